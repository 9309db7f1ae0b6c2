"""How the frozen backbone runs in the model actors of `features` and `classify` (`model.engine`).

- `eager`: PyTorch as it is (channels-last; on GPU bf16/fp16 autocast, see `devices`).
- `onnxruntime`: the backbone exported once to ONNX and run by ONNX Runtime's CPU kernels, which
  fuse convolution, batch norm and activation and pick AVX-512/AVX2 kernels for the machine.
  Outputs agree with eager fp32 to float rounding (cosine > 0.9999; `tests/test_engine.py`).
- `compile`: `torch.compile` (inductor) on CPU or GPU, one fixed batch shape (batches are padded), its
  compiled artefacts in the node's cache (`<cache>/inductor`), so the node's other actors and later jobs load
  them instead of compiling again; the first actor compiles under a file lock. On one CPU core it beats eager
  channels-last ~2x but loses to ONNX Runtime (`bench/bench_engines.py`), so `auto` does not pick it.
- `model.quantize=int8` (opt-in, CPUs): the export quantised to static int8 (`pipeline.quantize`).
- `auto`: `onnxruntime` on CPU when the package is installed (`pip install imgpipe[onnx]`),
  `eager` on GPU (ONNX Runtime's CUDA provider is not part of the install) and when it is not.

The export is cached on the node's disk (`IMGPIPE_CACHE`, default `~/.cache/imgpipe`), keyed by
the weights' digest, the crop size and the torch version; a file lock makes the first actor of a
node export it while the others wait and then load the same file, so a job pays for one export
per node, once, and later jobs pay for none.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError

log = logging.getLogger("imgpipe")

ENGINES = ("auto", "eager", "onnxruntime", "compile")
QUANTIZE = ("none", "int8")
OPSET = 17


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def choose(requested: str, device: str, digest: str = "x", quantize: str = "none") -> str:
    """The engine a plan runs: `requested` (auto | eager | onnxruntime | compile) on `device` (cpu | cuda).
    A backbone without a weights digest (random init) always runs eager: there is nothing stable
    to key a cached export by. `quantize=int8` needs the engine to be ONNX Runtime, on CPUs."""
    if requested not in ENGINES:
        raise UserError(f"model.engine must be one of {', '.join(ENGINES)}, got {requested!r}")
    if quantize not in QUANTIZE:
        raise UserError(f"model.quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    what, other = ("quantize=int8", "quantize=none") if quantize == "int8" else ("engine=onnxruntime", "engine=eager")
    if device == "cuda":
        if requested == "onnxruntime" or quantize == "int8":
            raise UserError(f"model.{what} runs on CPUs only; on GPUs set model.{other} (or model.engine=compile)")
        return "compile" if requested == "compile" else "eager"
    if requested == "compile" and quantize != "int8":
        return requested
    if (requested == "onnxruntime" or quantize == "int8") and not onnxruntime_installed():
        raise UserError(
            f"model.{what} needs the onnxruntime and onnx packages: pip install 'imgpipe[onnx]', or set model.{other}"
        )
    if requested == "auto":
        requested = "onnxruntime" if onnxruntime_installed() else "eager"
    engine = requested if digest else "eager"
    if quantize == "int8" and engine != "onnxruntime":
        why = (
            f"model.engine={requested}" if requested in ("eager", "compile") else "random weights (model.weights=none)"
        )
        raise UserError(f"model.quantize=int8 runs through ONNX Runtime on pretrained weights, not with {why}")
    return engine


def cache_dir() -> Path:
    return Path(os.environ.get("IMGPIPE_CACHE") or Path.home() / ".cache" / "imgpipe")


class OnnxBackbone:
    """The backbone as an ONNX Runtime session: (N, 3, H, W) float32 -> (N, dim) float32."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: a quantised model's unused constants are not news
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input: batch})[0])


