"""The labels layout: CSV/TSV/JSONL label files beside images, and ImageNet's own layouts with the shipped configs."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from images import IMAGENET_WNIDS, jpeg_bytes, upload_tree, write_imagenet

from jobs import prepare as prepare_job
from pipeline import features, heads, predict, storage
from pipeline.config import (
    ClassifyConfig,
    FeaturesConfig,
    HeadConfig,
    LabelFileConfig,
    ModelConfig,
    PrepareConfig,
    StorageConfig,
    load_config,
)
from pipeline.labelfile import LabelRow, read_rows
from pipeline.prepare import discover_inputs, run

ROOT = Path(__file__).resolve().parent.parent


def rows_of(text: str, name: str, **cfg) -> list[LabelRow]:
    return read_rows(text.encode(), LabelFileConfig(**cfg), f"/data/{name}")


TABLES = [
    ("labels.csv", "a.jpg,cat\nsub/b.jpg,dog\n", {}),
    ("labels.csv", "file,class\na.jpg,cat\nsub/b.jpg,dog\n", {"path_column": "file", "label_column": "class"}),
    ("labels.csv", "id,x,class\na.jpg,1,cat\nsub/b.jpg,2,dog\n", {"header": True, "label_column": 2}),
    ("labels.tsv", "a.jpg\tcat\nsub/b.jpg\tdog\n", {}),
    ("labels.tsv", "class\tfile\ncat\ta.jpg\ndog\tsub/b.jpg\n", {"path_column": "file", "label_column": "class"}),
    ("l.jsonl", '{"file": "a.jpg", "y": "cat"}\n\n{"file": "sub/b.jpg", "y": "dog"}\n', {"path_column": "file"}),
]


@pytest.mark.parametrize("name,text,cfg", TABLES)
def test_every_format_with_and_without_header_gives_the_same_rows(name, text, cfg):
    cfg = {"label_column": "y", **cfg} if name.endswith(".jsonl") else cfg
    rows = rows_of(text, name, **cfg)
    assert [(r.path, r.label, r.problem) for r in rows] == [("a.jpg", "cat", ""), ("sub/b.jpg", "dog", "")]


def test_bad_rows_are_rows_with_a_reason_and_the_pattern_picks_the_label():
    text = 'ImageId,PredictionString\nv1,n01440764 1 2 3 4\nv2\nv3,,\nv4,12 5 5\n"v5",n02102040 9 9 9 9 n0\n'
    with pytest.raises(ValueError, match=r"needs a named group \(\?P<label>"):
        rows_of(text, "sol.csv", path_column="ImageId", label_column="PredictionString", label_pattern=r"^(n\d+)?")
    rows = rows_of(
        text, "sol.csv", path_column="ImageId", label_column="PredictionString", label_pattern=r"^(?P<label>n\d{8})\b"
    )
    assert [(r.line, r.path, r.label) for r in rows] == [
        (2, "v1", "n01440764"),
        (3, "", ""),
        (4, "v3", ""),
        (5, "v4", ""),
        (6, "v5", "n02102040"),
    ]
    assert [r.problem for r in rows] == [
        "",
        "1 columns, fewer than the label file's columns",
        "label '' does not match label_pattern '^(?P<label>n\\d{8})\\b'",
        "label '12 5 5' does not match label_pattern '^(?P<label>n\\d{8})\\b'",
        "",
    ]


def test_config_mistakes_are_one_line_errors():
    with pytest.raises(ValueError, match=r"no column 'ImageId' in the header; it has \['id', 'label'\]"):
        rows_of("id,label\nx,y\n", "a.csv", path_column="ImageId", label_column="label")
    with pytest.raises(ValueError, match="columns given by name need a header row"):
        rows_of("x,y\n", "a.csv", path_column="f", header=False)
    with pytest.raises(ValueError, match="JSONL label file's columns are keys"):
        rows_of('{"a": 1}\n', "a.jsonl")
    with pytest.raises(ValueError, match="cannot tell the label file's format"):
        rows_of("x,y\n", "labels.txt")
    assert [
        r.problem for r in rows_of('{"f": "a", "y": 3}\nnot json\n[1]\n', "a.jsonl", path_column="f", label_column="y")
    ][1:] == ["not a JSON object (Expecting value: line 1 column 1 (char 0))", "no 'f' and 'y' keys"]


def labelled_folder(root: Path) -> Path:
    """5 images under root/img (one in a subfolder); labels.csv names 4 of them and one that is not there."""
    (root / "img" / "sub").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "c.png", "sub/d.jpg", "stray.jpg"):
        (root / "img" / name).write_bytes(jpeg_bytes(seed=len(name)))
    (root / "img" / "notes.txt").write_text("not an image")
    rows = ["a.jpg,10", "b,2", "c,2", "sub/d.jpg,10", "gone.jpg,2", "b.jpg,10", "a.jpg,10"]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_rows_and_files_are_each_counted_once(tmp_path):
    root = labelled_folder(tmp_path)
    cfg = PrepareConfig(source=str(root / "img"), layout="labels", labels={"file": str(root / "labels.csv")})
    found = discover_inputs(storage.resolve(cfg.source), cfg, StorageConfig())

    assert found.layout == "labels" and found.classes == ["2", "10"]  # integer labels sort as numbers
    labels = {Path(i.source).name: (i.label, i.problem) for i in found.inputs if i.path}
    assert labels == {
        "a.jpg": (1, ""),
        "b.jpg": (0, ""),
        "c.png": (0, ""),  # a row may leave out the extension
        "d.jpg": (1, ""),
        "stray.jpg": (-1, f"no row of {root / 'labels.csv'} names this file"),
    }
    row_rejects = {i.source.rsplit("#", 1)[1]: i.problem for i in found.inputs if not i.path}
    assert row_rejects == {
        "line=5": f"line 5: no image file 'gone.jpg' under {root / 'img'}",
        "line=6": "line 6: names 'b.jpg' again (label '10', not '2'); line 2 labels it",
        "line=7": "line 7: names 'a.jpg' again (the same label); line 1 labels it",
    }
    assert found.counts == {
        "file": str(root / "labels.csv"),
        "rows": 7,
        "labelled": 4,
        "missing_files": 1,
        "unlabelled_files": 1,
        "unknown_labels": 0,
        "duplicate_rows": 2,
        "bad_rows": 0,
    }
    assert found.ignored == [str(root / "img" / "notes.txt")]


def imagenet_config(name: str, **paths: str):
    """A shipped ImageNet config with its URIs pointed at the test data, as --set would."""
    keys = {"source": "prepare.source", "output": "prepare.output", "labels": "prepare.labels.file"}
    keys["classes"] = "prepare.classes_file"
    overrides = [f"{keys[k]}={v}" for k, v in paths.items()] + ["prepare.max_reject_fraction=0.25"]
    return load_config(ROOT / "configs" / f"imagenet-{name}.yaml", overrides)


def shard_labels(read, manifest: dict) -> dict[str, int]:
    """key -> label of every sample in the shards; `read(name)` gives a shard's bytes."""
    import io

    labels = {}
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            with tarfile.open(fileobj=io.BytesIO(read(shard["path"]))) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".cls"):
                        labels[m.name.removesuffix(".cls")] = int(tar.extractfile(m).read())
    return labels


