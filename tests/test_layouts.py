"""What `prepare` finds before it reads a pixel (`layouts.discover`, no Ray): extensions, classes
left out, ambiguous and nested trees, label patterns without a label group, damaged MNIST files,
and CIFAR/MNIST test sets kept or split."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from images import jpeg_bytes

from pipeline import storage
from pipeline.layouts import discover
from pipeline.prepare import assign_splits

EXTENSIONS = ["jpg", "jpeg", "png"]


def tree(root: Path, files: list[str]) -> storage.Location:
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(8, 8, seed=len(rel)))
    return storage.resolve(str(root))


def test_only_the_listed_extensions_are_inputs_the_rest_is_listed_as_ignored(tmp_path):
    loc = tree(tmp_path, ["a/1.jpg", "a/2.JPEG", "b/3.png", "b/4.bmp", "b/notes.txt"])
    found = discover(loc, "auto", EXTENSIONS, "", None)
    assert sorted(i.key for i in found.inputs) == ["a/1", "a/2", "b/3"]  # extension case does not matter
    assert sorted(Path(u).name for u in found.ignored) == ["4.bmp", "notes.txt"]
    only_png = discover(loc, "imagefolder", ["png"], "", None)
    assert [i.key for i in only_png.inputs] == ["b/3"] and only_png.classes == ["b"]
    with pytest.raises(ValueError, match=r"no image files \(webp\) under this prefix"):
        discover(loc, "auto", ["webp"], "", None)


def test_a_class_folder_left_out_of_classes_is_rejected_by_name_not_dropped(tmp_path):
    loc = tree(tmp_path, ["cat/1.jpg", "dog/2.jpg", "eel/3.jpg", "eel/4.jpg"])
    found = discover(loc, "imagefolder", EXTENSIONS, "", ["dog", "cat"])
    assert found.classes == ["dog", "cat"]  # the given order is the label order
    labels = {i.key: (i.label, i.problem) for i in found.inputs}
    assert labels["cat/1"] == (1, "") and labels["dog/2"] == (0, "")
    assert labels["eel/3"] == labels["eel/4"] == (-1, "class folder 'eel' is not in prepare.classes")
    with pytest.raises(ValueError, match="fox"):  # a listed class with no folder is named
        discover(loc, "imagefolder", EXTENSIONS, "", ["cat", "dog", "eel", "fox"])


def test_an_ambiguous_tree_and_a_nested_imagefolder_say_what_to_set(tmp_path):
    mixed = tree(tmp_path / "mixed", ["top.jpg", "a/1.jpg"])
    with pytest.raises(
        ValueError, match=r"cannot tell the layout \(image files at depths \[0, 1\]\); set prepare.layout"
    ):
        discover(mixed, "auto", EXTENSIONS, "", None)
    nested = tree(tmp_path / "nested", ["a/x/1.jpg", "a/2.jpg"])
    with pytest.raises(ValueError, match=r"imagefolder layout wants <class>/<file>, found 'a/x/1.jpg'"):
        discover(nested, "imagefolder", EXTENSIONS, "", None)


def test_a_label_pattern_without_a_label_group_is_refused(tmp_path):
    loc = tree(tmp_path, ["cat.1.jpg", "dog.2.jpg"])
    with pytest.raises(ValueError, match=r"label_pattern '\^\(\\w\+\)\\\.' needs a named group \(\?P<label>\.\.\.\)"):
        discover(loc, "flat", EXTENSIONS, r"^(\w+)\.", None)
    found = discover(loc, "flat", EXTENSIONS, r"^(?P<label>\w+)\.", None)
    assert found.classes == ["cat", "dog"] and [i.label for i in found.inputs] == [0, 1]


def _idx(header: bytes, body: bytes) -> bytes:
    return gzip.compress(header + body)


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (_idx(bytes([0, 0, 9, 3]) + (2).to_bytes(4, "big") * 3, b"\0" * 8), None, "bad magic number"),
        (
            _idx(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (3, 2, 2)), b"\0" * 11),
            None,
            r"idx header promises \(3, 2, 2\), file holds 11 values",
        ),
        (None, bytes([0, 0, 8, 1]) + (4).to_bytes(4, "big") + b"\1\2\3\4", r"3 images but 4 labels"),
    ],
)
def test_damaged_mnist_files_are_named_with_what_is_wrong(tmp_path, images, labels, message):
    good_images = _idx(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (3, 2, 2)), b"\0" * 12)
    good_labels = bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + b"\1\2\3"
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(images or good_images)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(labels or good_labels)
    with pytest.raises(ValueError, match=message):
        discover(storage.resolve(str(tmp_path)), "auto", EXTENSIONS, "", None)


def test_keep_source_test_false_splits_the_source_test_set_like_the_rest(tmp_path):
    body = b"".join(d.to_bytes(4, "big") for d in (10, 2, 2))
    for prefix, n in (("train", 10), ("t10k", 10)):
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            _idx(bytes([0, 0, 8, 3]) + n.to_bytes(4, "big") + body[4:], b"\0" * (4 * n))
        )
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(
            bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes(i % 2 for i in range(n))
        )
    found = discover(storage.resolve(str(tmp_path)), "auto", EXTENSIONS, "", None)
    assert sum(i.split == "test" for i in found.inputs) == 10
    kept = assign_splits(found.inputs, {"train": 0.8, "val": 0.2}, 0, keep_source_test=True)
    assert {s: len(v) for s, v in kept.items()} == {"train": 8, "val": 2, "test": 10}
    assert {i.key for i in kept["test"]} == {f"t10k_{i:05d}" for i in range(10)}
    mixed = assign_splits(found.inputs, {"train": 0.8, "val": 0.2}, 0, keep_source_test=False)
    assert {s: len(v) for s, v in mixed.items()} == {"train": 16, "val": 4}
    assert any(i.key.startswith("t10k") for i in mixed["train"])
