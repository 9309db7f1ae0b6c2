"""Break features by hand and check that the suite notices: each mutant below edits one line or block of the
product (or of the offline guard), runs the tests that promise the feature, and puts the file back.

    .venv/bin/python tests/mutants.py               # every mutant: about 3 minutes on 2 cores
    .venv/bin/python tests/mutants.py EXIF shard    # the mutants whose name contains a word given

It edits the working tree: run it with nothing else (an editor's save, another pytest) using the checkout.
Ctrl-C and SIGTERM put the file back; after a SIGKILL, `git diff` shows the mutant and `git checkout -- FILE`
removes it. A mutant the tests let through is a test that cannot fail; a mutant whose text is no longer in
its file is a stale entry (the code moved): both make the script exit non-zero. Not a test itself (pytest does
not collect it): it runs pytest once per mutant. Hand-picked rather than generated (mutmut and the like): a
generated mutant of this code base mostly breaks something no test is about, at a full run of the suite each.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from processes import ROOT, stop  # tests/ is this script's folder

TIMEOUT_S = 900


class Mutant(NamedTuple):
    name: str  # the feature, broken
    path: str  # relative to the project root
    old: str  # text that occurs exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments


MUTANTS = (
    Mutant(
        "run_job turns every exception into a one-line error",
        "jobs/common.py",
        "        message = user_error(exc)\n        if message is None:\n            raise\n",
        "        message = user_error(exc) or str(exc)\n",
        ("tests/test_errors.py",),
    ),
    Mutant(
        "a user error ends the job with a traceback, not one line",
        "jobs/common.py",
        "        if message is None:\n            raise\n",
        "        raise\n",
        ("tests/test_errors.py", "tests/test_prepare.py", "-k", "one_line or too_many_rejects"),
    ),
    Mutant(
        "a damaged EXIF block logged for every image",
        "pipeline/decode.py",
        "    if not _EXIF_LOGGED:",
        "    if True:",
        ("tests/test_decode.py", "-k", "exif_block"),
    ),
    Mutant(
        "the shuffle-buffer seed leaves out the rank",
        "pipeline/loader.py",
        'f"{seed}/{epoch}/{rank}/buffer"',
        'f"{seed}/{epoch}/buffer"',
        ("tests/test_loader.py", "-k", "shuffle_buffer_seed"),
    ),
    Mutant(
        "the shard order leaves out the epoch",
        "pipeline/loader.py",
        'f"{seed}/{epoch}/shards"',
        'f"{seed}/shards"',
        ("tests/test_loader.py", "-k", "shard_order"),
    ),
    Mutant(
        "a head trained on another backbone is accepted",
        "pipeline/predict.py",
        'if "backbone" in asked and model_cfg.backbone != info["backbone"]:',
        "if False:",
        ("tests/test_predict.py", "-k", "refuses_another_backbone"),
    ),
    Mutant(
        "prepare's stale-shard cleanup swallows a failed listing",
        "pipeline/prepare.py",
        "    for info in storage.list_files(out, missing_ok=True):\n",
        "    try:\n        listed = storage.list_files(out, missing_ok=True)\n    except Exception:\n        return\n"
        "    for info in listed:\n",
        ("tests/test_prepare.py", "-k", "stale_shard_cleanup_fails"),
    ),
    Mutant(
        "a split that leaves inputs nowhere goes through",
        "pipeline/prepare.py",
        "        if free and total <= 0:",
        "        if False:",
        ("tests/test_prepare.py", "-k", "leaves_the_free"),
    ),
    Mutant(
        "storage.endpoint_url loses to the environment",
        "pipeline/storage.py",
        'return cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")',
        'return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or cfg.endpoint_url',
        ("tests/test_storage.py", "-k", "explicit_endpoint"),
    ),
    Mutant(
        "storage.region loses to the environment",
        "pipeline/storage.py",
        'return cfg.region or os.environ.get("AWS_REGION")',
        'return os.environ.get("AWS_REGION") or cfg.region',
        ("tests/test_storage.py", "-k", "explicit_endpoint"),
    ),
    Mutant(
        "RAY_ADDRESS is ignored",
        "pipeline/runtime.py",
        'address = cfg.address or os.environ.get("RAY_ADDRESS")',
        "address = cfg.address",
        ("tests/test_cli.py", "tests/test_runtime.py", "-k", "closed_port or ray_address"),
    ),
    Mutant(
        "CIFAR-10's CHW -> HWC transpose swapped",
        "pipeline/layouts.py",
        ".transpose(0, 2, 3, 1)",
        ".transpose(0, 3, 2, 1)",
        ("tests/test_array_datasets.py", "-k", "cifar"),
    ),
    Mutant(
        "MNIST labels off",
        "pipeline/layouts.py",
        'f"{prefix}_{i:05d}",\n                    int(label),',
        'f"{prefix}_{i:05d}",\n                    int(label) % 9,',
        ("tests/test_array_datasets.py", "-k", "mnist"),
    ),
    Mutant(
        "top-k accuracy reads one column too many",
        "pipeline/report.py",
        "topk[:, :k] ==",
        "topk[:, : k + 1] ==",
        ("tests/test_predict.py", "-k", "top_k_metrics"),
    ),
    Mutant(
        "the offline guard is off",
        "tests/offline/sitecustomize.py",
        'if os.environ.get("IMGPIPE_OFFLINE") == "1":\n    install()',
        "if False:\n    install()",
        ("tests/test_offline.py",),
    ),
    Mutant(
        "the config written beside outputs leaves out a section",
        "pipeline/config.py",
        'cfg.model_dump(mode="json")',
        'cfg.model_dump(mode="json", exclude={"augment"})',
        ("tests/test_config.py", "-k", "dump_round"),
    ),
    Mutant(
        "a config's backbone name is not checked",
        "pipeline/models.py",
        'writes a file."""\n    _check_name(name)\n',
        'writes a file."""\n',
        ("tests/test_config.py", "-k", "every_shipped"),
    ),
    Mutant(
        "a .cls label outside the classes is accepted",
        "pipeline/webshards.py",
        "        if label < 0 or (self.classes is not None and label >= len(self.classes)):",
        "        if False:",
        ("tests/test_webshards.py", "-k", "label_rules"),
    ),
    Mutant(
        "a damaged shard is read as far as it goes",
        "pipeline/webshards.py",
        '        raise UserError(f"{shard_uri}: not a readable tar (',
        '        return samples\n        raise UserError(f"{shard_uri}: not a readable tar (',
        ("tests/test_webshards.py", "-k", "damaged_or_missing"),
    ),
    Mutant(
        "a sample without an image member is not named as such",
        "pipeline/webshards.py",
        '        if image is None:\n            error = f"no image member',
        '        if False:\n            error = f"no image member',
        ("tests/test_webshards.py", "-k", "counts_every_sample"),
    ),
    Mutant(
        "features.source_kind=images reads labels from the folders",
        "pipeline/sources.py",
        'if kind == "imagefolder" or (kind == "auto" and depths == {1}):',
        'if kind in ("imagefolder", "images") or (kind == "auto" and depths == {1}):',
        ("tests/test_features.py", "-k", "source_kind_images"),
    ),
    Mutant(
        "classify maps the input's classes to the head's by position, not by name",
        "pipeline/predict.py",
        "[index.get(c, -1) for c in (source.classes or ())]",
        "[i if i < len(classes) else -1 for i, c in enumerate(source.classes or ())]",
        ("tests/test_cli_jobs.py", "-k", "features_train_head_classify"),
    ),
    Mutant(
        "random shear on the y axis",
        "pipeline/augment.py",
        "(shear_x, 0.0), Image.Resampling.BILINEAR)",
        "(0.0, shear_x), Image.Resampling.BILINEAR)",
        ("tests/test_augment_reference.py",),
    ),
    Mutant(
        "colour jitter in a fixed order",
        "pipeline/augment.py",
        "    rng.shuffle(enhancers)\n",
        "    rng.shuffle(enhancers[:])\n",  # the same draws, so only the order can fail the tests
        ("tests/test_augment_reference.py",),
    ),
    Mutant(
        "RandAugment's rotate range at 20 degrees, not 30",
        "pipeline/augment.py",
        '"Rotate": lambda size: _linspace(30.0),',
        '"Rotate": lambda size: _linspace(20.0),',
        ("tests/test_augment_reference.py",),
    ),
)


