"""Class folders reconciled into one class list: matched when names differ only in case,
separators or a generic word, mapped by a label map, and refused (naming hospital, folder and
nearest class) otherwise. Folder names are the real brain MRI hospitals'."""

from __future__ import annotations

import json

import pytest

from fedssl_flower.data.labels import (HOW_LABEL_MAP, HOW_NORMALISED, HOW_SAME_NAME, label_key, parse_class_names,
                                       parse_label_map, reconcile)
from fedssl_flower.errors import ConfigError, LabelMismatch


@pytest.fixture
def mri_folders(brain_mri_dir) -> dict[str, list[str]]:
    return {h.name: sorted(d.name for d in h.iterdir() if d.is_dir()) for h in sorted(brain_mri_dir.iterdir()) if h.is_dir()}


@pytest.mark.parametrize("a, b", [("no_tumor", "notumor"), ("No Tumor", "notumor"), ("pituitary tumor", "pituitary"),
                                  ("glioma_tumor", "glioma"), ("Glioma", "glioma"), ("Meningioma-Tumour", "meningioma")])
def test_names_differing_in_case_separators_or_a_generic_word_share_a_key(a, b):
    assert label_key(a) == label_key(b)


@pytest.mark.parametrize("a, b", [("Normal", "notumor"), ("glioma", "meningioma"), ("tumor", "notumor")])
def test_other_names_do_not(a, b):
    assert label_key(a) != label_key(b)


def test_the_mri_hospitals_without_a_label_map_fail_on_normal_naming_the_nearest_class(mri_folders):
    with pytest.raises(LabelMismatch) as err:
        reconcile(mri_folders)
    msg = str(err.value)
    assert "hospital tata-memorial-mumbai: folder 'Normal' matches no known class (known: glioma, meningioma, notumor, pituitary); nearest: 'notumor'" in msg
    assert "--label-map (e.g. 'tata-memorial-mumbai:Normal=notumor')" in msg
    assert msg.count("hospital ") == 1  # every other folder matched


def test_the_mri_hospitals_with_one_label_map_entry_share_four_classes(mri_folders):
    rec = reconcile(mri_folders, parse_label_map("tata-memorial-mumbai:Normal=notumor"))
    assert rec.class_names == ["glioma", "meningioma", "notumor", "pituitary"]
    assert rec.mapping["nimhans-bengaluru"] == {"glioma_tumor": "glioma", "meningioma_tumor": "meningioma",
                                                "no_tumor": "notumor", "pituitary_tumor": "pituitary"}
    assert rec.mapping["tata-memorial-mumbai"] == {"Glioma": "glioma", "Meningioma": "meningioma", "Normal": "notumor",
                                                   "pituitary tumor": "pituitary"}
    assert rec.how["aiims-delhi"] == dict.fromkeys(mri_folders["aiims-delhi"], HOW_SAME_NAME)
    assert rec.how["tata-memorial-mumbai"]["Normal"] == HOW_LABEL_MAP
    assert rec.how["tata-memorial-mumbai"]["pituitary tumor"] == HOW_NORMALISED
    lines = rec.matches()  # printed and recorded: every match the label map did not name
    assert "nimhans-bengaluru: folder 'no_tumor' -> class 'notumor' (case/separators/generic word)" in lines
    assert "tata-memorial-mumbai: folder 'pituitary tumor' -> class 'pituitary' (case/separators/generic word)" in lines
    assert len(lines) == 7


def test_class_names_fix_the_list_and_its_order_and_folders_match_them(mri_folders):
    rec = reconcile(mri_folders, parse_label_map({"Normal": "no tumour"}), ["pituitary", "no tumour", "meningioma", "glioma"])
    assert rec.class_names == ["pituitary", "no tumour", "meningioma", "glioma"]
    assert rec.mapping["aiims-delhi"]["notumor"] == "no tumour"


def test_a_class_missing_at_one_hospital_is_fine_and_reported():
    rec = reconcile({"a": ["glioma", "normal"], "b": ["Glioma", "Normal", "pituitary"], "c": ["pituitary_tumor", "normal"]})
    assert rec.class_names == ["glioma", "normal", "pituitary"]
    assert rec.missing == {"a": ["pituitary"], "b": [], "c": ["glioma"]}
    assert "a: no folder for class(es) pituitary (it trains on the others)" in rec.matches()


