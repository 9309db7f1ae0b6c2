"""`imgpipe train-head`: a linear or MLP classifier head trained on cached features."""

from __future__ import annotations

from jobs.common import parse_config, run_job, start

SECTIONS = ("head", "storage")


def main(argv: list[str] | None = None) -> dict:
    """Parse, train, print the accuracy and where the head and plots are."""
    cfg = parse_config("train-head", __doc__, argv, SECTIONS)
    from pipeline import heads, report

    data = run_job("train-head", heads.check, cfg.head, cfg.storage)
    start("train-head", cfg, cfg.head.output, "head.output", uses_ray=False)  # one process: no Ray to start
    metrics = run_job("train-head", heads.run, cfg.head, cfg.storage, data)
    print(f"{cfg.head.kind} head: best epoch {metrics['best_epoch']} of {metrics['epochs_run']}")
    for split in ("train", "val", "test"):
        if split in metrics:
            print(f"{split:>5}: {report.accuracy_text(metrics[split])}  ({metrics[split]['samples']} samples)")
    out = metrics["output"]
    print(f"wrote {out}/head.pt, head.json, metrics.json; plots {out}/curves.png, {out}/confusion.png")
    return metrics


if __name__ == "__main__":
    main()
