"""`imgpipe finetune`: fine-tune ResNet / EfficientNet / MobileNet (or train simple_cnn from
scratch) on prepared shards with Ray Train; checkpoints, metrics, plots and the exported model
land in finetune.output. Rerunning the same config resumes it."""

from __future__ import annotations

from jobs.common import parse_config, run_job, start

SECTIONS = ("finetune", "model", "augment", "loader", "storage", "ray")


def main(argv: list[str] | None = None) -> dict:
    """Parse, fine-tune (or resume), print the accuracies and where the model and plots are."""
    cfg = parse_config("finetune", __doc__, argv, SECTIONS)
    from pipeline import finetune, report

    checked = run_job("finetune", finetune.check, cfg)
    start("finetune", cfg, cfg.finetune.output, "finetune.output")
    result = run_job("finetune", finetune.run, cfg, checked)
    if result.get("already_finished"):
        print(f"the run in {result['output']} is already finished; nothing to do")
    print(f"best epoch {result['best_epoch']} of {result['epochs_run']} ({result['seconds']} s of training)")
    for split in ("val", "test"):
        if result.get(split):
            m = result[split]
            print(f"{split:>5}: {report.accuracy_text(m)}  ({m['samples']} images)")
    out = result["output"]
    print(f"model: {result['model']} (classify with --set model.weights={result['model']})")
    print(f"wrote {out}/metrics.json; plots {out}/curves.png, {out}/confusion.png")
    return result


if __name__ == "__main__":
    main()
