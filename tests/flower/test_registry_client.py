"""The aggregator's registry client reads its token from a mounted Secret file when given one."""

import pytest

from fedssl_core import names
from fedssl_flower.errors import ConfigError
from fedssl_flower.registry_client import RegistryClient


def test_the_token_file_wins_over_the_environment_variable(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    client = RegistryClient.from_environment("http://registry:8080", {names.ENV_REGISTRY_TOKEN: "from-env",
                                                                      names.ENV_REGISTRY_TOKEN_FILE: str(secret)})
    assert client._http.headers["Authorization"] == "Bearer from-file"
    client.close()
    client = RegistryClient.from_environment("http://registry:8080", {names.ENV_REGISTRY_TOKEN: "from-env"})
    assert client._http.headers["Authorization"] == "Bearer from-env"
    client.close()


def test_an_unreadable_or_empty_token_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=f"FEDSSL_REGISTRY_TOKEN_FILE {tmp_path / 'nope'} cannot be read"):
        RegistryClient.from_environment("http://r", {names.ENV_REGISTRY_TOKEN_FILE: str(tmp_path / "nope")})
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="is empty; expected the token"):
        RegistryClient.from_environment("http://r", {names.ENV_REGISTRY_TOKEN_FILE: str(tmp_path / "empty")})
