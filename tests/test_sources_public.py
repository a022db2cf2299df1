"""Public dataset readers: each test fabricates a tiny copy of the published layout (real file names, headers and
label coding) and ingests it through ``retfm.data.ingest.ingest``."""

import typing
from itertools import count

import pandas as pd
import pytest
from typer.testing import CliRunner

from retfm.cli.main import app
from retfm.data import Manifest
from retfm.data.config import IngestConfig
from retfm.data.deid import generate_key
from retfm.data.ingest import ingest
from retfm.data.sources import FORMATS, READERS
from retfm.data.sources.public import PUBLIC_READERS
from retfm.errors import RetfmError
from tests.conftest import encode, fundus_rgb

_seeds = count(100)  # every fabricated image differs, so none is dropped as a byte-identical duplicate


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    path.write_bytes(encode(fundus_rgb(96, seed=next(_seeds)), fmt))


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _ingest(src, out, fmt, **options):
    report = ingest(src, out, IngestConfig(format=fmt, size=64, workers=1, **options))
    table = Manifest.read(out).table
    assert report["seen"] == report["ingested"] + report["duplicates"] + sum(report["rejected"].values())
    return report, table.set_index("source", drop=False) if "source" in table else table


def _rejected(report):
    return {entry["source"]: entry["reason"] for entry in report["rejected_files"]}


def test_every_public_format_is_wired():
    assert set(PUBLIC_READERS) < set(READERS) and FORMATS == ("auto", *READERS)
    assert set(typing.get_args(IngestConfig.model_fields["format"].annotation)) == set(FORMATS)


def test_retfound_layout_keeps_splits_and_class_names(tmp_path):
    root = tmp_path / "APTOS2019"
    for name in ("train/anodr/a.jpg", "train/bmilddr/b.jpg", "val/anodr/c.jpg", "test/bmilddr/d.jpg"):
        _image(root / name)
    _write(root / "README.txt", "not an image\n")
    report, table = _ingest(root, tmp_path / "out", "retfound", label_column="dr_class")
    assert report["ingested"] == 4 and _rejected(report) == {"README.txt": "unknown_class"}
    assert table["split"].to_dict() == {"train/anodr/a.jpg": "train", "train/bmilddr/b.jpg": "train",
                                        "val/anodr/c.jpg": "val", "test/bmilddr/d.jpg": "test"}
    assert table.loc["test/bmilddr/d.jpg", "dr_class"] == "bmilddr" and set(table["modality"]) == {"CFP"}
    flat = tmp_path / "flat"
    _image(flat / "anodr" / "e.jpg")
    with pytest.raises(RetfmError, match="not the RETFound layout"):
        ingest(flat, tmp_path / "out2", IngestConfig(format="retfound", workers=1))


def test_aptos2019_competition_layout(tmp_path):
    root = tmp_path / "aptos2019-blindness-detection"
    _write(root / "train.csv", "id_code,diagnosis\n000c1434d8d7,2\n001639a390f0,4\n0024cdab0c1e,0\nffff00000000,1\n")
    _write(root / "test.csv", "id_code\n0005cfc8afb6\n")  # the competition's test labels were never published
    for name in ("000c1434d8d7", "001639a390f0", "0024cdab0c1e"):
        _image(root / "train_images" / f"{name}.png")
    _image(root / "test_images" / "0005cfc8afb6.png")
    report, table = _ingest(tmp_path, tmp_path / "out", "aptos2019")
    prefix = "aptos2019-blindness-detection/train_images/"
    assert report["ingested"] == 3 and _rejected(report) == {prefix + "ffff00000000": "missing_file"}
    assert table["dr_grade"].to_dict() == {prefix + "000c1434d8d7.png": 2, prefix + "001639a390f0.png": 4,
                                           prefix + "0024cdab0c1e.png": 0}
    assert table["split"].notna().all() and set(table["country"]) == {"India"}  # splits drawn by ingest
    assert "patient_id" not in table and "sex" not in table  # APTOS publishes neither


