"""The disease knowledge base: its contents, lookups, prompt ensembles, label maps, captions, validation and CLI.

The public datasets' class lists are written out here, independently of knowledge.yaml, so a class dropped or
misspelt there fails a test.
"""

from __future__ import annotations

import math
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from retfm.cli.common import stdout
from retfm.cli.main import app
from retfm.errors import RetfmError
from retfm.knowledge.base import (CATEGORIES, MODALITIES, caption, class_prompts, condition, describe,
                                      load_knowledge, lookup_key, prompts)
from retfm.knowledge import base as knowledge_module

JSIEC_CLASSES = [
    "0.0.Normal", "0.1.Tessellated fundus", "0.2.Large optic cup", "0.3.DR1", "1.0.DR2", "1.1.DR3", "2.0.BRVO",
    "2.1.CRVO", "3.RAO", "4.Rhegmatogenous RD", "5.0.CSCR", "5.1.VKH disease", "6.Maculopathy", "7.ERM", "8.MH",
    "9.Pathological myopia", "10.0.Possible glaucoma", "10.1.Optic atrophy", "11.Severe hypertensive retinopathy",
    "12.Disc swelling and elevation", "13.Dragged Disc", "14.Congenital disc abnormality",
    "15.0.Retinitis pigmentosa", "15.1.Bietti crystalline dystrophy", "16.Peripheral retinal degeneration and break",
    "17.Myelinated nerve fiber", "18.Vitreous particles", "19.Fundus neoplasm", "20.Massive hard exudates",
    "21.Yellow-white spots-flecks", "22.Cotton-wool spots", "23.Vessel tortuosity",
    "24.Chorioretinal atrophy-coloboma", "25.Preretinal hemorrhage", "26.Fibrosis", "27.Laser Spots",
    "28.Silicon oil in eye", "29.0.Blur fundus without PDR", "29.1.Blur fundus with suspected PDR",
]
ODIR_CLASSES = ["N", "D", "G", "C", "A", "H", "M", "O"]
BRSET_CLASSES = ["diabetic_retinopathy", "macular_edema", "scar", "nevus", "amd", "vascular_occlusion",
                 "hypertensive_retinopathy", "drusens", "hemorrhage", "retinal_detachment", "myopic_fundus",
                 "increased_cup_disc", "other"]

# Conditions the knowledge base must hold, by a name a clinician would type, and the key each must reach.
REQUIRED = {
    "normal fundus": "normal_fundus", "no DR": "no_dr", "mild NPDR": "mild_npdr", "moderate NPDR": "moderate_npdr",
    "severe NPDR": "severe_npdr", "PDR": "pdr", "DME": "diabetic_macular_edema", "glaucoma": "glaucoma",
    "glaucoma suspect": "glaucoma_suspect", "early glaucoma": "early_glaucoma",
    "advanced glaucoma": "advanced_glaucoma", "early AMD": "early_amd", "intermediate AMD": "intermediate_amd",
    "geographic atrophy": "geographic_atrophy", "wet AMD": "neovascular_amd", "cataract": "cataract",
    "hypertensive retinopathy": "hypertensive_retinopathy", "pathological myopia": "pathological_myopia",
    "BRVO": "brvo", "CRVO": "crvo", "CRAO": "crao", "BRAO": "brao", "retinal detachment": "retinal_detachment",
    "drusen": "drusen", "nevus": "choroidal_nevus", "chorioretinal scar": "chorioretinal_scar",
    "retinal haemorrhage": "retinal_hemorrhage", "increased cup-to-disc ratio": "increased_cup_disc",
    "papilloedema": "papilledema", "optic atrophy": "optic_atrophy", "macular hole": "macular_hole",
    "epiretinal membrane": "epiretinal_membrane", "CSC": "central_serous_chorioretinopathy",
    "retinitis pigmentosa": "retinitis_pigmentosa", "ROP": "retinopathy_of_prematurity",
    "vitreous haemorrhage": "vitreous_hemorrhage", "laser scars": "laser_scars",
    "tessellated fundus": "tessellated_fundus", "Coats disease": "coats_disease",
    "toxoplasmosis scar": "toxoplasmosis_scar", "choroidal melanoma": "choroidal_melanoma",
}