def run(mutant: Mutant) -> str:
    """'caught', 'SURVIVED', 'STALE', 'BROKEN', 'ERROR' or 'TIMED OUT', with pytest's last line. Caught means
    pytest ran the tests and one failed (exit 1, "failed" in its summary, no errors): a collection error, no
    test selected or a fixture that could not start proves nothing. The file is always put back."""
    path = ROOT / mutant.path
    original = path.read_text()
    if original.count(mutant.old) != 1:
        return f"STALE ({original.count(mutant.old)} copies of its text in {mutant.path})"
    mutated = original.replace(mutant.old, mutant.new)
    try:
        compile(mutated, mutant.path, "exec")
    except SyntaxError as exc:
        return f"BROKEN (the mutant does not compile: {exc})"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutant.tests]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # no bytecode of the mutant outlives it
    try:
        _write(path, mutated)
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"TIMED OUT after {TIMEOUT_S} s (a hang is not a failing test: look at it)"
        finally:
            _stop(proc)
    finally:
        _write(path, original)
    last = (out.strip().splitlines() or ["(no output)"])[-1]
    if proc.returncode == 0:
        return f"SURVIVED: {last}"
    if proc.returncode == 1 and " failed" in last and " error" not in last:
        return f"caught: {last}"
    return f"ERROR (pytest exit {proc.returncode}): {last}"


def _write(path: Path, text: str) -> None:
    """Replace the file whole (a new file renamed over it), with SIGINT and SIGTERM held until it is done."""
    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        fresh = path.with_name(f".{path.name}.mutants")
        fresh.write_text(text)
        shutil.copymode(path, fresh)
        os.replace(fresh, path)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def _stop(proc: subprocess.Popen) -> None:
    """End pytest (`processes.stop`), then what it started and left behind (Ray's processes, servers), which
    share its process group."""
    stop(proc)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("mutants: stopped; the file being mutated was put back"))
    words = sys.argv[1:]
    chosen = [m for m in MUTANTS if not words or any(w.lower() in m.name.lower() for w in words)]
    if not chosen:
        sys.exit(f"mutants: no mutant's name contains {' or '.join(words)}")
    bad = 0
    for mutant in chosen:
        start = time.monotonic()
        verdict = run(mutant)
        bad += not verdict.startswith("caught")
        print(f"{mutant.name}: {verdict} ({time.monotonic() - start:.0f} s)", flush=True)
    print(f"{len(chosen) - bad} of {len(chosen)} mutants caught")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