def test_aptos2019_labelled_split_redistribution_keeps_splits(tmp_path):
    root = tmp_path / "aptos"
    for table, folder, ids in (("train_1.csv", "train_images", ("a1", "a2")), ("valid.csv", "val_images", ("b1",)),
                               ("test.csv", "test_images", ("c1",))):
        _write(root / table, "id_code,diagnosis\n" + "".join(f"{i},{n + 1}\n" for n, i in enumerate(ids)))
        for i in ids:
            _image(root / folder / f"{i}.png")
    report, table = _ingest(root, tmp_path / "out", "aptos2019")
    assert report["ingested"] == 4
    assert table["split"].to_dict() == {"train_images/a1.png": "train", "train_images/a2.png": "train",
                                        "val_images/b1.png": "val", "test_images/c1.png": "test"}
    assert table["dr_grade"].to_dict()["train_images/a2.png"] == 2


def test_idrid_grading_keeps_official_split_and_dme_risk(tmp_path):
    grading = tmp_path / "IDRiD" / "B. Disease Grading"
    truths = grading / "2. Groundtruths"
    # The published header: trailing space after "Risk of macular edema" and empty trailing columns.
    _write(truths / "a. IDRiD_Disease Grading_Training Labels.csv",
           "Image name,Retinopathy grade,Risk of macular edema ,,\n"
           "IDRiD_001,3,2,,\nIDRiD_002,0,0,,\nIDRiD_003,2,1,,\n,,,,\n")
    _write(truths / "b. IDRiD_Disease Grading_Testing Labels.csv",
           "Image name,Retinopathy grade,Risk of macular edema \nIDRiD_001,4,1\n")
    for name in ("a. Training Set/IDRiD_001.jpg", "a. Training Set/IDRiD_002.jpg", "b. Testing Set/IDRiD_001.jpg"):
        _image(grading / "1. Original Images" / name)
    _image(tmp_path / "IDRiD" / "A. Segmentation" / "1. Original Images" / "a. Training Set" / "IDRiD_01.jpg")
    report, table = _ingest(tmp_path / "IDRiD", tmp_path / "out", "idrid")
    images = "B. Disease Grading/1. Original Images/"
    assert report["ingested"] == 3
    assert _rejected(report) == {images + "a. Training Set/IDRiD_003": "missing_file"}
    # IDRiD numbers each split from 001: the two IDRiD_001 are different images with their own labels.
    train, test = images + "a. Training Set/IDRiD_001.jpg", images + "b. Testing Set/IDRiD_001.jpg"
    assert (table.loc[train, "split"], table.loc[train, "dr_grade"], table.loc[train, "dme_risk"]) == ("train", 3, 2)
    assert (table.loc[test, "split"], table.loc[test, "dr_grade"], table.loc[test, "dme_risk"]) == ("test", 4, 1)
    assert table.loc[images + "a. Training Set/IDRiD_002.jpg", "dr_grade"] == 0
    assert set(table["country"]) == {"India"}


def _messidor2(root):
    _write(root / "messidor_data.csv", "image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable\n"
           "20051020_43808_0100_PP.png,0,0,1\n20051020_43832_0100_PP.png,3,1,1\nIM000001.JPG,,,0\n"
           "IM000002.JPG,1,0,1\n")
    _write(root / "messidor-2.csv", "left;right\n20051020_43808_0100_PP.png;20051020_43832_0100_PP.png\n"
           "IM000001.JPG;IM000002.JPG\n")
    for name in ("20051020_43808_0100_PP.png", "20051020_43832_0100_PP.png", "IM000001.JPG"):
        _image(root / "IMAGES" / name)


def test_messidor2_adjudicated_grades_with_examination_pairs(tmp_path):
    _messidor2(tmp_path / "messidor2")
    report, table = _ingest(tmp_path / "messidor2", tmp_path / "out", "messidor2")
    assert report["ingested"] == 3 and _rejected(report) == {"IMAGES/IM000002.JPG": "missing_file"}
    first, second, ungradable = "IMAGES/20051020_43808_0100_PP.png", "IMAGES/20051020_43832_0100_PP.png", \
        "IMAGES/IM000001.JPG"
    assert table.loc[[first, second, ungradable], "patient_id"].tolist() == ["exam001", "exam001", "exam002"]
    assert table.loc[[first, second, ungradable], "eye"].tolist() == ["L", "R", "L"]
    assert table.loc[second, ["dr_grade", "dme", "gradable"]].tolist() == [3, 1, 1]
    assert pd.isna(table.loc[ungradable, "dr_grade"]) and table.loc[ungradable, "gradable"] == 0
    assert table.loc[first, "split"] == table.loc[second, "split"]  # one examination, one split
    assert set(table["country"]) == {"France"}


