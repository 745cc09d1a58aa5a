import copy
import math
import re

import pytest
import torch

from fedssl_core import names
from fedssl_core.models import FedSSLModel
from fedssl_flower import training
from fedssl_flower.errors import ConfigError
from fedssl_flower.data import load_hospital_data


@pytest.fixture(scope="module")
def data(ham10000_dir, tmp_path_factory):
    return load_hospital_data({"hospital": "h", "data-path": str(ham10000_dir), "max-images": 160,
                               "cache-dir": str(tmp_path_factory.mktemp("cache"))}, 32)


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("task", names.SSL_TASKS)
def test_ssl_training_reduces_the_loss_on_a_fixed_batch(task):
    torch.manual_seed(0)
    model = FedSSLModel(num_classes=7)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    lesions = [str(i // 2) for i in range(16)]  # MICLe pairs images 2k and 2k+1; the other tasks ignore it
    first = training.train_ssl(model, images, task, epochs=1, batch_size=16, lr=1e-3, seed=0, lesions=lesions)
    for _ in range(6):
        last = training.train_ssl(model, images, task, epochs=1, batch_size=16, lr=1e-3, seed=0, lesions=lesions)
    assert last[names.ssl_loss_key(task)] < first[names.ssl_loss_key(task)]
    assert first[names.M_EXAMPLES] == 16


def test_frozen_backbone_mode_trains_only_the_projection_head(data):
    model = FedSSLModel()
    before = snapshot(model)
    training.train_ssl(model, data.train_images[:32], names.SSL_SIMCLR, epochs=1, batch_size=16, share="projection-head")
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {names.GROUP_PROJECTION_HEAD}


def test_linear_probe_changes_only_the_classifier_and_full_changes_the_encoder(data):
    model = FedSSLModel()
    before = snapshot(model)
    training.train_supervised(model, data.train_images, data.train_labels, epochs=2, mode="linear")
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed == {names.GROUP_CLASSIFIER}
    training.train_supervised(model, data.train_images[:64], data.train_labels[:64], epochs=1, mode="full")
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed == {names.GROUP_ENCODER, names.GROUP_CLASSIFIER}


def test_evaluate_reports_every_metric(data):
    m = training.evaluate(FedSSLModel(), data.test_images, data.test_labels, data.class_names)
    assert m[names.M_TEST_EXAMPLES] == len(data.test_labels)
    assert len(m[names.M_F1]) == 7 and len(m[names.M_CONFUSION_MATRIX]) == 7
    assert sum(map(sum, m[names.M_CONFUSION_MATRIX])) == len(data.test_labels)
    assert 0.0 <= m[names.M_BALANCED_ACCURACY] <= 1.0 and m[names.M_LOSS] > 0


def test_shared_and_trainable_groups():
    assert training.shared_groups("ssl", "encoder") == (names.GROUP_ENCODER,)
    assert training.shared_groups("ssl", "projection-head") == (names.GROUP_PROJECTION_HEAD,)
    assert training.shared_groups("ssl", "encoder-and-heads") == (
        names.GROUP_ENCODER, names.GROUP_PROJECTION_HEAD, names.GROUP_ROTATION_HEAD)
    assert training.trainable_groups("ssl", "simclr", "encoder-and-heads") == (names.GROUP_ENCODER, names.GROUP_PROJECTION_HEAD)
    assert training.shared_groups("finetune", mode="full") == (names.GROUP_ENCODER, names.GROUP_CLASSIFIER)
    assert training.trainable_groups("ssl", "rotation", "encoder") == (names.GROUP_ENCODER, names.GROUP_ROTATION_HEAD)
    assert training.trainable_groups("ssl", "micle", "encoder-and-heads") == (names.GROUP_ENCODER, names.GROUP_PROJECTION_HEAD)


def test_schedule_takes_exactly_its_steps_whatever_the_data_size():
    g = torch.Generator().manual_seed(0)
    steps = list(training.Schedule(steps=7).batches(20, 8, g))  # 20 images, batch 8: reshuffles as needed
    assert len(steps) == 7 and all(1 <= len(b) <= 8 for b in steps)
    assert len(list(training.Schedule(epochs=2).batches(20, 8, g))) == 6  # epochs: 3 batches each
    assert list(training.Schedule(steps=5).batches(1, 8, g, min_size=2)) == []  # too small for a pair


def test_cosine_schedule_decays_over_the_phase_rounds_with_warmup():
    s = training.Schedule(lr=1.0, steps=10, kind=names.SCHEDULE_COSINE, offset=0, total=40, warmup=4)
    assert [round(s.lr_at(i), 3) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    last_round = training.Schedule(lr=1.0, steps=10, kind=names.SCHEDULE_COSINE, offset=30, total=40, warmup=4)
    lrs = [last_round.lr_at(i) for i in range(10)]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.01
    assert training.Schedule(lr=0.3, kind=names.SCHEDULE_CONSTANT, total=40).lr_at(39) == 0.3


def test_local_rounds_follow_run_config_steps_and_schedule(data):
    from fedssl_flower import local
    from fedssl_flower.config import RunConfig

    cfg = RunConfig(local_steps=3, finetune_rounds=4, lr_schedule="cosine", lr=0.01)
    first, last = local.schedule(cfg, names.PHASE_FINETUNE, 1, 500, 0.01), local.schedule(cfg, names.PHASE_FINETUNE, 4, 500, 0.01)
    assert (first.offset, first.total, last.offset) == (0, 12, 9)
    assert first.lr_at(0) == 0.01 and last.lr_at(2) < 0.001
    epochs = local.schedule(RunConfig(batch_size=64, finetune_rounds=2, local_steps=0), names.PHASE_FINETUNE, 2, 130, 0.01)
    assert (epochs.steps, epochs.offset, epochs.total) == (0, 3, 6)  # one epoch = 3 batches of 64


def test_ssl_colour_jitter_run_config_shapes_the_simclr_views(data):
    from fedssl_flower import local
    from fedssl_flower.config import RunConfig

    def trained(jitter):
        torch.manual_seed(0)
        model = FedSSLModel(num_classes=7)
        cfg = RunConfig(local_steps=2, batch_size=16, ssl_colour_jitter=jitter)
        local.train_round(model, data, names.SSL_SIMCLR, names.PHASE_SSL, cfg, seed=3, rnd=1)
        return model.encoder.state_dict()

    default, again, none = trained(0.4), trained(0.4), trained(0.0)
    assert all(torch.equal(default[k], again[k]) for k in default)  # same views for the same seed
    assert any(not torch.equal(default[k], none[k]) for k in default if default[k].is_floating_point())


@pytest.mark.parametrize("batchnorm", ["adapt", "frozen"])
def test_ssl_batchnorm_frozen_keeps_the_encoders_statistics_while_its_weights_learn(data, batchnorm):
    torch.manual_seed(0)
    model = FedSSLModel(num_classes=7)
    before = snapshot(model.encoder)
    training.train_ssl(model, data.train_images[:32], names.SSL_SIMCLR, epochs=1, batch_size=16, batchnorm=batchnorm)
    after = model.encoder.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in before if k.endswith("weight")]
    assert stats and any(not torch.equal(before[k], after[k]) for k in weights)
    assert all(torch.equal(before[k], after[k]) for k in stats) == (batchnorm == "frozen")


@pytest.mark.parametrize("batchnorm", ["adapt", "frozen"])
def test_fine_tuning_with_frozen_batchnorm_normalises_by_the_statistics_it_came_with(data, batchnorm):
    """train_supervised(batchnorm=frozen) (a benchmark lever): the encoder's running statistics
    stay as they came while its weights and BatchNorm affine parameters learn; adapt updates them."""
    torch.manual_seed(0)
    model = FedSSLModel(num_classes=7)
    before = snapshot(model.encoder)
    training.train_supervised(model, data.train_images[:32], data.train_labels[:32], mode=names.FINETUNE_FULL, batch_size=16,
                              loss=names.LOSS_BALANCED_SOFTMAX, schedule=training.Schedule(lr=1e-3, steps=2), batchnorm=batchnorm)
    after = model.encoder.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    affine = [k[: -len("running_mean")] + "weight" for k in stats if k.endswith("running_mean")]
    assert stats and any(not torch.equal(before[k], after[k]) for k in affine)
    assert all(torch.equal(before[k], after[k]) for k in stats) == (batchnorm == "frozen")
    with pytest.raises(ConfigError, match="fine-tuning batchnorm"):
        training.train_supervised(model, data.train_images[:4], data.train_labels[:4], mode=names.FINETUNE_FULL, batchnorm="off")


def test_balanced_softmax_learns_balanced_logits_from_a_skewed_hospital():
    """A hospital that is 90 % one class, with nothing in the images to tell the classes apart:
    plain cross-entropy learns the prior (logit gap log 9), balanced softmax (logit adjustment
    by the local prior) learns no preference."""
    torch.manual_seed(0)
    labels = torch.tensor([1] * 20 + [0] * 180)
    images = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8).expand(200, -1, -1, -1).contiguous()
    gap = {}
    for loss in names.FINETUNE_LOSSES:
        model = FedSSLModel(num_classes=2)
        training.train_supervised(model, images, labels, mode="linear", class_weighted=False, loss=loss,
                                  schedule=training.Schedule(lr=0.05, epochs=40), batch_size=50)
        with torch.no_grad():
            logits = model.eval()(training.normalize(images[:1], model.mean, model.std))[0]
        gap[loss] = float(logits[0] - logits[1])
    assert abs(gap[names.LOSS_WEIGHTED_CE] - math.log(9)) < 0.3
    assert abs(gap[names.LOSS_BALANCED_SOFTMAX]) < 0.3
    # Adjusted by a prior other than its labels' (`class_counts`: the benchmark's federation-wide
    # prior): a uniform one adjusts nothing, so the hospital's own prior is learnt again.
    model = FedSSLModel(num_classes=2)
    training.train_supervised(model, images, labels, mode="linear", loss=names.LOSS_BALANCED_SOFTMAX,
                              schedule=training.Schedule(lr=0.05, epochs=40), batch_size=50, class_counts=torch.tensor([5, 5]))
    with torch.no_grad():
        logits = model.eval()(training.normalize(images[:1], model.mean, model.std))[0]
    assert abs(float(logits[0] - logits[1]) - math.log(9)) < 0.3
    with pytest.raises(ConfigError, match="finetune-loss"):
        training.train_supervised(FedSSLModel(num_classes=2), images, labels, loss="focal")


def test_kept_optimizer_moments_make_two_rounds_one_uninterrupted_run(data):
    """keep-optimizer-state: a round that resumes the AdamW moments (through safetensors, as a
    hospital's state directory keeps them) continues exactly where the previous round stopped;
    a fresh optimizer does not."""
    from fedssl_core import weights

    images, labels = data.train_images[:48], data.train_labels[:48]
    start = FedSSLModel(num_classes=len(data.class_names))

    def rounds(steps_each: int, count: int, carry: bool) -> torch.Tensor:
        model = FedSSLModel(num_classes=len(data.class_names))
        model.load_state_dict(start.state_dict())
        kept: dict | None = {} if carry else None
        for r in range(count):  # the whole split is one batch: every step sees the same examples
            training.train_supervised(model, images, labels, mode="linear", batch_size=64, seed=r, optimizer_state=kept,
                                      schedule=training.Schedule(lr=0.05, steps=steps_each, offset=r * steps_each))
            if carry:
                kept = {"adamw": weights.from_bytes(weights.to_bytes(kept["adamw"]))}
        return model.classifier.weight.detach().clone()

    one_run = rounds(6, 1, carry=True)
    assert torch.allclose(rounds(3, 2, carry=True), one_run, atol=1e-5)
    assert not torch.allclose(rounds(3, 2, carry=False), one_run, atol=1e-3)  # a fresh AdamW restarts its moments


def test_moments_of_another_model_are_refused_with_the_entry_named(data):
    model = FedSSLModel(num_classes=len(data.class_names))
    kept: dict = {}
    training.train_supervised(model, data.train_images[:16], data.train_labels[:16], mode="linear", batch_size=16,
                              schedule=training.Schedule(steps=1), optimizer_state=kept)
    other = FedSSLModel(num_classes=len(data.class_names) + 1)
    message = "optimizer state entry '0.exp_avg' has shape (7, 512), its parameter (8, 512): it belongs to another model"
    with pytest.raises(ConfigError, match=re.escape(message)):
        training.train_supervised(other, data.train_images[:16], data.train_labels[:16], mode="linear", batch_size=16,
                                  schedule=training.Schedule(steps=1), optimizer_state=kept)


def test_drift_correction_reports_the_mean_gradient_and_shifts_every_step(data):
    """SCAFFOLD: with a zero correction training is unchanged and the round's mean raw
    gradient comes back (the hospital's next control variate); a correction shifts the step."""
    def run(drift):
        torch.manual_seed(0)
        model = FedSSLModel(num_classes=7)
        training.train_supervised(model, data.train_images[:32], data.train_labels[:32], batch_size=16, mode="full",
                                  schedule=training.Schedule(lr=1e-3, steps=2), seed=0, drift=drift)
        return model

    plain = run(None)
    zero = {"correction": {}}
    same = run(zero)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), same.state_dict().values()))
    trainable = {n for n, p in same.named_parameters() if p.requires_grad}
    assert set(zero["gradients"]) == trainable
    assert all(torch.isfinite(g).all() for g in zero["gradients"].values())
    assert any(g.abs().sum() > 0 for g in zero["gradients"].values())
    shifted = run({"correction": {n: torch.full_like(g, 1e-2) for n, g in zero["gradients"].items()}})
    assert not torch.equal(shifted.classifier.weight, plain.classifier.weight)


