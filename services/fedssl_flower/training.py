"""Local training and evaluation at a hospital: plain PyTorch, no Flower.

The ClientApp calls these between receiving the global parameters and replying; the
benchmarks call the same functions for pooled (centralised) and local-only baselines.
Images arrive as uint8 (N, 3, S, S) tensors and are augmented/normalised per batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedssl_core import names
from fedssl_core.models import FedSSLModel, check_tta, combine_views, set_activation_checkpointing, tta_views

from .errors import ConfigError
from .metrics import classification_metrics
from . import ssl as ssl_methods
from .ssl.transforms import SimCLRTransform, normalize, rotate_batch

_TASK_HEAD = {task: method.head for task, method in ssl_methods.METHODS.items()}
# share=encoder-and-heads: every SSL task head travels with the encoder, so hospitals running
# the same task train their encoders against one averaged head rather than each against its
# own; a hospital returns the heads of the other tasks unchanged.
_SSL_HEADS = tuple(dict.fromkeys(_TASK_HEAD.values()))  # each head once: SimCLR and MICLe share the projection head
# task=generate: both networks of the GAN are averaged. The discriminator travels too: a
# hospital's generator learns from its discriminator, and four discriminators that each saw
# only their own images would pull one averaged generator four ways (and a fresh local
# discriminator each round would start from nothing). Sharing it reveals little beyond the
# generator: the generator is trained on nothing but the discriminator's gradients. Neither is
# an image store, but both can memorise: the per-round memorisation check scores that.
GENERATIVE_GROUPS = (names.GROUP_GENERATOR, names.GROUP_DISCRIMINATOR)


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def trainable_groups(phase: str, task: str | None, share: str = names.SHARE_ENCODER, mode: str = names.FINETUNE_LINEAR) -> tuple[str, ...]:
    """The parameter groups a hospital trains in `phase`."""
    if phase == names.PHASE_GENERATE:
        return GENERATIVE_GROUPS
    _check(phase, names.PHASES, "phase")
    if phase == names.PHASE_SSL:
        _check(task or "", names.SSL_TASKS, "ssl-task")
        _check(share, names.SHARE_MODES, "share")
        if share == names.SHARE_PROJECTION_HEAD:
            return (_TASK_HEAD[task],)  # backbone frozen: only the head learns
        return (names.GROUP_ENCODER, _TASK_HEAD[task])
    _check(mode, names.FINETUNE_MODES, "finetune-mode")
    return (names.GROUP_CLASSIFIER,) if mode == names.FINETUNE_LINEAR else (names.GROUP_ENCODER, names.GROUP_CLASSIFIER)


def shared_groups(phase: str, share: str = names.SHARE_ENCODER, mode: str = names.FINETUNE_LINEAR) -> tuple[str, ...]:
    """The parameter groups the server aggregates in `phase`. SSL: the encoder (`encoder`),
    the encoder and every SSL task head (`encoder-and-heads`), or the projection head alone
    in the frozen-backbone set-up (`projection-head`). Generative rounds: the generator and
    the discriminator (`GENERATIVE_GROUPS`)."""
    if phase == names.PHASE_GENERATE:
        return GENERATIVE_GROUPS
    _check(phase, names.PHASES, "phase")
    if phase == names.PHASE_SSL:
        _check(share, names.SHARE_MODES, "share")
        return {names.SHARE_PROJECTION_HEAD: (names.GROUP_PROJECTION_HEAD,), names.SHARE_ENCODER: (names.GROUP_ENCODER,),
                names.SHARE_ENCODER_AND_HEADS: (names.GROUP_ENCODER, *_SSL_HEADS)}[share]
    _check(mode, names.FINETUNE_MODES, "finetune-mode")
    return (names.GROUP_CLASSIFIER,) if mode == names.FINETUNE_LINEAR else (names.GROUP_ENCODER, names.GROUP_CLASSIFIER)


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


@dataclass(frozen=True)
class Schedule:
    """How many optimizer steps a round takes and where they sit in the phase's learning rate
    schedule. `steps` = 0: `epochs` passes over the data; otherwise exactly `steps` batches,
    reshuffling as often as needed (a small hospital takes as many steps as a large one).
    `offset`/`total`: steps before this round and in the whole phase (for `cosine`)."""

    lr: float = 1e-3
    steps: int = 0
    epochs: int = 1
    kind: str = names.SCHEDULE_CONSTANT
    offset: int = 0
    total: int = 0
    warmup: int = 0  # linear warm-up steps at the start of the phase

    def lr_at(self, step: int) -> float:
        """Learning rate of this round's `step`-th batch."""
        t = self.offset + step
        if self.warmup and t < self.warmup:
            return self.lr * (t + 1) / self.warmup
        if self.kind == names.SCHEDULE_COSINE and self.total > self.warmup:
            progress = min(1.0, (t - self.warmup) / (self.total - self.warmup))
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr

    def batches(self, n: int, batch_size: int, generator: torch.Generator, min_size: int = 1) -> Iterator[torch.Tensor]:
        if self.steps <= 0:
            for _ in range(self.epochs):
                yield from _batches(n, batch_size, generator, min_size)
            return
        if n < min_size:
            return
        done = 0
        while done < self.steps:
            for idx in _batches(n, min(batch_size, n), generator, min_size):
                yield idx
                done += 1
                if done == self.steps:
                    return