def raw_knowledge() -> dict:
    return yaml.safe_load(resources.files("retfm.knowledge").joinpath("knowledge.yaml").read_text(encoding="utf-8"))


def names_it(text: str, entry) -> bool:
    return any(term.lower() in text.lower() for term in entry.terms)


def write_extra(tmp_path: Path, payload: dict) -> Path:
    path = tmp_path / "extra.yaml"
    path.write_text(yaml.safe_dump(payload, sort_keys=False))
    return path


NEW_CONDITION = {"key": "solar_retinopathy", "name": "solar retinopathy", "synonyms": ["solar maculopathy"],
                 "category": "macular", "signs": {"cfp": "a small yellow or red spot at the fovea",
                                                  "oct": "a small outer retinal gap at the fovea"}}


# ---------------------------------------------------------------- contents


def test_knowledge_base_covers_every_category_with_over_sixty_conditions():
    kb = load_knowledge()
    assert len(kb.conditions) >= 60
    assert {c.category for c in kb.conditions} == set(CATEGORIES)
    assert all(set(c.signs) <= set(MODALITIES) and c.signs for c in kb.conditions)
    assert sum("cfp" in c.signs for c in kb.conditions) >= 60
    assert kb.condition("normal fundus").category == "normal"


def test_no_key_name_or_synonym_is_shared_between_conditions():
    owners: dict[str, set[str]] = {}
    for entry in raw_knowledge()["conditions"]:
        for term in [entry["key"], entry["name"], *entry.get("synonyms", [])]:
            owners.setdefault(lookup_key(term), set()).add(entry["key"])
    shared = {term: keys for term, keys in owners.items() if len(keys) > 1}
    assert not shared
    keys = [entry["key"] for entry in raw_knowledge()["conditions"]]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("typed, key", REQUIRED.items())
def test_required_conditions_are_found_by_their_usual_names(typed, key):
    assert condition(typed).key == key
    assert condition(typed.upper()) is condition(typed.lower()) is condition(key)


def test_lookup_ignores_case_hyphens_underscores_and_apostrophes():
    assert condition("Branch Retinal Vein Occlusion").key == "brvo"
    assert condition("Coats' disease").key == "coats_disease"
    assert condition("cotton wool spots") is condition("Cotton-Wool_Spots") is condition("cotton_wool_spots")
    assert condition(condition("CSCR")) is condition("central serous chorioretinopathy")


def test_unknown_condition_is_one_line_with_a_suggestion():
    with pytest.raises(RetfmError, match="unknown condition 'glaucomma'; did you mean glaucoma") as info:
        condition("glaucomma")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- datasets and label maps


def test_every_jsiec_class_maps_to_its_own_condition():
    ensembles = class_prompts("label", JSIEC_CLASSES, label_map="jsiec")
    assert list(ensembles) == JSIEC_CLASSES
    kb = load_knowledge()
    keys = [kb.resolve("jsiec", name).key for name in JSIEC_CLASSES]
    assert len(set(keys)) == 39  # distinct classes must stay distinct for zero-shot recognition
    assert keys[:6] == ["normal_fundus", "tessellated_fundus", "increased_cup_disc", "mild_npdr", "moderate_npdr",
                        "severe_npdr"]
    assert kb.resolve("jsiec", "2.0.brvo").key == "brvo"  # case-insensitive values


def test_odir_and_brset_classes_and_columns_resolve():
    kb = load_knowledge()
    assert len({kb.resolve("odir", letter).key for letter in ODIR_CLASSES}) == 8
    assert len({kb.resolve("brset", name).key for name in BRSET_CLASSES}) == 13
    for column in ODIR_CLASSES + BRSET_CLASSES:
        assert kb.resolve(column, 1) is not None, column
    assert kb.resolve("N", 1).key == "normal_fundus" and kb.resolve("N", 0).key == "abnormal_fundus"
    assert kb.resolve("G", 1).key == "glaucoma" and kb.resolve("G", 0).key == "normal_fundus"
    assert kb.resolve("M", 1).key == "pathological_myopia"
    assert kb.resolve("drusens", 1).key == "drusen" and kb.resolve("increased_cup_disc", 0).key == "normal_fundus"
    assert kb.resolve("diabetic_retinopathy", 0).key == "no_dr"
    assert kb.resolve("other", 0) is None  # "no other finding" says nothing about the fundus


