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
    "inspect": "filters, feature maps and Grad-CAM of a model on a few images -> PNGs + index.html",
    "demo": "prepare -> features -> train-head -> classify on scikit-learn's digits, offline",
}


# Commands that send jobs to a cluster and watch them (cluster.submit), beside the jobs themselves.
CLUSTER_COMMANDS = {
    "submit": "send a job to a Ray cluster: imgpipe submit <job> [job flags] [--address URL] [--follow]",
    "jobs": "jobs sent to a cluster: imgpipe jobs list | status ID | logs ID [--follow] | stop ID",
}


def main(argv: list[str] | None = None) -> None:
    """Dispatch to `jobs.<job>.main`, or to `cluster.submit` for `submit` and `jobs`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in CLUSTER_COMMANDS:
        from cluster import submit

        sys.exit(submit.main(argv, JOBS))
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in JOBS:
        width = max(map(len, {**JOBS, **CLUSTER_COMMANDS}))
        lines = [f"  {name:<{width}}  {text}" for name, text in JOBS.items()]
        cluster = [f"  {name:<{width}}  {text}" for name, text in CLUSTER_COMMANDS.items()]
        known = "" if not argv or argv[0] in ("-h", "--help") else f"unknown job {argv[0]!r}\n"
        usage = "usage: imgpipe <job> [--config FILE] [--set key=value ...] [--address ADDR]"
        sys.exit(f"{known}{usage}\n\njobs:\n" + "\n".join(lines) + "\n\non a cluster:\n" + "\n".join(cluster))
    module = importlib.import_module(f"jobs.{argv[0].replace('-', '_')}")
    module.main(argv[1:])


if __name__ == "__main__":
    main()