def cannot_train(phase: str, images: int, mode: str = names.FINETUNE_LINEAR) -> str | None:
    """Why a hospital with `images` training images cannot take a `phase` round, or None.
    Training BatchNorm (and SimCLR's negatives) needs two images in a batch; a linear probe on
    frozen features needs one. Below that a round would take no step and report a NaN loss."""
    need = 1 if phase == names.PHASE_FINETUNE and mode == names.FINETUNE_LINEAR else 2
    if images < need:
        return (f"{images} training image(s); {phase} training "
                f"{'of the linear classifier ' if need == 1 else ''}needs at least {need}")
    return None


def _optimizer(params: list[nn.Parameter], schedule: Schedule, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=schedule.lr_at(0), weight_decay=weight_decay)


def optimizer_moments(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat tensors (`"<index>.<name>"`), e.g. AdamW's
    step, exp_avg and exp_avg_sq: storable as safetensors, no pickle."""
    return {f"{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().clone()
            for i, st in optimizer.state_dict()["state"].items() for k, v in st.items()}


def load_optimizer_moments(optimizer: torch.optim.Optimizer, moments: dict[str, torch.Tensor]) -> None:
    """Restore what `optimizer_moments` saved, for the same parameters in the same order."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) >= len(params):
            raise ConfigError(f"optimizer state entry {key!r} names no parameter of this model ({len(params)} trained tensors)")
        if name != "step" and value.shape != params[int(index)].shape:
            raise ConfigError(f"optimizer state entry {key!r} has shape {tuple(value.shape)}, "
                              f"its parameter {tuple(params[int(index)].shape)}: it belongs to another model")
        state.setdefault(int(index), {})[name] = value
    full = optimizer.state_dict()
    full["state"] = state
    optimizer.load_state_dict(full)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def proximal_reference(model: nn.Module, groups: tuple[str, ...], mu: float) -> dict[str, torch.Tensor] | None:
    """The values, now, of `model`'s trainable parameters in the shared `groups`: the global
    model FedProx pulls toward (captured at the start of the round). None when `mu` is 0."""
    if not mu:
        return None
    prefixes = tuple(f"{g}." for g in groups)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefixes)}