def check_imagenet(train: dict, val: dict, val_errors: list[dict], labels: dict[str, int], ids: dict, base: str):
    """The counts and labels that write_imagenet's tree must give, wherever it is stored."""
    assert train["layout"] == "imagefolder" and train["classes"] == list(IMAGENET_WNIDS)
    assert train["inputs"] == train["samples"] == 18 and train["rejected"] == 0
    assert val["layout"] == "labels" and val["classes"] == train["classes"]  # the same order: a model scores on both
    assert (val["inputs"], val["samples"], val["rejected"]) == (15, 12, 3)  # 14 files + the row without one
    assert val["splits"]["val"]["classes"] == {w: 4 for w in IMAGENET_WNIDS}
    assert {k: v for k, v in val["label_file"].items() if k != "file"} == {
        "rows": 14,
        "labelled": 12,
        "missing_files": 1,
        "unlabelled_files": 1,
        "unknown_labels": 1,
        "duplicate_rows": 0,
        "bad_rows": 0,
    }
    reasons = {e["source"].rsplit("/", 1)[1]: e["reason"] for e in val_errors}
    assert reasons == {
        "LOC_val_solution.csv#line=14": f"line 14: no image file 'ILSVRC2012_val_00000090' under {base}",
        "ILSVRC2012_val_00000091.JPEG": "label 'n09999999' (line 15) is not one of the classes",
        "ILSVRC2012_val_00000092.JPEG": f"no row of {val['label_file']['file']} names this file",
    }
    assert labels == {i: c for c, w in enumerate(IMAGENET_WNIDS) for i in ids[w]}


