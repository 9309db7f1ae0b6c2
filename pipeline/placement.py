"""Where the model actors of `features` and `classify` run, and with what: a pure function of the
cluster's node table (`ray.nodes()`), so that every cluster shape (8-GPU nodes, GPU nodes beside
CPU-only nodes, an autoscaling GPU group now at zero) is planned, and tested, on a laptop.

- `model.device: auto` uses GPUs when the cluster has some now, else CPUs; `cuda` insists on
  GPUs: it asks the autoscaler for them and waits (`model.gpu_wait_s`), then fails in one line.
- A GPU pool autoscales from one actor up to the GPU slots (or `actors`), so a growing cluster
  gets more actors and asking for more than there are GPUs now is a ceiling, not a hang.
- A GPU actor's CPU share comes from the GPU nodes' own CPU:GPU ratio (not cluster totals, which
  count CPU-only nodes): the rest of each GPU node's CPUs decode for its GPUs.
- The compute precision is decided here, on the driver, from the GPUs' accelerator types, so it
  can be part of a run's identity: a resume on another cluster never mixes bf16 and fp16 rows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from pipeline.errors import UserError

log = logging.getLogger("imgpipe")

# GPUs without fast bf16 (compute capability < 8.0), by Ray's accelerator_type resource name.
PRE_AMPERE = {"V100", "T4", "P100", "P40", "P4", "K80", "M60", "K40", "P6"}
GPU_CPU_SHARE = 0.25  # of a GPU node's CPUs per GPU, for the actor feeding that GPU; the rest decode


class NoGPUs(UserError):
    """`model.device=cuda`, and the cluster has no GPU (now, or within the wait)."""


@dataclass(frozen=True)
class ActorPlan:
    """How many model actors (a range: the pool autoscales), what each holds, and how it computes."""

    min_size: int
    max_size: int
    num_cpus: float
    num_gpus: float
    threads: int  # torch intra-op threads per actor
    device: str  # "cuda" | "cpu"
    precision: str  # "bf16" | "fp16" | "fp32"
    start_wait_s: float = -1  # how long the pool may take to start its first actor; -1: no bound
    cpu_selector: tuple[tuple[str, str], ...] = ()  # label selector of CPU work (reads, decode, CPU actors)
    engine: str = "eager"  # how the actors run the backbone (`engine.choose`)

    @property
    def cpu_remote_args(self) -> dict:
        """`ray_remote_args` that place CPU work per the plan: {} (anywhere) or a label selector."""
        return {"label_selector": dict(self.cpu_selector)} if self.cpu_selector else {}

    @property
    def size(self) -> int:
        """The most actors the pool may run."""
        return self.max_size

    @property
    def compute(self) -> str:
        """`cuda/bf16`, `cpu/fp32`: what a run's outputs were computed in."""
        return f"{self.device}/{self.precision}"

    def describe(self) -> str:
        """One line for the job's log."""
        count = f"{self.min_size}" if self.min_size == self.max_size else f"{self.min_size}..{self.max_size}"
        return (
            f"model actors: {count} x ({self.num_cpus:.2g} CPU, {self.num_gpus:g} GPU, {self.threads} torch threads), "
            f"{self.device} {self.precision}, {self.engine}"
        )


