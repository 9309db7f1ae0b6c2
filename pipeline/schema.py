"""Column names and Arrow schemas shared by every stage (the data contracts: docs/ARCHITECTURE.md, section 3)."""

from __future__ import annotations

import re

import pyarrow as pa

# Columns of an image dataset as `sources.open_images` yields it.
KEY = "key"  # unique sample id; no dots (WebDataset splits key and extension at the first dot)
IMAGE = "image"  # the original encoded bytes
LABEL = "label"  # int32 index into classes.json; UNLABELED when unknown
SOURCE = "source"  # the object the bytes came from: a raw file's URI, or the URI of its shard
MEMBER = "member"  # the image's member name inside its shard ("" for a raw file)
SHARD = "shard"  # the input unit (a shard's name, or a chunk of raw files): one output part each
ERROR = "error"  # "" for a good row, else why the sample was rejected (read, then decode)
# Samples in the row's unit. Foreign WebDataset shards are counted only when they are read, so the
# output side learns from the rows when a unit is complete.
UNIT_SIZE = "unit_size"

# Columns added by decode/augment stages.
PIXELS = "pixels"  # uint8, (N, H, W, 3): NHWC, so torch sees it as channels-last NCHW for free

EMBEDDING = "embedding"
PRED = "pred"
PRED_CLASS = "pred_class"
PROB = "prob"
TOPK = "topk"
TOPK_PROB = "topk_prob"

UNLABELED = -1

# A prepared dataset's shard files: `<split>-NNNNNN.tar`.
SHARD_FILE = re.compile(r"(train|val|test)-\d{6}\.tar")

IMAGE_SCHEMA = pa.schema(
    [
        pa.field(KEY, pa.string()),
        pa.field(IMAGE, pa.binary()),
        pa.field(LABEL, pa.int32()),
        pa.field(SOURCE, pa.string()),
        pa.field(MEMBER, pa.string()),
        pa.field(SHARD, pa.string()),
        pa.field(ERROR, pa.string()),
        pa.field(UNIT_SIZE, pa.int32()),
    ]
)


def located(source: str, member: str) -> str:
    """One string that finds an input: the object's URI, and for a shard member `<shard URI>:<member>`."""
    return f"{source}:{member}" if member else source


def sample_key(relative_path: str) -> str:
    """A WebDataset-safe key from a path relative to the dataset root: no extension, no dots.

    `cats/cat.123.jpg` -> `cats/cat_123`. Callers must still check keys are unique.
    """
    stem = relative_path.rsplit(".", 1)[0] if "." in relative_path.rsplit("/", 1)[-1] else relative_path
    return stem.replace(".", "_").replace(" ", "_").strip("/")


def features_schema(dim: int, dtype: str) -> pa.Schema:
    """Schema of a features part: key, label, embedding as fixed_size_list<float16|32>[dim]."""
    value = {"float16": pa.float16(), "float32": pa.float32()}[dtype]
    return pa.schema(
        [
            pa.field(KEY, pa.string()),
            pa.field(LABEL, pa.int32()),
            pa.field(EMBEDDING, pa.list_(value, dim)),
            pa.field(SOURCE, pa.string()),
            pa.field(MEMBER, pa.string()),
        ]
    )


def predictions_schema() -> pa.Schema:
    """Schema of a predictions part."""
    return pa.schema(
        [
            pa.field(KEY, pa.string()),
            pa.field(LABEL, pa.int32()),
            pa.field(PRED, pa.int32()),
            pa.field(PRED_CLASS, pa.string()),
            pa.field(PROB, pa.float32()),
            pa.field(TOPK, pa.list_(pa.int32())),
            pa.field(TOPK_PROB, pa.list_(pa.float32())),
            pa.field(SOURCE, pa.string()),
            pa.field(MEMBER, pa.string()),
        ]
    )
