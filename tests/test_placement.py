"""Model-actor placement from node tables (no GPU needed): GPU nodes, mixed GPU and CPU-only
nodes, an autoscaling GPU group at zero, precision by accelerator type; and on the real local Ray,
a bounded wait for GPUs that never come, and a CPU actor that never touches CUDA."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from pipeline import placement, schema
from pipeline.config import ModelConfig
from pipeline.placement import NoGPUs, plan_model_actors


def node(name: str, cpus: float, gpus: float = 0, accelerator: str | None = None, alive: bool = True) -> dict:
    resources = {
        "CPU": cpus,
        **({"GPU": gpus} if gpus else {}),
        **({f"accelerator_type:{accelerator}": 1} if accelerator else {}),
    }
    return {"NodeID": name, "Alive": alive, "Resources": resources}


def placeable(plan, nodes) -> bool:
    """Every GPU node can hold its GPUs' actors with their CPU share."""
    return all(
        int(n["Resources"]["GPU"] // plan.num_gpus) * plan.num_cpus <= n["Resources"]["CPU"]
        for n in nodes
        if n["Resources"].get("GPU")
    )


def test_cpu_plan_leaves_cpus_to_decoding_and_never_outnumbers_the_batches():
    plan = plan_model_actors([node("laptop", 4)], cores=2)
    # one CPU token per single-threaded actor: the 2 left over (4 logical CPUs on 2 cores) run reads and decode
    assert (plan.size, plan.num_gpus, plan.threads, plan.num_cpus, plan.compute) == (2, 0.0, 1, 1.0, "cpu/fp32")
    one = plan_model_actors([node("laptop", 4)], batches=1, cores=2)  # one batch: one actor, both cores
    assert (one.size, one.num_cpus, one.threads) == (1, 2.0, 2)
    assert plan_model_actors([node("big", 64), node("dead", 64, alive=False)]).size == 48


def test_a_cpu_actor_never_asks_for_more_cpus_than_one_node_has():
    nodes = [node("head", 2), node("w1", 2), node("w2", 2)]
    plan = plan_model_actors(nodes, requested=2)  # 5 free CPUs over 2 actors would be 2.5 each
    assert plan.size == 2 and plan.num_cpus == 2


def test_cpu_work_can_be_kept_off_gpu_nodes():
    nodes = [node("head", 1), node("gpu-a", 8, gpus=1), node("cpu-a", 4), node("cpu-b", 4)]
    on_gpus = plan_model_actors(nodes, cpu_only="features.cpu_only_nodes")
    assert on_gpus.device == "cuda" and on_gpus.cpu_remote_args == {"label_selector": {"ray.io/node-id": "!in(gpu-a)"}}
    on_cpus = plan_model_actors(nodes, device="cpu", cpu_only="features.cpu_only_nodes")
    # sized from the 9 CPUs off the GPU node (7 after the decode share), not from all 17
    assert (on_cpus.size, on_cpus.num_cpus) == (7, 1.0) and on_cpus.cpu_selector == (("ray.io/node-id", "!in(gpu-a)"),)
    assert plan_model_actors(nodes, device="cpu").size == 13 and plan_model_actors(nodes).cpu_remote_args == {}
    assert plan_model_actors([node("laptop", 4)], cpu_only="x", cores=2).cpu_remote_args == {}  # nothing to avoid
    with pytest.raises(ValueError, match="classify.cpu_only_nodes is set, but every node of the cluster has GPUs"):
        plan_model_actors([node("gpu-a", 8, gpus=1)], cpu_only="classify.cpu_only_nodes")
    assert placement.describe_cluster(nodes) == "4 nodes (1 with GPUs): 17 CPUs, 1 GPU"


def test_an_8_gpu_node_gets_an_autoscaling_pool_of_gpu_actors():
    nodes = [node("gpu", 64, gpus=8, accelerator="H100")]
    plan = plan_model_actors(nodes)
    assert (plan.min_size, plan.max_size, plan.num_gpus, plan.num_cpus, plan.compute) == (1, 8, 1.0, 1.0, "cuda/bf16")
    assert placeable(plan, nodes)
    half = plan_model_actors(nodes, gpus_per_actor=0.5)
    assert half.max_size == 16 and placeable(half, nodes)


def test_gpu_actors_take_their_cpu_share_from_the_gpu_nodes_not_the_cluster():
    # Cluster totals (88 CPUs / 4 GPUs) would give each actor a full CPU; the GPU node has 6 for 4 GPUs.
    nodes = [node("head", 16), node("cpu-pool", 64), node("gpu", 6, gpus=4, accelerator="A100")]
    plan = plan_model_actors(nodes)
    assert plan.num_cpus == pytest.approx(0.38) and placeable(plan, nodes)
    tight = [node("gpu", 6, gpus=8, accelerator="L4")]
    assert placeable(plan_model_actors(tight), tight)  # 8 actors x 0.19 CPU fit in 6


def test_no_gpu_now_auto_runs_on_cpus_and_cuda_insists():
    nodes = [node("head", 8), node("cpu", 16)]
    assert plan_model_actors(nodes, device="auto").device == "cpu"
    with pytest.raises(NoGPUs, match="model.device=cuda, but the cluster has no GPU"):
        plan_model_actors(nodes, device="cuda")
    assert plan_model_actors([*nodes, node("gpu", 8, gpus=1)], device="cpu").device == "cpu"  # asked: CPU only


def test_more_actors_than_gpus_now_is_a_ceiling_for_a_growing_cluster():
    plan = plan_model_actors([node("gpu", 16, gpus=2)], requested=8)
    assert (plan.min_size, plan.max_size) == (1, 8)
    assert plan_model_actors([node("gpu", 16, gpus=8)], requested=8, batches=3).max_size == 3


def test_precision_follows_the_accelerators_and_is_part_of_the_plan():
    assert plan_model_actors([node("gpu", 8, gpus=1, accelerator="T4")]).compute == "cuda/fp16"  # no fast bf16
    mixed = [node("a", 8, gpus=1, accelerator="A100"), node("v", 8, gpus=1, accelerator="V100")]
    assert plan_model_actors(mixed).precision == "fp16"  # one dtype for the whole run
    assert plan_model_actors([node("gpu", 8, gpus=1)], precision="fp32").compute == "cuda/fp32"
    assert "1..4 x (0.5 CPU, 1 GPU, 1 torch threads), cuda bf16" in plan_model_actors([node("g", 8, gpus=4)]).describe()


@pytest.mark.timeout(120)
def test_cuda_without_gpus_fails_in_one_line_after_the_bounded_wait(ray_session):
    started = time.monotonic()
    with pytest.raises(NoGPUs, match=r"no GPU joined the cluster within model.gpu_wait_s=1 s; add a GPU worker group"):
        placement.plan_actors(ModelConfig(device="cuda", gpu_wait_s=1), None, 10, 2)
    assert time.monotonic() - started < 30


def test_a_cpu_actor_on_a_node_with_visible_gpus_never_touches_cuda(monkeypatch):
    from pipeline.features import Embedder
    from pipeline.models import resolve_weights

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # what Ray leaves to an actor that asked for no GPU
    actor = Embedder(resolve_weights("simple_cnn", "none"), "float16", device="cpu")
    batch = {
        schema.KEY: np.array(["a", "b"], dtype=object),
        schema.LABEL: np.array([0, 1]),
        schema.SOURCE: np.array(["x", "y"], dtype=object),
        schema.SHARD: np.array(["s", "s"], dtype=object),
        schema.ERROR: np.array(["", "undecodable"], dtype=object),
        schema.PIXELS: np.zeros((2, 64, 64, 3), np.uint8),
    }
    out = actor(batch)
    assert out[schema.EMBEDDING].shape == (2, 256) and out[schema.EMBEDDING].dtype == np.float16
    assert not out[schema.EMBEDDING][1].any()  # the rejected row: zeros
    assert actor.device.type == "cpu" and not torch.cuda.is_initialized()


def test_a_run_computed_in_another_precision_is_another_run(tmp_path):
    from pipeline import parts, storage
    from pipeline.sources import Unit

    out = storage.resolve(str(tmp_path / "feats"))
    unit = Unit("train-000000", "train", 3, (), digest="sha256:aa")
    gpu = plan_model_actors([node("gpu", 8, gpus=1, accelerator="A100")])
    cpu = plan_model_actors([node("cpu", 8)])
    parts.write_run_file(out, "features.json", {"dim": "4", "compute": gpu.compute}, None, [unit])
    with pytest.raises(ValueError, match=r"differs in compute"):
        parts.plan_run(out, "features.json", {"dim": "4", "compute": cpu.compute}, [unit], [unit])
    assert parts.plan_run(out, "features.json", {"dim": "4", "compute": gpu.compute}, [unit], [unit])[1] == [unit]