def plan_model_actors(
    nodes: list[dict],
    *,
    requested: int | None = None,
    batches: int | None = None,
    device: str = "auto",
    gpus_per_actor: float = 1.0,
    precision: str = "auto",
    cores: int | None = None,
    cpu_only: str | None = None,
) -> ActorPlan:
    """The plan for this node table. `requested` caps the actors, `batches` too (no idle actors);
    `cores` caps CPU actors (an embedded Ray has more logical CPUs than cores). `cpu_only` (the
    setting's name, when set) keeps CPU work, CPU model actors included, off the nodes with GPUs."""
    alive = [n for n in nodes if n.get("Alive", True)]
    gpu_nodes = [n for n in alive if n["Resources"].get("GPU", 0) > 0]
    if device == "cuda" and not gpu_nodes:
        raise NoGPUs("model.device=cuda, but the cluster has no GPU")
    selector = tuple(sorted(cpu_only_selector(alive, cpu_only).items())) if cpu_only else ()
    if device == "cpu" or not gpu_nodes:
        hosts = [n for n in alive if not n["Resources"].get("GPU", 0)] if selector else alive
        return replace(_cpu_plan(hosts, requested, batches, cores), cpu_selector=selector)
    slots = sum(int(n["Resources"]["GPU"] // gpus_per_actor) for n in gpu_nodes)
    if slots < 1:
        raise UserError(
            f"model.gpus_per_actor={gpus_per_actor} is more than any node has; the GPU nodes have "
            f"{sorted({n['Resources']['GPU'] for n in gpu_nodes})} GPUs"
        )
    top = min(requested or slots, batches or requested or slots)
    if requested and requested > slots:
        log.info(
            "%d model actors asked for, %d GPU slots now: the pool grows as the cluster adds GPUs", requested, slots
        )
    ratio = min(n["Resources"].get("CPU", 0) / n["Resources"]["GPU"] for n in gpu_nodes)
    num_cpus = round(max(0.1, min(1.0, ratio * gpus_per_actor * GPU_CPU_SHARE)), 2)
    precision = gpu_precision(precision, gpu_nodes)
    return ActorPlan(1, max(1, top), num_cpus, gpus_per_actor, 1, "cuda", precision, cpu_selector=selector)


def _cpu_plan(alive: list[dict], requested: int | None, batches: int | None, cores: int | None) -> ActorPlan:
    """Single-threaded actors, one per CPU, after leaving a quarter of the CPUs (one at least) to
    the read and decode tasks, which otherwise starve while Ray waits for ever (docs/ARCHITECTURE.md, section 6).
    Separate actors beat intra-op threads for these small convnets (2 cores, Lite0: 2 actors x 1
    thread 45 img/s, 1 actor x 2 threads 36 img/s)."""
    cpus = int(sum(n["Resources"].get("CPU", 0) for n in alive))
    cores = cores or cpus
    free = max(1.0, cpus - max(1, cpus // 4))
    size = requested or max(1, min(int(free), cores, batches or cores))
    # Never more tokens than the cores an actor can use: the logical CPUs beyond the cores (an embedded Ray has
    # twice as many) go to the read and decode tasks. Spread over the actors instead (1.5 each on 2 cores), they
    # left one task slot, which an I/O-bound read held for seconds while decode waited and the actors starved.
    # Never more than one node has: an actor no node can hold waits for ever, silently.
    per_actor = max(0.25, min(free / size, cores / size, max(n["Resources"].get("CPU", 0) for n in alive)))
    threads = max(1, min(int(per_actor), cores))  # threads only when asked for fewer, bigger actors
    return ActorPlan(size, size, per_actor, 0.0, threads, "cpu", "fp32")


def cpu_only_selector(nodes: list[dict], setting: str, labels: dict[str, str] | None = None) -> dict[str, str]:
    """A Ray node-label selector (`label_selector` of a task or actor) that keeps CPU work off the
    nodes with GPUs alive now, plus `labels`; {} when no node has a GPU (nothing to avoid). A
    cluster whose every node has GPUs fails here in one line naming `setting`, not in a task that
    waits for ever. GPU nodes that join later are not excluded: label the CPU group (the node
    labels in cluster/) and select it with `labels` too on an autoscaling cluster."""
    selector = dict(labels or {})
    alive = [n for n in nodes if n.get("Alive", True)]
    gpu_nodes = sorted(n["NodeID"] for n in alive if n["Resources"].get("GPU", 0))
    if not gpu_nodes:
        return selector
    if len(gpu_nodes) == len(alive):
        raise UserError(f"{setting} is set, but every node of the cluster has GPUs; add CPU-only nodes or unset it")
    selector["ray.io/node-id"] = f"!in({','.join(gpu_nodes)})"
    return selector


def describe_cluster(nodes: list[dict]) -> str:
    """`3 nodes (1 with GPUs): 10 CPUs, 1 GPU` for the plan line."""
    alive = [n for n in nodes if n.get("Alive", True)]
    with_gpus = sum(1 for n in alive if n["Resources"].get("GPU", 0))
    cpus = sum(n["Resources"].get("CPU", 0) for n in alive)
    gpus = sum(n["Resources"].get("GPU", 0) for n in alive)
    return f"{_count(len(alive), 'node')} ({with_gpus} with GPUs): {_count(cpus, 'CPU')}, {_count(gpus, 'GPU')}"


def _count(n: float, noun: str) -> str:
    return f"{n:g} {noun}{'' if n == 1 else 's'}"


def gpu_precision(requested: str, gpu_nodes: list[dict]) -> str:
    """bf16 where every GPU has fast bf16, fp16 where some do not (auto); else as asked."""
    if requested != "auto":
        return requested
    types = {k.split(":", 1)[1] for n in gpu_nodes for k in n["Resources"] if k.startswith("accelerator_type:")}
    return "fp16" if types & PRE_AMPERE else "bf16"


def plan_actors(
    model_cfg, requested: int | None, batches: int | None, cores: int | None, cpu_only: str | None = None
) -> ActorPlan:
    """`plan_model_actors` for the connected cluster; with `model.device=cuda` and no GPU yet, ask
    the autoscaler for one actor's GPUs and wait up to `model.gpu_wait_s`, then fail in one line."""
    import ray

    kwargs = dict(
        requested=requested,
        batches=batches,
        device=model_cfg.device,
        gpus_per_actor=model_cfg.gpus_per_actor,
        precision=model_cfg.precision,
        cores=cores,
        cpu_only=cpu_only,
    )
    try:
        return _bounded(plan_model_actors(ray.nodes(), **kwargs), model_cfg.gpu_wait_s)
    except NoGPUs:
        pass
    from ray.autoscaler.sdk import request_resources

    log.info(
        "model.device=cuda and no GPU in the cluster yet: asking the autoscaler, waiting up to %g s",
        model_cfg.gpu_wait_s,
    )
    request_resources(bundles=[{"GPU": model_cfg.gpus_per_actor}])
    deadline = time.monotonic() + model_cfg.gpu_wait_s
    while time.monotonic() < deadline:
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
        try:
            return _bounded(plan_model_actors(ray.nodes(), **kwargs), model_cfg.gpu_wait_s)
        except NoGPUs:
            continue
    raise NoGPUs(
        f"model.device=cuda, but no GPU joined the cluster within model.gpu_wait_s={model_cfg.gpu_wait_s:g} s; "
        "add a GPU worker group (see cluster/), raise the wait, or set model.device=auto to run on CPUs"
    )


def _bounded(plan: ActorPlan, wait_s: float) -> ActorPlan:
    return replace(plan, start_wait_s=wait_s) if plan.device == "cuda" else plan
