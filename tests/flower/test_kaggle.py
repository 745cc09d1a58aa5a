import pytest

from fedssl_flower.data import kaggle, load_hospital_data
from fedssl_flower.errors import DatasetNotFound, KaggleDownloadError


def test_without_credentials_the_missing_dataset_is_an_error_not_a_download(tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))
    assert not kaggle.credentials_available()
    with pytest.raises(DatasetNotFound, match="set data-path or provide Kaggle credentials"):
        load_hospital_data({"data-path": str(tmp_path / "ham")}, 32)
    with pytest.raises(KaggleDownloadError, match="no Kaggle credentials; set KAGGLE_USERNAME and KAGGLE_KEY"):
        kaggle.download_ham10000(tmp_path / "ham")


def test_failed_download_leaves_no_partial_dataset(tmp_path, monkeypatch):
    # Real kaggle client, fake credentials, no route to Kaggle: the download fails for real.
    monkeypatch.setenv("KAGGLE_USERNAME", "fedssl-test")
    monkeypatch.setenv("KAGGLE_KEY", "0" * 32)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "cfg"))
    target = tmp_path / "data" / "ham10000"
    with pytest.raises(KaggleDownloadError, match="downloading kmader/skin-cancer-mnist-ham10000 from Kaggle into"):
        kaggle.download_ham10000(target)
    assert not target.exists()
    assert list((tmp_path / "data").iterdir()) == []  # the staging folder is gone too


def test_command_line_fails_clearly_without_credentials(tmp_path):
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KAGGLE_CONFIG_DIR": str(tmp_path / "none")}
    r = subprocess.run([sys.executable, "-m", "fedssl_flower.data.kaggle", str(tmp_path / "ham")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "error: cannot download kmader/skin-cancer-mnist-ham10000" in r.stderr and "no Kaggle credentials" in r.stderr
    assert not (tmp_path / "ham").exists()


def test_command_line_is_a_no_op_when_the_dataset_is_there(ham10000_dir):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "fedssl_flower.data.kaggle", str(ham10000_dir)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"HAM10000 ready at {ham10000_dir}" in r.stdout