def test_proximal_term_is_half_mu_times_the_squared_distance_and_pulls_toward_the_reference():
    layer = torch.nn.Linear(3, 2)
    reference = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with torch.no_grad():
        layer.weight.add_(1.0)
    term = training.proximal_term(layer, reference, 0.5)
    assert float(term.detach()) == pytest.approx(0.5 / 2 * 6 * 1.0)  # six weights, each 1 away
    term.backward()
    assert torch.allclose(layer.weight.grad, torch.full((2, 3), 0.5))  # mu * (w - w_ref): descent goes back
    assert torch.count_nonzero(layer.bias.grad) == 0
    assert training.proximal_reference(layer, ("weight",), 0.0) is None  # mu = 0: nothing captured, nothing added


def test_moon_term_pulls_features_toward_the_global_encoder_and_away_from_the_previous_one():
    """MOON's model-contrastive term: log 2 (times mu) with no gradient when the global and previous
    encoders agree; otherwise smaller for features like the global encoder's than for features like
    the previous one's, and its gradient moves features toward the global encoder's."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x = torch.randn(8, 4)
    same = training.Contrast(copy.deepcopy(a), copy.deepcopy(a), mu=2.0, temperature=0.5)
    features = torch.randn(8, 3, requires_grad=True)
    term = same.term(features, x)
    assert float(term.detach()) == pytest.approx(2.0 * math.log(2))
    term.backward()
    assert features.grad.abs().max() < 1e-6
    moon = training.Contrast(copy.deepcopy(a), copy.deepcopy(b), mu=1.0, temperature=0.5)
    assert all(not p.requires_grad for p in moon.global_encoder.parameters()) and not moon.global_encoder.training
    assert all(p.requires_grad for p in a.parameters()) and a.training  # only the copies were frozen
    like_global, like_previous = a(x).detach(), b(x).detach()
    assert float(moon.term(like_global, x)) < math.log(2) < float(moon.term(like_previous, x))
    features = like_previous.clone().requires_grad_(True)
    moon.term(features, x).backward()
    with torch.no_grad():
        stepped = features - 0.1 * features.grad
        cos = torch.nn.functional.cosine_similarity
        assert (cos(stepped, like_global).mean() > cos(like_previous, like_global).mean())


def test_full_fine_tuning_adds_the_moon_term_to_its_loss_but_reports_the_task_loss(data):
    """train_supervised(contrast=...): the same seeded round with a strong MOON term ends elsewhere,
    and its reported loss is the classification loss alone (close to the plain round's)."""
    def one_round(contrast):
        torch.manual_seed(0)
        model = FedSSLModel(num_classes=7)
        start = copy.deepcopy(model.encoder)
        moon = None if contrast is None else training.Contrast(start, copy.deepcopy(model.encoder).apply(_perturb), mu=contrast)
        metrics = training.train_supervised(model, data.train_images[:32], data.train_labels[:32], epochs=1, batch_size=16,
                                            lr=1e-3, mode=names.FINETUNE_FULL, contrast=moon)
        return model, metrics

    plain, plain_metrics = one_round(None)
    pulled, pulled_metrics = one_round(50.0)
    assert not all(torch.equal(a, b) for a, b in zip(plain.encoder.parameters(), pulled.encoder.parameters()))
    assert pulled_metrics[names.M_LOSS] < 3 * plain_metrics[names.M_LOSS]  # not the 50 x log 2 of the term


def test_a_joint_ssl_term_trains_its_head_and_the_encoder_on_unlabelled_images_and_reports_the_task_loss(data):
    """train_supervised(joint=...) (S4L): the self-supervised term on images drawn from the
    unlabelled pool trains the method's head beside the encoder and classifier and moves the
    encoder elsewhere than the same seeded step without it; the reported loss of a one-step
    round is the plain round's exactly (the term is drawn after the step's batch). MICLe's
    pairs come from the lesions of the pool, not of the labelled images."""
    labelled, unlabelled = slice(0, 16), slice(16, None)

    def one_step(joint_task):
        torch.manual_seed(0)
        model = FedSSLModel(num_classes=7)
        before = snapshot(model)
        joint = None if joint_task is None else training.Joint(
            training.ssl_methods.build(joint_task, model, groups=data.train_groups[unlabelled]),
            data.train_images[unlabelled], weight=1.0, batch_size=8)
        metrics = training.train_supervised(model, data.train_images[labelled], data.train_labels[labelled], batch_size=16,
                                            mode=names.FINETUNE_FULL, schedule=training.Schedule(lr=1e-3, steps=1), joint=joint)
        changed = {k.split(".")[0] for k in before if not torch.equal(before[k], model.state_dict()[k])}
        return model, metrics, changed

    plain, plain_metrics, plain_changed = one_step(None)
    assert plain_changed == {names.GROUP_ENCODER, names.GROUP_CLASSIFIER}
    for task in (names.SSL_MICLE, names.SSL_ROTATION):
        model, metrics, changed = one_step(task)
        head = training.ssl_methods.METHODS[task].head
        assert changed == {names.GROUP_ENCODER, names.GROUP_CLASSIFIER, head}, task
        assert metrics[names.M_LOSS] == plain_metrics[names.M_LOSS], task
        assert not all(torch.equal(a, b) for a, b in zip(plain.encoder.parameters(), model.encoder.parameters())), task
    # batchnorm=frozen: the term's views leave the encoder's running statistics to the labelled batch
    torch.manual_seed(0)
    model = FedSSLModel(num_classes=7)
    stats = {k: v.clone() for k, v in model.encoder.state_dict().items() if "running_" in k}
    training.Joint(training.ssl_methods.build(names.SSL_SIMCLR, model), data.train_images[unlabelled], batch_size=8,
                   batchnorm=names.SSL_BATCHNORM_FROZEN).term(model.train(), torch.Generator().manual_seed(0))
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in stats.items())
    assert all(m.momentum == 0.1 for m in training.encoder_batchnorms(model).values())  # put back
    training.Joint(training.ssl_methods.build(names.SSL_SIMCLR, model), data.train_images[unlabelled],
                   batch_size=8).term(model, torch.Generator().manual_seed(0))
    assert not all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in stats.items())
    with pytest.raises(ConfigError, match="unknown joint batchnorm 'off'"):
        training.Joint(training.ssl_methods.build(names.SSL_SIMCLR, model), data.train_images[:8], batchnorm="off")
    with pytest.raises(ConfigError, match="needs finetune-mode=full"):
        training.train_supervised(FedSSLModel(num_classes=7), data.train_images[:8], data.train_labels[:8], mode=names.FINETUNE_LINEAR,
                                  joint=training.Joint(training.ssl_methods.build(names.SSL_ROTATION, FedSSLModel()), data.train_images[:8]))