def test_messidor2_with_a_key_writes_no_original_file_name(tmp_path):
    _messidor2(tmp_path / "messidor2")
    key = generate_key(tmp_path / "site.key")
    report = ingest(tmp_path / "messidor2", tmp_path / "out",
                    IngestConfig(format="messidor2", size=64, workers=1, deid_key_file=key))
    assert report["ingested"] == 3 and report["rejected"] == {"missing_file": 1}
    table = Manifest.read(tmp_path / "out").table
    assert "source" not in table and table["patient_id"].str.startswith("p").all()
    written = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    # Messidor-2 file names carry exam dates; no output may hold them.
    assert b"20051020" not in written and b"IM00000" not in written and b"exam00" not in written


def _papila_sheet(path, patients):
    """A clinical workbook as published: a title row, the ID header row, a sub-header row, then '#002' rows."""
    rows = [["Clinical data", None, None, None, None, None, None, None, None, None],
            ["ID", "Age", "Gender", "Diagnosis", "Refractive_Defect", None, None, "Phakic/Pseudophakic", "IOP", None],
            [None, "Age", "Gender", "Diagnosis", "dioptre_1", "dioptre_2", "astigmatism", "Phakic/Pseudophakic",
             "Pneumatic", "Perkins"]]
    rows += [[pid, age, gender, diagnosis, -1.5, -0.5, 90, 0, 15, 14] for pid, age, gender, diagnosis in patients]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_excel(path, header=False, index=False)


def test_papila_clinical_workbooks(tmp_path):
    root = tmp_path / "PapilaDB-PAPILA-17d1c8b"
    patients = [("#002", 39, 0, 0), ("#004", 73, 1, 2), ("#005", 57, 1, 1)]
    _papila_sheet(root / "ClinicalData" / "patient_data_od.xlsx", patients)
    _papila_sheet(root / "ClinicalData" / "patient_data_os.xlsx", patients)
    for name in ("RET002OD", "RET002OS", "RET004OD", "RET005OD", "RET005OS"):
        _image(root / "FundusImages" / f"{name}.jpg")
    report, table = _ingest(tmp_path, tmp_path / "out", "papila")
    images = "PapilaDB-PAPILA-17d1c8b/FundusImages/"
    assert report["ingested"] == 5 and _rejected(report) == {images + "RET004OS": "missing_file"}
    od, os_ = table.loc[images + "RET002OD.jpg"], table.loc[images + "RET002OS.jpg"]
    assert (od["patient_id"], od["eye"], os_["eye"], od["sex"], od["age"]) == ("002", "R", "L", "M", 39)
    assert (od["glaucoma"], od["glaucoma_diagnosis"]) == (0, 0)
    suspect = table.loc[images + "RET004OD.jpg"]
    assert pd.isna(suspect["glaucoma"]) and suspect["glaucoma_diagnosis"] == 2 and suspect["sex"] == "F"
    assert table.loc[images + "RET005OS.jpg", "glaucoma"] == 1
    assert set(table["country"]) == {"Spain"} and table.groupby("patient_id")["split"].nunique().max() == 1


