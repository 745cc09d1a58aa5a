"""One hospital's part of a round, without Flower: which seed, what to train, how to score.

The ClientApp wraps these in Messages; the quality benchmark (`bench/quality.py`) calls the
same functions in one process, so its federated numbers come from the code hospitals run.
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import torch

from fedssl_core import generative as gan_models
from fedssl_core import label_shift, names
from fedssl_core.models import FedSSLModel

from . import generative, training
from .metrics import confusion_matrix, macro_auc
from .config import RunConfig
from .data import HospitalData


def round_seed(seed: int, phase: str, rnd: int) -> int:
    """The training seed of `phase` round `rnd` (the same at every hospital; their data differ)."""
    return seed * 10_007 + rnd * 101 + (0 if phase == names.PHASE_SSL else 50)


def schedule(cfg: RunConfig, phase: str, rnd: int, examples: int, lr: float) -> training.Schedule:
    """Round `rnd`'s steps and learning rates: `local-steps` batches (or `local-epochs` passes)
    at `lr`, decayed over the phase's rounds when `lr-schedule = cosine`."""
    rounds = cfg.ssl_rounds if phase == names.PHASE_SSL else cfg.finetune_rounds
    per_round = cfg.local_steps or cfg.local_epochs * max(1, math.ceil(examples / cfg.batch_size))
    return training.Schedule(lr=lr, steps=cfg.local_steps, epochs=cfg.local_epochs, kind=cfg.lr_schedule,
                             offset=(max(1, rnd) - 1) * per_round, total=max(1, rounds) * per_round)


def train_round(model: FedSSLModel, data: HospitalData, task: str, phase: str, cfg: RunConfig, seed: int, rnd: int = 1,
                optimizer_state: dict | None = None, drift: dict | None = None, proximal_mu: float = 0.0,
                contrast: training.Contrast | None = None,
                joint: training.Joint | training.PseudoLabel | None = None, class_counts: torch.Tensor | None = None,
                batchnorm: str = names.SSL_BATCHNORM_ADAPT) -> dict:
    """Round `rnd` of local training in `phase` (SSL with `task`, or fine-tuning).
    `optimizer_state`: the hospital's optimizer moments, kept across rounds (fine-tuning's
    AdamW; in a generative round both networks' Adam, which only the benchmark keeps).
    `drift`: fine-tuning's SCAFFOLD control variates (`training.train_supervised`).
    `proximal_mu`: FedProx's proximal term toward the model as it is now (`training.proximal_term`).
    `contrast`: fine-tuning's MOON term (`training.Contrast`, benchmark only).
    `joint`: fine-tuning's term on the hospital's images, labelled or not (`training.Joint`,
    self-supervised, or `training.PseudoLabel`; benchmark only).
    `class_counts`: the balanced softmax's label counts instead of the hospital's own
    (`training.train_supervised`; benchmark only).
    `batchnorm`: fine-tuning's BatchNorm mode (`training.train_supervised`; benchmark only)."""
    n = len(data.train_images)
    if phase == names.PHASE_GENERATE:
        return generative.train_gan(model, data.train_images, data.train_labels, steps=cfg.gan_steps, batch_size=cfg.batch_size,
                                    lr_generator=cfg.gan_lr, lr_discriminator=cfg.gan_lr_discriminator, seed=seed,
                                    augment=cfg.gan_diffaugment, optimizer_state=optimizer_state)
    if phase == names.PHASE_SSL:
        return training.train_ssl(
            model, data.train_images, task, batch_size=cfg.batch_size, share=cfg.share, seed=seed,
            schedule=schedule(cfg, phase, rnd, n, cfg.lr), weight_decay=cfg.weight_decay, proximal_mu=proximal_mu,
            colour_jitter=cfg.ssl_colour_jitter, batchnorm=cfg.ssl_batchnorm, checkpointing=cfg.activation_checkpointing,
            lesions=data.train_groups,
        )
    lr = cfg.probe_lr if cfg.finetune_mode == names.FINETUNE_LINEAR else (cfg.finetune_lr or cfg.lr)
    if cfg.head_warmup_epochs and rnd == 1 and cfg.finetune_mode == names.FINETUNE_FULL:
        # LP-FT (Kumar et al. 2022): fit the fresh classifier on the frozen encoder's features
        # first, so full fine-tuning's first steps do not push a random head's gradients into the encoder.
        training.train_supervised(
            model, data.train_images, data.train_labels, epochs=cfg.head_warmup_epochs, batch_size=cfg.batch_size,
            lr=cfg.probe_lr, mode=names.FINETUNE_LINEAR, seed=seed, loss=cfg.finetune_loss,
        )
    return training.train_supervised(
        model, data.train_images, data.train_labels, batch_size=cfg.batch_size, mode=cfg.finetune_mode, seed=seed,
        loss=cfg.finetune_loss, schedule=schedule(cfg, phase, rnd, n, lr), weight_decay=cfg.weight_decay,
        optimizer_state=optimizer_state, drift=drift, proximal_mu=proximal_mu, augment=cfg.augment, contrast=contrast,
        checkpointing=cfg.activation_checkpointing, joint=joint, class_counts=class_counts,
        batchnorm=batchnorm,
    )


