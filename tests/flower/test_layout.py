"""Layout detection and the hospital plan deploy-local.sh starts from: the real brain MRI
hospitals (read-only), small symlinked or generated trees for the other layouts and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.common.config import parse_config_args
from PIL import Image

from fedssl_flower.data import load_hospital_data
from fedssl_flower.data.layout import (LAYOUT_CLASS_FOLDERS, LAYOUT_HAM10000, LAYOUT_HOSPITAL_FOLDERS, detect,
                                       hospital_name, main, plan)
from fedssl_flower.errors import ConfigError, DatasetMalformed, DatasetNotFound, LabelMismatch

MRI_MAP = "tata-memorial-mumbai:Normal=notumor"


def tiny_images(folder, n, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture
def mri_tree(tmp_path, brain_mri_dir):
    """One class-per-folder tree of real MRI slices (symlinks, 12 a class)."""
    root = tmp_path / "mri"
    for d in sorted((brain_mri_dir / "aiims-delhi").iterdir()):
        (root / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[:12]:
            (root / d.name / f.name).symlink_to(f)
    return root


def test_the_brain_mri_hospitals_are_hospital_folders_with_their_counts(brain_mri_dir):
    assert detect(brain_mri_dir) == LAYOUT_HOSPITAL_FOLDERS
    layout = plan(brain_mri_dir, label_map=MRI_MAP, max_images=40)
    assert layout.class_names == ["glioma", "meningioma", "notumor", "pituitary"]
    assert [h.name for h in layout.hospitals] == ["aiims-delhi", "nimhans-bengaluru", "tata-memorial-mumbai"]
    by_name = {h.name: h for h in layout.hospitals}
    # the README's table
    assert by_name["aiims-delhi"].images == {"glioma": 727, "meningioma": 335, "notumor": 636, "pituitary": 291}
    assert by_name["nimhans-bengaluru"].images == {"glioma": 396, "meningioma": 670, "notumor": 398, "pituitary": 364}
    assert by_name["tata-memorial-mumbai"].images == {"glioma": 198, "meningioma": 334, "notumor": 557, "pituitary": 802}
    assert all(sum(h.used.values()) == 40 for h in layout.hospitals)
    assert layout.label_map["tata-memorial-mumbai"]["Normal"] == {"class": "notumor", "how": "label-map"}
    assert layout.label_map["nimhans-bengaluru"]["no_tumor"] == {"class": "notumor", "how": "case/separators/generic word"}
    text = layout.describe()
    assert "data layout: hospital-folders at " in text and "one hospital per folder" in text
    assert "  nimhans-bengaluru: 'pituitary_tumor' -> 'pituitary' (case/separators/generic word)" in text
    assert "  tata-memorial-mumbai: 'Normal' -> 'notumor' (label-map)" in text
    assert any(line.split() == ["tata-memorial-mumbai", "1891", "198", "334", "557", "802"] for line in text.splitlines())


def test_the_planned_node_config_survives_flowers_parser_and_loads_that_hospital(brain_mri_dir, tmp_path):
    layout = plan(brain_mri_dir, label_map=MRI_MAP)
    tata = layout.hospitals[2]
    parsed = parse_config_args([f'hospital="{tata.name}" ' + tata.node_config_text()])
    assert parsed["data-source"] == "imagefolder" and parsed["data-path"] == str(brain_mri_dir.resolve() / "tata-memorial-mumbai")
    assert json.loads(parsed["label-map"])["pituitary tumor"] == "pituitary"
    data = load_hospital_data({**parsed, "max-images": 16, "cache-dir": str(tmp_path / "cache")}, 32)
    assert data.class_names == ["glioma", "meningioma", "notumor", "pituitary"]
    assert data.audit["label_map"] == {"Glioma": "glioma", "Meningioma": "meningioma", "Normal": "notumor", "pituitary tumor": "pituitary"}
    assert len(data.train_labels) + len(data.test_labels) == 16


def test_a_folder_name_with_quotes_reaches_the_hospital_intact(tmp_path):
    tiny_images(tmp_path / "h1" / "Alzheimer's", 3)
    tiny_images(tmp_path / "h1" / "normal", 3)
    tiny_images(tmp_path / "h2" / "alzheimers", 3)
    tiny_images(tmp_path / "h2" / "Normal", 3)
    layout = plan(tmp_path, label_map="h1:Alzheimer's=alzheimers")
    parsed = parse_config_args([layout.hospitals[0].node_config_text()])
    assert json.loads(parsed["label-map"]) == {"Alzheimer's": "alzheimers", "normal": "normal"}


def test_one_class_tree_is_split_into_hospitals_at_random_or_by_dirichlet(mri_tree):
    assert detect(mri_tree) == LAYOUT_CLASS_FOLDERS
    layout = plan(mri_tree, hospitals=2)
    assert layout.partition == "random" and [h.name for h in layout.hospitals] == ["hospital-1", "hospital-2"]
    assert layout.class_names == ["glioma", "meningioma", "notumor", "pituitary"]
    totals = [sum(h.images[c] for h in layout.hospitals) for c in layout.class_names]
    assert totals == [12, 12, 12, 12]
    assert [h.node_config["partition-id"] for h in layout.hospitals] == [0, 1]
    skewed = plan(mri_tree, hospitals=3, partition="dirichlet", dirichlet_alpha=0.1)
    assert skewed.hospitals[0].node_config["dirichlet-alpha"] == 0.1
    assert sum(sum(h.images.values()) for h in skewed.hospitals) == 48
    assert "3 hospital(s) by dirichlet" in skewed.describe()
    with pytest.raises(ConfigError, match="a class-per-folder tree has no lesion ids or sites; split it by random or dirichlet"):
        plan(mri_tree, partition="site")
    with pytest.raises(ConfigError, match="its hospitals share one label map; write 'folder=class'"):
        plan(mri_tree, label_map="h:glioma=g")


def test_ham10000_is_recognised_and_split_by_site(ham10000_dir):
    assert detect(ham10000_dir) == LAYOUT_HAM10000
    layout = plan(ham10000_dir, hospitals=4)
    assert layout.partition == "site" and len(layout.hospitals) == 4
    assert sum(sum(h.images.values()) for h in layout.hospitals) == 10015
    assert layout.hospitals[0].node_config["data-source"] == "ham10000"
    assert plan(ham10000_dir, hospitals=5).partition == "lesion"  # more hospitals than sites
    with pytest.raises(ConfigError, match="HAM10000, whose 7 classes come from its metadata"):
        plan(ham10000_dir, label_map="nv=naevus")
    with pytest.raises(ConfigError, match="--partition random: HAM10000 splits by site, lesion, dirichlet"):
        plan(ham10000_dir, partition="random")


def test_hospital_folders_take_no_partition_and_their_own_count(brain_mri_dir):
    with pytest.raises(ConfigError, match="--hospitals 2: .* holds 3 hospital folders \\(aiims-delhi, nimhans-bengaluru, "
                                          "tata-memorial-mumbai\\), one SuperNode each; drop --hospitals or give 3"):
        plan(brain_mri_dir, hospitals=2, label_map=MRI_MAP)
    assert len(plan(brain_mri_dir, hospitals=3, label_map=MRI_MAP).hospitals) == 3
    with pytest.raises(ConfigError, match="--partition dirichlet: .* holds one folder per hospital, so the hospitals are the folders"):
        plan(brain_mri_dir, partition="dirichlet", label_map=MRI_MAP)


def test_hospitals_are_named_after_their_folders(tmp_path):
    assert hospital_name("St Mary's Hospital") == "St-Mary-s-Hospital"
    tiny_images(tmp_path / "St Mary" / "glioma", 2)
    tiny_images(tmp_path / "St-Mary" / "glioma", 2)
    with pytest.raises(DatasetMalformed, match="hospital folders 'St Mary' and 'St-Mary' both give the SuperNode name 'St-Mary'"):
        plan(tmp_path)


def test_empty_class_folders_are_left_out_and_said(tmp_path):
    tiny_images(tmp_path / "a" / "glioma", 2)
    tiny_images(tmp_path / "a" / "normal", 2)
    (tmp_path / "a" / "pituitary").mkdir()
    tiny_images(tmp_path / "b" / "glioma", 2)
    tiny_images(tmp_path / "b" / "Normal", 2)
    layout = plan(tmp_path)
    assert layout.class_names == ["glioma", "normal"]
    assert "a: class folder 'pituitary' holds no images; left out" in layout.notes


@pytest.mark.parametrize("build, error, message", [
    (lambda p: None, DatasetNotFound, "--data {p}/data: no such folder; expected one of: ham10000"),
    (lambda p: (p / "data").write_text("x"), DatasetMalformed, "--data {p}/data is a file, not a folder"),
    (lambda p: (p / "data").mkdir(), DatasetMalformed, "--data {p}/data holds no folders and no HAM10000_metadata.csv"),
    (lambda p: (tiny_images(p / "data" / "glioma", 2), (p / "data" / "notes").mkdir()), DatasetMalformed,
     "--data {p}/data: folder(s) notes hold no JPEG/PNG images"),
    (lambda p: (tiny_images(p / "data" / "glioma", 2), tiny_images(p / "data" / "h2" / "glioma", 2)), DatasetMalformed,
     "--data {p}/data mixes class folders holding images (glioma) with folders holding class folders (h2)"),
])
def test_unrecognisable_data_is_an_error_saying_what_was_expected(tmp_path, build, error, message):
    build(tmp_path)
    with pytest.raises(error) as err:
        detect(tmp_path / "data")
    assert message.format(p=tmp_path) in str(err.value)


def test_the_command_line_prints_the_plan_or_the_error(brain_mri_dir, tmp_path, capsys):
    assert main([str(brain_mri_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: class folders do not match one class list")
    assert "hospital tata-memorial-mumbai: folder 'Normal' matches no known class" in err and "nearest: 'notumor'" in err
    tsv, out_json = tmp_path / "hospitals.tsv", tmp_path / "layout.json"
    assert main([str(brain_mri_dir), "--label-map", MRI_MAP, "--node-configs", str(tsv), "--write-json", str(out_json)]) == 0
    assert "classes: glioma, meningioma, notumor, pituitary" in capsys.readouterr().out
    lines = [ln.split("\t") for ln in tsv.read_text().splitlines()]
    assert [name for name, _ in lines] == ["aiims-delhi", "nimhans-bengaluru", "tata-memorial-mumbai"]
    recorded = json.loads(out_json.read_text())
    assert recorded["kind"] == "hospital-folders" and recorded["hospitals"][0]["images"]["glioma"] == 727
    assert main([str(brain_mri_dir), "--label-map", MRI_MAP, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["class_names"] == ["glioma", "meningioma", "notumor", "pituitary"]


def test_a_class_at_one_hospital_only_needs_saying_so(tmp_path):
    tiny_images(tmp_path / "a" / "glioma", 2)
    tiny_images(tmp_path / "b" / "glioma", 2)
    tiny_images(tmp_path / "b" / "other", 2)
    tiny_images(tmp_path / "a" / "normal", 2)
    # A folder found at one hospital only could be a class missing elsewhere or a different name: never guessed.
    with pytest.raises(LabelMismatch) as err:
        plan(tmp_path)
    assert "hospital a: folder 'normal' matches no known class (known: glioma)" in str(err.value)
    assert "hospital b: folder 'other' matches no known class (known: glioma)" in str(err.value)
    assert plan(tmp_path, class_names="glioma,normal,other").hospitals[0].images == {"glioma": 2, "normal": 2, "other": 0}
