from pathlib import Path

import pytest

from fedssl_flower.data import kaggle, load_hospital_data
from fedssl_flower.errors import ConfigError, DatasetNotFound, KaggleDownloadError

# The command line runs this checkout's code (not whatever copy the venv has installed).
SERVICES_ON_PATH = {"PYTHONPATH": str(Path(kaggle.__file__).resolve().parents[2])}


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

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KAGGLE_CONFIG_DIR": str(tmp_path / "none"), **SERVICES_ON_PATH}
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


# --------------------------------------------------------------- datasets beyond HAM10000 (issue 15, item 4)

BRAIN = "masoudnickparvar/brain-tumor-mri-dataset"
CHEST = "paultimothymooney/chest-xray-pneumonia"


@pytest.mark.parametrize("text, path, expected", [
    (f"{BRAIN}/Training", "", (BRAIN, "Training", "imagefolder")),
    (f"{BRAIN}/Training/", "", (BRAIN, "Training", "imagefolder")),
    (BRAIN, "Training", (BRAIN, "Training", "imagefolder")),
    (f"{CHEST}/chest_xray//train", "", (CHEST, "chest_xray/train", "imagefolder")),
    (f"{CHEST}/./chest_xray/train", "chest_xray/train", (CHEST, "chest_xray/train", "imagefolder")),
    (BRAIN, "", (BRAIN, "", "imagefolder")),
    ("kmader/skin-cancer-mnist-ham10000", "", ("kmader/skin-cancer-mnist-ham10000", "", "ham10000")),
])
def test_a_dataset_is_a_slug_and_a_sub_path(text, path, expected):
    d = kaggle.parse_dataset(text, path)
    assert (d.dataset, d.path, d.format) == expected


@pytest.mark.parametrize("text, path, words", [
    ("brain-tumor-mri-dataset", "", ["'brain-tumor-mri-dataset' is not OWNER/DATASET", "expected OWNER/DATASET[/SUB/PATH]"]),
    ("", "", ["'' is not OWNER/DATASET"]),
    ("/Training", "", ["is not OWNER/DATASET"]),
    ("masoud nickparvar/brain", "", ["owner 'masoud nickparvar' may hold only letters, digits"]),
    ("masoudnickparvar/brain?x", "", ["dataset name 'brain?x' may hold only"]),
    (f"{BRAIN}/../etc", "", ["'..' is not allowed", "expected a folder inside the download"]),
    (f"{BRAIN}/.hidden", "", ["'.hidden' is not allowed"]),
    (BRAIN, "/abs/Training", ["'/abs/Training' is absolute"]),
    (BRAIN, "chest_xray\\train", ["backslash", "chest_xray/train"]),
    (f"{BRAIN}/Training", "Testing", ["names the sub-path 'Training' and --path names 'Testing'; give it once"]),
])
def test_a_bad_slug_or_sub_path_is_an_error_saying_what_was_expected(text, path, words):
    with pytest.raises(ConfigError) as e:
        kaggle.parse_dataset(text, path)
    for w in words:
        assert w in str(e.value)


def test_download_targets_keep_ham10000_where_it_was(tmp_path):
    assert kaggle.parse_dataset("kmader/skin-cancer-mnist-ham10000").target_in(tmp_path) == tmp_path / "ham10000"
    assert kaggle.parse_dataset(f"{BRAIN}/Training").target_in(tmp_path) == tmp_path / "kaggle" / "masoudnickparvar" / "brain-tumor-mri-dataset"
    with pytest.raises(ConfigError, match="HAM10000 is used from the top of its download; drop the sub-path"):
        kaggle.parse_dataset("kmader/skin-cancer-mnist-ham10000/x", format="ham10000")


def _write_jpeg(path, value: int, mode: str = "RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (40, 30), value if mode == "L" else (value, value // 2, 255 - value)).save(path, "JPEG")


@pytest.fixture
def fake_kaggle(monkeypatch, tmp_path):
    """The real `kaggle` client with its two network calls replaced: `authenticate` succeeds and
    `dataset_download_files` unzips `fake_kaggle.tree` (a function writing files) into the folder
    it is given. Records every download."""
    monkeypatch.setenv("KAGGLE_USERNAME", "fedssl-test")
    monkeypatch.setenv("KAGGLE_KEY", "0" * 32)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "cfg"))
    from kaggle.api.kaggle_api_extended import KaggleApi

    class Fake:
        calls: list[tuple[str, str]] = []
        tree = staticmethod(lambda root: None)

    def download_files(self, dataset, path=None, unzip=False, quiet=True, **kw):
        assert unzip, "the download must be unzipped in the staging folder"
        Fake.calls.append((dataset, path))
        Fake.tree(__import__("pathlib").Path(path))

    monkeypatch.setattr(KaggleApi, "authenticate", lambda self: None)
    monkeypatch.setattr(KaggleApi, "dataset_download_files", download_files)
    return Fake


def brain_download(root):
    """The Kaggle brain tumour MRI download: Training/ and Testing/, one folder per class."""
    for split in ("Training", "Testing"):
        for i, cls in enumerate(("glioma", "meningioma", "notumor", "pituitary")):
            for k in range(3):
                _write_jpeg(root / split / cls / f"{split[:2]}-{k}.jpg", 40 * i + k, "L" if k == 0 else "RGB")


