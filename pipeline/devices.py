"""Which device and precision a worker computes in, decided from what it was given, never guessed.

A worker given a GPU must use CUDA, or fail in one line saying why (the torch build's CUDA
version needs a recent NVIDIA driver); a worker given no GPU never touches CUDA, even when the
node has GPUs that Ray leaves visible. Precision follows the device: fp32 on CPU, bf16 autocast
on GPUs with fast bf16 (compute capability >= 8.0), fp16 with loss scaling on older ones.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from pipeline.errors import UserError

log = logging.getLogger("imgpipe")

# The oldest NVIDIA driver each CUDA major version of the torch build runs on (NVIDIA's
# compatibility table): torch 2.14's default wheels are CUDA 13.0 builds.
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
NVIDIA_PROC = Path("/proc/driver/nvidia/version")


class DeviceError(UserError):
    """A worker that was given a GPU cannot use it; the message says why and what to do."""


def driver_version(proc: Path = NVIDIA_PROC) -> str | None:
    """The loaded NVIDIA kernel driver's version ("580.65.06"), or None when there is none."""
    try:
        match = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+\.\d+(?:\.\d+)?)", proc.read_text())
    except OSError:
        return None
    return match.group(1) if match else None


def cuda_missing_message(found_driver: str | None, torch_cuda: str | None = torch.version.cuda) -> str:
    """One line: why CUDA is unusable here and what the torch build needs."""
    if torch_cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build; install the CUDA build of torch on the GPU nodes"
    need = MIN_DRIVER.get(int(torch_cuda.split(".")[0]))
    need_text = f"an NVIDIA driver >= {need}" if need else "a matching NVIDIA driver"
    found = f"driver {found_driver} found" if found_driver else "no NVIDIA driver found (/proc/driver/nvidia/version)"
    return (
        f"a GPU was assigned but CUDA is not usable: torch {torch.__version__} "
        f"is built for CUDA {torch_cuda} and needs "
        f"{need_text} (or the cuda-compat package); {found}. Use the image in cluster/ or upgrade the driver"
    )


def assigned_gpus() -> list | None:
    """The GPU ids Ray gave this task or actor, or None outside one (a driver, a script, a test):
    nothing was assigned there, so a caller that asks for CUDA gets it when the machine has it.
    Never starts Ray: `ray.get_gpu_ids()` in a process without Ray would start a local one."""
    import ray

    if not ray.is_initialized():
        return None
    from ray._private.worker import WORKER_MODE, global_worker

    return ray.get_gpu_ids() if global_worker.mode == WORKER_MODE else None


def worker_device(use_gpu: bool, gpu_ids: list | None = None) -> torch.device:
    """The device for a worker: CUDA exactly when it was assigned GPUs (`ray.get_gpu_ids()`),
    else CPU. Assigned but unusable is an error, never a silent CPU run."""
    if not use_gpu:
        return torch.device("cpu")
    if gpu_ids is not None and not gpu_ids:
        raise DeviceError(
            "use_gpu is set but Ray assigned this worker no GPU; request GPUs per worker (gpus_per_worker)"
        )
    if not torch.cuda.is_available():
        raise DeviceError(cuda_missing_message(driver_version()))
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if not has_kernels(major, minor, torch.cuda.get_arch_list()):
        raise DeviceError(
            f"{torch.cuda.get_device_name(index)} (sm_{major}{minor}) has no kernels in this torch build "
            f"({', '.join(torch.cuda.get_arch_list())}); use GPUs of compute capability 7.5 or newer"
        )
    return torch.device("cuda", index)


def has_kernels(major: int, minor: int, arch_list: list[str]) -> bool:
    """Whether a build with `arch_list` (sm_75, sm_80, ...) runs on compute capability major.minor:
    binaries run on the same major version at the same or a newer minor."""
    built = [re.fullmatch(r"sm_(\d+?)(\d)", a) for a in arch_list]
    return any(m and int(m.group(1)) == major and int(m.group(2)) <= minor for m in built)


def resolve_precision(requested: str, device: torch.device) -> str:
    """fp32 | bf16 | fp16 for `requested` (auto | fp32 | bf16 | fp16) on `device`."""
    if device.type != "cuda":
        if requested in ("bf16", "fp16"):
            log.info("precision %s asked for on CPU: computing in fp32 (CPU autocast is slower here)", requested)
        return "fp32"
    fast_bf16 = torch.cuda.get_device_capability(device)[0] >= 8
    if requested == "auto":
        return "bf16" if fast_bf16 else "fp16"
    if requested == "bf16" and not fast_bf16:
        log.warning("bf16 asked for on a GPU below compute capability 8.0: emulated and slow; fp16 is the fast choice")
    return requested


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision, None for fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def describe(device: torch.device, precision: str) -> str:
    """`cuda:0 NVIDIA H100 80GB HBM3 (sm_90, driver 580.65), bf16` or `cpu (8 threads), fp32`."""
    if device.type != "cuda":
        return f"cpu ({torch.get_num_threads()} threads), {precision}"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{device} {torch.cuda.get_device_name(device)} (sm_{major}{minor}, driver {driver_version()}), {precision}"