def score(model: FedSSLModel, data: HospitalData, phase: str, cfg: RunConfig, feature_cache: dict | None = None) -> dict:
    """Scores on the hospital's held-out split. An SSL-phase encoder has no classifier yet, so
    it is scored by a linear probe fitted on the hospital's training split. A generator is
    scored by what it draws against the held-out images (`score_generator`; `feature_cache`
    keeps the real images' features between calls)."""
    if phase == names.PHASE_GENERATE:
        return score_generator(model, data, cfg, feature_cache)
    if phase == names.PHASE_SSL:
        model = copy.deepcopy(model)
        torch.manual_seed(cfg.seed)
        model.classifier.reset_parameters()
        training.train_supervised(
            model, data.train_images, data.train_labels, epochs=cfg.probe_epochs,
            batch_size=cfg.batch_size, lr=cfg.probe_lr, mode=names.FINETUNE_LINEAR, seed=cfg.seed,
        )
    return training.evaluate(model, data.test_images, data.test_labels, data.class_names, tta=cfg.test_time_augmentation)


def score_as_served(model: FedSSLModel, data: HospitalData, ratio: np.ndarray, cfg: RunConfig) -> dict:
    """The classifier scored on the held-out split as `:predict?hospital=` serves this hospital:
    `model` holds the hospital's own BatchNorm statistics (hospital-batchnorm), and its
    probabilities (test-time augmentation `cfg`'s) are multiplied by the hospital's label
    prior over the federation's (`ratio`, `fedssl_core.label_shift`). The aggregator picks the
    temperature it serves at only after every hospital has scored, and that temperature changes
    which class wins once the prior is applied, so the scores come at each of
    `names.TEMPERATURE_GRID`: (T, K, K) confusion matrices (`M_SERVED_CONFUSION_BY_TEMPERATURE`)
    and T macro AUCs (`M_SERVED_MACRO_AUC_BY_TEMPERATURE`, left out where fewer than two
    classes are held out)."""
    k, labels = len(data.class_names), data.test_labels.numpy()
    view_logits = training.predict_view_logits(model, data.test_images, cfg.test_time_augmentation)
    confusions, aucs = [], []
    for t in names.TEMPERATURE_GRID:
        proba = label_shift.adjust(training.view_log_proba(view_logits, t).exp().numpy(), ratio)
        confusions.append(confusion_matrix(labels, proba.argmax(axis=1), k))
        aucs.append(macro_auc(labels, proba))
    out = {names.M_SERVED_CONFUSION_BY_TEMPERATURE: np.stack(confusions)}
    if all(a is not None for a in aucs):
        out[names.M_SERVED_MACRO_AUC_BY_TEMPERATURE] = [float(a) for a in aucs]
    return out


def new_model(cfg: RunConfig, num_classes: int, pretrained: bool | None = None) -> FedSSLModel | gan_models.ConditionalGAN:
    """The run's model, seeded with the run's seed (the aggregator and every hospital build the
    same one): the GAN of a generative run, else the encoder with its heads."""
    torch.manual_seed(cfg.seed)
    if cfg.task == names.RUN_GENERATE:
        return gan_models.ConditionalGAN(num_classes, cfg.image_size, cfg.gan_z_dim, cfg.gan_width)
    return FedSSLModel(cfg.arch, num_classes=num_classes, pretrained=cfg.pretrained if pretrained is None else pretrained)


@functools.cache
def _feature_extractor():
    """The ImageNet EfficientNet-Lite0 feature extractor, built once per process: a handler
    scores the global and the local-only generator with it."""
    from . import generative_metrics

    return generative_metrics.FeatureExtractor()


def score_generator(gan: gan_models.ConditionalGAN, data: HospitalData, cfg: RunConfig, feature_cache: dict | None = None) -> dict:
    """A generator's scores at a hospital: `gan-eval-samples` images drawn with the held-out
    split's class mix against the held-out images (Frechet distance and precision/recall on
    ImageNet EfficientNet-Lite0 features), and how near they sit to the training images
    (memorisation). The same latents every round (the run's seed), so rounds compare."""
    from . import generative_metrics  # timm and the Lite0 weights: only generative runs pay for them

    def draw(labels: torch.Tensor, seed: int) -> torch.Tensor:
        return gan_models.sample(gan.generator, labels, seed)

    m = generative_metrics.score_generator(draw, data.train_images, data.train_labels, data.test_images, data.test_labels,
                                           extractor=_feature_extractor(), seed=cfg.seed,
                                           max_samples=cfg.gan_eval_samples, cache=feature_cache)
    return {names.M_FID: m["fid"], names.M_GEN_PRECISION: m["precision"], names.M_GEN_RECALL: m["recall"],
            names.M_MEMORISATION_RATIO: m["memorisation_distance_ratio"], names.M_TOO_CLOSE: m["memorisation_too_close_fraction"],
            names.M_TOO_CLOSE_PIXELS: m["memorisation_too_close_fraction_pixels"],
            "generated_examples": m["generated_examples"], names.M_TEST_EXAMPLES: m["real_examples"]}
