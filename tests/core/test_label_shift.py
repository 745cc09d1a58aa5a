"""fedssl_core.label_shift: a hospital's prior over the federation's, and the adjustment."""

import numpy as np
import pytest

from fedssl_core import label_shift


def test_a_hospitals_ratio_is_its_prior_over_the_federations_with_a_missing_class_as_half_an_image():
    r = label_shift.ratios({"a": [30, 10, 0], "b": [10, 30, 0]}, 3)
    federation = np.array([40, 40, 0.5]) / 80.5
    np.testing.assert_allclose(r["a"], (np.array([30, 10, 0.5]) / 40.5) / federation)
    np.testing.assert_allclose(r["b"], (np.array([10, 30, 0.5]) / 40.5) / federation)


def test_adjusting_uniform_probabilities_gives_the_hospitals_prior_rescaled_and_rows_sum_to_one():
    r = label_shift.ratios({"a": [30, 10, 0], "b": [10, 30, 0]}, 3)
    out = label_shift.adjust(np.full((2, 3), 1 / 3), r["a"])
    assert out.dtype == np.float32 and np.allclose(out.sum(axis=1), 1.0)
    np.testing.assert_allclose(out[0], r["a"] / r["a"].sum(), rtol=1e-6)
    sure = label_shift.adjust(np.array([[0.0, 1.0, 0.0]]), r["a"])
    np.testing.assert_allclose(sure, [[0.0, 1.0, 0.0]])  # a certain answer stays certain


def test_counts_round_trip_through_the_weights_metadata_value():
    text = label_shift.encode({"b": [1, 2, 3], "a": [4, 5, 6]})
    assert text == '{"a":[4,5,6],"b":[1,2,3]}'
    assert set(label_shift.decode(text, 3)) == {"a", "b"}


@pytest.mark.parametrize(("text", "error"), [
    ("not json", "is not JSON"),
    ("[]", "must map each hospital"),
    ("{}", "must map each hospital"),
    ('{"a": [1, 2]}', "hospital 'a': expected 3 non-negative"),
    ('{"a": [1, -2, 3]}', "hospital 'a': expected 3 non-negative"),
    ('{"a": [0, 0, 0]}', "with at least one image"),
    ('{"a": "123"}', "hospital 'a': expected 3"),
    ('{"a": ["x", "y", "z"]}', "hospital 'a': expected 3"),
    ('{"a": 7}', "hospital 'a': expected 3"),
])
def test_bad_counts_are_refused_naming_what_is_wrong(text, error):
    with pytest.raises(label_shift.LabelCountsError, match=error):
        label_shift.decode(text, 3)


def test_a_hospital_computes_its_own_ratio_from_its_counts_and_the_federations_sum_as_the_registry_does():
    counts = {"a": [30, 10, 0], "b": [10, 30, 0], "c": [5, 5, 7]}
    federation = [sum(c) for c in zip(*counts.values())]
    for h, expected in label_shift.ratios(counts, 3).items():
        assert label_shift.ratio(counts[h], federation).tolist() == expected.tolist()


@pytest.mark.parametrize("own,federation,error", [
    ([1, 2], [1, 2, 3], "two equal-length lists"),
    ([5, 1, 0], [4, 10, 10], "at least the hospital's own"),
    ([0, 0, 0], [4, 10, 10], "at least one image"),
    ([1, -1, 0], [4, 10, 10], "at least the hospital's own"),
])
def test_a_ratio_from_counts_that_cannot_be_is_refused_naming_why(own, federation, error):
    with pytest.raises(label_shift.LabelCountsError, match=error):
        label_shift.ratio(own, federation)
