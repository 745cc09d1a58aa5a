"""fedssl-submit's run config overrides: what users type becomes the TOML flwr expects."""

import pytest

from fedssl_flower.submit import _FINAL_LINE, run_config_override


@pytest.mark.parametrize("given, expected", [
    ("arch=resnet50", 'arch="resnet50"'),
    ("registry-url=http://registry:8080", 'registry-url="http://registry:8080"'),
    ("ssl-rounds=3", "ssl-rounds=3"),
    ("lr=0.05", "lr=0.05"),
    ("lr=1e-3", "lr=1e-3"),
    ("pretrained=true", "pretrained=true"),
    ('data-warning="two words"', 'data-warning="two words"'),
    (" share = projection-head ", 'share="projection-head"'),
])
def test_overrides_become_toml(given, expected):
    assert run_config_override(given) == expected


@pytest.mark.parametrize("bad", ["ssl-rounds", "=3", "SSL_ROUNDS=3", "ssl rounds=3"])
def test_malformed_overrides_are_refused_with_the_expected_form(bad):
    with pytest.raises(ValueError, match="key=value with a kebab-case key"):
        run_config_override(bad)


@pytest.mark.parametrize("line, final", [
    ("[fedssl] run 8417 succeeded; run folder /runs/8417", True),
    ("[fedssl] run 8417 FAILED: RunFailed: only 1 hospital(s) connected", True),
    ("[fedssl] run 8417: 3 SSL + 2 fine-tune rounds, 3 hospitals (a, b, c)", False),
    ("[fedssl] phase=ssl round=1/3 hospitals=3 loss=4.1 balanced_accuracy=0.2 macro_auc=0.6 (21.0s)", False),
])
def test_the_aggregators_last_line_ends_status_polling(line, final):
    """fedssl-submit asks the SuperLink for the status right away when this line streams by,
    instead of starting a `flwr ls` process every few seconds while hospitals train."""
    assert bool(_FINAL_LINE.search(line)) is final
