"""The `imgpipe` console script: `imgpipe <job> [flags]`, one subcommand per job module.

Conventions as argparse's: help goes to stdout and exits 0; a usage error (no job, an unknown
job or flag) prints the usage to stderr and exits 2; a job that fails exits 1 with one line.
"""

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

USAGE = "usage: imgpipe [-h] [--version] <job> [-c FILE] [-s KEY=VALUE ...] [--address ADDR] [-q | -v]"


def version() -> str:
    """The installed distribution's version (`pip install -e .` counts)."""
    from importlib import metadata

    try:
        return metadata.version("imgpipe")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def usage_text() -> str:
    """The top-level help: jobs, cluster commands, and where each job's own help is."""
    width = max(map(len, {**JOBS, **CLUSTER_COMMANDS}))
    jobs = "\n".join(f"  {name:<{width}}  {text}" for name, text in JOBS.items())
    cluster = "\n".join(f"  {name:<{width}}  {text}" for name, text in CLUSTER_COMMANDS.items())
    return (
        f"{USAGE}\n\nBatch image work on Ray: one job per command, embedded Ray or a cluster.\n\n"
        f"jobs:\n{jobs}\n\non a cluster:\n{cluster}\n\n"
        "every job takes:\n"
        "  -c, --config FILE      YAML config (see configs/)\n"
        "  -s, --set KEY=VALUE    override a config key, e.g. --set prepare.seed=1\n"
        "  --address ADDR         Ray cluster (ray://HEAD:10001 or HEAD:6379; default RAY_ADDRESS, else embedded)\n"
        "  -q, --quiet            print only imgpipe's warnings and errors (and the job's summary)\n"
        "  -v, --verbose          also Ray's own INFO lines and its progress output\n\n"
        "`imgpipe <job> --help` lists the config keys the job reads, with their defaults.\n"
        "  -h, --help             show this help and exit\n"
        "  --version              show imgpipe's version and exit"
    )


def main(argv: list[str] | None = None) -> None:
    """Dispatch to `jobs.<job>.main`, or to `cluster.submit` for `submit` and `jobs`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argv[0] if argv else None
    if first in ("-h", "--help"):
        try:
            print(usage_text())
        except BrokenPipeError:  # `imgpipe --help | head`
            pass
        sys.exit(0)
    if first == "--version":
        print(f"imgpipe {version()}")
        sys.exit(0)
    if first in CLUSTER_COMMANDS:
        from cluster import submit

        sys.exit(submit.main(argv, JOBS))
    if first not in JOBS:
        problem = "a job is required" if first is None else f"unknown job {first!r}"
        known = ", ".join([*JOBS, *CLUSTER_COMMANDS])
        sys.stderr.write(f"{USAGE}\nimgpipe: error: {problem} (choose from {known}); see imgpipe --help\n")
        sys.exit(2)
    module = importlib.import_module(f"jobs.{first.replace('-', '_')}")
    module.main(argv[1:])


if __name__ == "__main__":
    main()