def test_glaucoma_fundus_stages_flat_and_retfound_copies(tmp_path):
    root = tmp_path / "Glaucoma_fundus"
    for folder in ("normal_control", "early_glaucoma", "advanced_glaucoma"):
        _image(root / folder / "1.png")  # the published folders each number their images from 1
    _image(root / "__MACOSX" / "1.png")
    report, table = _ingest(root, tmp_path / "out", "glaucoma_fundus")
    assert report["ingested"] == 3 and _rejected(report) == {"__MACOSX/1.png": "unknown_class"}
    assert table["glaucoma_stage"].to_dict() == {"normal_control/1.png": 0, "early_glaucoma/1.png": 1,
                                                 "advanced_glaucoma/1.png": 2}
    assert table["glaucoma"].to_dict() == {"normal_control/1.png": 0, "early_glaucoma/1.png": 1,
                                           "advanced_glaucoma/1.png": 1}
    assert set(table["country"]) == {"South Korea"}
    copy = tmp_path / "RETFound"
    for name in ("train/anormal_control/2.png", "val/bearly_glaucoma/3.png", "test/cadvanced_glaucoma/4.png"):
        _image(copy / name)
    _, table = _ingest(copy, tmp_path / "out2", "glaucoma_fundus")
    assert table["split"].to_dict() == {"train/anormal_control/2.png": "train", "val/bearly_glaucoma/3.png": "val",
                                        "test/cadvanced_glaucoma/4.png": "test"}
    assert table.loc["test/cadvanced_glaucoma/4.png", "glaucoma_stage"] == 2


def test_jsiec_category_folders(tmp_path):
    root = tmp_path / "1000images"
    classes = ("0.0.Normal", "0.3.DR1", "10.1.Optic atrophy", "29.1.Blur fundus with suspected PDR")
    for index, name in enumerate(classes):
        _image(root / name / f"{index}.jpg")
    _image(root / "Thumbs" / "x.jpg")
    report, table = _ingest(tmp_path, tmp_path / "out", "jsiec")
    assert report["ingested"] == 4 and _rejected(report) == {"1000images/Thumbs/x.jpg": "unknown_class"}
    assert sorted(table["diagnosis"]) == sorted(classes)
    assert table.loc["1000images/10.1.Optic atrophy/2.jpg", "diagnosis"] == "10.1.Optic atrophy"
    assert set(table["country"]) == {"China"} and table["split"].notna().all()


BRSET_HEADER = ("image_id,patient_id,camera,patient_age,comorbidities,diabetes_time_y,insuline,patient_sex,exam_eye,"
                "diabetes,nationality,optic_disc,vessels,macula,DR_SDRG,DR_ICDR,focus,iluminaton,image_field,"
                "artifacts,diabetic_retinopathy,macular_edema,scar,nevus,amd,vascular_occlusion,"
                "hypertensive_retinopathy,drusens,hemorrhage,retinal_detachment,myopic_fundus,increased_cup_disc,"
                "other,quality\n")


def test_brset_demographics_camera_and_conditions(tmp_path):
    root = tmp_path / "brazilian-ophthalmological"
    # Columns up to nationality, then optic_disc ... artifacts, the 13 conditions, quality (the published order).
    _write(root / "labels_brset.csv", BRSET_HEADER +
           "img00001,1,Canon CR,48,diabetes1,12,yes,1,1,yes,Brazil,1,1,1,0,0,1,1,1,1,"
           "0,0,0,0,0,0,0,0,0,0,0,1,0,Adequate\n"
           "img00002,1,Canon CR,48,diabetes1,12,yes,1,2,yes,Brazil,2,1,1,3,3,1,1,1,1,"
           "1,1,0,0,0,0,0,0,0,0,0,1,0,Adequate\n"
           'img00003,2,NIKON NF5050,"57,5","diabetes1, SAH",NA,no,2,2,no,Brazil,1,1,1,0,0,1,1,1,1,'
           "0,0,0,0,1,0,0,1,0,0,0,0,0,Inadequate\n"
           "img00004,2,NIKON NF5050,57,diabetes1,NA,no,2,1,no,Brazil,1,1,1,0,0,1,1,1,1,"
           "0,0,0,0,0,0,0,0,0,0,0,0,0,Adequate\n")
    _write(root / "labels.csv", BRSET_HEADER)  # version 1.0.0's name: the newer labels_brset.csv wins
    for name in ("img00001", "img00002", "img00003"):
        _image(root / "fundus_photos" / f"{name}.jpg")
    report, table = _ingest(root, tmp_path / "out", "brset")
    assert report["ingested"] == 3 and _rejected(report) == {"fundus_photos/img00004": "missing_file"}
    first, second, third = (table.loc[f"fundus_photos/img0000{i}.jpg"] for i in (1, 2, 3))
    assert (first["patient_id"], first["sex"], first["eye"], first["age"]) == ("1", "M", "R", 48)
    assert (second["eye"], second["dr_grade"], second["dr_sdrg"], second["macular_edema"]) == ("L", 3, 3, 1)
    assert (third["sex"], third["age"], third["device"], third["amd"], third["drusens"]) == ("F", 57.5, "NIKON NF5050",
                                                                                              1, 1)
    assert (first["diabetes"], third["diabetes"], first["quality_adequate"], third["quality_adequate"]) == (1, 0, 1, 0)
    assert first["increased_cup_disc"] == 1 and set(table["country"]) == {"Brazil"}
    assert first["split"] == second["split"]  # patient-level splits


