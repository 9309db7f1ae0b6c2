"""See what the network sees: its first-layer filters, the feature maps of chosen stages, and a
Grad-CAM of its top prediction, for a few images; PNGs plus an index.html that shows them.

The model is the one `classify` would run (a backbone's own classifier, backbone + a train-head
head, or a fine-tuned export via model.weights), as trunk -> classifier. Stage outputs come from
torchvision's FX feature extractor (timm's wrapper of it for timm models), by the stage names of
`transfer.trunk_stages`; Grad-CAM (Selvaraju et al., 2017) weighs the last convolutional stage's
channels by the mean gradient of the top class's logit and keeps the positive part.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
import tarfile
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from torch import nn

from pipeline import predict, storage
from pipeline.augment import build_eval_transform
from pipeline.config import IMAGE_EXTENSIONS, InspectConfig, ModelConfig, StorageConfig
from pipeline.errors import UserError
from pipeline.heads import create_head
from pipeline.models import create_backbone
from pipeline.preprocessing import Preprocessing
from pipeline.sources import open_images
from pipeline.transfer import trunk_stages

log = logging.getLogger("imgpipe")

CAM_METHOD = "Grad-CAM"
MIN_TILE = 24  # feature-map tiles are drawn at least this many pixels high
FILTER_PX = 40  # filter tiles too (a 3x3 filter at 1 pixel a weight is a speck)


@dataclass
class InspectModel:
    """trunk -> classifier as one module, its stages by name (-> module path), classes and preprocessing."""

    model: nn.Module
    stages: dict[str, str]
    classes: list[str]
    prep: Preprocessing
    label: str
    backbone: str


def load_model(model_cfg: ModelConfig, head_uri: str | None, storage_cfg: StorageConfig | None) -> InspectModel:
    """The model classify would run, for inspection (eval mode, on the CPU)."""
    weights, head, classes, label, _ = predict.resolve_model(model_cfg, head_uri, storage_cfg)
    backbone = create_backbone(weights)
    if head is not None:
        classifier = create_head(head[0])
        classifier.load_state_dict(head[1])
    else:
        classifier = backbone.classifier
    model = nn.Sequential(backbone.trunk, classifier).eval()
    paths = {id(m): name for name, m in backbone.trunk.named_modules()}
    stages = {name: "0." + paths[id(modules[-1])] for name, modules in trunk_stages(weights.backbone, backbone.trunk)}
    return InspectModel(model, stages, classes, weights.preprocessing, label, weights.backbone)


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The first nn.Conv2d, in module order."""
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def tile_grid(tiles: np.ndarray, pad: int = 1) -> np.ndarray:
    """(N, h, w[, 3]) tiles in [0, 1] -> one (rows*(h+pad)+pad, cols*(w+pad)+pad[, 3]) grid on white,
    cols = ceil(sqrt(N)), row-major."""
    n, h, w = tiles.shape[:3]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, *tiles.shape[3:]), dtype=np.float32)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad) : (r + 1) * (h + pad), pad + c * (w + pad) : (c + 1) * (w + pad)] = tile
    return grid