def test_pseudo_labels_train_strong_views_toward_the_models_confident_predictions_on_weak_ones(data):
    """training.PseudoLabel (FixMatch): the term draws a batch, predicts each image from a weak
    view in eval mode (the label prior added), and is `weight` times the cross-entropy of the
    strong views of the images whose prediction reaches the threshold, toward that prediction,
    summed and divided by the batch, recomputed here step by step from the same generator.
    Frozen BatchNorm: the running statistics stay. It counts the confident pseudo-labels by
    class and, given the images' real labels, the right ones. No image confident: zero."""
    import torch.nn.functional as F
    from fedssl_flower.ssl.transforms import SimCLRTransform, normalize

    torch.manual_seed(0)
    model = FedSSLModel(num_classes=7).train()
    pool, adjust = data.train_images[16:48], torch.log(torch.tensor([0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05]))
    truth = data.train_labels[16:48]
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(len(pool), (8,), generator=g)
    batch = pool[idx]
    with torch.no_grad():
        weak = normalize(training._augment_supervised(batch, g), model.mean, model.std)
        confidence, target = torch.softmax(copy.deepcopy(model).eval()(weak) + adjust, dim=1).max(dim=1)
    threshold = float(confidence.median())
    keep = confidence >= threshold
    assert 0 < int(keep.sum()) < 8
    strong = SimCLRTransform(mean=model.mean, std=model.std).view(batch[keep], g)
    expected = 2.0 * F.cross_entropy(copy.deepcopy(model)(strong) + adjust, target[keep], reduction="sum") / 8
    stats = {k: v.clone() for k, v in model.encoder.state_dict().items() if "running_" in k}

    term = training.PseudoLabel(pool, weight=2.0, batch_size=8, threshold=threshold, truth=truth)
    value = term.term(model, torch.Generator().manual_seed(3), adjust)
    assert torch.allclose(value, expected, atol=1e-5), (float(value), float(expected))
    assert (term.drawn, term.confident) == (8, int(keep.sum()))
    assert term.classes == {c: int((target[keep] == c).sum()) for c in target[keep].unique().tolist()}
    assert term.correct == int((target[keep] == truth[idx][keep]).sum())
    assert model.training and all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in stats.items())
    value.backward()
    assert next(model.encoder.parameters()).grad.abs().sum() > 0 and model.classifier.weight.grad.abs().sum() > 0

    nothing = training.PseudoLabel(pool, batch_size=8, threshold=1.0)
    assert float(nothing.term(model, torch.Generator().manual_seed(3), adjust)) == 0.0
    assert (nothing.drawn, nothing.confident, nothing.correct, nothing.classes) == (8, 0, 0, {})
    with pytest.raises(ConfigError, match=r"pseudo-label threshold 0.0: expected a probability in \(0, 1\]"):
        training.PseudoLabel(pool, threshold=0.0)