def test_odir5k_both_eyes_with_patient_level_flags(tmp_path):
    root = tmp_path / "ODIR-5K" / "ODIR-5K"
    flags = list("NDGCAHMO")
    rows = [[0, 69, "Female", "0_left.jpg", "0_right.jpg", "cataract", "normal fundus", 0, 0, 0, 1, 0, 0, 0, 0],
            [1, 57, "Male", "1_left.jpg", "1_right.jpg", "normal fundus", "normal fundus", 1, 0, 0, 0, 0, 0, 0, 0]]
    root.mkdir(parents=True)
    pd.DataFrame(rows, columns=["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus",
                                "Left-Diagnostic Keywords", "Right-Diagnostic Keywords", *flags]).to_excel(
        root / "data.xlsx", index=False)
    for name in ("0_left.jpg", "0_right.jpg", "1_left.jpg"):
        _image(root / "Training Images" / name)
    _image(root / "Testing Images" / "1000_left.jpg")  # no published labels: not listed
    report, table = _ingest(tmp_path / "ODIR-5K", tmp_path / "out", "odir5k")
    images = "ODIR-5K/Training Images/"
    assert report["seen"] == 4 and report["ingested"] == 3
    assert _rejected(report) == {images + "1_right.jpg": "missing_file"}
    left, right, other = (table.loc[images + name] for name in ("0_left.jpg", "0_right.jpg", "1_left.jpg"))
    assert (left["patient_id"], left["eye"], right["eye"], left["sex"], left["age"]) == ("0", "L", "R", "F", 69)
    assert (left["text"], right["text"]) == ("cataract", "normal fundus")
    assert (left["cataract"], right["cataract"], left["normal"], other["normal"], other["sex"]) == (1, 1, 0, 1, "M")
    assert left["split"] == right["split"] and set(table["country"]) == {"China"}


def test_a_layout_that_is_not_there_is_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetfmError, match=r"empty: no IDRiD disease-grading train labels found") as error:
        ingest(tmp_path / "empty", tmp_path / "out", IngestConfig(format="idrid", workers=1))
    assert "\n" not in str(error.value)
    _write(tmp_path / "aptos" / "train.csv", "image,level\nx,1\n")  # EyePACS headers, not APTOS ones
    (tmp_path / "aptos" / "train_images").mkdir()
    with pytest.raises(RetfmError, match=r"train\.csv: missing column\(s\) 'id_code'"):
        ingest(tmp_path / "aptos", tmp_path / "out", IngestConfig(format="aptos2019", workers=1))


def test_cli_ingests_aptos2019(tmp_path):
    root = tmp_path / "aptos"
    _write(root / "train.csv", "id_code,diagnosis\n0a4e1a29ffff,3\n0a61bddab956,0\n0ac436400db4,1\n")
    for name in ("0a4e1a29ffff", "0a61bddab956"):
        _image(root / "train_images" / f"{name}.png")
    result = CliRunner().invoke(app, ["data", "ingest", str(root), "--out", str(tmp_path / "out"), "--format",
                                      "aptos2019", "--size", "64", "--workers", "1", "--site", "aptos"])
    assert result.exit_code == 0, result.output
    assert "ingested 2 of 3" in result.output and "train_images/0ac436400db4: missing_file" in result.output
    table = Manifest.read(tmp_path / "out").table
    assert sorted(table["dr_grade"]) == [0, 3] and set(table["site"]) == {"aptos"}