def test_conventional_label_maps():
    kb = load_knowledge()
    icdr = ["no_dr", "mild_npdr", "moderate_npdr", "severe_npdr", "pdr"]
    assert [kb.resolve("dr_grade", grade).key for grade in range(5)] == icdr
    assert [kb.resolve("DR_ICDR", grade).key for grade in range(5)] == icdr
    assert [kb.resolve("glaucoma", v).key for v in (0, 1)] == ["normal_fundus", "glaucoma"]
    assert [kb.resolve("glaucoma_stage", v).key for v in (0, 1, 2)] == ["normal_fundus", "early_glaucoma",
                                                                         "advanced_glaucoma"]
    assert [kb.resolve("dme_risk", v).key for v in (0, 1, 2)] == ["no_dme", "diabetic_macular_edema", "csme"]
    assert [kb.resolve("amd", v).key for v in (0, 1, "Wet", "dry")] == ["normal_fundus", "amd", "neovascular_amd",
                                                                        "geographic_atrophy"]
    # one value however a table stores it
    assert {kb.resolve("dr_grade", v).key for v in (2, 2.0, "2", " 2.0 ", np.int64(2), np.float32(2))} == {
        "moderate_npdr"}
    assert kb.resolve("glaucoma", True).key == "glaucoma"
    # values that name a condition need no map
    assert kb.resolve("label", "wet AMD").key == "neovascular_amd"
    for column, mapping in kb.label_maps.items():
        for value in mapping:
            assert kb.resolve(column, value) is not None, (column, value)


def test_unknown_label_values_are_one_error_naming_them_and_suggesting_classes():
    with pytest.raises(RetfmError) as info:
        class_prompts("dr_grade", [0, 1, 7, "grade x"])
    message = str(info.value)
    assert "\n" not in message
    assert "7" in message and "'grade x'" in message and "--classes" in message and "'0'" not in message
    with pytest.raises(RetfmError, match="no label map 'label'"):
        class_prompts("label", ["0.0.Normal"])
    with pytest.raises(RetfmError, match="nan"):
        class_prompts("glaucoma", [0, 1, math.nan])


def test_class_prompts_keep_the_values_given():
    ensembles = class_prompts("dr_grade", [0, 1, 2, 3, 4])
    assert list(ensembles) == [0, 1, 2, 3, 4]
    assert ensembles[4] == prompts("pdr")
    assert class_prompts("label", ["cataract", "normal fundus"], modality="CFP")["cataract"] == prompts("cataract")


# ---------------------------------------------------------------- prompts and captions


def test_prompts_are_the_template_ensemble_in_a_fixed_order():
    kb = load_knowledge()
    entry = kb.condition("mild NPDR")
    ensemble = prompts(entry)
    templates = kb.templates["cfp"]
    expected_count = sum(len(entry.terms) if "{synonym}" in t else 1 for t in templates)
    assert len(ensemble) == expected_count == 50
    assert len(set(ensemble)) == len(ensemble)
    assert ensemble[0] == templates[0].format(name=entry.name, sign=entry.signs["cfp"])
    assert ensemble[1] == "a fundus photograph showing mild non-proliferative diabetic retinopathy."
    assert sum(entry.signs["cfp"] in p for p in ensemble) == 2 + len(entry.terms) * 2
    assert prompts("mild_npdr") == ensemble
    knowledge_module._load.cache_clear()  # a fresh read of the file gives the same ensemble
    assert prompts("mild_npdr") == ensemble


def test_every_condition_has_prompts_that_name_it_on_each_modality_it_is_seen_on():
    kb = load_knowledge()
    for entry in kb.conditions:
        for modality in entry.signs:
            ensemble = kb.prompts(entry, modality)
            assert ensemble and all(names_it(p, entry) for p in ensemble), (entry.key, modality)
            assert any(entry.name in p for p in ensemble)
            assert any(entry.signs[modality] in p for p in ensemble)
    assert prompts("VMT", "OCT")[0].startswith("an optical coherence tomography scan showing vitreomacular traction")
    with pytest.raises(RetfmError, match="'vitreomacular_traction' is not visible on cfp"):
        prompts("VMT")
    with pytest.raises(RetfmError, match="modality 'mri' is not one of"):
        prompts("glaucoma", "mri")