def test_a_dataset_downloads_once_atomically_and_its_sub_path_plans_as_class_folders(fake_kaggle, tmp_path):
    from fedssl_flower.data import layout

    fake_kaggle.tree = brain_download
    source = kaggle.parse_dataset(f"{BRAIN}/Training")
    target = source.target_in(tmp_path / "data")
    folder = kaggle.download(target, source)
    assert folder == target / "Training"
    assert fake_kaggle.calls == [(BRAIN, fake_kaggle.calls[0][1])]
    assert (target / kaggle.MARKER).read_text().strip() == BRAIN
    assert [p.name for p in target.parent.iterdir()] == ["brain-tumor-mri-dataset"]  # no staging folder left
    assert kaggle.download(target, source) == folder and len(fake_kaggle.calls) == 1  # there: no second download
    plan = layout.plan(folder, hospitals=2)
    assert plan.kind == layout.LAYOUT_CLASS_FOLDERS
    assert plan.class_names == ["glioma", "meningioma", "notumor", "pituitary"]
    assert sum(sum(h.images.values()) for h in plan.hospitals) == 12
    data = load_hospital_data({**plan.hospitals[0].node_config, "cache-dir": str(tmp_path / "cache")}, 32)
    assert data.class_names == plan.class_names and data.audit["data_source"] == "imagefolder"
    assert data.audit["skipped_files"] == []


def test_a_sub_path_missing_after_download_names_the_folders_there(fake_kaggle, tmp_path):
    fake_kaggle.tree = brain_download
    target = tmp_path / "brain"
    with pytest.raises(DatasetNotFound) as e:
        kaggle.download(target, kaggle.parse_dataset(BRAIN, "Train"))
    assert f"Kaggle dataset {BRAIN} at {target} has no folder 'Train'; the download holds Testing/, Training/" in str(e.value)
    # The download itself is complete and kept: fixing the sub-path does not download again.
    assert kaggle.download(target, kaggle.parse_dataset(BRAIN, "Training")) == target / "Training"
    assert len(fake_kaggle.calls) == 1
    with pytest.raises(DatasetNotFound, match="no folder 'Training/glioma/x'; Training/glioma/ holds no folders"):
        kaggle.download(target, kaggle.parse_dataset(BRAIN, "Training/glioma/x"))


def test_an_empty_download_or_a_folder_holding_another_dataset_installs_nothing(fake_kaggle, tmp_path):
    target = tmp_path / "data" / "x"
    with pytest.raises(KaggleDownloadError, match=f"the Kaggle download of {BRAIN} is empty; nothing was installed"):
        kaggle.download(target, kaggle.parse_dataset(BRAIN))
    assert list((tmp_path / "data").iterdir()) == []
    fake_kaggle.tree = brain_download
    kaggle.download(target, kaggle.parse_dataset(BRAIN))
    with pytest.raises(KaggleDownloadError, match=f"it holds the Kaggle dataset {BRAIN}; choose another folder"):
        kaggle.download(target, kaggle.parse_dataset(f"{CHEST}/chest_xray/train"))


def test_command_line_downloads_a_dataset_and_refuses_a_bad_slug_before_asking_kaggle(tmp_path):
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KAGGLE_CONFIG_DIR": str(tmp_path / "none"), **SERVICES_ON_PATH}
    r = subprocess.run([sys.executable, "-m", "fedssl_flower.data.kaggle", str(tmp_path / "d"), "--dataset", "brain-tumor"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "error: Kaggle dataset 'brain-tumor' is not OWNER/DATASET" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "fedssl_flower.data.kaggle", str(tmp_path / "d"), f"--dataset={BRAIN}",
                        "--path=Training"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"error: cannot download {BRAIN}" in r.stderr and "no Kaggle credentials" in r.stderr
    assert not (tmp_path / "d").exists()


def test_the_shared_brain_mri_copy_loads_through_a_faked_download(fake_kaggle, tmp_path, brain_mri_dir):
    """The real MRI slices (some grayscale) as the Kaggle download's Training/ tree: 6 per class
    of one hospital, planned and loaded as class folders."""
    import shutil

    shared = brain_mri_dir / "aiims-delhi"

    def tree(root):
        for cls in sorted(d.name for d in shared.iterdir() if d.is_dir()):
            (root / "Training" / cls).mkdir(parents=True)
            for f in sorted((shared / cls).iterdir())[:6]:
                shutil.copy(f, root / "Training" / cls / f.name)

    from fedssl_flower.data import layout

    fake_kaggle.tree = tree
    folder = kaggle.download(tmp_path / "brain", kaggle.parse_dataset(f"{BRAIN}/Training"))
    plan = layout.plan(folder, hospitals=1)
    assert plan.kind == layout.LAYOUT_CLASS_FOLDERS and plan.class_names == ["glioma", "meningioma", "notumor", "pituitary"]
    data = load_hospital_data({**plan.hospitals[0].node_config, "cache-dir": str(tmp_path / "cache")}, 32)
    assert len(data.train_labels) + len(data.test_labels) == 24 and data.audit["skipped_files"] == []


def test_command_line_prints_the_data_folder_of_a_download_that_is_there(tmp_path):
    """What deploy-local.sh --data kaggle:... runs: no credentials needed once the dataset is there."""
    import subprocess
    import sys

    target = tmp_path / "kaggle" / "masoudnickparvar" / "brain-tumor-mri-dataset"
    brain_download(target)
    (target / kaggle.MARKER).write_text(BRAIN + "\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KAGGLE_CONFIG_DIR": str(tmp_path / "none"), **SERVICES_ON_PATH}
    r = subprocess.run([sys.executable, "-m", "fedssl_flower.data.kaggle", str(target), "--dataset", f"{BRAIN}/Training",
                        "--print-path"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{target / 'Training'}\n"
    r = subprocess.run([sys.executable, "-m", "fedssl_flower.data.kaggle", str(target), "--dataset", f"{BRAIN}/training",
                        "--print-path"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert "has no folder 'training'; the download holds Testing/, Training/" in r.stderr
