"""The end-to-end demo, offline: scikit-learn's handwritten digits (1,797 real scanned 8x8
digits, 10 classes, shipped inside the package) -> PNG files -> prepare -> features ->
train-head -> classify, every stage the same code a real job runs.
"""

from __future__ import annotations

import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from pipeline import features, heads, predict, prepare, storage
from pipeline.config import Config

log = logging.getLogger("imgpipe")

WRITE_THREADS = 16
DIGITS_SOURCE = "sklearn-digits"  # finetune.source alias: the digits, prepared under demo.workdir
MARGIN = 2  # pixels of white around each 8x8 digit


def write_digits(root: storage.Location, limit: int | None = None) -> int:
    """scikit-learn's digits as an ImageFolder of grayscale PNGs, `<digit>/digit_NNNN.png`;
    returns the count.

    Dark ink on white, as on the scanned forms they come from (0-16 ink levels -> 255-0), with
    a 2-pixel white margin (12x12), as MNIST frames its 20x20 digits in 28x28: strokes touch
    the edge of the 8x8 box, and the backbone's centre crop (224 of 256) would cut them. With
    Lite0 and a linear head, over 8 stratified 70/10/20 splits: 95.8% test accuracy without
    the margin, 98.2% (min 97.2%) with it.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target) if limit is None else min(limit, len(digits.target))
    ink = np.round(digits.images[:n] * 255.0 / 16.0).astype(np.uint8)
    pixels = np.pad(255 - ink, ((0, 0), (MARGIN, MARGIN), (MARGIN, MARGIN)), constant_values=255)

    def write(i: int) -> None:
        buf = io.BytesIO()
        Image.fromarray(pixels[i]).save(buf, format="PNG")
        storage.write_bytes(root.join(str(digits.target[i]), f"digit_{i:04d}.png"), buf.getvalue())

    with ThreadPoolExecutor(WRITE_THREADS) as pool:
        list(pool.map(write, range(n)))
    return n


def prepare_digits(cfg: Config, work: storage.Location) -> dict:
    """prepare's manifest of the digits under `work/prepared` (written first under `work/digits`)."""
    prepare_cfg = cfg.prepare.model_copy(
        update={"source": work.join("digits").uri, "output": work.join("prepared").uri, "layout": "imagefolder"}
    )
    return prepare.run(prepare_cfg, cfg.storage)


def prepared_digits(cfg: Config) -> str:
    """The URI of the digits prepared under `demo.workdir` (with the `prepare` section's split),
    writing and preparing them first when they are not there yet."""
    work = storage.resolve(cfg.demo.workdir, cfg.storage)
    prepared = work.join("prepared")
    if not storage.exists(prepared.join("manifest.json")):
        log.info("writing scikit-learn's digits and preparing them under %s", work.uri)
        write_digits(work.join("digits"), cfg.demo.limit)
        prepare_digits(cfg, work)
    return prepared.uri


def run(cfg: Config) -> dict:
    """Run the four stages under `cfg.demo.workdir`; returns each stage's summary and timings.
    Ray must be connected. The stages' sources and outputs are set here; every other setting
    (backbone, batch sizes, head, splits) comes from the config's sections."""
    work = storage.resolve(cfg.demo.workdir, cfg.storage)
    paths = {name: work.join(name).uri for name in ("digits", "prepared", "features", "head", "predictions")}
    timings, started = {}, time.perf_counter()

    def timed(name: str, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        timings[name] = round(time.perf_counter() - t0, 1)
        log.info("demo: %s done in %.1f s", name, timings[name])
        return result

    count = timed("digits", write_digits, work.join("digits"), cfg.demo.limit)
    manifest = timed("prepare", prepare_digits, cfg, work)
    feats = timed(
        "features",
        features.run,
        cfg.model,
        cfg.features.model_copy(update={"source": paths["prepared"], "output": paths["features"]}),
        cfg.storage,
    )
    head = timed(
        "train-head",
        heads.run,
        cfg.head.model_copy(update={"features": paths["features"], "output": paths["head"]}),
        cfg.storage,
    )
    classify_cfg = cfg.classify.model_copy(
        update={
            "source": paths["prepared"],
            "output": paths["predictions"],
            "head": paths["head"],
            "splits": [cfg.demo.classify_split],
        }
    )
    predictions = timed("classify", predict.run, cfg.model, classify_cfg, cfg.storage)
    timings["total"] = round(time.perf_counter() - started, 1)
    return {
        "images": count,
        "manifest": manifest,
        "features": feats,
        "head": head,
        "predictions": predictions,
        "paths": paths,
        "timings": timings,
    }