def test_a_pseudo_label_term_moves_a_fine_tuning_round_and_trains_no_extra_head(data):
    """train_supervised(joint=PseudoLabel): a one-step round with every drawn image confident
    ends elsewhere than the plain step, changes only the encoder and the classifier, and
    reports the plain step's loss (the term is drawn after the step's batch)."""
    def one_step(term):
        torch.manual_seed(0)
        model = FedSSLModel(num_classes=7)
        before = snapshot(model)
        metrics = training.train_supervised(model, data.train_images[:16], data.train_labels[:16], batch_size=16,
                                            mode=names.FINETUNE_FULL, loss=names.LOSS_BALANCED_SOFTMAX,
                                            schedule=training.Schedule(lr=1e-3, steps=1), joint=term)
        return model, metrics, {k.split(".")[0] for k in before if not torch.equal(before[k], model.state_dict()[k])}

    plain, plain_metrics, _ = one_step(None)
    term = training.PseudoLabel(data.train_images[16:], weight=1.0, batch_size=8, threshold=1e-6)
    model, metrics, changed = one_step(term)
    assert term.confident == term.drawn == 8
    assert changed == {names.GROUP_ENCODER, names.GROUP_CLASSIFIER}
    assert metrics[names.M_LOSS] == plain_metrics[names.M_LOSS]
    assert not all(torch.equal(a, b) for a, b in zip(plain.encoder.parameters(), model.encoder.parameters()))


