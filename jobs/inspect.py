"""`imgpipe inspect`: what a model sees in a few images: first-layer filters, feature maps of chosen
stages, Grad-CAM of the top prediction; PNGs and an index.html in inspect.output. The model is
model.backbone + model.weights (its own classifier, or a finetune export's model.pt), or
inspect.head (a train-head output)."""

from __future__ import annotations

import sys

from jobs.common import parse_config, run_job
from pipeline import storage
from pipeline.config import dump_config

SECTIONS = ("inspect", "model", "storage")


def main(argv: list[str] | None = None) -> dict:
    """Parse, inspect (on this machine's CPU: no Ray), print the predictions and the index.html path."""
    cfg = parse_config("inspect", __doc__, argv, SECTIONS)
    from pipeline import inspection

    if not cfg.inspect.output:
        sys.exit("imgpipe inspect: no output given; set inspect.output (a local path or s3:// / gs:// URI)")
    try:
        out = storage.resolve(cfg.inspect.output, cfg.storage)
        storage.check_writable(out)
    except storage.StorageError as exc:
        sys.exit(f"imgpipe inspect: {exc}")
    result = run_job("inspect", inspection.run, cfg.model, cfg.inspect, cfg.storage)
    # After the model resolved and the pictures were made: a failed run leaves no config.yaml behind.
    storage.write_bytes(out.join("config.yaml"), dump_config(cfg).encode())
    for image in result["images"]:
        best = ", ".join(f"{c} {p:.1%}" for c, p in image["topk"][:3])
        print(f"{image['name']}: {best}" + (f" (true: {image['true']})" if image["true"] else ""))
    print(f"{result['cam']}; feature maps of {', '.join(result['layers'])}")
    print(f"wrote {result['index']}")
    return result


if __name__ == "__main__":
    main()