@pytest.mark.timeout(300)
def test_imagenet_layouts_prepare_locally_with_the_shipped_configs(ray_session, tmp_path, capsys):
    tree = write_imagenet(tmp_path / "imagenet")
    out_train, out_val = tmp_path / "prepared-train", tmp_path / "prepared-val"
    cfg = imagenet_config(
        "train", source=tree["train"], output=out_train, classes=tmp_path / "imagenet" / "LOC_synset_mapping.txt"
    )
    train = run(cfg.prepare, cfg.storage)
    # The val set through the job itself, as a user runs it: imgpipe prepare -c configs/imagenet-val.yaml --set ...
    sets = {
        "prepare.source": tree["val"],
        "prepare.output": out_val,
        "prepare.labels.file": tmp_path / "imagenet" / "LOC_val_solution.csv",
        "prepare.classes_file": out_train / "classes.json",
        "prepare.max_reject_fraction": 0.25,
    }
    argv = ["-c", str(ROOT / "configs" / "imagenet-val.yaml")] + [f"--set={k}={v}" for k, v in sets.items()]
    val = prepare_job.main(argv)

    errors = [json.loads(line) for line in (out_val / "errors.jsonl").read_text().splitlines()]
    labels = shard_labels(lambda name: (out_val / name).read_bytes(), val)
    check_imagenet(train, val, errors, labels, tree["val_ids"], str(tree["val"]))
    printed = capsys.readouterr().out
    assert "inputs 15 = samples 12 + rejected 3" in printed
    assert (
        "14 rows, 12 files labelled; rejected: 1 rows naming no file, 1 files no row names, 1 unknown labels, "
        "0 duplicate rows, 0 unusable rows" in printed
    )
    assert json.loads((out_val / "manifest.json").read_text())["label_file"]["missing_files"] == 1

    # One class order: a head trained on the train preparation scores the val preparation (classes are colours).
    storage_cfg = StorageConfig()
    feats = FeaturesConfig(source=str(out_train), output=str(tmp_path / "feats"), actors=1, dtype="float32")
    features.run(ModelConfig(), feats, storage_cfg)
    heads.run(
        HeadConfig(features=str(tmp_path / "feats"), output=str(tmp_path / "head"), epochs=60, lr=1e-2), storage_cfg
    )
    cfg = ClassifyConfig(source=str(out_val), output=str(tmp_path / "preds"), head=str(tmp_path / "head"), actors=1)
    scored = predict.run(ModelConfig(), cfg, storage_cfg)["metrics"]["val"]
    assert scored["samples"] == 12 and scored["top1"] == 1.0


