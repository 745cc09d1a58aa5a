"""Local training and evaluation at a hospital: plain PyTorch, no Flower.

The ClientApp calls these between receiving the global parameters and replying; the
benchmarks call the same functions for pooled (centralised) and local-only baselines.
Images arrive as uint8 (N, 3, S, S) tensors and are augmented/normalised per batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedssl_core import names
from fedssl_core.models import FedSSLModel

from .errors import ConfigError
from .metrics import classification_metrics
from .ssl.losses import NTXentLoss
from .ssl.transforms import SimCLRTransform, normalize, rotate_batch

SHARE_ENCODER = "encoder"
SHARE_PROJECTION_HEAD = "projection-head"
SHARE_MODES = (SHARE_ENCODER, SHARE_PROJECTION_HEAD)
FINETUNE_LINEAR = "linear"
FINETUNE_FULL = "full"
FINETUNE_MODES = (FINETUNE_LINEAR, FINETUNE_FULL)

_TASK_HEAD = {names.SSL_SIMCLR: names.GROUP_PROJECTION_HEAD, names.SSL_ROTATION: names.GROUP_ROTATION_HEAD}


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def trainable_groups(phase: str, task: str | None, share: str = SHARE_ENCODER, mode: str = FINETUNE_LINEAR) -> tuple[str, ...]:
    """The parameter groups a hospital trains in `phase`."""
    _check(phase, names.PHASES, "phase")
    if phase == names.PHASE_SSL:
        _check(task or "", names.SSL_TASKS, "ssl-task")
        _check(share, SHARE_MODES, "share")
        if share == SHARE_PROJECTION_HEAD:
            return (_TASK_HEAD[task],)  # backbone frozen: only the head learns
        return (names.GROUP_ENCODER, _TASK_HEAD[task])
    _check(mode, FINETUNE_MODES, "finetune-mode")
    return (names.GROUP_CLASSIFIER,) if mode == FINETUNE_LINEAR else (names.GROUP_ENCODER, names.GROUP_CLASSIFIER)


def shared_groups(phase: str, share: str = SHARE_ENCODER, mode: str = FINETUNE_LINEAR) -> tuple[str, ...]:
    """The parameter groups the server aggregates in `phase`; task heads are never shared
    except the projection head in the frozen-backbone set-up."""
    _check(phase, names.PHASES, "phase")
    if phase == names.PHASE_SSL:
        _check(share, SHARE_MODES, "share")
        return (names.GROUP_PROJECTION_HEAD,) if share == SHARE_PROJECTION_HEAD else (names.GROUP_ENCODER,)
    _check(mode, FINETUNE_MODES, "finetune-mode")
    return (names.GROUP_CLASSIFIER,) if mode == FINETUNE_LINEAR else (names.GROUP_ENCODER, names.GROUP_CLASSIFIER)


def _prepare(model: FedSSLModel, groups: tuple[str, ...]) -> list[nn.Parameter]:
    """Make only `groups` trainable; frozen groups run in eval mode so BatchNorm statistics
    of a frozen encoder do not drift."""
    params = []
    for group in names.PARAM_GROUPS:
        module = getattr(model, group)
        train = group in groups
        module.train(train)
        for p in module.parameters():
            p.requires_grad_(train)
            if train:
                params.append(p)
    return params


def _batches(n: int, batch_size: int, generator: torch.Generator, min_size: int = 1) -> Iterator[torch.Tensor]:
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        if len(idx) >= min_size:
            yield idx


def train_ssl(
    model: FedSSLModel,
    images: torch.Tensor,
    task: str,
    *,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 1e-3,
    share: str = SHARE_ENCODER,
    seed: int = 0,
    temperature: float = 0.5,
) -> dict:
    """Self-supervised training on unlabelled uint8 `images` with `task` (simclr | rotation)."""
    groups = trainable_groups(names.PHASE_SSL, task, share)
    params = _prepare(model, groups)
    optimizer = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    criterion = NTXentLoss(temperature)
    transform = SimCLRTransform()
    total, batches = 0.0, 0
    for _ in range(epochs):
        for idx in _batches(len(images), batch_size, g, min_size=2):
            batch = images[idx]
            if task == names.SSL_SIMCLR:
                v1, v2 = transform(batch, g)
                z = model.projection_head(model.encoder(torch.cat([v1, v2])))
                loss = criterion(z[: len(idx)], z[len(idx) :])
            else:
                rotated, k = rotate_batch(batch, g)
                loss = F.cross_entropy(model.rotation_head(model.encoder(normalize(rotated))), k)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
    mean = total / batches if batches else float("nan")
    return {names.M_LOSS: mean, names.ssl_loss_key(task): mean, names.M_EXAMPLES: int(len(images))}


def _class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1 over present classes): rare diagnoses count."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    w = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), torch.zeros_like(counts))
    return w


def _augment_supervised(batch: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Label-preserving dermoscopy augmentation: flips and 90-degree rotations."""
    rotated, _ = rotate_batch(batch, g)
    flip = torch.rand(len(batch), generator=g) < 0.5
    rotated[flip] = torch.flip(rotated[flip], dims=(-1,))
    return rotated