def _perturb(module):
    if isinstance(module, torch.nn.Conv2d):
        with torch.no_grad():
            module.weight.add_(0.05 * torch.randn_like(module.weight))


@pytest.mark.parametrize("phase", names.PHASES)
def test_fedprox_keeps_the_shared_groups_near_the_start_of_the_round(phase, data):
    """The same round with and without a strong proximal term: with it, the shared groups end
    nearer the global model they started from; the reported loss is the task's alone."""
    def one_round(mu):
        torch.manual_seed(0)
        model = FedSSLModel(num_classes=7)
        start = snapshot(model)
        if phase == names.PHASE_SSL:
            metrics = training.train_ssl(model, data.train_images[:32], names.SSL_ROTATION, epochs=2, batch_size=16, lr=1e-2,
                                         proximal_mu=mu)
            shared = training.shared_groups(phase)
        else:
            metrics = training.train_supervised(model, data.train_images[:64], data.train_labels[:64], epochs=3, batch_size=16,
                                                lr=1e-1, mode="linear", proximal_mu=mu)
            shared = training.shared_groups(phase, mode="linear")
        after = model.state_dict()
        moved = sum(float(((after[k].float() - start[k].float()) ** 2).sum()) for k in start
                    if k.startswith(tuple(f"{g}." for g in shared)) and start[k].is_floating_point() and "running" not in k)
        return moved, metrics

    free, _ = one_round(0.0)
    held, metrics = one_round(100.0)
    assert held < 0.5 * free, (held, free)
    assert math.isfinite(metrics[names.M_LOSS])


