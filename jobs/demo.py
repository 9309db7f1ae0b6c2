"""`imgpipe demo`: prepare -> features (EfficientNet-Lite0) -> train-head -> classify on
scikit-learn's handwritten digits, offline, on an embedded Ray. Without --config it reads
configs/demo.yaml from this checkout."""

from __future__ import annotations

import sys
from pathlib import Path

from jobs.common import parse_config, run_job, start

SECTIONS = ("demo", "model", "prepare", "features", "head", "classify", "storage", "ray")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> dict:
    """Parse, run the four stages, print the test accuracy and where everything is."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if DEFAULT_CONFIG.is_file() and not any(a in ("-c", "--config") or a.startswith("--config=") for a in argv):
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    cfg = parse_config("demo", __doc__, argv, SECTIONS)
    from pipeline import demo

    start("demo", cfg, cfg.demo.workdir, "demo.workdir")
    result = run_job("demo", demo.run, cfg)
    paths, split = result["paths"], cfg.demo.classify_split
    head, scores = result["head"], result["predictions"]["metrics"][split]
    print(
        f"\n{result['images']} digits; splits "
        + ", ".join(f"{s} {i['samples']}" for s, i in result["manifest"]["splits"].items())
    )
    print(
        f"features: {result['features']['rows']} x {result['features']['dim']}-d {cfg.model.backbone} "
        f"embeddings -> {paths['features']}"
    )
    print(
        f"head ({cfg.head.kind}, best epoch {head['best_epoch']}): val top-1 {head['val']['top1']:.2%}, "
        f"{split} top-1 on cached features {head[split]['top1']:.2%}"
    )
    print(
        f"classify (images -> backbone -> head), {split} split: top-1 {scores['top1']:.2%} on "
        f"{scores['samples']} images -> {paths['predictions']}"
    )
    print(f"plots: {paths['head']}/curves.png, {paths['head']}/confusion.png, {paths['predictions']}/confusion.png")
    print("timings (s): " + ", ".join(f"{k} {v}" for k, v in result["timings"].items()))
    print(f"\nTEST ACCURACY: {scores['top1']:.2%}")
    print(f"classify report (galleries of the {split} split): {result['predictions']['report']}")
    print(f"HTML report: {head['report']}")
    return result


if __name__ == "__main__":
    main()
