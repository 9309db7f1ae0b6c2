"""The cluster definitions a user deploys (cluster/): the launcher YAML against the schema the ray package
ships, the KubeRay RayCluster and RayJobs (entrypoints that run, configs that load, resources that fit
their nodes), and the Dockerfile's versions. No cloud here: these checks stand in for `ray up` and
`kubectl apply`."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from cluster.submit import job_arguments, job_module
from jobs.cli import JOBS

ROOT = Path(__file__).parent.parent
KUBERAY = ROOT / "cluster" / "kuberay"
# What each instance type offers: vCPUs, GiB, GPUs (AWS's published sizes).
INSTANCES = {"m6i.2xlarge": (8, 32, 0), "g5.2xlarge": (8, 32, 1), "c6i.8xlarge": (32, 64, 0)}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def launcher_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_aws_launcher_config_is_valid_and_fits_its_instances():
    config = load(ROOT / "cluster" / "aws.yaml")
    jsonschema.validate(config, launcher_schema())
    types = config["available_node_types"]
    assert config["head_node_type"] in types and set(types) == {"head", "gpu_workers", "cpu_workers"}
    assert types["head"]["resources"] == {"CPU": 0}  # drivers only
    for name, node in types.items():
        vcpus, _, gpus = INSTANCES[node["node_config"]["InstanceType"]]
        assert node["resources"].get("CPU", vcpus) <= vcpus and node["resources"].get("GPU", 0) <= gpus, name
        if name != "head":
            assert 0 <= node["min_workers"] <= node["max_workers"] <= config["max_workers"], name
    assert types["gpu_workers"]["resources"]["GPU"] == 1 and "GPU" not in types["cpu_workers"]["resources"]
    assert config["docker"]["image"].endswith(":0.1.0")
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]


@pytest.mark.parametrize("breakage", ["string resource", "unknown docker key", "no provider"])
def test_the_schema_check_catches_a_broken_launcher_config(breakage):
    config = load(ROOT / "cluster" / "aws.yaml")
    bad = copy.deepcopy(config)
    if breakage == "string resource":
        bad["available_node_types"]["gpu_workers"]["resources"]["GPU"] = "one"
    elif breakage == "unknown docker key":
        bad["docker"]["imagee"] = bad["docker"].pop("image")
    else:
        del bad["provider"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, launcher_schema())


def rayjobs() -> dict[str, dict]:
    return {p.stem.removeprefix("rayjob-"): load(p) for p in sorted(KUBERAY.glob("rayjob-*.yaml"))}


def test_one_rayjob_per_job_each_running_a_real_module_with_a_config_that_loads():
    jobs = rayjobs()
    assert set(jobs) == set(JOBS)
    for job, doc in jobs.items():
        assert doc["kind"] == "RayJob" and doc["metadata"]["name"] == f"imgpipe-{job}"
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[:2] == ["python", "-m"] and argv[2] == f"jobs.{job_module(job, JOBS)}"
        assert argv[3] == "--config" and (ROOT / argv[4]).is_file()
        # The same check `imgpipe submit` makes: the config loads with the overrides, and the job's
        # data paths are URIs that mean the same on every pod.
        assert job_arguments(argv[3:], "head" if job == "train-head" else job, cwd=ROOT) == argv[3:]
        assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["working_dir"] == "/home/ray/imgpipe"


def test_rayjobs_run_on_the_raycluster_shape():
    cluster = load(KUBERAY / "raycluster.yaml")
    for job, doc in rayjobs().items():
        assert doc["spec"]["rayClusterSpec"] == cluster["spec"], f"rayjob-{job}.yaml drifted from raycluster.yaml"
        assert doc["spec"]["shutdownAfterJobFinishes"] is True


def test_raycluster_resources_add_up():
    spec = load(KUBERAY / "raycluster.yaml")["spec"]
    assert spec["rayVersion"] == ray.__version__ and spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu-workers", "cpu-workers"}
    for name, group in [("head", head), *groups.items()]:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        res = container["resources"]
        assert res["requests"] == res["limits"], f"{name}: Ray sizes itself from limits; requests must match"
        vcpus, gib, gpus = INSTANCES[pod["nodeSelector"]["node.kubernetes.io/instance-type"]]
        # Leave a CPU and a tenth of the memory to the kubelet and the node's daemons.
        assert int(res["limits"]["cpu"]) <= vcpus - 1 and _gib(res["limits"]["memory"]) <= 0.9 * gib, name
        assert int(res["limits"].get("nvidia.com/gpu", 0)) <= gpus, name
        assert container["image"] == head["template"]["spec"]["containers"][0]["image"]
        if name != "head":
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
    gpu = groups["gpu-workers"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == gpu["rayStartParams"]["num-gpus"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])
    assert "nvidia.com/gpu" not in groups["cpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_dockerfile_builds_the_pinned_ray_with_the_tested_packages():
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)-py311-gpu$", text, re.M)
    pinned = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert base and base.group(1) == pinned == ray.__version__
    for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M):
        assert all((ROOT / src).exists() for src in line.split()[:-1]), line
    assert 'pip install --no-cache-dir -c constraints.txt ".[onnx]"' in text


def _gib(quantity: str) -> float:
    match = re.fullmatch(r"(\d+)Gi", quantity)
    assert match, f"memory {quantity!r}: write it in Gi"
    return float(match.group(1))
