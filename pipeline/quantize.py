"""`model.quantize=int8`: the ONNX export quantised to int8 (static, QDQ) by ONNX Runtime, for CPUs.

Static quantisation, because it holds accuracy where dynamic does not: on real photos (EfficientNet-Lite0,
`tests/test_quantize.py`) static int8 keeps embedding cosine with fp32 at 0.99+ and about 95% of top-1,
while dynamic int8 (ConvInteger) kept 51-75% of top-1 and ran slower than fp32. Activations are calibrated
(min/max) on the job's first images, shipped to the actors with the weights; weights are int8 per
channel. Only the data path is quantised: timm's TF-"same" padding computes its pad widths in float
ops (Shape -> Div -> Ceil -> Clip), and quantising those shifts the whole image by a pixel (top-1
agreement fell to 60% when they were).

On x86 CPUs without VNNI, weights are quantised to 7 bits (ONNX Runtime's `reduce_range`). There its
uint8 x int8 kernels add pairs of products in 16 bits (VPMADDUBSW), and with full 8-bit weights the sums
saturate: on an AVX2-only CPU, EfficientNet-Lite0's top-1 agreement with fp32 fell to 74% and the worst
embedding cosine to 0.79. With 7-bit weights they were 82% and 0.95, at 1.3x fp32's speed; uint8 weights
held 91% but ran at a quarter of fp32's speed. A job takes its driver's width (`precision`), which becomes
its outputs' `compute`, so a resume never mixes the two; a node that needs 7 bits refuses an 8-bit plan.

The quantised model is cached beside the fp32 export, keyed by it, by the calibration images' digest and
by the weights' bits, under the same kind of file lock: the first actor of a node quantises, the others load.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import time
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

log = logging.getLogger("imgpipe")

CALIBRATION_IMAGES = 64  # the job's first decodable images; min/max ranges settle well before that
CALIBRATION_BATCH = 8


def calibration_digest(pixels: np.ndarray) -> str:
    """A short digest of the calibration images (uint8 NHWC), for the quantised model's file name."""
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()[:16]


def weights_in_7_bits(machine: str | None = None, cpuinfo: str | None = None) -> bool:
    """Whether int8 weights must keep to 7 bits on this CPU: x86 without VNNI (or AMX), where 8-bit
    weights saturate ONNX Runtime's kernels. An x86 CPU whose flags cannot be read is taken to lack it."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return False  # ARM's int8 dot products add in 32 bits
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True
    return not re.search(r"\b(avx512_vnni|avx_vnni|amx_int8)\b", cpuinfo)


def precision() -> str:
    """The int8 precision this CPU runs: `int8w7` (7-bit weights) or `int8`. A job takes its driver's, and it
    becomes the outputs' `compute` (`cpu/int8w7`), so rows of the two widths never mix in one output."""
    return "int8w7" if weights_in_7_bits() else "int8"


def is_int8(precision: str) -> bool:
    """Whether a plan's precision is one of the int8 widths (`int8`, `int8w7`)."""
    return precision.startswith("int8")


def check_node(planned: str, needs_7_bits: bool) -> None:
    """Refuse 8-bit weights on a CPU they saturate (a driver with VNNI, a node without); 7-bit weights run
    right everywhere."""
    if planned == "int8" and needs_7_bits:
        raise UserError(
            "model.quantize=int8: this node's CPU has no VNNI, where 8-bit int8 weights give wrong embeddings, "
            "but the job's driver has VNNI and chose them; run the job's driver on a node without VNNI (its "
            "7-bit weights run right on every CPU), or set model.quantize=none"
        )


def int8_model(fp32: Path, calibration: np.ndarray, digest: str, planned: str) -> tuple[Path, bool]:
    """The int8 version (`planned`: `int8` or `int8w7`) of the ONNX model `fp32`, calibrated on `calibration`
    (normalised float NCHW), made once per node and cached; returns (its path, whether this call made it)."""
    from filelock import FileLock

    check_node(planned, weights_in_7_bits())
    bits = "w7" if planned == "int8w7" else ""
    path = fp32.with_name(f"{fp32.stem}-int8{bits}-{digest}.onnx")
    with FileLock(str(path) + ".lock", timeout=600):
        if path.exists():
            return path, False
        started = time.perf_counter()
        partial = path.with_suffix(f".{os.getpid()}.partial")
        quantize_static_int8(fp32, calibration, partial, reduce_range=bool(bits))
        partial.replace(path)  # whole or absent
        how = " (7-bit weights)" if bits else ""
        log.info("engine: quantised %s to int8%s in %.1f s", fp32.name, how, time.perf_counter() - started)
    return path, True


def quantize_static_int8(fp32: Path, calibration: np.ndarray, out: Path, reduce_range: bool = False) -> None:
    """Static QDQ quantisation: uint8 activations (min/max over `calibration`), int8 weights per channel
    (7 bits with `reduce_range`), the pad-width arithmetic left in float."""
    import tempfile

    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnxruntime.set_default_logger_severity(3)  # its calibration sessions list every unused initializer
    with tempfile.TemporaryDirectory() as work:
        prepared = Path(work) / "prepared.onnx"  # shapes inferred, graph optimised: what the quantiser expects
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        on_path = data_path_nodes(model)
        quantize_static(
            model,
            str(out),
            CalibrationBatches(model.graph.input[0].name, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=[n.name for n in model.graph.node if n.name not in on_path],
        )


def data_path_nodes(model) -> set[str]:
    """Names of the nodes the input's values flow through; shape arithmetic (everything that hangs
    off a `Shape` node) is not on it."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    seen: set[str] = set()
    todo = [model.graph.input[0].name]
    while todo:
        for node in consumers.get(todo.pop(), []):
            if node.op_type != "Shape" and node.name not in seen:
                seen.add(node.name)
                todo.extend(node.output)
    return seen


class CalibrationBatches:
    """ONNX Runtime's calibration data reader over an in-memory array, in small batches."""

    def __init__(self, input_name: str, pixels: np.ndarray):
        batches = [pixels[i : i + CALIBRATION_BATCH] for i in range(0, len(pixels), CALIBRATION_BATCH)]
        self.batches = iter([{input_name: np.ascontiguousarray(b, dtype=np.float32)} for b in batches])

    def get_next(self) -> dict | None:
        return next(self.batches, None)
