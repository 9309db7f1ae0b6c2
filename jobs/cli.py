"""The `imgpipe` console script: `imgpipe <job> [flags]`, one subcommand per job module."""

from __future__ import annotations

import importlib
import sys

JOBS = {
    "prepare": "raw images -> WebDataset shards, split and counted",
    "features": "frozen backbone -> cached embeddings (Parquet)",
    "train-head": "train a classifier head on cached embeddings",
    "finetune": "fine-tune a backbone on Ray Train (DDP), checkpointed and resumable",
    "classify": "label a whole dataset or bucket -> predictions (Parquet)",
    "demo": "prepare -> features -> train-head -> classify on scikit-learn's digits, offline",
}


def main(argv: list[str] | None = None) -> None:
    """Dispatch to `jobs.<job>.main`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in JOBS:
        width = max(map(len, JOBS))
        lines = [f"  {name:<{width}}  {text}" for name, text in JOBS.items()]
        known = "" if not argv or argv[0] in ("-h", "--help") else f"unknown job {argv[0]!r}\n"
        sys.exit(f"{known}usage: imgpipe <job> [--config FILE] [--set key=value ...] [--address ADDR]\n\njobs:\n" + "\n".join(lines))
    module = importlib.import_module(f"jobs.{argv[0].replace('-', '_')}")
    module.main(argv[1:])


if __name__ == "__main__":
    main()