def test_hospitals_score_a_classifier_as_it_is_served_with_test_time_augmentation():
    """evaluate(tta=dihedral) scores the probabilities the registry's serving module answers for
    the same weights and pixels; its NLL at temperature 1 is its loss, and at temperature t it is
    what the classifier with 1/t baked into its weights gives (each view divided). With tta=none,
    the NLL curve is plain cross-entropy of the logits over t."""
    from fedssl_core import weights
    from fedssl_core.models import TASK_GROUPS, build_inference_model, select_groups
    from fedssl_core.preprocessing import normalize

    torch.manual_seed(0)
    model = FedSSLModel(num_classes=3).eval()
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    served = build_inference_model(names.TASK_CLASSIFICATION, names.ARCH_RESNET18, 3, tta=names.TTA_DIHEDRAL)
    weights.load_into(served, select_groups(model.state_dict(), TASK_GROUPS[names.TASK_CLASSIFICATION]))
    with torch.no_grad():
        answer = torch.softmax(served(normalize(images)), 1)
    assert torch.allclose(training.predict_proba(model, images, tta=names.TTA_DIHEDRAL), answer, atol=1e-5)

    out = training.evaluate(model, images, labels, ["a", "b", "c"], tta=names.TTA_DIHEDRAL)
    grid = list(names.TEMPERATURE_GRID)
    assert out[names.M_NLL_BY_TEMPERATURE][grid.index(1.0)] == pytest.approx(out[names.M_LOSS], rel=1e-5)
    assert out[names.M_LOSS] == pytest.approx(float(torch.nn.functional.nll_loss(answer.log(), labels)), rel=1e-4)
    t = grid[3]
    state = select_groups(model.state_dict(), TASK_GROUPS[names.TASK_CLASSIFICATION])
    state = {**state, "classifier.weight": state["classifier.weight"] / t, "classifier.bias": state["classifier.bias"] / t}
    weights.load_into(served, state)
    with torch.no_grad():
        cooled = torch.softmax(served(normalize(images)), 1)
    assert out[names.M_NLL_BY_TEMPERATURE][3] == pytest.approx(float(torch.nn.functional.nll_loss(cooled.log(), labels)), rel=1e-4)

    plain = training.evaluate(model, images, labels, ["a", "b", "c"])
    with torch.no_grad():
        logits = model.eval()(normalize(images, model.mean, model.std))
    assert plain[names.M_NLL_BY_TEMPERATURE] == pytest.approx(
        [float(torch.nn.functional.cross_entropy(logits / t, labels)) for t in grid], rel=1e-5)
    assert plain[names.M_BALANCED_ACCURACY] != out[names.M_BALANCED_ACCURACY] or plain[names.M_LOSS] != pytest.approx(out[names.M_LOSS])