def test_describe_is_canonical_without_rng_and_varies_with_it():
    entry = condition("BRVO")
    assert describe("BRVO") == describe("brvo") == (
        f"a color fundus photograph showing branch retinal vein occlusion, with {entry.signs['cfp']}.")
    drawn = [describe("BRVO", "cfp", seed) for seed in range(40)]
    assert drawn == [describe("BRVO", "cfp", seed) for seed in range(40)]
    assert len(set(drawn)) >= 10
    assert all(names_it(text, entry) for text in drawn)
    assert {term for term in entry.terms if any(term in text for text in drawn)} == set(entry.terms)


def test_captions_follow_the_labels_and_the_rng():
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    labels = {"dr_grade": 3, "glaucoma": 1}
    first = [caption(labels, rng=rng_a) for _ in range(20)]
    assert first == [caption(labels, rng=rng_b) for _ in range(20)]
    assert len(set(first)) >= 10
    severe, glaucoma = condition("severe NPDR"), condition("glaucoma")
    assert all(names_it(text, severe) and names_it(text, glaucoma) for text in first)
    assert caption(labels) == f"{describe(severe)} {describe(glaucoma)}"

    # "normal fundus" gives way to a finding; unknown (null) labels are skipped
    normal = condition("normal fundus")
    mixed = caption({"glaucoma": 0, "dr_grade": 2, "amd": None, "C": math.nan}, rng=0)
    assert names_it(mixed, condition("moderate NPDR")) and not names_it(mixed, normal)
    assert names_it(caption({"glaucoma": 0, "amd": 0}, rng=0), normal)
    # conditions not seen on the modality are left out; nothing visible is an error
    oct_caption = caption({"H": 1, "dr_grade": 2}, "oct", rng=0)
    assert names_it(oct_caption, condition("moderate NPDR"))
    assert not names_it(oct_caption, condition("hypertensive retinopathy"))
    with pytest.raises(RetfmError, match="visible on oct"):
        caption({"H": 1}, "oct")
    with pytest.raises(RetfmError, match="dr_grade=9"):
        caption({"dr_grade": 9})


# ---------------------------------------------------------------- validation and extension


def test_an_extra_file_adds_conditions_label_maps_and_templates(tmp_path):
    extra = write_extra(tmp_path, {"conditions": [NEW_CONDITION],
                                   "label_maps": {"solar": {1: "solar_retinopathy"}, "dr_grade": {5: "pdr"}},
                                   "templates": {"cfp": ["a fundus photograph after sun gazing: {name}."]}})
    kb = load_knowledge(extra)
    assert kb.condition("solar maculopathy").key == "solar_retinopathy"
    assert kb.resolve("solar", "1").key == "solar_retinopathy"
    assert kb.resolve("dr_grade", 5).key == "pdr" and kb.resolve("dr_grade", 4).key == "pdr"
    assert kb.resolve("DR_ICDR", 5) is None  # the shared YAML anchor was not modified in place
    assert kb.prompts("solar retinopathy")[-1] == "a fundus photograph after sun gazing: solar retinopathy."
    assert len(kb.conditions) == len(load_knowledge().conditions) + 1
    with pytest.raises(RetfmError):
        condition("solar retinopathy")  # the built-in base is unchanged


