"""One config loader: YAML files + dotted overrides -> typed, frozen sections.

Every job reads the same `Config`; a job uses only the sections it needs and passes them down
one by one (`cfg.prepare`, `cfg.storage`), never the whole object. Unknown or mistyped keys are
rejected with a one-line message that names the key and the valid ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from pipeline.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class ConfigError(UserError):
    """A config file, key or value that cannot be used; the message says which and why."""


class Section(BaseModel):
    """Base of every config section: frozen, and no key it does not declare."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageConfig(Section):
    """Object-storage connection. Credentials never live here: they come from the AWS chain."""

    endpoint_url: Optional[str] = None  # S3-compatible endpoint; else AWS_ENDPOINT_URL; else AWS
    region: Optional[str] = None  # else AWS_REGION / AWS_DEFAULT_REGION; else us-east-1
    anonymous: bool = False  # public buckets
    # Transient errors (connection refused or reset, 5xx, throttling): each S3 request is tried up to
    # max_attempts times with exponential backoff inside pyarrow, in the driver and in every Ray task;
    # imgpipe's own reads and writes then keep retrying, logged, for up to retry_seconds in all.
    max_attempts: int = Field(default=5, ge=1)
    retry_seconds: float = Field(default=60.0, ge=0)


class RayConfig(Section):
    """Where jobs run: a cluster address, else an embedded local Ray."""

    address: Optional[str] = None  # else RAY_ADDRESS; else embedded
    connect_timeout_s: float = Field(default=15.0, gt=0)  # joining a cluster: fail in one line after this
    num_cpus: Optional[int] = None  # embedded only; default max(cores, 4), see runtime.py
    object_store_memory_mb: Optional[int] = None  # embedded only


class LabelFileConfig(Section):
    """The `labels` layout: a CSV, TSV or JSONL file of (image path or key, label) rows beside the images."""

    file: str = ""  # local path or URI of the label file
    format: Literal["auto", "csv", "tsv", "jsonl"] = "auto"  # auto: from the file's extension
    # Columns by name (CSV/TSV with a header row; JSONL keys) or by 0-based position (CSV/TSV).
    path_column: Union[int, str] = 0  # the image's path under prepare.source, with or without its extension
    label_column: Union[int, str] = 1
    header: Optional[bool] = None  # CSV/TSV: None = a header row exactly when the columns are given by name
    label_pattern: Optional[str] = None  # the class is this regex's (?P<label>...) group of the cell; None: the cell


class PrepareConfig(Section):
    """Raw images -> WebDataset shards, split and counted."""

    source: str = ""
    output: str = ""
    layout: Literal["auto", "imagefolder", "flat", "labels", "cifar10", "mnist"] = "auto"
    label_pattern: str = r"^(?P<label>[^.]+)\.[^.]+\.[^.]+$"  # flat layout: <label>.<id>.<ext> (cat.123.jpg)
    labels: LabelFileConfig = LabelFileConfig()  # the labels layout (auto picks it when labels.file is set)
    classes: Optional[list[str]] = None  # None: discovered, sorted
    # The class list from a file instead: classes.json ({"classes": [...]}) or text, one class a line, its first
    # word (ImageNet's LOC_synset_mapping.txt as distributed); the order is the label order.
    classes_file: Optional[str] = None
    split: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    keep_source_test: bool = True  # CIFAR-10 / MNIST: keep their own test set as `test`
    seed: int = 0
    shard_max_samples: int = Field(default=1000, ge=1)
    shard_max_mb: float = Field(default=256.0, gt=0)
    max_pixels: int = Field(default=89_478_485, ge=1)  # Pillow's decompression-bomb limit
    max_reject_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    extensions: list[str] = Field(default_factory=lambda: list(IMAGE_EXTENSIONS))

    @field_validator("split")
    @classmethod
    def _split_is_ratios(cls, split: dict[str, float]) -> dict[str, float]:
        allowed = {"train", "val", "test"}
        if not split or set(split) - allowed:
            raise ValueError(f"split names must be among {sorted(allowed)}, got {sorted(split)}")
        if any(r < 0 for r in split.values()) or abs(sum(split.values()) - 1.0) > 1e-6:
            raise ValueError(f"split ratios must be >= 0 and sum to 1, got {split}")
        return split