@pytest.mark.timeout(180)
def test_imagenet_layouts_prepare_in_s3_with_the_shipped_configs(ray_session, s3, bucket, tmp_path):
    tree = write_imagenet(tmp_path / "imagenet")
    upload_tree(s3, bucket, tmp_path / "imagenet", "imagenet")
    base = f"s3://{bucket}/imagenet"
    cfg = imagenet_config(
        "train",
        source=f"{base}/ILSVRC/Data/CLS-LOC/train",
        output=f"{base}/prepared-train",
        classes=f"{base}/LOC_synset_mapping.txt",
    )
    train = run(cfg.prepare, cfg.storage)
    cfg = imagenet_config(
        "val",
        source=f"{base}/ILSVRC/Data/CLS-LOC/val",
        output=f"{base}/prepared-val",
        labels=f"{base}/LOC_val_solution.csv",
        classes=f"{base}/prepared-train/classes.json",
    )
    val = run(cfg.prepare, cfg.storage)

    def read(name: str) -> bytes:
        return s3.get_object(Bucket=bucket, Key=f"imagenet/prepared-val/{name}")["Body"].read()

    errors = [json.loads(line) for line in read("errors.jsonl").splitlines()]
    assert val["label_file"]["file"] == f"{base}/LOC_val_solution.csv"
    check_imagenet(train, val, errors, shard_labels(read, val), tree["val_ids"], f"{base}/ILSVRC/Data/CLS-LOC/val")


@pytest.mark.timeout(180)
def test_a_jsonl_label_file_prepares_with_discovered_classes(ray_session, tmp_path):
    root = labelled_folder(tmp_path)
    lines = [{"image": "a.jpg", "y": 10}, {"image": "b", "y": 2}, {"image": "c", "y": 2}, {"image": "sub/d", "y": 10}]
    (root / "labels.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    labels = {"file": str(root / "labels.jsonl"), "path_column": "image", "label_column": "y"}
    cfg = PrepareConfig(
        source=str(root / "img"),
        output=str(tmp_path / "out"),
        labels=labels,
        split={"train": 1.0},
        max_reject_fraction=0.5,
    )
    manifest = run(cfg, StorageConfig())

    assert manifest["layout"] == "labels" and manifest["classes"] == ["2", "10"]
    assert (manifest["inputs"], manifest["samples"], manifest["rejected"]) == (5, 4, 1)
    assert manifest["splits"]["train"]["classes"] == {"2": 2, "10": 2}


def test_auto_layout_with_a_label_file_is_labels_and_classes_file_fixes_the_order(tmp_path):
    root = labelled_folder(tmp_path)
    (root / "classes.txt").write_text("10 ten\n2 two\n99 not in any row\n")
    cfg = PrepareConfig(
        source=str(root / "img"), labels={"file": str(root / "labels.csv")}, classes_file=str(root / "classes.txt")
    )
    found = discover_inputs(storage.resolve(cfg.source), cfg, StorageConfig())
    assert found.layout == "labels" and found.classes == ["10", "2", "99"]
    assert {Path(i.source).name: i.label for i in found.inputs if i.path and not i.problem} == {
        "a.jpg": 0,
        "b.jpg": 1,
        "c.png": 1,
        "d.jpg": 0,
    }
    (root / "classes.txt").write_text("a\nb\na\n")
    with pytest.raises(ValueError, match=r"classes listed twice: \['a'\]"):
        discover_inputs(storage.resolve(cfg.source), cfg, StorageConfig())
    with pytest.raises(ValueError, match="set prepare.classes or prepare.classes_file, not both"):
        discover_inputs(storage.resolve(cfg.source), cfg.model_copy(update={"classes": ["a"]}), StorageConfig())


def test_a_wrong_labels_key_lists_the_valid_ones():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(None, ["prepare.labels.path_col=ImageId"])
    assert str(info.value) == (
        "unknown config key 'prepare.labels.path_col'; valid keys in prepare.labels: "
        "file, format, header, label_column, label_pattern, path_column"
    )
