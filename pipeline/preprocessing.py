"""What a model expects of its input (size, resize, interpolation, mean/std), and the one place
where uint8 pixels become normalised float tensors: on the model's device, not in the pipeline."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import UserError

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: the loader's actors and tasks import this module for
# `Preprocessing` alone, and an import of torch costs a new Ray worker about 1.5 CPU-seconds.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocessing:
    """Eval preprocessing of a model's weights: resize short side, centre crop, normalise."""

    crop_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"unknown interpolation {self.interpolation!r}; known: {', '.join(INTERPOLATIONS)}")
        if self.resize_size < self.crop_size:
            raise UserError(f"resize_size {self.resize_size} is smaller than crop_size {self.crop_size}")

    def to_dict(self) -> dict:
        """JSON-ready form, for Parquet metadata and model sidecars."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        """Inverse of `to_dict`."""
        return cls(
            crop_size=int(data["crop_size"]),
            resize_size=int(data["resize_size"]),
            interpolation=str(data["interpolation"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
        )


def readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor view of an array that is only read (Ray hands batches out read-only): no copy,
    and no "not writable" warning for a tensor that is never written."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(array))


class DeviceNormalizer:
    """uint8 NHWC on a device -> normalised float NCHW there; mean and std live on the device,
    built once (two small host-to-device copies per call would synchronise the stream)."""

    def __init__(self, prep: Preprocessing, device: torch.device, channels_last: bool = True):
        import torch

        self.mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1) * 255.0
        self.format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.permute(0, 3, 1, 2).float()
        return ((x - self.mean) / self.std).contiguous(memory_format=self.format)


def to_model_input(
    pixels: np.ndarray | torch.Tensor, prep: Preprocessing, device: torch.device, channels_last: bool = True
) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> normalised float32 (N, 3, H, W) on `device`, channels-last unless asked not.

    The uint8 batch crosses to the device (4x fewer bytes than float, pinned for an async copy
    on GPU) and is converted there. Permuting NHWC gives channels-last NCHW without a copy.
    """
    batch = readonly_tensor(pixels) if isinstance(pixels, np.ndarray) else pixels
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    return DeviceNormalizer(prep, device, channels_last)(batch)