def test_a_hospital_scores_the_classifier_as_predict_serves_it_by_name_at_every_temperature():
    """`local.score_as_served`: at each grid temperature, the confusion matrix and macro AUC of
    what `:predict?hospital=` answers, the registry's module (test-time augmentation, the
    temperature baked into the classifier) with the hospital's statistics, its softmax times
    the hospital's prior ratio (`label_shift.adjust`)."""
    import numpy as np

    from fedssl_core import label_shift, weights
    from fedssl_core.models import TASK_GROUPS, build_inference_model, select_groups
    from fedssl_core.preprocessing import normalize
    from fedssl_flower import local
    from fedssl_flower.config import RunConfig
    from fedssl_flower.data import HospitalData
    from fedssl_flower.metrics import macro_auc

    torch.manual_seed(1)
    model = FedSSLModel(num_classes=3)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2] * 4)
    training.recompute_batchnorm(model, torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), batch_size=4)
    data = HospitalData("h", ["a", "b", "c"], images[:0], labels[:0], images, labels)
    ratio = label_shift.ratio([40, 5, 5], [60, 60, 60])
    out = local.score_as_served(model, data, ratio, RunConfig(test_time_augmentation=names.TTA_DIHEDRAL))
    grid = list(names.TEMPERATURE_GRID)
    confusion = out[names.M_SERVED_CONFUSION_BY_TEMPERATURE]
    assert confusion.shape == (len(grid), 3, 3) and (confusion.sum(axis=(1, 2)) == 12).all()
    assert len(out[names.M_SERVED_MACRO_AUC_BY_TEMPERATURE]) == len(grid)

    served = build_inference_model(names.TASK_CLASSIFICATION, names.ARCH_RESNET18, 3, tta=names.TTA_DIHEDRAL)
    state = select_groups(model.state_dict(), TASK_GROUPS[names.TASK_CLASSIFICATION])
    for i in (grid.index(1.0), 3, len(grid) - 1):
        t = grid[i]
        weights.load_into(served, {**state, "classifier.weight": state["classifier.weight"] / t,
                                   "classifier.bias": state["classifier.bias"] / t})
        with torch.no_grad():
            answer = label_shift.adjust(torch.softmax(served(normalize(images)), 1).numpy(), ratio)
        expected = np.zeros((3, 3), dtype=np.int64)
        np.add.at(expected, (labels.numpy(), answer.argmax(1)), 1)
        assert (confusion[i] == expected).all(), t
        assert out[names.M_SERVED_MACRO_AUC_BY_TEMPERATURE][i] == pytest.approx(macro_auc(labels.numpy(), answer), abs=1e-6)
    # the prior moves the decisions: without it (a ratio of ones) the served answers differ
    plain = local.score_as_served(model, data, np.ones(3), RunConfig(test_time_augmentation=names.TTA_DIHEDRAL))
    assert (plain[names.M_SERVED_CONFUSION_BY_TEMPERATURE] != confusion).any()