def proximal_term(model: nn.Module, reference: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's proximal term (Li et al. 2020), `mu / 2 * ||w - w_global||^2` over the
    parameters named in `reference` (`proximal_reference`): added to the local loss, it keeps
    a hospital's update near the global model it started from."""
    params = dict(model.named_parameters())
    return (mu / 2) * sum(((params[n] - ref) ** 2).sum() for n, ref in reference.items())


@dataclass
class Contrast:
    """MOON's model-contrastive term (Li, He & Song, CVPR 2021) for one hospital's round: each
    image's representation is pulled toward the global model's representation of it and pushed
    away from the hospital's own previous local model's, `mu * -log(e^(s_g/t) / (e^(s_g/t) + e^(s_p/t)))`
    with `s` the cosine similarity of encoder features and `t` the temperature. `global_encoder`
    and `previous_encoder` are frozen copies (eval mode: their BatchNorm statistics do not move)."""

    global_encoder: nn.Module
    previous_encoder: nn.Module
    mu: float = 1.0
    temperature: float = 0.5

    def __post_init__(self) -> None:
        for encoder in (self.global_encoder, self.previous_encoder):
            encoder.eval().requires_grad_(False)
            _channels_last(encoder, True)

    def term(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            anchor, previous = self.global_encoder(x), self.previous_encoder(x)
        z = F.normalize(features, dim=1)
        logits = torch.stack([(z * F.normalize(anchor, dim=1)).sum(1), (z * F.normalize(previous, dim=1)).sum(1)], 1)
        target = torch.zeros(len(z), dtype=torch.long)
        return self.mu * F.cross_entropy(logits / self.temperature, target)


@dataclass
class Joint:
    """A self-supervised term in fine-tuning's loss (S4L, Zhai et al., ICCV 2019: self-supervised
    semi-supervised learning), benchmark only: each step also draws `batch_size` of the
    hospital's training images, labelled or not (`images`, uint8), and adds `weight` times
    `method`'s loss on them (`ssl_methods.build`; its head trains beside the encoder and the
    classifier and stays at the hospital), so the unlabelled images shape the encoder while
    the labelled ones train the classifier. `batchnorm`: `adapt` (the term's augmented views
    move the encoder's BatchNorm running statistics like the labelled batches do) or `frozen`
    (they normalise with their own batch statistics but leave the running ones, which the
    served model uses, to the labelled batches: momentum 0 during the term's forward pass)."""

    method: ssl_methods.SSLMethod
    images: torch.Tensor
    weight: float = 1.0
    batch_size: int = 32
    batchnorm: str = names.SSL_BATCHNORM_ADAPT

    def __post_init__(self) -> None:
        _check(self.batchnorm, names.SSL_BATCHNORM, "joint batchnorm")

    @property
    def heads(self) -> tuple[str, ...]:
        """Parameter groups the term trains besides the encoder and the classifier."""
        return (self.method.head,)

    def term(self, model: FedSSLModel, g: torch.Generator, adjust: torch.Tensor | None = None) -> torch.Tensor:
        idx = torch.randint(len(self.images), (self.batch_size,), generator=g)
        with _running_statistics(model, self.batchnorm):
            return self.weight * self.method.loss(model, self.method.batch(self.images, idx, g), g)


@contextmanager
def _running_statistics(model: FedSSLModel, batchnorm: str) -> Iterator[None]:
    """`batchnorm` frozen: the encoder's BatchNorm layers leave their running statistics alone
    inside (momentum 0: batches still normalise with their own statistics); adapt: no change."""
    layers = list(encoder_batchnorms(model).values()) if batchnorm == names.SSL_BATCHNORM_FROZEN else []
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        yield
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum


@dataclass
class PseudoLabel:
    """FixMatch (Sohn et al., NeurIPS 2020) as a term in fine-tuning's loss, benchmark only: each
    step also draws `batch_size` of the hospital's training images, labelled or not (`images`,
    uint8), predicts each from a weakly augmented view (flips and 90-degree turns, the model in
    eval mode, no gradient), and where the top class's probability reaches `threshold` trains
    the model to predict that class from a strongly augmented view (`SimCLRTransform`'s crop and
    colour jitter): `weight` times the cross-entropy summed over the confident images, divided
    by `batch_size`. With a balanced-softmax objective (`adjust`, the log label prior) the
    prediction and the term use the adjusted logits, as the labelled batches do. `batchnorm` as
    in `Joint` (for the strong views). `drawn` and `confident` count the images, for reports;
    `classes` the confident pseudo-labels by class. `truth` (the images' real labels, which
    only a benchmark has) adds `correct`, the confident pseudo-labels that match them."""

    images: torch.Tensor
    weight: float = 1.0
    batch_size: int = 32
    threshold: float = 0.95
    batchnorm: str = names.SSL_BATCHNORM_FROZEN
    truth: torch.Tensor | None = None
    drawn: int = field(default=0, init=False)
    confident: int = field(default=0, init=False)
    correct: int = field(default=0, init=False)
    classes: dict[int, int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        _check(self.batchnorm, names.SSL_BATCHNORM, "pseudo-label batchnorm")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"pseudo-label threshold {self.threshold}: expected a probability in (0, 1]")

    @property
    def heads(self) -> tuple[str, ...]:
        return ()

    def term(self, model: FedSSLModel, g: torch.Generator, adjust: torch.Tensor | None = None) -> torch.Tensor:
        idx = torch.randint(len(self.images), (self.batch_size,), generator=g)
        batch = self.images[idx]
        shift = 0.0 if adjust is None else adjust
        with torch.no_grad():
            was_training = model.training
            model.eval()
            try:
                weak = supervised_view(batch, names.AUGMENT_FLIPS, g, model.mean, model.std)
                proba = torch.softmax(model(weak.contiguous(memory_format=torch.channels_last)) + shift, dim=1)
            finally:
                model.train(was_training)
        confidence, target = proba.max(dim=1)
        keep = confidence >= self.threshold
        self.drawn += len(batch)
        self.confident += int(keep.sum())
        for c in target[keep].tolist():
            self.classes[c] = self.classes.get(c, 0) + 1
        if self.truth is not None:
            self.correct += int((target[keep] == self.truth[idx][keep]).sum())
        if not keep.any():
            return torch.zeros(())
        strong = SimCLRTransform(mean=model.mean, std=model.std).view(batch[keep], g)
        with _running_statistics(model, self.batchnorm):
            logits = model(strong.contiguous(memory_format=torch.channels_last))
        return self.weight * F.cross_entropy(logits + shift, target[keep], reduction="sum") / self.batch_size


def encoder_batchnorms(model: FedSSLModel) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The encoder's BatchNorm layers by state-dict prefix (`encoder.<path>`)."""
    return {f"encoder.{n}": m for n, m in model.encoder.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


class _Checkpointing:
    """Activation checkpointing of a training loop's encoder (`set_activation_checkpointing`)
    as a context: on inside, off after (evaluation and the next round see a plain model).
    Its `backward` puts the encoder's BatchNorm running statistics back as the forward pass
    left them, since the blocks' recomputation during backward runs in train mode and would
    update them a second time: the step is the plain step's, with a lower memory peak. Off
    (`on` false): a plain `loss.backward()`."""

    def __init__(self, model: FedSSLModel, on: bool) -> None:
        self.model, self.on = model, on
        self.batchnorms = list(encoder_batchnorms(model).values()) if on else []

    def __enter__(self) -> "_Checkpointing":
        if self.on:
            set_activation_checkpointing(self.model.encoder, True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.on:
            set_activation_checkpointing(self.model.encoder, False)

    def backward(self, loss: torch.Tensor) -> None:
        saved = [(b, b.clone()) for m in self.batchnorms for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                 if b is not None]
        loss.backward()
        for buffer, value in saved:
            buffer.copy_(value)


def _hold_batchnorm_statistics(model: FedSSLModel, batchnorm: str) -> None:
    """`batchnorm` frozen: the encoder's BatchNorm layers run in eval mode for the rest of a
    training loop (batches normalised with the running statistics, which stay as they are);
    adapt: they stay in the mode `_prepare` set."""
    if batchnorm == names.SSL_BATCHNORM_FROZEN:
        for layer in encoder_batchnorms(model).values():
            layer.eval()


def _channels_last(model: nn.Module, on: bool) -> None:
    """Convolutions run ~1.4x faster on CPU in channels-last layout; state dicts leave in the
    default layout so serialisation sees ordinary contiguous tensors."""
    model.to(memory_format=torch.channels_last if on else torch.contiguous_format)


def train_ssl(
    model: FedSSLModel,
    images: torch.Tensor,
    task: str,
    *,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 1e-3,
    share: str = names.SHARE_ENCODER,
    seed: int = 0,
    temperature: float = 0.5,
    schedule: Schedule | None = None,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    colour_jitter: float = 0.4,
    batchnorm: str = names.SSL_BATCHNORM_ADAPT,
    checkpointing: bool = False,
    lesions: Sequence[str] = (),
) -> dict:
    """Self-supervised training on unlabelled uint8 `images` with `task` (`ssl_methods.METHODS`:
    simclr | rotation | micle; `lesions`, the lesion or patient of each image, pairs MICLe's images).
    `schedule` (steps, learning-rate schedule) overrides `epochs` and `lr`. `proximal_mu` > 0
    adds FedProx's `proximal_term` toward the shared groups' values at the start (the
    reported loss stays the SSL loss alone). `colour_jitter`: SimCLR's brightness, contrast
    and saturation jitter strength (0 = none). `batchnorm`: `adapt` (the encoder's BatchNorm
    running statistics follow the augmented views) or `frozen` (they stay as they came, the
    layers normalising with them: an ImageNet start keeps the statistics its weights expect).
    `checkpointing`: activation checkpointing of the encoder when it trains (`_Checkpointing`:
    the same steps with a lower memory peak, for one more forward pass of the encoder's blocks)."""
    _check(batchnorm, names.SSL_BATCHNORM, "ssl-batchnorm")
    schedule = schedule or Schedule(lr=lr, epochs=epochs)
    groups = trainable_groups(names.PHASE_SSL, task, share)
    params = _prepare(model, groups)
    _hold_batchnorm_statistics(model, batchnorm)
    reference = proximal_reference(model, shared_groups(names.PHASE_SSL, share), proximal_mu)
    optimizer = _optimizer(params, schedule, weight_decay)
    g = torch.Generator().manual_seed(seed)
    method = ssl_methods.build(task, model, temperature=temperature, colour_jitter=colour_jitter, groups=lesions)
    total, batches = 0.0, 0
    _channels_last(model, True)
    with _Checkpointing(model, checkpointing and names.GROUP_ENCODER in groups) as steps:
        for step, idx in enumerate(schedule.batches(len(images), batch_size, g, min_size=2)):
            _set_lr(optimizer, schedule.lr_at(step))
            loss = method.loss(model, method.batch(images, idx, g), g)
            optimizer.zero_grad(set_to_none=True)
            steps.backward(loss if reference is None else loss + proximal_term(model, reference, proximal_mu))
            optimizer.step()
            total += float(loss.detach())
            batches += 1
    _channels_last(model, False)
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


def supervised_view(batch: torch.Tensor, augment: str, g: torch.Generator, mean, std) -> torch.Tensor:
    """A uint8 batch as the normalised float input of one fine-tuning step under `augment`."""
    if augment == names.AUGMENT_CROP_JITTER:
        return SimCLRTransform(crop_scale=(0.5, 1.0), brightness=0.2, contrast=0.2, saturation=0.2, jitter_p=0.8,
                               mean=mean, std=std).view(batch, g)
    return normalize(_augment_supervised(batch, g), mean, std)


def balanced_log_prior(counts: torch.Tensor) -> torch.Tensor:
    """The log label prior that balanced softmax adds to the logits, from per-class counts: an
    absent class gets the prior of half an example, so its logit is not pushed down."""
    counts = counts.float()
    return torch.log(counts.clamp(min=0.5) / counts.sum().clamp(min=1))


def train_supervised(
    model: FedSSLModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 1e-3,
    mode: str = names.FINETUNE_LINEAR,
    seed: int = 0,
    class_weighted: bool = True,
    loss: str = names.LOSS_WEIGHTED_CE,
    schedule: Schedule | None = None,
    weight_decay: float = 0.0,
    optimizer_state: dict | None = None,
    drift: dict | None = None,
    proximal_mu: float = 0.0,
    augment: str = names.AUGMENT_FLIPS,
    contrast: Contrast | None = None,
    checkpointing: bool = False,
    joint: Joint | PseudoLabel | None = None,
    class_counts: torch.Tensor | None = None,
    batchnorm: str = names.SSL_BATCHNORM_ADAPT,
) -> dict:
    """Train the classifier (linear probe) or encoder + classifier (full) on labelled images.
    `loss`: class-weighted cross-entropy (unweighted if not `class_weighted`) or balanced
    softmax over the label prior of `labels`. `schedule` overrides `epochs` and `lr`.
    `optimizer_state`: a dict that carries the AdamW moments from one round to the next (read
    from its "adamw" entry when present, written back after training, `optimizer_moments`);
    without it every round starts a fresh optimizer.
    `drift` (full mode; SCAFFOLD, Karimireddy et al. 2020): its "correction" (parameter name ->
    tensor, the server's control variate minus this hospital's) is added to every gradient,
    and the mean raw gradient of the round is written back as its "gradients" (the
    hospital's next control variate).
    `proximal_mu` > 0 adds FedProx's `proximal_term` toward the shared groups' values at the
    start (the reported loss stays the task loss alone).
    `augment` (full mode): `names.AUGMENTS`, what each fine-tuning batch goes through.
    `contrast` (full mode): MOON's model-contrastive term (`Contrast.term`) is added to every
    batch's loss (the reported loss stays the task loss alone).
    `checkpointing` (full mode): activation checkpointing of the encoder (`_Checkpointing`).
    `joint` (full mode): a term on the hospital's images, labelled or not, added to every
    batch's loss: self-supervised (`Joint`; its head trains too) or pseudo-labels
    (`PseudoLabel`); the reported loss stays the task loss alone.
    `class_counts`: the label counts whose prior the balanced softmax uses (e.g. the whole
    federation's, benchmark only); by default those of `labels`.
    `batchnorm` (full mode): `adapt`, as usual (each batch normalised by its own statistics,
    which the running ones follow), or `frozen`: the encoder's BatchNorm layers run in eval
    mode, so every batch is normalised with the running statistics the model came with, which
    stay as they are, while their affine weights still learn (benchmark only)."""
    _check(loss, names.FINETUNE_LOSSES, "finetune-loss")
    _check(augment, names.AUGMENTS, "augment")
    _check(batchnorm, names.SSL_BATCHNORM, "fine-tuning batchnorm")
    if batchnorm == names.SSL_BATCHNORM_FROZEN and joint is not None:
        raise ConfigError("fine-tuning with frozen BatchNorm statistics takes no term on unlabelled images (joint): "
                          "its scoring passes reset the layers' mode")
    schedule = schedule or Schedule(lr=lr, epochs=epochs)
    groups = trainable_groups(names.PHASE_FINETUNE, None, mode=mode)
    if joint is not None:
        if mode != names.FINETUNE_FULL:
            raise ConfigError("a term on the hospital's unlabelled images in fine-tuning (joint) needs finetune-mode=full: "
                              "it trains the encoder")
        groups = (*groups, *joint.heads)
    params = _prepare(model, groups)
    _hold_batchnorm_statistics(model, batchnorm)
    reference = proximal_reference(model, shared_groups(names.PHASE_FINETUNE, mode=mode), proximal_mu)

    def with_proximal(value: torch.Tensor) -> torch.Tensor:
        return value if reference is None else value + proximal_term(model, reference, proximal_mu)
    optimizer = _optimizer(params, schedule, weight_decay)
    if optimizer_state is not None and optimizer_state.get("adamw"):
        load_optimizer_moments(optimizer, optimizer_state["adamw"])
    g = torch.Generator().manual_seed(seed)
    counts = torch.bincount(labels, minlength=model.num_classes).float() if class_counts is None else class_counts.float()
    if loss == names.LOSS_BALANCED_SOFTMAX:
        adjust, weight = balanced_log_prior(counts), None
    else:
        adjust, weight = None, (_class_weights(labels, model.num_classes) if class_weighted else None)

    def objective(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits if adjust is None else logits + adjust, target, weight=weight)

    total, batches = 0.0, 0
    if mode == names.FINETUNE_LINEAR:
        # The encoder is frozen: compute features once, then epochs over features are cheap.
        features = embed(model, images, batch_size=max(batch_size, 256))
        for step, idx in enumerate(schedule.batches(len(images), batch_size, g)):
            _set_lr(optimizer, schedule.lr_at(step))
            value = objective(model.classifier(features[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            with_proximal(value).backward()
            optimizer.step()
            total += float(value.detach())
            batches += 1
    else:
        _channels_last(model, True)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] if drift is not None else []
        grad_sums = {n: torch.zeros_like(p) for n, p in named}
        with _Checkpointing(model, checkpointing) as steps:
            for step, idx in enumerate(schedule.batches(len(images), batch_size, g, min_size=2)):
                _set_lr(optimizer, schedule.lr_at(step))
                x = supervised_view(images[idx], augment, g, model.mean, model.std).contiguous(memory_format=torch.channels_last)
                features = model.encoder(x)
                value = objective(model.classifier(features), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                steps.backward(with_proximal(value) + (contrast.term(features, x) if contrast is not None else 0)
                               + (joint.term(model, g, adjust) if joint is not None else 0))
                for n, p in named:
                    if p.grad is not None:
                        grad_sums[n] += p.grad
                        if n in drift.get("correction", {}):
                            p.grad += drift["correction"][n]
                optimizer.step()
                total += float(value.detach())
                batches += 1
        _channels_last(model, False)
        if drift is not None and batches:
            drift["gradients"] = {n: t / batches for n, t in grad_sums.items()}
    if optimizer_state is not None:
        optimizer_state["adamw"] = optimizer_moments(optimizer)
    mean = total / batches if batches else float("nan")
    return {names.M_LOSS: mean, names.M_FINETUNE_LOSS: mean, names.M_EXAMPLES: int(len(images))}


@torch.no_grad()
def embed(model: FedSSLModel, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    was_training = model.encoder.training
    model.encoder.eval()
    out = torch.cat([model.encoder(normalize(images[i : i + batch_size], model.mean, model.std)) for i in range(0, len(images), batch_size)])
    model.encoder.train(was_training)
    return out


@torch.no_grad()
def recompute_batchnorm(model: FedSSLModel, images: torch.Tensor, *, batch_size: int = 256) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Sets every BatchNorm layer's running statistics to the mean over `images` (in batches,
    as in training: each layer sees the batch statistics of the layers before it) of the batch
    mean and variance, and returns them by layer name with the number of images behind them,
    so that hospitals' statistics can be merged. Only the encoder's layers: heads are not run."""
    layers = encoder_batchnorms(model)
    saved = {n: m.momentum for n, m in layers.items()}
    for m in layers.values():
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    was_training = model.training
    model.train()
    try:
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size]
            if len(batch) > 1:
                model.encoder(normalize(batch, model.mean, model.std))
    finally:
        for n, m in layers.items():
            m.momentum = saved[n]
        model.train(was_training)
    return {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in layers.items()}


@torch.no_grad()
def predict_view_logits(model: FedSSLModel, images: torch.Tensor, tta: str = names.TTA_NONE, *, batch_size: int = 256) -> torch.Tensor:
    """(V, N, K) logits of the V views test-time augmentation `tta` scores of each image
    (`fedssl_core.models.tta_views`, what the served classifier computes); V = 1 without.
    At most `batch_size` views go through the model at once (memory: a hospital's evaluation
    shares the machine with the others')."""
    model.eval()
    views = names.TTA_VIEWS[check_tta(tta)]
    step = max(1, batch_size // views)
    _channels_last(model, True)  # 1.6x faster on CPU for EfficientNet-Lite0 at 96 px (6.3 vs 3.9 ms an image)
    try:
        out = [model(tta_views(normalize(images[i : i + step], model.mean, model.std), tta).contiguous(memory_format=torch.channels_last))
               .reshape(views, -1, model.num_classes) for i in range(0, len(images), step)]
    finally:
        _channels_last(model, False)
    return torch.cat(out, dim=1)


def view_log_proba(view_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(V, N, K) view logits → (N, K) log of the mean over views of softmax(logits / temperature)."""
    return combine_views(view_logits.reshape(-1, view_logits.shape[-1]), view_logits.shape[0], temperature)


def predict_proba(model: FedSSLModel, images: torch.Tensor, *, batch_size: int = 256, tta: str = names.TTA_NONE) -> torch.Tensor:
    return view_log_proba(predict_view_logits(model, images, tta, batch_size=batch_size)).exp()


def expected_calibration_error(proba: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-class probability over `bins` equal-width bins (Guo et al. 2017)."""
    conf, pred = proba.max(1), proba.argmax(1)
    ece = 0.0
    for lo, hi in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    return float(ece)


def evaluate(model: FedSSLModel, images: torch.Tensor, labels: torch.Tensor, class_names: list[str], *, batch_size: int = 256,
             tta: str = names.TTA_NONE) -> dict:
    """Metrics of the classifier on a held-out split (`metrics.classification_metrics` keys)
    plus the cross-entropy `loss` and `test_examples`, scored as it is served: with test-time
    augmentation `tta`, on the probabilities averaged over the views, and the NLL at each
    temperature on the views' logits divided by it (as a temperature baked into the classifier acts)."""
    if len(images) == 0:
        raise ConfigError("cannot evaluate on an empty test split; lower test-fraction or provide more images")
    view_logits = predict_view_logits(model, images, tta, batch_size=batch_size)
    log_proba = view_log_proba(view_logits)
    proba = log_proba.exp()
    out = classification_metrics(labels.numpy(), proba.numpy(), class_names)
    out[names.M_LOSS] = float(F.nll_loss(log_proba.clamp_min(math.log(1e-12)), labels))
    out[names.M_ECE] = expected_calibration_error(proba.numpy(), labels.numpy())
    out[names.M_NLL_BY_TEMPERATURE] = [float(F.nll_loss(view_log_proba(view_logits, t), labels)) for t in names.TEMPERATURE_GRID]
    out[names.M_TEST_EXAMPLES] = int(len(images))
    return out


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
