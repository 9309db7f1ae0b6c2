"""Where the work of a batch job lands on a mixed cluster (`ray.cluster_utils.Cluster`: a head, a
node that carries a GPU resource and a CPU-only node): with `features.cpu_only_nodes`, the reads,
the decoding and the CPU model actors all run on the CPU-only node, read back from Ray's own task
records (the State API), not from the job's word.

The GPU is a logical resource only (no CUDA here), which is all the scheduler sees; the model
actors run on CPUs (`model.device=cpu`), so that every piece of the job is CPU work.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from images import prepare_without_ray, write_imagefolder
from processes import free_port, ray_env
from test_faults import _finish, _job

ROOT = Path(__file__).parent.parent
pytestmark = [pytest.mark.multinode, pytest.mark.timeout(300)]

TASKS = """
import json, sys
import ray
from ray.util.state import list_tasks
ray.init(address=sys.argv[1], log_to_driver=False)
tasks = list_tasks(filters=[("state", "=", "FINISHED")], limit=10000, detail=True, raise_on_missing_output=False)
print(json.dumps([[t.name, t.node_id] for t in tasks]))
"""


@pytest.fixture(scope="module")
def mixed():
    """Head (1 CPU) + a 2-CPU node with one (logical) GPU + a 2-CPU node without; the dashboard is
    on, for the State API."""
    from ray.cluster_utils import Cluster

    made = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
        },
    )
    try:
        gpu = made.add_node(num_cpus=2, num_gpus=1)
        cpu = made.add_node(num_cpus=2)
        made.wait_for_nodes()
        yield made, gpu.node_id, cpu.node_id
    finally:
        made.shutdown()


def test_cpu_work_stays_off_the_node_with_a_gpu(mixed, tmp_path):
    made, gpu_node, cpu_node = mixed
    write_imagefolder(tmp_path / "raw", {"a": 24, "b": 24}, size=(32, 32))
    manifest = prepare_without_ray(str(tmp_path / "raw"), str(tmp_path / "prepared"), 8)
    settings = [
        f"features.source={tmp_path / 'prepared'}",
        f"features.output={tmp_path / 'features'}",
        "features.batch_size=8",
        "features.decode_batch=8",
        "features.cpu_only_nodes=true",
        "model.device=cpu",
    ]
    out, err = _finish(_job(made.address, "features", *settings), 240)
    n = manifest["samples"]
    assert f"inputs {n} = embedded {n} + rejected 0" in out
    # The plan line names the cluster and where the CPU work goes.
    assert "plan: 3 nodes (1 with GPUs): 5 CPUs, 1 GPU;" in err and "on CPU-only nodes" in err

    listed = subprocess.run(
        [sys.executable, "-c", TASKS, made.address], capture_output=True, text=True, timeout=120, env=ray_env()
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    tasks = json.loads(listed.stdout.strip().splitlines()[-1])
    job_tasks = [  # (a record without a node is a task Ray dropped the event of; none such can be placed)
        (name, node) for name, node in tasks if node and any(k in name for k in ("_read", "EvalTransform", "Embedder"))
    ]
    names = {name for name, _ in job_tasks}
    assert any("Embedder" in name for name in names) and any("EvalTransform" in name for name in names), names
    on_gpu_node = [name for name, node in job_tasks if node == gpu_node]
    assert on_gpu_node == [], f"CPU work ran on the GPU node: {sorted(set(on_gpu_node))}"
    assert {node for _, node in job_tasks} <= {cpu_node, made.head_node.node_id}
    assert any(node == cpu_node for _, node in job_tasks)
