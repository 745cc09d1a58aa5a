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


@pytest.mark.integration
def test_registering_under_a_model_that_reads_images_differently_is_refused_naming_what_differs(tmp_path):
    """A model's input_spec serves all its versions: a run whose classifier is scored with
    test-time augmentation (or at another image size) must not add versions to a model created
    without it (a real registry process; the second identical ensure is a no-op)."""
    from fedssl_flower.registry_client import RegistryConflict
    from tests.support import processes as P

    spec = {"image_size": 32, "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "class_names": ["a", "b"]}
    with P.cluster(tmp_path) as c:
        reg = P.start_registry(c, tmp_path / "data")
        client = RegistryClient(reg.url, reg.token)
        try:
            client.ensure_model("clf", task=names.TASK_CLASSIFICATION, architecture="resnet18", input_spec=spec)  # before the field
            client.ensure_model("clf", task=names.TASK_CLASSIFICATION, architecture="resnet18",
                                input_spec={**spec, "test_time_augmentation": "none"})  # the same: nothing to do
            with pytest.raises(RegistryConflict) as err:
                client.ensure_model("clf", task=names.TASK_CLASSIFICATION, architecture="resnet18",
                                    input_spec={**spec, "image_size": 96, "test_time_augmentation": "dihedral"})
            msg = str(err.value)
            assert "'clf'" in msg and "image_size 32 (this run: 96)" in msg, msg
            assert "test_time_augmentation 'none' (this run: 'dihedral')" in msg, msg
            with reg.client() as http:
                assert http.get("/v1/models/clf").json()["input_spec"]["image_size"] == 32  # untouched
        finally:
            client.close()
