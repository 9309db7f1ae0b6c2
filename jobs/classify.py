"""`imgpipe classify`: backbone + head (or the backbone's own classifier) over a dataset or a
bucket of images -> predictions Parquet with top-k."""

from __future__ import annotations

from jobs.common import parse_config, run_job, start, timings_text, written_text

SECTIONS = ("classify", "model", "webdataset", "storage", "ray")


def main(argv: list[str] | None = None) -> dict:
    """Parse, classify (only the parts still missing), print counts and accuracy when labelled."""
    cfg = parse_config("classify", __doc__, argv, SECTIONS)
    from pipeline import predict, report

    checked = run_job("classify", predict.check, cfg.model, cfg.classify, cfg.storage, cfg.webdataset)
    start("classify", cfg, cfg.classify.output, "classify.output")
    result = run_job("classify", predict.run, cfg.model, cfg.classify, cfg.storage, cfg.webdataset, checked)
    print(f"model: {result['model']}")
    print(
        f"inputs {result['inputs']} = classified {result['rows']} + rejected {result['rejected']}; "
        f"{written_text(result['written'])}"
    )
    for split, m in (result["metrics"] or {}).items():
        print(f"{split:>5}: {report.accuracy_text(m)}  ({m['samples']} labelled)")
    where = f"{result['output']}; rejects in {result['output']}/errors.jsonl"
    print(f"wrote predictions to {where}" if result["written"] else f"predictions already complete in {where}")
    print(timings_text(result))
    return result


if __name__ == "__main__":
    main()
