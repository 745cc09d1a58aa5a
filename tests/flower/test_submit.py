"""fedssl-submit's run config overrides: what users type becomes the TOML flwr expects."""

import pytest

from fedssl_flower.submit import run_config_override


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