def export_path(name: str, digest: str, crop: int) -> Path:
    """Where the node's ONNX export of backbone `name` with these weights and this crop size lives."""
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{name}-{digest}")[:120]
    torch_version = torch.__version__.split("+")[0]
    return cache_dir() / "onnx" / f"{tag}-{crop}px-torch{torch_version}-opset{OPSET}.onnx"


def trunk_facts_path(export: Path) -> Path:
    """Beside an export: what the actors need besides the trunk (its width, the backbone's own classifier),
    so that an actor that finds the export cached never builds the PyTorch model at all."""
    return export.with_suffix(".facts.pt")


def cached_onnx(name: str, digest: str, crop: int) -> tuple[Path, int, torch.nn.Linear | None] | None:
    """(the export, the embedding width, the backbone's own classifier) when the node has all of them cached,
    else None. Files appear whole (renamed into place), so no lock is needed to read them."""
    path = export_path(name, digest, crop)
    facts = trunk_facts_path(path)
    if not (path.exists() and facts.exists()):
        return None
    record = torch.load(facts, weights_only=True)
    classifier = None
    if record["classifier"] is not None:
        weight = record["classifier"]["weight"]
        classifier = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in record["classifier"])
        classifier.load_state_dict(record["classifier"])
        classifier.eval().requires_grad_(False)
    return path, int(record["dim"]), classifier


def onnx_export(model: torch.nn.Module, name: str, digest: str, crop: int) -> tuple[Path, bool]:
    """The ONNX file of `model` (a `models.Backbone`), exported once per node and cached with its trunk facts
    (`trunk_facts_path`); returns (its path, whether this call exported it)."""
    from filelock import FileLock

    path = export_path(name, digest, crop)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=600):
        facts = trunk_facts_path(path)
        if not facts.exists():  # also for an export cached by an older imgpipe, which wrote none
            classifier = model.classifier.state_dict() if model.classifier is not None else None
            partial = facts.with_suffix(f".{os.getpid()}.partial")
            torch.save({"dim": int(model.dim), "classifier": classifier}, partial)
            partial.replace(facts)
        if path.exists():
            return path, False
        started = time.perf_counter()
        partial = path.with_suffix(f".{os.getpid()}.partial")
        export(model, crop, partial)
        partial.replace(path)  # whole or absent: a crashed export leaves no half file to load
        log.info("engine: exported %s to ONNX in %.1f s (%s)", name, time.perf_counter() - started, path)
    return path, True


def onnx_backbone(model: torch.nn.Module, name: str, digest: str, crop: int, threads: int) -> OnnxBackbone:
    """An ONNX Runtime session for `model` (a `models.Backbone`), exported once per node and cached."""
    return OnnxBackbone(onnx_export(model, name, digest, crop)[0], threads)


def export(model: torch.nn.Module, crop: int, path: Path) -> None:
    """`model` (NCHW float -> embedding) to an ONNX file with a dynamic batch dimension."""
    import copy
    import warnings

    plain = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, per export
        torch.onnx.export(
            plain,
            (torch.zeros(1, 3, crop, crop),),
            str(path),
            input_names=["pixels"],
            output_names=["embedding"],
            dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


def compiled_backbone(model: torch.nn.Module, example: torch.Tensor, autocast: torch.dtype | None):
    """`torch.compile(model)` for inputs shaped as `example`, compiled now (the first call) with inductor's
    caches under the node's cache folder: the node's first actor compiles, holding a file lock, and the
    others then load what it wrote instead of compiling again."""
    from filelock import FileLock

    folder = cache_dir() / "inductor"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)  # read by inductor at each compile
    compiled = torch.compile(model, dynamic=False)
    started = time.perf_counter()
    with FileLock(str(folder) + ".lock", timeout=1800), torch.inference_mode():
        with torch.autocast(example.device.type, dtype=autocast, enabled=autocast is not None):
            compiled(example)
    log.info("engine: torch.compile ready in %.1f s (cache %s)", time.perf_counter() - started, folder)
    return compiled
