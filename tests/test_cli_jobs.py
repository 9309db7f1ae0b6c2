"""features -> train-head -> classify as a user runs them: each job a subprocess of `imgpipe`, on an
ImageFolder (features on an embedded Ray sized by ray.num_cpus, train-head with no Ray at all, classify
joining the session's Ray by RAY_ADDRESS), with the printed summaries, exit codes and the config.yaml
beside each output checked; then classify over a folder whose classes differ from the head's (reordered,
one missing, one the head never saw), quiet (`-q`). In this process: a features run resumed with every
part there; classify's resume, a changed run refused and then replaced with overwrite, and a missing
source failing in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from images import write_imagefolder
from processes import ray_env

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.timeout(600)


def imgpipe(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jobs.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env or ray_env(), timeout=300)


def ok(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()


def test_features_train_head_classify_through_the_cli(ray_address, tmp_path):
    write_imagefolder(tmp_path / "train", {"a": 12, "b": 12, "c": 12})
    feats, head, preds = tmp_path / "feats", tmp_path / "head", tmp_path / "preds"

    source = f"features.source={tmp_path / 'train'}"
    embedded = imgpipe("features", "--set", source, "--set", f"features.output={feats}", "--set", "ray.num_cpus=3")
    lines = ok(embedded)
    assert "started an embedded local Ray: 3 logical CPUs on " in embedded.stderr  # no address: embedded, as set
    assert "inputs 36 = embedded 36 + rejected 0; 1 part written this run" in lines
    timings = next(line for line in lines if line.startswith("timings (s): features (this run) "))
    assert "model actors: first ready, from the stage's start" in timings, lines
    assert any(line.startswith("model actor start-up") and "onnxruntime" in line for line in lines), lines
    saved = yaml.safe_load((feats / "config.yaml").read_text())
    assert saved["features"]["source"] == str(tmp_path / "train") and saved["model"]["engine"] == "auto"

    trained = imgpipe("train-head", "--set", f"head.features={feats}", "--set", f"head.output={head}")
    lines = ok(trained)
    assert "Ray" not in trained.stderr  # one process: no Ray started for a head
    assert lines[0].startswith("linear head: best epoch ") and any(line.startswith("  val: top-1 ") for line in lines)
    assert yaml.safe_load((head / "config.yaml").read_text())["head"]["features"] == str(feats)

    # The input's classes against the head's [a, b, c]: c and b (reordered), no a, and d, unknown to it.
    new = tmp_path / "new"
    for name, source, count in (("c", "c", 3), ("b", "b", 3), ("d", "a", 2)):
        (new / name).mkdir(parents=True)
        for path in sorted((tmp_path / "train" / source).glob("*.jpg"))[:count]:
            shutil.copy(path, new / name / path.name)
    args = ["--set", f"classify.source={new}", "--set", f"classify.output={preds}", "--set", f"classify.head={head}"]
    # -q, with tqdm and Ray Data's progress bars left on: the summary on stdout and nothing on stderr. It joins
    # the session's Ray (token auth, its token in ~/.ray) by RAY_ADDRESS: features above showed the embedded start.
    loud = {
        k: v
        for k, v in ray_env(RAY_ADDRESS=ray_address, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "token")).items()
        if k not in ("TQDM_DISABLE", "RAY_DATA_DISABLE_PROGRESS_BARS")
    }
    classified = imgpipe("classify", "-q", *args, env=loud)
    lines = ok(classified)
    assert classified.stderr == ""
    assert "inputs 8 = classified 8 + rejected 0; 1 part written this run" in lines
    assert any(line.startswith("  all: top-1 100.00%  (6 labelled)") for line in lines), lines
    rows = [r for p in sorted(preds.rglob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    by_folder = {r["key"].split("/")[0]: r for r in rows}
    assert {r["key"].split("/")[0]: r["label"] for r in rows} == {"b": 1, "c": 2, "d": -1}  # the head's indices
    assert by_folder["b"]["pred_class"] == "b" and by_folder["c"]["pred_class"] == "c"
    assert by_folder["d"]["pred_class"] == "a"  # a's pictures, in a folder the head does not know
    assert all(Path(r["source"]).is_file() and r["member"] == "" for r in rows)


def test_features_resumed_with_every_part_there_says_so(ray_session, tmp_path, capsys):
    from jobs import features as features_job

    write_imagefolder(tmp_path / "raw", {"a": 4, "b": 4}, size=(32, 32))
    out = tmp_path / "out"
    args = ["--set", f"features.source={tmp_path / 'raw'}", "--set", f"features.output={out}"]
    features_job.main([*args, "--set", "features.batch_size=4"])
    assert "inputs 8 = embedded 8 + rejected 0; 1 part written this run" in capsys.readouterr().out
    assert pq.read_table(out / "all" / "part-000000.parquet").num_rows == 8
    features_job.main([*args, "--set", "features.batch_size=4"])  # the same run: nothing left to do
    again = capsys.readouterr().out
    assert "inputs 8 = embedded 8 + rejected 0; nothing to write: every part was there" in again
    assert f"embeddings of efficientnet_lite0, already complete in {out};" in again


def test_classify_resumes_refuses_another_run_and_replaces_it_with_overwrite(ray_session, tmp_path, capsys):
    """The same `imgpipe classify` in this process (the session's Ray is joined, not started), so that
    the checks that need no fresh process cost no Ray start each."""
    from jobs import classify as classify_job

    write_imagefolder(tmp_path / "new", {"a": 3, "b": 3})
    preds = tmp_path / "preds"
    args = ["--set", f"classify.source={tmp_path / 'new'}", "--set", f"classify.output={preds}"]

    def run(*extra: str) -> list[str]:
        capsys.readouterr()
        classify_job.main([*args, *extra])
        return capsys.readouterr().out.splitlines()

    assert "inputs 6 = classified 6 + rejected 0; 1 part written this run" in run()
    again = run()
    assert "inputs 6 = classified 6 + rejected 0; nothing to write: every part was there" in again
    assert f"predictions already complete in {preds}; rejects in {preds}/errors.jsonl" in again
    assert not any(line.startswith("model actor start-up") for line in again)  # no actors: nothing to start
    with pytest.raises(SystemExit) as changed:
        run("--set", "classify.top_k=2")
    assert str(changed.value).startswith("imgpipe classify: ") and "classify.overwrite=true" in str(changed.value)
    assert "inputs 6 = classified 6 + rejected 0; 1 part written this run" in run(
        "--set", "classify.top_k=2", "--set", "classify.overwrite=true"
    )
    assert all(len(r["topk"]) == 2 for p in preds.rglob("part-*.parquet") for r in pq.read_table(p).to_pylist())
    with pytest.raises(SystemExit) as missing:
        run("--set", f"classify.source={tmp_path / 'nothing'}")
    assert str(missing.value) == f"imgpipe classify: {tmp_path / 'nothing'}: no such file or prefix; check the path"
