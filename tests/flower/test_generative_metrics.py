"""Generator quality measures: FID, precision/recall, memorisation, on synthetic features with
known answers and on real HAM10000 images through the offline EfficientNet-Lite0."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedssl_core.preprocessing import load_image
from fedssl_flower.data.ham10000 import load_catalog
from fedssl_flower.generative_metrics import (SCORE_KEYS, FeatureExtractor, class_balanced_labels, frechet_distance,
                                              memorisation, precision_recall, score_generator)

IMAGE_SIZE = 32
TRAIN_IMAGES, TEST_IMAGES = 80, 40


def gaussian(n, d=16, seed=0, shift=0.0):
    """Correlated Gaussian features: a fixed random mixing of standard normals."""
    mixing = np.random.default_rng(1234).normal(size=(d, d)) / np.sqrt(d)
    return np.random.default_rng(seed).normal(size=(n, d)) @ mixing + shift


# --- FID -------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero_and_a_mean_shift_adds_its_squared_length():
    a = gaussian(300)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # Same covariance, mean moved by s in each of the d features: FID is exactly d * s².
    for s in (0.5, 1.0, 2.0):
        assert frechet_distance(a, a + s) == pytest.approx(16 * s**2, rel=1e-9)


def test_fid_grows_with_the_shift_between_independent_samples():
    a = gaussian(400, seed=0)
    fids = [frechet_distance(a, gaussian(400, seed=1, shift=s)) for s in (0.0, 0.25, 0.5, 1.0)]
    assert fids == sorted(fids) and fids[0] < 1.0 < fids[-1]


@pytest.mark.parametrize("without_scipy", [False, True], ids=["scipy", "numpy"])
def test_fid_matches_the_reference_formula_with_a_general_matrix_square_root(without_scipy, monkeypatch):
    """Reference: Tr(sqrtm(C_r C_f)) as pytorch-fid computes it, with a different covariance per set."""
    from scipy import linalg

    real, fake = gaussian(200, d=8, seed=0), gaussian(150, d=8, seed=1) * 1.5 + 0.3
    c_r, c_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    diff = real.mean(0) - fake.mean(0)
    expected = diff @ diff + np.trace(c_r) + np.trace(c_f) - 2 * np.trace(linalg.sqrtm(c_r @ c_f)).real
    if without_scipy:  # the ClientApp image may lack scipy: the numpy path must agree
        monkeypatch.setitem(sys.modules, "scipy", None)
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=1e-9)


def test_fid_refuses_sets_too_small_for_a_covariance_naming_both_counts():
    with pytest.raises(ValueError, match="1 real and 5 fake"):
        frechet_distance(gaussian(1), gaussian(5))
    with pytest.raises(ValueError, match="16-d.*8-d"):
        frechet_distance(gaussian(10), gaussian(10, d=8))


# --- precision / recall ----------------------------------------------------------------


def test_precision_and_recall_of_identical_sets_are_one_and_of_far_apart_clusters_zero():
    a = gaussian(200)
    assert precision_recall(a, a.copy()) == (1.0, 1.0)
    assert precision_recall(a, gaussian(200, seed=1, shift=100.0)) == (0.0, 0.0)


def test_a_generator_covering_one_of_two_modes_has_full_precision_and_half_recall():
    left, right = gaussian(200, seed=0, shift=-50.0), gaussian(200, seed=1, shift=50.0)
    precision, recall = precision_recall(np.concatenate([left, right]), gaussian(200, seed=2, shift=-50.0))
    assert precision > 0.8 and 0.35 < recall <= 0.5


def test_precision_recall_needs_k_plus_one_samples():
    with pytest.raises(ValueError, match="real has 3 feature rows; expected at least 4"):
        precision_recall(gaussian(3), gaussian(10))


# --- memorisation ----------------------------------------------------------------------


def test_copies_of_training_samples_are_flagged_and_fresh_samples_are_not():
    train, test = gaussian(400, seed=0), gaussian(200, seed=1)
    copies = memorisation(train[50:150], train, test)
    assert copies["too_close_fraction"] == 1.0 and copies["too_close_indices"] == list(range(100))
    assert copies["distance_ratio"] < 1e-6 and copies["too_close_threshold"] > 0

    fresh = memorisation(gaussian(200, seed=2), train, test)
    assert fresh["too_close_fraction"] <= 0.05 and 0.8 < fresh["distance_ratio"] < 1.25
    assert set(fresh) == {"nn_train_distance_fake_median", "nn_train_distance_test_median", "distance_ratio",
                          "too_close_fraction", "too_close_threshold", "too_close_indices"}


def test_memorisation_refuses_a_quantile_outside_zero_one():
    with pytest.raises(ValueError, match="quantile 1.5"):
        memorisation(gaussian(5), gaussian(5), gaussian(5), quantile=1.5)


# --- class mix -------------------------------------------------------------------------


def test_class_balanced_labels_match_the_real_class_mix_and_depend_only_on_the_seed():
    real = torch.tensor([0] * 600 + [3] * 300 + [5] * 100)
    drawn = class_balanced_labels(real, 50, seed=7)
    assert drawn.dtype == real.dtype and torch.bincount(drawn, minlength=6).tolist() == [30, 0, 0, 15, 0, 5]
    assert torch.equal(drawn, class_balanced_labels(real, 50, seed=7))
    assert not torch.equal(drawn, class_balanced_labels(real, 50, seed=8))
    # Rounding: the counts still add up, the largest remainders get the spare labels.
    assert torch.bincount(class_balanced_labels(real, 7, seed=0), minlength=6).tolist() == [4, 0, 0, 2, 0, 1]
    with pytest.raises(ValueError, match="1-D integer"):
        class_balanced_labels(torch.zeros(3, 2, dtype=torch.long), 4, seed=0)


# --- real images -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    return FeatureExtractor(batch_size=64)


@pytest.fixture(scope="module")
def ham_split(ham10000_dir):
    """Real HAM10000 images at 32 px, one per lesion, split into train and test by lesion so that no
    test image is a second photo of a training lesion."""
    cat = load_catalog(ham10000_dir)
    first_of_lesion = {}
    for i, group in enumerate(cat.groups):
        first_of_lesion.setdefault(group, i)
    rows = [first_of_lesion[g] for g in sorted(first_of_lesion)]
    chosen = np.random.default_rng(0).choice(rows, TRAIN_IMAGES + TEST_IMAGES, replace=False)
    images = torch.from_numpy(np.stack([load_image(cat.paths[i], IMAGE_SIZE) for i in chosen]))
    labels = torch.tensor([cat.labels[i] for i in chosen])
    return (images[:TRAIN_IMAGES], labels[:TRAIN_IMAGES]), (images[TRAIN_IMAGES:], labels[TRAIN_IMAGES:])


def noise_images(n, seed=0):
    return torch.randint(0, 256, (n, 3, IMAGE_SIZE, IMAGE_SIZE), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def blur(images):
    x = images.float()
    x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return x.round().clamp(0, 255).to(torch.uint8)


def test_the_extractor_gives_finite_features_that_rank_a_blurred_copy_above_noise(extractor, ham_split):
    _, (images, _) = ham_split
    features = extractor(images)
    assert features.shape == (TEST_IMAGES, 1280) and features.dtype == np.float64 and np.isfinite(features).all()
    assert np.array_equal(features, extractor(images))  # eval mode: no dropout, no batch statistics
    blurred = frechet_distance(features, extractor(blur(images)))
    noise = frechet_distance(features, extractor(noise_images(TEST_IMAGES)))
    assert 0 < blurred < noise / 3


def test_the_extractor_refuses_float_images_naming_what_it_got(extractor):
    with pytest.raises(ValueError, match=r"torch.float32 tensor of shape \(2, 3, 8, 8\); expected uint8"):
        extractor(torch.zeros(2, 3, 8, 8))


def memorising_generator(train_images, train_labels):
    """A "generator" that returns training images of the requested classes: the worst case."""
    def sample(labels, seed):
        rng = np.random.default_rng(seed)
        picks = []
        for label in labels.tolist():
            same_class = torch.nonzero(train_labels == label).flatten().tolist() or list(range(len(train_labels)))
            picks.append(same_class[rng.integers(len(same_class))])
        return train_images[picks]
    return sample


def test_a_generator_returning_training_images_is_flagged_and_one_returning_noise_has_a_big_fid(extractor, ham_split):
    (train_images, train_labels), (test_images, test_labels) = ham_split
    split = dict(train_images=train_images, train_labels=train_labels, test_images=test_images,
                 test_labels=test_labels, extractor=extractor, seed=3, max_samples=TEST_IMAGES)

    copier = score_generator(memorising_generator(train_images, train_labels), **split)
    assert set(copier) == set(SCORE_KEYS)
    assert copier["generated_examples"] == copier["real_examples"] == TEST_IMAGES
    assert copier["memorisation_too_close_fraction"] == 1.0 and copier["memorisation_distance_ratio"] < 0.01
    assert copier["memorisation_too_close_fraction_pixels"] == 1.0

    noise = score_generator(lambda labels, seed: noise_images(len(labels), seed), **split)
    # 40 real images against 40 is a small sample: FID's upward bias puts even the copier in the hundreds.
    assert noise["fid"] > 2 * copier["fid"] and noise["precision"] == 0.0 and noise["recall"] == 0.0
    assert noise["memorisation_too_close_fraction"] == 0.0 and noise["memorisation_distance_ratio"] > 1.5


def test_blurred_copies_of_training_images_are_caught_in_pixels_where_features_lose_them(extractor, ham_split):
    """A 3x3 blur of a training image sits, in EfficientNet features, as far from its original as
    an unseen image does; in pixels it stays next to it: the pixel check flags it."""
    (train_images, train_labels), (test_images, test_labels) = ham_split
    copier = memorising_generator(train_images, train_labels)

    def blurred(labels, seed):
        x = copier(labels, seed).float()
        return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False).round().to(torch.uint8)

    out = score_generator(blurred, train_images, train_labels, test_images, test_labels, extractor=extractor, seed=3,
                          max_samples=TEST_IMAGES)
    assert out["memorisation_too_close_fraction_pixels"] >= 0.9, out
    assert out["memorisation_too_close_fraction"] < out["memorisation_too_close_fraction_pixels"], out
    honest = score_generator(lambda labels, seed: test_images[:len(labels)], train_images, train_labels, test_images,
                             test_labels, extractor=extractor, seed=3, max_samples=TEST_IMAGES)
    assert honest["memorisation_too_close_fraction_pixels"] <= 0.1, honest  # unseen real images are not copies


def test_score_generator_refuses_a_sample_of_the_wrong_size(extractor, ham_split):
    (train_images, train_labels), (test_images, test_labels) = ham_split
    with pytest.raises(ValueError, match=f"generated images holds 1 images; expected {TEST_IMAGES}"):
        score_generator(lambda labels, seed: noise_images(1), train_images, train_labels, test_images, test_labels,
                        extractor=extractor, seed=0, max_samples=TEST_IMAGES)


class CountingExtractor(FeatureExtractor):
    """The real extractor, counting the images it is asked for."""

    def __init__(self) -> None:
        super().__init__(batch_size=64)
        self.images = 0

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        self.images += len(images)
        return super().__call__(images)


def test_a_feature_cache_extracts_the_real_images_once_and_changes_no_score(ham_split):
    """A hospital scores a new generator every round (and a local-only one beside it) against the
    same real images: with a cache their features are extracted once; the scores are the same."""
    (train_images, train_labels), (test_images, test_labels) = ham_split
    counting = CountingExtractor()
    split = dict(train_images=train_images, train_labels=train_labels, test_images=test_images, test_labels=test_labels,
                 extractor=counting, seed=3, max_samples=TEST_IMAGES)

    def noise(labels, seed):
        return noise_images(len(labels), seed)

    uncached = score_generator(noise, **split)
    per_call = counting.images
    cache: dict = {}
    counting.images = 0
    first = score_generator(noise, **split, cache=cache)
    assert counting.images == per_call and len(cache) == 2  # held-out and training features, stored
    counting.images = 0
    second = score_generator(noise, **split, cache=cache)
    assert counting.images == TEST_IMAGES  # only the generated images this time
    assert first == second == uncached
    # Another set of real images (another hospital, another split) is never served from the cache.
    counting.images = 0
    score_generator(noise, **(split | {"test_images": test_images.flip(-1)}), cache=cache)
    assert counting.images == 2 * TEST_IMAGES and len(cache) == 3
