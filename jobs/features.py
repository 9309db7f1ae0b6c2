"""`imgpipe features`: a frozen backbone over shards, an ImageFolder or a prefix -> Parquet embeddings."""

from __future__ import annotations

from jobs.common import parse_config, plural, run_job, start, timings_text, written_text

SECTIONS = ("features", "model", "webdataset", "storage", "ray")


def main(argv: list[str] | None = None) -> dict:
    """Parse, embed (only the parts still missing), print the counts."""
    cfg = parse_config("features", __doc__, argv, SECTIONS)
    # torch and the models load after the config is read: --help and config errors answer at once.
    from pipeline import features

    checked = run_job("features", features.check, cfg.model, cfg.features, cfg.storage, cfg.webdataset)
    start("features", cfg, cfg.features.output, "features.output")
    result = run_job("features", features.run, cfg.model, cfg.features, cfg.storage, cfg.webdataset, checked)
    for split, info in result["splits"].items():
        print(f"{split:>5}: {info['rows']:>8} embedded, {info['rejected']} rejected, {plural(info['parts'], 'part')}")
    print(
        f"inputs {result['inputs']} = embedded {result['rows']} + rejected {result['rejected']}; "
        f"{written_text(result['written'])}"
    )
    what = f"{result['dim']}-d {cfg.features.dtype} embeddings of {cfg.model.backbone}"
    where = f"{result['output']}; rejects in {result['output']}/errors.jsonl"
    print(f"wrote {what} to {where}" if result["written"] else f"{what}, already complete in {where}")
    print(timings_text(result))
    return result


if __name__ == "__main__":
    main()