def _unit_range(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    low, high = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
    return (x - low) / np.maximum(high - low, 1e-8)


def filter_grid(conv: nn.Conv2d) -> np.ndarray:
    """The conv's filters as an RGB grid in [0, 1]: one (kh, kw) tile each, each scaled to its own
    range (3 input channels as RGB; any other count as the mean over them, in grey)."""
    weight = conv.weight.detach().float().cpu().numpy()  # (out, in, kh, kw)
    tiles = weight.transpose(0, 2, 3, 1) if weight.shape[1] == 3 else weight.mean(axis=1)[..., None].repeat(3, -1)
    return tile_grid(_unit_range(tiles, (1, 2, 3)))


def feature_grid(fmap: torch.Tensor) -> np.ndarray:
    """One image's (C, h, w) feature maps as a grey grid in [0, 1], one tile per channel, each
    channel scaled to its own range."""
    return tile_grid(_unit_range(fmap.detach().float().cpu().numpy(), (1, 2)))


def extractor(im: InspectModel, stages: list[str]) -> nn.Module:
    """A module returning {stage: output, ..., "logits": logits} (torchvision / timm FX feature extraction)."""
    nodes = {im.stages[s]: s for s in stages}
    nodes["1"] = "logits"
    if im.backbone.startswith("efficientnet_lite"):
        from timm.models import create_feature_extractor
    else:
        from torchvision.models.feature_extraction import create_feature_extractor
    return create_feature_extractor(im.model, return_nodes=nodes).eval()


def check_stages(im: InspectModel, names: list[str]) -> None:
    """Unknown stage names fail, listing the valid ones."""
    unknown = [n for n in names if n not in im.stages]
    if unknown:
        raise UserError(f"unknown stage {unknown[0]!r} for {im.backbone}; known: {', '.join(im.stages)}")


def run_image(net: nn.Module, x: torch.Tensor, cam_stage: str, top_k: int) -> dict:
    """Stage outputs, top-k (class index, probability) and the Grad-CAM (h, w) in [0, 1] of the top class."""
    with torch.enable_grad():
        out = net(x)
        logits = out["logits"]
        prob = torch.softmax(logits.detach(), dim=1)[0]
        top = prob.topk(min(top_k, len(prob)))
        acts = out[cam_stage]
        (grads,) = torch.autograd.grad(logits[0, int(top.indices[0])], acts)
    weights = grads[0].mean(dim=(1, 2))
    cam = torch.relu((weights[:, None, None] * acts[0].detach()).sum(0)).numpy()
    cam = cam / cam.max() if cam.max() > 0 else cam
    return {
        "maps": {k: v.detach()[0] for k, v in out.items() if k != "logits"},
        "topk": [(int(i), float(p)) for i, p in zip(top.indices, top.values)],
        "cam": cam,
    }


def last_conv_stage(im: InspectModel, net_all: nn.Module, x: torch.Tensor) -> str:
    """The last stage whose output is a 4-D map (MobileNetV3's pre-logits `classifier` is not)."""
    with torch.no_grad():
        out = net_all(x)
    return [s for s in im.stages if out[s].ndim == 4][-1]


def overlay(pixels: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The CAM, upsampled to the image (bilinear) and coloured with jet, over the uint8 image."""
    h, w = pixels.shape[:2]
    big = np.asarray(Image.fromarray((cam * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)) / 255.0
    heat = colormaps["jet"](big)[..., :3]
    return np.clip((1 - alpha) * pixels / 255.0 + alpha * heat, 0, 1)


def png(array: np.ndarray, min_height: int = 0) -> bytes:
    """A float [0, 1] (or uint8) array as a PNG, scaled up (nearest) to at least `min_height` pixels."""
    arr = array if array.dtype == np.uint8 else (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    img = Image.fromarray(arr.squeeze())
    scale = max(1, math.ceil(min_height / img.height)) if min_height else 1
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def take_images(uris: list[str], split: str | None, count: int, storage_cfg) -> list[tuple[str, bytes, str]]:
    """(name, encoded bytes, true class or "") of the images to inspect: files as given, and the
    first `count` images of a prefix or prepared dataset (reading one shard, or only those files)."""
    found = []
    for uri in uris:
        loc = storage.resolve(uri, storage_cfg)
        if uri.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS and storage.exists(loc):
            found.append((uri.rsplit("/", 1)[-1], storage.read_bytes(loc), ""))
            continue
        source = open_images(uri, storage_cfg, splits=[split] if split else None)
        classes = list(source.classes or ())
        for unit in source.units:
            if len(found) >= count:
                break
            if source.kind == "shards":
                found += _shard_head(source.location, unit, count - len(found), classes)
            else:
                for path, key, label in list(zip(unit.paths, unit.keys, unit.labels))[: count - len(found)]:
                    name = classes[label] if label >= 0 and classes else ""
                    found.append((key, storage.read_bytes(storage.Location(loc.fs, path, path)), name))
    return found


def _shard_head(loc: storage.Location, unit, n: int, classes: list[str]) -> list[tuple[str, bytes, str]]:
    data = storage.read_bytes(storage.Location(loc.fs, unit.paths[0], f"{loc.uri}/{unit.name}.tar"))
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if member.isfile():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
    found = []
    for key, parts in list(samples.items())[:n]:
        ext = next((e for e in parts if e in IMAGE_EXTENSIONS), None)
        label = int(parts["cls"]) if "cls" in parts else -1
        if ext:
            found.append((key, parts[ext], classes[label] if 0 <= label < len(classes) else ""))
    return found


def run(model_cfg: ModelConfig, cfg: InspectConfig, storage_cfg: StorageConfig) -> dict:
    """Filters, feature maps and Grad-CAM of the model on `cfg.images`, written to `cfg.output`."""
    if not cfg.images or not cfg.output:
        raise UserError("inspect needs inspect.images (files, a prefix or a prepared dataset) and inspect.output")
    im = load_model(model_cfg, cfg.head, storage_cfg)
    check_stages(im, cfg.layers)
    out = storage.resolve(cfg.output, storage_cfg)
    images = take_images(cfg.images, cfg.split, cfg.count, storage_cfg)
    if not images:
        raise UserError(f"no images found in {cfg.images}")
    crops = [model_crop(im.prep, data) for _, data, _ in images]
    cam_stage = last_conv_stage(im, extractor(im, list(im.stages)), model_input(im.prep, crops[0]))
    layers = list(dict.fromkeys(cfg.layers or [next(iter(im.stages)), cam_stage]))
    net = extractor(im, list(dict.fromkeys([*layers, cam_stage])))
    conv = first_conv(im.model)
    storage.write_bytes(
        out.join("filters.png"), png(filter_grid(conv), FILTER_PX * math.ceil(math.sqrt(conv.out_channels)))
    )
    results = []
    for i, ((name, _, truth), crop) in enumerate(zip(images, crops)):
        res = run_image(net, model_input(im.prep, crop), cam_stage, cfg.top_k)
        files = write_image_pngs(out, i, crop, res, layers)
        results.append(
            {"name": name, "true": truth, "topk": [(im.classes[c], p) for c, p in res["topk"]], "files": files}
        )
    summary = {
        "model": im.label,
        "cam": f"{CAM_METHOD} on stage {cam_stage!r} for the top prediction",
        "layers": layers,
        "filters": list(conv.weight.shape),
        "images": results,
        "stages": list(im.stages),
    }
    storage.write_bytes(out.join("inspect.json"), json.dumps(summary, indent=1).encode())
    storage.write_bytes(out.join("index.html"), index_html(summary).encode())
    return {**summary, "output": out.uri, "index": out.join("index.html").uri}


def model_crop(prep: Preprocessing, data: bytes) -> np.ndarray:
    """The (crop, crop, 3) uint8 image the model sees: the eval transform of `classify`."""
    crop = np.zeros((prep.crop_size, prep.crop_size, 3), np.uint8)
    build_eval_transform(prep).image(data, crop)
    return crop


def model_input(prep: Preprocessing, crop: np.ndarray) -> torch.Tensor:
    """(1, 3, H, W) float32, normalised with the weights' mean and std."""
    mean, std = torch.tensor(prep.mean).view(1, 3, 1, 1), torch.tensor(prep.std).view(1, 3, 1, 1)
    return (torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255 - mean) / std


def write_image_pngs(out: storage.Location, i: int, crop: np.ndarray, res: dict, layers: list[str]) -> dict:
    """image-<i>.png (the crop), image-<i>-gradcam.png, image-<i>-<stage>.png per layer; returns the file names."""
    files = {"image": f"image-{i}.png", "cam": f"image-{i}-gradcam.png"}
    storage.write_bytes(out.join(files["image"]), png(crop))
    storage.write_bytes(out.join(files["cam"]), png(overlay(crop, res["cam"])))
    for stage in layers:
        fmap = res["maps"][stage]
        files[stage] = f"image-{i}-{stage.replace('.', '_')}.png"
        grid = feature_grid(fmap if fmap.ndim == 3 else fmap[:, None, None])  # a vector stage: 1x1 tiles
        storage.write_bytes(out.join(files[stage]), png(grid, MIN_TILE * math.ceil(math.sqrt(len(fmap)))))
    return files


INDEX_STYLE = (
    "<style>body{font-family:system-ui,sans-serif;margin:24px;color:#222}"
    ".row{display:flex;gap:16px;align-items:flex-start;flex-wrap:wrap}figure{margin:0}"
    "img{max-width:560px;image-rendering:pixelated}figcaption{max-width:340px;font-size:.9em}"
    "td,th{border:1px solid #ddd;padding:2px 8px}table{border-collapse:collapse}</style>"
)


def index_html(summary: dict) -> str:
    """index.html: filters, then per image its crop, the CAM overlay, predictions, feature maps (PNGs beside it)."""
    e = html.escape
    rows = []
    for r in summary["images"]:
        preds = "".join(f"<tr><td>{e(c)}</td><td>{p:.2%}</td></tr>" for c, p in r["topk"])
        maps = "".join(
            f'<figure><img src="{e(r["files"][s])}" alt="{e(s)}"><figcaption>stage {e(s)}</figcaption></figure>'
            for s in summary["layers"]
        )
        truth = f" (true class: {e(r['true'])})" if r["true"] else ""
        rows.append(
            f"<h2>{e(r['name'])}{truth}</h2><div class=row>"
            f'<figure><img src="{e(r["files"]["image"])}" alt="input"><figcaption>model input</figcaption></figure>'
            f'<figure><img src="{e(r["files"]["cam"])}" alt="{CAM_METHOD}"><figcaption>{e(summary["cam"])}'
            f" ({e(r['topk'][0][0])})</figcaption></figure>"
            f"<table><tr><th>class</th><th>probability</th></tr>{preds}</table></div>"
            f"<div class=row>{maps}</div>"
        )
    shape = "x".join(str(v) for v in summary["filters"])
    return (
        f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>imgpipe inspect</title>{INDEX_STYLE}"
        "</head><body>\n"
        f"<h1>imgpipe inspect: {e(summary['model'])}</h1>"
        f'<h2>First convolution filters ({e(shape)})</h2><img src="filters.png" alt="filters">'
        + "\n".join(rows)
        + "\n</body></html>\n"
    )