def test_a_hospital_with_no_recognisable_class_folder_is_an_error_naming_each_folder():
    with pytest.raises(LabelMismatch) as err:
        reconcile({"a": ["glioma", "pituitary"], "b": ["glioma", "pituitary"], "c": ["scans", "misc"]})
    assert "hospital c: folder 'misc' matches no known class" in str(err.value)
    assert "hospital c: folder 'scans' matches no known class" in str(err.value)
    with pytest.raises(LabelMismatch, match="hospital c: no class folders"):
        reconcile({"a": ["glioma"], "c": []})


def test_two_folders_of_one_hospital_that_look_alike_are_not_merged_silently():
    with pytest.raises(LabelMismatch, match="hospital a: folders 'No Tumor', 'no_tumor' would all be class 'notumor'"):
        reconcile({"a": ["No Tumor", "no_tumor", "glioma"], "b": ["notumor", "glioma"]})
    merged = reconcile({"a": ["No Tumor", "no_tumor", "glioma"], "b": ["notumor", "glioma"]},
                       parse_label_map("a:No Tumor=notumor,a:no_tumor=notumor"))
    assert merged.mapping["a"] == {"No Tumor": "notumor", "no_tumor": "notumor", "glioma": "glioma"}


def test_label_map_forms_inline_json_and_file(tmp_path):
    inline = parse_label_map("pituitary tumor=pituitary, tata:Normal=notumor")
    assert inline.common == {"pituitary tumor": "pituitary"} and inline.per_hospital == {"tata": {"Normal": "notumor"}}
    nested = parse_label_map(json.dumps({"pituitary tumor": "pituitary", "tata": {"Normal": "notumor"}}))
    assert nested == inline
    f = tmp_path / "labels.txt"
    f.write_text("# one entry a line\npituitary tumor=pituitary\ntata:Normal=notumor\n")
    assert parse_label_map(str(f)) == inline
    (tmp_path / "labels.json").write_text(json.dumps({"tata": {"Normal": "notumor"}, "pituitary tumor": "pituitary"}))
    assert parse_label_map(str(tmp_path / "labels.json")) == inline
    assert inline.for_hospital("tata") == {"pituitary tumor": "pituitary", "Normal": "notumor"}


@pytest.mark.parametrize("value, message", [
    ("glioma", "label-map 'glioma' is neither a file nor 'folder=class' entries"),
    ("glioma=", "label-map entry 'glioma=' is not 'folder=class' or 'hospital:folder=class'"),
    ("{not json", "label-map is not valid JSON"),
    ('["a"]', "label-map JSON must be an object, got list"),
    ('{"a": 3}', "label-map entry 'a' must map to a class name"),
])
def test_bad_label_maps_say_what_was_expected(value, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace(")", "\\)").replace("[", "\\[")):
        parse_label_map(value)


def test_label_map_typos_name_the_nearest_folder_or_the_hospitals(mri_folders):
    with pytest.raises(ConfigError, match="label-map entry tata-memorial-mumbai:Normall=notumor names no folder of hospital "
                                          "tata-memorial-mumbai; nearest folder: 'Normal'"):
        reconcile(mri_folders, parse_label_map("tata-memorial-mumbai:Normall=notumor"))
    with pytest.raises(ConfigError, match="label-map names hospital\\(s\\) tata, but the hospitals are aiims-delhi"):
        reconcile(mri_folders, parse_label_map("tata:Normal=notumor"))
    with pytest.raises(ConfigError, match="label-map maps to healthy, which class-names"):
        reconcile(mri_folders, parse_label_map("Normal=healthy"), ["glioma", "meningioma", "notumor", "pituitary"])
    with pytest.raises(LabelMismatch, match="class\\(es\\) astrocytoma \\(from class-names or the label map\\) have no folder"):
        reconcile({"a": ["glioma"]}, None, ["glioma", "astrocytoma"])


def test_class_names_refuse_duplicates():
    assert parse_class_names(" a, b ,c") == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="class-names lists a more than once"):
        parse_class_names("a,b,a")