@pytest.mark.parametrize("payload, message", [
    ({"conditions": [{**NEW_CONDITION, "synonyms": ["brvo"]}]},
     "'brvo' of condition 'solar_retinopathy' already names 'brvo'"),
    ({"conditions": [{**NEW_CONDITION, "key": "glaucoma"}]}, "condition key 'glaucoma' is defined twice"),
    ({"conditions": [{**NEW_CONDITION, "category": "sunburn"}]}, r"conditions\[\d+\] \(solar_retinopathy\).category"),
    ({"conditions": [{**NEW_CONDITION, "signs": {"cfp": "a spot."}}]}, "ends with a full stop"),
    ({"conditions": [{**NEW_CONDITION, "signs": {"mri": "a spot"}}]}, r"signs.mri"),
    ({"label_maps": {"dr_grade": {6: "pdr_grade_6"}}}, "value '6' points at unknown condition 'pdr_grade_6'"),
    ({"templates": {"cfp": ["a photo of {disease}."]}}, r"\{disease\} is not one of"),
    ({"templates": {"oct": ["an OCT with {sign}."]}}, r"must name the condition"),
    ({"templates": {"fa": ["an angiogram of {name"]}}, r"an angiogram of \{name"),
    ({"conditions": "none"}, "conditions must be a list"),
    ({"diseases": []}, "a knowledge file is a mapping with the sections"),
])
def test_invalid_extra_files_are_one_line_errors_naming_the_file(tmp_path, payload, message):
    extra = write_extra(tmp_path, payload)
    with pytest.raises(RetfmError) as info:
        load_knowledge(extra)
    text = str(info.value)
    assert "\n" not in text and "extra.yaml" in text
    assert re.search(message, text), text


def test_a_value_given_twice_in_one_map_is_an_error_and_a_later_file_overrides(tmp_path):
    with pytest.raises(ValidationError, match="label map 'x': value '1.0' is given twice"):
        knowledge_module.KnowledgeBase.model_validate({**raw_knowledge(), "label_maps": {"x": {1: "glaucoma",
                                                                                             "1.0": "cataract"}}})
    extra = write_extra(tmp_path, {"label_maps": {"glaucoma": {"1.0": "advanced_glaucoma"}}})
    assert load_knowledge(extra).resolve("glaucoma", 1).key == "advanced_glaucoma"


def test_the_knowledge_file_installs_as_package_data():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "knowledge/knowledge.yaml" in pyproject["tool"]["setuptools"]["package-data"]["retfm"]


# ---------------------------------------------------------------- CLI


def test_cli_list_and_show(monkeypatch, tmp_path):
    monkeypatch.setattr(stdout, "width", 250)  # the console was sized when first imported
    runner = CliRunner()
    result = runner.invoke(app, ["knowledge", "list"])
    assert result.exit_code == 0, result.output
    assert f"{len(load_knowledge().conditions)} conditions" in result.output
    assert "central_serous_chorioretinopathy" in result.output and "CSCR" in result.output

    result = runner.invoke(app, ["knowledge", "list", "--category", "tumour"])
    assert result.exit_code == 0, result.output
    assert "choroidal_melanoma" in result.output and "brvo" not in result.output
    result = runner.invoke(app, ["knowledge", "list", "--modality", "OCT"])
    assert "vitreomacular_traction" in result.output and "other_abnormality" not in result.output

    result = runner.invoke(app, ["knowledge", "show", "BRVO", "--modality", "fa"])
    assert result.exit_code == 0, result.output
    entry = condition("brvo")
    assert entry.signs["fa"] in result.output and "(not visible" not in result.output
    assert f"{len(prompts(entry, 'fa'))} prompts (fa)" in result.output
    assert "a fluorescein angiogram showing branch retinal vein occlusion" in result.output
    result = runner.invoke(app, ["knowledge", "show", "wet AMD"])
    assert "amd=wet" in result.output and "prompts (cfp)" in result.output
    result = runner.invoke(app, ["knowledge", "show", "VMT"])  # not seen on cfp: its first modality instead
    assert result.exit_code == 0 and "prompts (oct)" in result.output

    extra = write_extra(tmp_path, {"conditions": [NEW_CONDITION]})
    result = runner.invoke(app, ["knowledge", "show", "solar maculopathy", "--knowledge", str(extra)])
    assert result.exit_code == 0 and "solar_retinopathy" in result.output

    result = runner.invoke(app, ["knowledge", "list", "--category", "sunburn"])
    assert isinstance(result.exception, RetfmError) and "is not one of" in str(result.exception)
    result = runner.invoke(app, ["knowledge", "show", "not a disease"])
    assert isinstance(result.exception, RetfmError)
