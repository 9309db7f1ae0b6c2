"""Transfer-learning building blocks without Ray: stages per family, freezing per mode, parameter
groups, the LR schedule, the exported state dict, and device choice."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline import devices
from pipeline.config import FinetuneConfig
from pipeline.models import ResolvedWeights, create_backbone, default_preprocessing, resolve_weights
from pipeline.transfer import (
    FineTuneModel,
    check_mode,
    create_optimizer,
    lr_factor,
    param_groups,
    phase_of,
    set_trainable,
    train_mode,
)


def model_of(name: str, classes: int = 3, pretrained: bool = False) -> FineTuneModel:
    torch.manual_seed(0)
    weights = ResolvedWeights(name, "none", default_preprocessing(name), None)
    if pretrained:  # a state dict of the architecture stands in for downloaded weights
        from torchvision.models import get_model

        weights = ResolvedWeights(name, "test", weights.preprocessing, None, get_model(name, weights=None).state_dict())
    return FineTuneModel(weights, classes)


def one_step(model: FineTuneModel, cfg: FinetuneConfig, frozen: list[str], size: int = 64) -> None:
    optimizer = create_optimizer(model, cfg)
    train_mode(model, frozen, cfg.freeze_bn_stats)
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 0])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "name, first, last",
    [
        ("resnet18", "stem", "layer4"),
        ("mobilenet_v3_small", "features.0", "classifier"),
        ("efficientnet_b0", "features.0", "features.8"),
        ("efficientnet_lite0", "stem", "head"),
        ("simple_cnn", "block1", "dense"),
    ],
)
def test_stages_cover_every_trunk_parameter_in_order(name, first, last):
    model = model_of(name)
    names = [n for n, _ in model.stages]
    assert (names[0], names[-1]) == (first, last)
    in_stages = {id(p) for _, modules in model.stages for m in modules for p in m.parameters()}
    assert in_stages == {id(p) for p in model.trunk.parameters()}


def test_linear_probe_trains_only_the_new_classifier_and_keeps_batchnorm_statistics():
    model = model_of("resnet18", pretrained=True)
    frozen = set_trainable(model, "linear_probe", 2)
    assert len(frozen) == 5
    trunk, head = snapshot(model.trunk), snapshot(model.head)
    one_step(model, FinetuneConfig(weight_decay=0.1), frozen)
    assert all(torch.equal(v, model.trunk.state_dict()[k]) for k, v in trunk.items())  # running stats too
    assert not torch.equal(head["weight"], model.head.weight)


def test_partial_changes_only_the_last_stages():
    model = model_of("resnet18", pretrained=True)
    frozen = set_trainable(model, "partial", 2)
    assert frozen == ["stem", "layer1", "layer2"]
    before = snapshot(model.trunk)
    one_step(model, FinetuneConfig(), frozen)
    after = model.trunk.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"layer3", "layer4"}


@pytest.mark.parametrize("freeze", [True, False])
def test_full_fine_tuning_keeps_pretrained_batchnorm_statistics_when_asked(freeze):
    model = model_of("resnet18", pretrained=True)
    frozen = set_trainable(model, "full", 2)
    assert frozen == []
    before = snapshot(model.trunk)
    one_step(model, FinetuneConfig(freeze_bn_stats=freeze), frozen)
    after = model.trunk.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert all(torch.equal(before[k], after[k]) for k in stats) == freeze
    assert not torch.equal(before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])


def test_two_phase_schedule_and_refusals():
    cfg = FinetuneConfig(mode="partial", head_epochs=2)
    assert [phase_of(e, cfg) for e in range(4)] == ["linear_probe", "linear_probe", "partial", "partial"]
    with pytest.raises(ValueError, match="set finetune.mode=full and finetune.head_epochs=0"):
        check_mode("simple_cnn", FinetuneConfig(mode="linear_probe"), pretrained=False)
    check_mode("simple_cnn", FinetuneConfig(mode="full"), pretrained=False)


def test_param_groups_lower_trunk_lr_and_no_decay_on_norms_and_biases():
    model = model_of("resnet18", pretrained=True)
    groups = param_groups(model, FinetuneConfig(lr=0.1, trunk_lr_scale=0.1, weight_decay=0.01))
    by = {(g["lr"], g["weight_decay"]): g["params"] for g in groups}
    assert len(by) == 4
    head_decay = [g for g in groups if g["params"][0] is model.head.weight][0]
    assert head_decay["lr"] == 0.1 and head_decay["weight_decay"] == 0.01
    bn = model.trunk.bn1.weight
    bn_group = [g for g in groups if any(p is bn for p in g["params"])][0]
    assert bn_group["weight_decay"] == 0.0 and bn_group["lr"] == pytest.approx(0.01)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    scratch = param_groups(model_of("simple_cnn"), FinetuneConfig(lr=0.1, trunk_lr_scale=0.1))
    assert {g["lr"] for g in scratch} == {0.1}  # nothing pretrained: one LR


def test_lr_schedule_warms_up_then_follows_cosine_or_steps():
    cosine = FinetuneConfig(epochs=10, warmup_epochs=1)
    assert lr_factor(0, cosine) == pytest.approx(0.01)
    assert lr_factor(0.5, cosine) == pytest.approx(0.505)
    assert lr_factor(1, cosine) == pytest.approx(1.0)
    assert lr_factor(5.5, cosine) == pytest.approx(0.5)
    assert lr_factor(10, cosine) == pytest.approx(0.0, abs=1e-12)
    step = FinetuneConfig(schedule="step", step_epochs=3, step_gamma=0.1)
    assert [lr_factor(e, step) for e in (0, 2.9, 3, 6.5)] == pytest.approx([1, 1, 0.1, 0.01])
    assert lr_factor(7, FinetuneConfig(schedule="constant")) == 1.0


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_lite0"])
def test_exported_state_dict_loads_as_the_architecture_with_the_new_classifier(tmp_path, name):
    model = model_of(name, classes=4).eval()
    torch.save(model.export_state(), tmp_path / "model.pt")
    (tmp_path / "model.json").write_text(json.dumps({"backbone": name, "classes": list("abcd")}))
    weights = resolve_weights("efficientnet_b0", str(tmp_path / "model.pt"))  # the sidecar's backbone wins
    assert weights.backbone == name and weights.categories == tuple("abcd")
    loaded = create_backbone(weights)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.classifier(loaded(x)), model(x), atol=1e-5)


def test_a_worker_without_gpus_never_touches_cuda():
    assert devices.worker_device(False, [0, 1]) == torch.device("cpu")
    assert devices.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert devices.resolve_precision("bf16", torch.device("cpu")) == "fp32"
    assert not torch.cuda.is_initialized()


def test_a_worker_given_a_gpu_fails_in_one_line_when_cuda_is_unusable():
    with pytest.raises(devices.DeviceError, match="assigned this worker no GPU"):
        devices.worker_device(True, [])
    if not torch.cuda.is_available():
        with pytest.raises(devices.DeviceError, match=r"CUDA 1\d\.\d and needs an NVIDIA driver >= \d+"):
            devices.worker_device(True, [0])
    message = devices.cuda_missing_message("550.54.15", "13.0")
    assert "driver >= 580" in message and "driver 550.54.15 found" in message and "\n" not in message
    assert "no NVIDIA driver found" in devices.cuda_missing_message(None, "13.0")


def test_kernel_check_and_driver_version(tmp_path):
    assert devices.has_kernels(9, 0, ["sm_75", "sm_80", "sm_90"])
    assert devices.has_kernels(8, 6, ["sm_80"])
    assert not devices.has_kernels(7, 0, ["sm_75", "sm_80"])  # V100 on a build without sm_70
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n")
    assert devices.driver_version(proc) == "550.54.15"
    assert devices.driver_version(tmp_path / "missing") is None
    assert math.isclose(devices.MIN_DRIVER[13], 580)


CONFIGS = __import__("pathlib").Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize(
    "name", ["digits-finetune", "digits-scratch", "imagenet-resnet50-finetune", "flowers-mobilenet-finetune"]
)
def test_shipped_finetune_configs_hold_together(name):
    from pipeline.config import load_config
    from pipeline.models import known_backbones

    cfg = load_config(CONFIGS / f"{name}.yaml")
    ft = cfg.finetune
    assert cfg.model.backbone in known_backbones()
    check_mode(cfg.model.backbone, ft, pretrained=cfg.model.weights.lower() != "none")
    assert ft.source and ft.output and ft.epochs > ft.head_epochs
    model = model_of(cfg.model.backbone)
    assert ft.mode != "partial" or ft.unfreeze_stages < len(model.stages)


def test_the_cluster_configs_scale_the_reference_recipe():
    from pipeline.config import load_config

    imagenet = load_config(CONFIGS / "imagenet-resnet50-finetune.yaml")
    ft, batch = imagenet.finetune, imagenet.loader.batch_size
    assert ft.use_gpu and ft.num_workers == 8 and ft.gpus_per_worker == 1
    assert ft.lr == pytest.approx(0.1 * ft.num_workers * batch * ft.accumulate / 256)  # linear scaling rule
    assert (ft.epochs, ft.momentum, ft.weight_decay, ft.optimizer) == (90, 0.9, 1e-4, "sgd")
    flowers = load_config(CONFIGS / "flowers-mobilenet-finetune.yaml")
    stages = [n for n, _ in model_of(flowers.model.backbone).stages]
    assert stages[-flowers.finetune.unfreeze_stages :] == ["features.14", "features.15", "features.16", "classifier"]
    assert flowers.finetune.head_epochs == 3 and flowers.finetune.mode == "partial"