def train_supervised(
    model: FedSSLModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 1e-3,
    mode: str = FINETUNE_LINEAR,
    seed: int = 0,
    class_weighted: bool = True,
) -> dict:
    """Train the classifier (linear probe) or encoder + classifier (full) on labelled images."""
    groups = trainable_groups(names.PHASE_FINETUNE, None, mode=mode)
    params = _prepare(model, groups)
    optimizer = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    weight = _class_weights(labels, model.num_classes) if class_weighted else None
    total, batches = 0.0, 0
    if mode == FINETUNE_LINEAR:
        # The encoder is frozen: compute features once, then epochs over features are cheap.
        features = embed(model, images, batch_size=max(batch_size, 256))
        for _ in range(epochs):
            for idx in _batches(len(images), batch_size, g):
                loss = F.cross_entropy(model.classifier(features[idx]), labels[idx], weight=weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                batches += 1
    else:
        for _ in range(epochs):
            for idx in _batches(len(images), batch_size, g, min_size=2):
                x = normalize(_augment_supervised(images[idx], g))
                loss = F.cross_entropy(model(x), labels[idx], weight=weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                batches += 1
    mean = total / batches if batches else float("nan")
    return {names.M_LOSS: mean, names.M_FINETUNE_LOSS: mean, names.M_EXAMPLES: int(len(images))}


@torch.no_grad()
def embed(model: FedSSLModel, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    was_training = model.encoder.training
    model.encoder.eval()
    out = torch.cat([model.encoder(normalize(images[i : i + batch_size])) for i in range(0, len(images), batch_size)])
    model.encoder.train(was_training)
    return out


@torch.no_grad()
def predict_proba(model: FedSSLModel, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([torch.softmax(model(normalize(images[i : i + batch_size])), dim=1) for i in range(0, len(images), batch_size)])


def evaluate(model: FedSSLModel, images: torch.Tensor, labels: torch.Tensor, class_names: list[str], *, batch_size: int = 256) -> dict:
    """Metrics of the classifier on a held-out split (`metrics.classification_metrics` keys)
    plus the cross-entropy `loss` and `test_examples`."""
    if len(images) == 0:
        raise ConfigError("cannot evaluate on an empty test split; lower test-fraction or provide more images")
    proba = predict_proba(model, images, batch_size=batch_size)
    out = classification_metrics(labels.numpy(), proba.numpy(), class_names)
    out[names.M_LOSS] = float(F.nll_loss(torch.log(proba.clamp_min(1e-12)), labels))
    out[names.M_TEST_EXAMPLES] = int(len(images))
    return out


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
