"""`imgpipe prepare`: raw images (ImageFolder, flat, CIFAR-10, MNIST) -> WebDataset shards."""

from __future__ import annotations

from jobs.common import parse_config, plural, run_job, start
from pipeline import labelfile, prepare

SECTIONS = ("prepare", "storage", "ray")


def main(argv: list[str] | None = None) -> dict:
    """Parse, prepare, print the counts."""
    cfg = parse_config("prepare", __doc__, argv, SECTIONS)
    run_job("prepare", prepare.check, cfg.prepare, cfg.storage)
    out = start("prepare", cfg, cfg.prepare.output, "prepare.output")
    manifest = run_job("prepare", prepare.run, cfg.prepare, cfg.storage)
    for split, info in manifest["splits"].items():
        print(f"{split:>5}: {info['samples']:>8} samples in {plural(len(info['shards']), 'shard')}")
    print(f"inputs {manifest['inputs']} = samples {manifest['samples']} + rejected {manifest['rejected']}")
    if "label_file" in manifest:
        print(f"label file {labelfile.describe(manifest['label_file'])}")
    print(f"wrote {out.uri}/manifest.json; rejects listed in {out.uri}/errors.jsonl")
    return manifest


if __name__ == "__main__":
    main()