def _block_calls(model):
    """Counts runs of the forward pass of the encoder's first checkpointed block (timm's first
    block, a ResNet's layer1.0), recomputations included (module hooks do not see those)."""
    encoder = model.encoder
    block = encoder.blocks[0][0] if hasattr(encoder, "blocks") else encoder.layer1[0]
    calls, forward = [0], block.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    block.forward = counted
    return calls


@pytest.mark.parametrize("arch", [names.ARCH_EFFICIENTNET_LITE0, names.ARCH_RESNET18])
def test_activation_checkpointing_takes_the_plain_steps_bit_for_bit_with_batchnorm_statistics_updated_once(data, arch):
    """activation-checkpointing: each block's forward pass runs again during backward (in train
    mode, which would move BatchNorm's running statistics a second time); the weights, the
    statistics and the losses come out identical to plain training, in both phases, and the
    model is left without checkpointing."""
    images, labels = data.train_images[:24], data.train_labels[:24]
    results, states, calls = {}, {}, {}
    for on in (False, True):
        torch.manual_seed(0)
        model = FedSSLModel(arch, num_classes=7)
        counter = _block_calls(model)
        ssl = training.train_ssl(model, images, names.SSL_SIMCLR, batch_size=12, checkpointing=on)
        ssl_calls = counter[0]
        ft = training.train_supervised(model, images, labels, batch_size=12, mode=names.FINETUNE_FULL, checkpointing=on)
        results[on], states[on] = (ssl[names.M_LOSS], ft[names.M_LOSS]), model.state_dict()
        calls[on] = (ssl_calls, counter[0] - ssl_calls)
        model.train()(training.normalize(images[:2], model.mean, model.std)).sum().backward()
        assert counter[0] == sum(calls[on]) + 1, "the encoder was left checkpointing"  # a plain step runs the block once
    # 2 steps a phase (24 images, batches of 12), each recomputed once with checkpointing
    assert calls[False] == (2, 2) and calls[True] == (4, 4), calls
    assert results[True] == results[False]
    assert states[True].keys() == states[False].keys()
    assert all(torch.equal(states[True][k], states[False][k]) for k in states[False])  # weights, running statistics, counters


def test_activation_checkpointing_is_ignored_where_the_encoder_does_not_train(data):
    torch.manual_seed(0)
    model = FedSSLModel(num_classes=7)
    counter = _block_calls(model)
    before = snapshot(model.encoder)
    training.train_ssl(model, data.train_images[:16], names.SSL_SIMCLR, batch_size=8, share="projection-head", checkpointing=True)
    training.train_supervised(model, data.train_images[:16], data.train_labels[:16], mode="linear", checkpointing=True)
    assert counter[0] == 2 + 1  # 2 SimCLR steps (both views in one forward), the probe's features in one batch: nothing recomputed
    assert all(torch.equal(before[k], model.encoder.state_dict()[k]) for k in before)
