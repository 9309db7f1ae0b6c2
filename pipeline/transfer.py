"""Transfer learning on a registered backbone: a new classifier for the dataset's classes, the
trunk's stages by family, what is frozen in each mode, parameter groups and the LR schedule.

Modes (the classic recipe):
- `linear_probe`: the trunk is frozen and kept in eval mode (BatchNorm statistics and dropout
  as pretrained); only the new classifier trains. The same as a head on cached features, but
  with augmentation.
- `partial`: the last N stages of the trunk train, earlier stages stay frozen (and in eval mode).
- `full`: everything trains; the pretrained trunk at `trunk_lr_scale` times the head's LR.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import FinetuneConfig
from pipeline.errors import UserError
from pipeline.models import SIMPLE_CNN, ResolvedWeights, create_backbone, final_layer_path

Stages = list[tuple[str, list[nn.Module]]]
HEAD_PHASE = "linear_probe"  # what a two-phase schedule trains first
WARMUP_START = 0.01  # linear warm-up starts at lr x this


class FineTuneModel(nn.Module):
    """A backbone's trunk (its final linear layer removed) and a new classifier for `num_classes`."""

    def __init__(self, weights: ResolvedWeights, num_classes: int):
        super().__init__()
        backbone = create_backbone(weights)
        self.name, self.pretrained = weights.backbone, weights.state_dict is not None
        self.trunk = backbone.trunk
        self.head = nn.Linear(backbone.dim, num_classes)
        self.stages = trunk_stages(self.name, self.trunk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    def export_state(self) -> dict[str, torch.Tensor]:
        """The state dict in the architecture's own names (the new classifier as its final layer),
        so that `models.resolve_weights` loads it like any other state dict."""
        final = final_layer_path(self.name)
        state = {k: v.detach().cpu().clone() for k, v in self.trunk.state_dict().items()}
        state[f"{final}.weight"] = self.head.weight.detach().cpu().clone()
        state[f"{final}.bias"] = self.head.bias.detach().cpu().clone()
        return state


def trunk_stages(name: str, trunk: nn.Module) -> Stages:
    """The trunk's stages, input to output, named per family: ResNet `stem, layer1..4`;
    EfficientNet/MobileNet (torchvision) `features.0..k` (+ MobileNetV3's pre-logits `classifier`);
    EfficientNet-Lite0 (timm) `stem, blocks.0..6, head`; simple_cnn `block1..3, dense`."""
    if name == SIMPLE_CNN:
        return [(n, [getattr(trunk, n)]) for n in ("block1", "block2", "block3", "dense")]
    if name.startswith("resnet"):
        return [("stem", [trunk.conv1, trunk.bn1])] + [
            (f"layer{i}", [getattr(trunk, f"layer{i}")]) for i in range(1, 5)
        ]
    if hasattr(trunk, "conv_stem"):  # timm EfficientNet(-Lite)
        blocks = [(f"blocks.{i}", [b]) for i, b in enumerate(trunk.blocks)]
        return [("stem", [trunk.conv_stem, trunk.bn1]), *blocks, ("head", [trunk.conv_head, trunk.bn2])]
    stages = [(f"features.{i}", [m]) for i, m in enumerate(trunk.features)]
    if any(True for _ in trunk.classifier.parameters()):  # MobileNetV3: Linear + Hardswish before the logits
        stages.append(("classifier", [trunk.classifier]))
    return stages


def phase_of(epoch: int, cfg: FinetuneConfig) -> str:
    """What trains in `epoch` (0-based): the head alone during the first `head_epochs`, then `mode`."""
    return HEAD_PHASE if epoch < cfg.head_epochs else cfg.mode


def check_mode(name: str, cfg: FinetuneConfig, pretrained: bool) -> None:
    """Refuse combinations that cannot work, before any worker starts."""
    uses_frozen = cfg.mode != "full" or cfg.head_epochs > 0
    if uses_frozen and not pretrained:
        raise UserError(
            f"finetune.mode={cfg.mode} (head_epochs={cfg.head_epochs}) freezes a trunk, but {name} has no pretrained "
            "weights here; set finetune.mode=full and finetune.head_epochs=0 to train it from scratch"
        )


def set_trainable(model: FineTuneModel, phase: str, unfreeze_stages: int) -> list[str]:
    """Set `requires_grad` for `phase`; returns the names of the frozen stages."""
    stages = model.stages
    if phase == "full":
        trainable = len(stages)
    elif phase == "partial":
        trainable = min(unfreeze_stages, len(stages))
    else:
        trainable = 0
    model.requires_grad_(True)
    frozen = stages[: len(stages) - trainable]
    for _, modules in frozen:
        for module in modules:
            module.requires_grad_(False)
    if trainable == 0:
        model.trunk.requires_grad_(False)  # parameter-free glue (pooling) included
    return [n for n, _ in frozen]


def train_mode(model: FineTuneModel, frozen: list[str], freeze_bn_stats: bool = False) -> None:
    """`model.train()`, but frozen stages stay in eval mode: their BatchNorm statistics (and
    dropout) stay as pretrained, as a frozen feature extractor needs. With `freeze_bn_stats`, a
    pretrained trunk's BatchNorm layers stay in eval mode in the trained stages too (Keras'
    transfer-learning advice for small datasets). Off by default: on the digits, full fine-tuning
    of Lite0 with it diverged to chance within an epoch, where batch statistics dipped and recovered.
    """
    model.train()
    if len(frozen) == len(model.stages):
        model.trunk.eval()
        return
    for name, modules in model.stages:
        if name in frozen:
            for module in modules:
                module.eval()
    if freeze_bn_stats and model.pretrained:
        for module in model.trunk.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def param_groups(model: FineTuneModel, cfg: FinetuneConfig) -> list[dict]:
    """Head and trunk at their own LR (trunk x `trunk_lr_scale` when pretrained), each with and
    without weight decay: no decay on biases and normalisation weights (1-d tensors)."""
    trunk_lr = cfg.lr * (cfg.trunk_lr_scale if model.pretrained else 1.0)
    groups = []
    for part, lr in ((model.head, cfg.lr), (model.trunk, trunk_lr)):
        params = list(part.parameters())
        for decay, chosen in (
            (cfg.weight_decay, [p for p in params if p.ndim > 1]),
            (0.0, [p for p in params if p.ndim <= 1]),
        ):
            if chosen:
                groups.append({"params": chosen, "lr": lr, "base_lr": lr, "weight_decay": decay})
    return groups


def create_optimizer(model: FineTuneModel, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW over every parameter that may ever train; frozen ones
    get no gradient, and torch's optimizers skip those entirely (no decay, no momentum)."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(progress: float, cfg: FinetuneConfig) -> float:
    """The LR multiplier at `progress` epochs into the run (fractional): linear warm-up, then
    cosine to zero at `epochs`, steps of `step_gamma`, or constant. A pure function, so a
    resumed run needs no scheduler state."""
    warm = cfg.warmup_epochs
    if warm and progress < warm:
        return WARMUP_START + (1 - WARMUP_START) * progress / warm
    if cfg.schedule == "cosine":
        t = min(max((progress - warm) / max(cfg.epochs - warm, 1e-9), 0.0), 1.0)
        return 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return cfg.step_gamma ** int(progress // cfg.step_epochs)
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group at its base LR x `factor`."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