class ModelConfig(Section):
    """Backbone by registry name and where its weights come from."""

    backbone: str = "efficientnet_lite0"
    weights: str = "DEFAULT"  # torchvision weight name | DEFAULT | path/URI to a state dict | none
    # features / classify model actors (finetune has its own finetune.use_gpu):
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto: GPUs if the cluster has some now; cuda: wait for them
    gpus_per_actor: float = Field(default=1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # on GPU; auto: bf16 (fp16 before Ampere); CPU: fp32
    gpu_wait_s: float = Field(default=600.0, ge=0)  # device=cuda: how long to wait for GPUs / for actors to start
    # auto: onnxruntime on CPU when installed, else eager; compile: torch.compile (inductor), cached per node
    engine: Literal["auto", "eager", "onnxruntime", "compile"] = "auto"
    quantize: Literal["none", "int8"] = "none"  # int8: static int8 through ONNX Runtime, CPUs only (opt-in)

    @field_validator("quantize")
    @classmethod
    def _int8_needs_onnxruntime(cls, quantize: str, info: ValidationInfo) -> str:
        if quantize == "int8" and info.data.get("engine") in ("eager", "compile"):
            raise ValueError(
                f"int8 runs through ONNX Runtime; set model.engine to auto or onnxruntime, not {info.data['engine']}"
            )
        return quantize


SourceKind = Literal["auto", "shards", "webdataset", "imagefolder", "images"]


class WebDatasetConfig(Section):
    """How samples of WebDataset shards written by another tool are labelled (README: "Accepted inputs")."""

    # auto: the first of .cls, .cls2, .label (an integer), else .txt (a class name) when class names are known,
    # else unlabelled; cls / cls2 / label / txt / json: only that member; none: every sample unlabelled.
    label: Literal["auto", "cls", "cls2", "label", "txt", "json", "none"] = "auto"
    json_field: str = "label"  # label=json: the field of the sample's .json (an integer, or a class name)
    classes: Optional[list[str]] = None  # None: classes.json / classes.txt beside the shards, if there


class FeaturesConfig(Section):
    """Frozen backbone over a dataset -> Parquet embeddings."""

    source: str = ""
    output: str = ""
    # auto: prepared shards if a manifest.json; WebDataset shards for a shard pattern or a prefix of tars;
    # else images, as an ImageFolder when every image is one folder deep
    source_kind: SourceKind = "auto"
    splits: Optional[list[str]] = None  # prepared shards: which splits; None = all
    batch_size: int = Field(default=64, ge=1)  # per model call (an H100 wants 256-512 for ResNet-50)
    decode_batch: int = Field(default=64, ge=1)  # rows per decode task block
    dtype: Literal["float16", "float32"] = "float16"  # of the stored embeddings
    actors: Optional[int] = Field(default=None, ge=1)  # None: one per GPU, else sized from the cluster's CPUs
    overwrite: bool = False  # output of another run (other input/model/dtype) there: replace it, don't refuse
    cpu_only_nodes: bool = False  # reads, decoding and CPU model actors only on nodes without GPUs


class HeadConfig(Section):
    """A classifier head trained on cached features."""

    features: str = ""
    output: str = ""
    kind: Literal["linear", "mlp"] = "linear"
    hidden: int = Field(default=256, ge=1)
    dropout: float = Field(default=0.5, ge=0.0, lt=1.0)
    epochs: int = Field(default=200, ge=1)  # at most; early stopping usually ends sooner
    batch_size: int = Field(default=256, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    class_weighting: bool = False
    patience: int = Field(default=10, ge=1)  # epochs without a better validation loss before stopping
    val_fraction: float = Field(default=0.1, gt=0, lt=1)  # held out of train when there is no val split
    seed: int = 0


class ClassifyConfig(Section):
    """Bulk offline classification -> predictions Parquet."""

    source: str = ""
    output: str = ""
    source_kind: SourceKind = "auto"  # as features.source_kind; images: unlabelled, whatever the folders
    splits: Optional[list[str]] = None  # prepared shards: which splits; None = all
    head: Optional[str] = None  # a train-head output (a set model.backbone/weights must match it); None: own classifier
    top_k: int = Field(default=5, ge=1)
    batch_size: int = Field(default=64, ge=1)  # per model call
    decode_batch: int = Field(default=64, ge=1)  # rows per decode task block
    actors: Optional[int] = Field(default=None, ge=1)
    overwrite: bool = False  # predictions of another run (other input/model/head) there: replace them, don't refuse
    cpu_only_nodes: bool = False  # reads, decoding and CPU model actors only on nodes without GPUs


class AugmentConfig(Section):
    """Train/eval transform presets; sizes and normalisation come from the model's weights."""

    preset: Literal["standard", "none"] = "standard"  # none: train on the eval transform
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop: area fraction of the source
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop: aspect ratio w/h
    hflip: float = Field(default=0.5, ge=0, le=1)
    vflip: float = Field(default=0.0, ge=0, le=1)
    rotate: float = Field(default=0.0, ge=0, le=180)  # degrees, +-
    shear: float = Field(default=0.0, ge=0, lt=90)  # degrees, +-, along x
    zoom: tuple[float, float] = (1.0, 1.0)  # affine scale range
    color_jitter: float = Field(default=0.0, ge=0)  # brightness = contrast = saturation strength
    auto_augment: Literal["none", "randaugment", "trivialaugment"] = "none"
    auto_augment_ops: int = Field(default=2, ge=1)  # RandAugment: ops per image
    auto_augment_magnitude: int = Field(default=9, ge=0, le=30)  # RandAugment: bin of 31
    seed: int = 0  # with the epoch and the sample key, fixes every random choice

    @field_validator("scale", "ratio", "zoom")
    @classmethod
    def _positive_range(cls, pair: tuple[float, float]) -> tuple[float, float]:
        if not 0 < pair[0] <= pair[1]:
            raise ValueError(f"must be a range [low, high] with 0 < low <= high, got {list(pair)}")
        return pair


class LoaderConfig(Section):
    """Training input pipeline: augmentation actors, shuffling, batches."""

    batch_size: int = Field(default=64, ge=1)  # per training worker
    pool: Literal["tasks", "actors"] = "tasks"  # where decode + augment run: see README, "Training input"
    deterministic: bool = True  # same rows to the same rank in every run (exact resume); false: faster input
    shuffle_buffer: int = Field(default=1000, ge=0)  # rows in each worker's local shuffle buffer
    seed: int = 0  # with the epoch, fixes the shard order and the shuffle buffer
    actors: Optional[int] = Field(default=None, ge=1)  # None: (eligible CPUs - reserved) / actor_cpus
    actor_cpus: float = Field(default=1.0, gt=0)
    reserved_cpus: float = Field(default=1.0, ge=0)  # left free for reads and trainers when sizing
    cpu_only_nodes: bool = False  # place augmentation actors only on nodes without GPUs
    actor_labels: dict[str, str] = Field(default_factory=dict)  # Ray node-label selector for actors
    prefetch_batches: int = Field(default=2, ge=0)


class FinetuneConfig(Section):
    """Fine-tuning on Ray Train: data-parallel (DDP), checkpointed to the run's storage, resumable.

    The model comes from the `model` section (backbone + pretrained weights, or `simple_cnn` from
    scratch); augmentation from `augment`; the input pipeline (batch per worker) from `loader`.
    """

    source: str = ""  # prepared shards (`imgpipe prepare`) with the train (and val) split, or WebDataset shards
    output: str = ""  # the run folder: checkpoints, metrics, plots, the exported model, config.yaml
    train_split: str = "train"
    val_split: str = "val"  # early stopping, best-checkpoint choice and curves
    test_split: Optional[str] = "test"  # scored once at the end with the best model; None or absent: skipped
    # Val / test from elsewhere: prepared shards (their val_split / test_split) or WebDataset shards (whole).
    # None: the source's own splits; WebDataset source without val_source: val_fraction of its shards held out.
    val_source: Optional[str] = None
    test_source: Optional[str] = None
    val_fraction: float = Field(default=0.05, gt=0, lt=1)  # of the shards (whole shards, drawn from seed)
    mode: Literal["linear_probe", "partial", "full"] = "full"
    unfreeze_stages: int = Field(default=2, ge=1)  # partial: the last N stages of the trunk train
    head_epochs: int = Field(default=0, ge=0)  # two-phase: the first K epochs train only the new classifier
    freeze_bn_stats: bool = False  # trained stages keep pretrained BatchNorm statistics (eval mode); see README
    image_size: Optional[int] = Field(default=None, ge=16)  # crop size; None: what the weights expect
    epochs: int = Field(default=10, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.01, gt=0)  # for the global batch (workers x loader.batch_size x accumulate)
    trunk_lr_scale: float = Field(default=0.1, gt=0, le=1)  # pretrained trunk: lr x this; new layers: lr
    momentum: float = Field(default=0.9, ge=0, lt=1)  # sgd
    nesterov: bool = True  # sgd
    weight_decay: float = Field(default=1e-4, ge=0)  # never on BatchNorm/LayerNorm weights and biases
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(default=0.0, ge=0)  # linear warm-up from lr/100, per step
    step_epochs: int = Field(default=30, ge=1)  # step schedule: lr x step_gamma every step_epochs
    step_gamma: float = Field(default=0.1, gt=0, le=1)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    accumulate: int = Field(default=1, ge=1)  # batches per optimizer step (gradient accumulation)
    patience: Optional[int] = Field(default=None, ge=1)  # epochs without a better val loss before stopping
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: fp32 on CPU, bf16 on GPUs >= sm80, else fp16
    channels_last: bool = (
        True  # faster on GPU, and on CPU too (Lite0 train step on 1 core: 1.5x at 128 px, 1.7x at 224)
    )
    seed: int = 0  # model init, dropout and (with loader.seed, augment.seed) the data order
    num_workers: int = Field(default=1, ge=1)  # Ray Train workers (DDP ranks)
    use_gpu: bool = False  # one CUDA device per worker (NCCL); else CPU (gloo)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=1.0, gt=0, le=1)
    checkpoint_every_steps: Optional[int] = Field(default=None, ge=1)  # besides one per epoch
    keep_checkpoints: int = Field(default=2, ge=1)  # best K by val loss (the latest is always kept too)
    max_failures: int = Field(default=2, ge=-1)  # worker-group restarts from the last checkpoint; -1: no limit
    overwrite: bool = False  # a run of another config in output: replace it, don't refuse


class DemoConfig(Section):
    """The end-to-end demo on scikit-learn's handwritten digits."""

    workdir: str = "runs/demo"  # local folder or s3:// / gs:// prefix; every stage writes under it
    limit: Optional[int] = Field(default=None, ge=20)  # first N digits only (quick runs); None = all 1,797
    classify_split: str = "test"  # the prepared split that classify labels (and scores)


class InspectConfig(Section):
    """`imgpipe inspect`: filters, feature maps and Grad-CAM of a model (model.* or a head) on a few images."""

    images: list[str] = []  # image files, or a prefix / prepared dataset to take `count` images from
    split: Optional[str] = None  # prepared dataset: the split to take images from; None = the first
    count: int = Field(default=4, ge=1, le=64)  # images taken from a prefix or dataset
    head: Optional[str] = None  # a train-head output; None: model.weights' own classifier (or a finetune export)
    layers: list[str] = []  # stage names whose feature maps to draw; [] = the first and the last conv stage
    top_k: int = Field(default=5, ge=1)
    output: str = ""  # PNGs + index.html go here


class Config(Section):
    """Every section; a job reads the ones it needs."""

    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    prepare: PrepareConfig = PrepareConfig()
    model: ModelConfig = ModelConfig()
    features: FeaturesConfig = FeaturesConfig()
    head: HeadConfig = HeadConfig()
    classify: ClassifyConfig = ClassifyConfig()
    webdataset: WebDatasetConfig = WebDatasetConfig()
    augment: AugmentConfig = AugmentConfig()
    loader: LoaderConfig = LoaderConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    demo: DemoConfig = DemoConfig()
    inspect: InspectConfig = InspectConfig()


def require(job: str, section: str, values: Section, keys: tuple[str, ...], what: str = "URIs or local paths") -> None:
    """Fail with one line that names every one of `keys` left empty in `section` at once."""
    missing = [f"{section}.{k}" for k in keys if not getattr(values, k)]
    if missing:
        listed = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
        raise ConfigError(f"{job} needs {listed} ({what}); set {'them' if len(missing) > 1 else 'it'} with --set or -c")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML file (or the defaults), apply `a.b=c` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(raw, item)
    return build_config(raw)


def build_config(raw: dict[str, Any]) -> Config:
    """Validate a plain dict into a `Config`, turning pydantic's errors into one line."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0])) from None


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, to be written next to a job's outputs."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a YAML file, e.g. one from configs/")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML file from configs/")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None


def _describe(error: dict[str, Any]) -> str:
    loc = [str(p) for p in error["loc"]]
    dotted = ".".join(loc)
    if error["type"] == "extra_forbidden":
        valid = ", ".join(_valid_keys(loc[:-1]))
        where = ".".join(loc[:-1]) or "the top level"
        return f"unknown config key '{dotted}'; valid keys in {where}: {valid}"
    if error["type"] in ("model_type", "model_attributes_type", "dict_type") and loc:
        return f"config key '{dotted}' must be a section (a mapping), got {error.get('input')!r}"
    message = error["msg"].removeprefix("Value error, ")
    if ", got " in message:  # the validator's own message already shows the value
        return f"config key '{dotted}': {message}"
    return f"config key '{dotted}': {message} (got {error.get('input')!r})"


def _valid_keys(loc: list[str]) -> list[str]:
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)
