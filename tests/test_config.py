"""Config: YAML + overrides into typed sections; unknown or mistyped keys fail in one line."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml

from pipeline.config import ConfigError, build_config, dump_config, load_config
from pipeline.models import check_weights


def test_defaults_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prepare:\n  seed: 3\n  split: {train: 0.5, val: 0.5}\nray:\n  num_cpus: 8\n")
    cfg = load_config(path, ["prepare.seed=11", "prepare.classes=[a, b]", "storage.endpoint_url=http://127.0.0.1:9000"])
    assert cfg.prepare.seed == 11
    assert cfg.prepare.split == {"train": 0.5, "val": 0.5}
    assert cfg.prepare.classes == ["a", "b"]
    assert cfg.ray.num_cpus == 8
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000"
    assert cfg.prepare.shard_max_samples == 1000  # untouched default


def test_sections_are_frozen():
    cfg = load_config()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.prepare.seed = 5


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["prepare.shard_sise=3"])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("unknown config key 'prepare.shard_sise'; valid keys in prepare: ")
    assert "shard_max_samples" in message and "max_reject_fraction" in message


def test_unknown_section_lists_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prepar:\n  seed: 1\n")
    with pytest.raises(
        ConfigError, match=r"unknown config key 'prepar'; valid keys in the top level: augment, classify"
    ):
        load_config(path)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("prepare.seed=abc", "config key 'prepare.seed': Input should be a valid integer"),
        ("prepare.split={train: 0.7}", "split ratios must be >= 0 and sum to 1"),
        ("prepare.split={train: 0.5, dev: 0.5}", "split names must be among"),
        ("prepare.layout=zip", "config key 'prepare.layout': Input should be 'auto'"),
        ("prepare.max_reject_fraction=2", "less than or equal to 1"),
        ("prepare=3", "config key 'prepare' must be a section"),
        ("noequals", "must look like section.key=value"),
    ],
)
def test_bad_values_are_one_line(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def test_dump_round_trips():
    cfg = load_config(None, ["prepare.seed=4", "prepare.source=s3://b/raw", "augment.zoom=[0.8,1.2]"])
    again = load_config(None, [])
    assert dump_config(cfg) != dump_config(again)
    data = yaml.safe_load(dump_config(cfg))
    assert data["prepare"]["seed"] == 4 and data["prepare"]["source"] == "s3://b/raw"
    for loaded in (cfg, again, *(load_config(path) for path in SHIPPED)):
        assert build_config(yaml.safe_load(dump_config(loaded))) == loaded  # every field, every section


SHIPPED = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_every_shipped_config_loads_and_names_a_real_backbone_and_weights():
    assert len(SHIPPED) >= 8, "configs/ lost its YAML"
    for path in SHIPPED:
        cfg = load_config(path)
        check_weights(cfg.model.backbone, cfg.model.weights)  # names only: nothing is downloaded
    with pytest.raises(ValueError, match="unknown backbone 'resnet5'; known: .*resnet50"):
        check_weights("resnet5", "DEFAULT")
    with pytest.raises(ValueError, match="unknown weights 'IMAGENET1K_V3' for resnet50; known: IMAGENET1K_V1, "):
        check_weights("resnet50", "IMAGENET1K_V3")
    with pytest.raises(ValueError, match="unknown weights 'imagenet' for efficientnet_lite0"):
        check_weights("efficientnet_lite0", "imagenet")
    check_weights("resnet50", "ResNet50_Weights.IMAGENET1K_V2")
    check_weights("mobilenet_v3_small", "s3://bucket/model.pt")
