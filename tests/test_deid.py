"""Identifiers planted in every place a hospital export hides them must not reach any byte of any output."""

import json

import pandas as pd
import pytest
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from retfm.cli.main import app
from retfm.data import Manifest
from retfm.data.deid import Pseudonymizer, column_kind, deidentify_columns, generate_key, load_key
from retfm.errors import RetfmError
from tests.conftest import encode, fundus_rgb
from tests.test_io import _dicom_bytes

PLANTED = ["Jane", "Doe", "998877", "19480317", "1948-03-17", "2021-05-04", "20210504", "Elm Street", "NHS-4455",
           "scan_0001"]


def _plant(root):
    """A CSV export with identifying columns, images carrying EXIF, XMP, ICC and PNG text, a DICOM file, and
    file names that contain the patient's name and number."""
    root.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x010E] = "Jane Doe MRN 998877"  # ImageDescription
    exif[0x013B] = "Dr Doe"  # Artist
    exif[0x9003] = "2021:05:04 10:00:00"  # DateTimeOriginal
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><dc:creator>Jane Doe 998877</dc:creator></x:xmpmeta>'
    icc = b"\0" * 128 + b"desc Jane Doe 998877 ICC profile"
    (root / "Jane_Doe_998877_L.jpg").write_bytes(encode(fundus_rgb(128, 1), exif=exif.tobytes(), xmp=xmp,
                                                        icc_profile=icc))
    text = PngImagePlugin.PngInfo()
    text.add_text("Patient", "Jane Doe, NHS-4455, born 1948-03-17")
    text.add_itxt("Comment", "Elm Street 998877")
    (root / "Jane_Doe_998877_R.png").write_bytes(encode(fundus_rgb(128, 2), "PNG", pnginfo=text))
    (root / "scan_0001.dcm").write_bytes(_dicom_bytes(
        fundus_rgb(128, 3), PatientName="Doe^Jane", PatientID="998877", PatientBirthDate="19480317",
        StudyDate="20210504", PatientSex="F", ImageLaterality="L", InstitutionName="Elm Street Clinic"))
    (root / "Jane_Doe_998877_broken.jpg").write_bytes(b"not an image")
    pd.DataFrame({
        "file": ["Jane_Doe_998877_L.jpg", "Jane_Doe_998877_R.png", "scan_0001.dcm", "Jane_Doe_998877_broken.jpg"],
        "patient_name": ["Jane Doe"] * 4, "mrn": ["998877"] * 4, "nhs_number": ["NHS-4455"] * 4,
        "dob": ["1948-03-17"] * 4, "visit_date": ["2021-05-04"] * 4, "address": ["1 Elm Street"] * 4,
        "eye": ["L", "R", None, "L"], "dr_grade": [2, 3, 1, 0],
    }).to_csv(root / "export.csv", index=False)


def _every_output_byte(folder):
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            yield path, path.read_bytes().lower()


def test_no_planted_identifier_reaches_any_output(tmp_path):
    _plant(tmp_path / "src")
    key = generate_key(tmp_path / "site.key")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["data", "ingest", str(tmp_path / "src"), "--out", str(out), "--size", "64",
                                      "--deid-key-file", str(key), "--map", "mrn=patient_id", "--workers", "1"])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.rglob("*")}
    assert {"manifest.parquet", "ingest_report.json", "deid_report.json", "ingest_config.yaml"} <= names
    for path, data in _every_output_byte(out):
        for needle in PLANTED:
            assert needle.lower().encode() not in data, f"{needle!r} found in {path.name}"
    for needle in PLANTED:  # nor in what the command printed
        assert needle.lower() not in result.output.lower(), needle
    table = Manifest.read(out).table
    cells = " ".join(map(str, table.columns)) + " " + " ".join(map(str, table.to_numpy().ravel()))
    for needle in PLANTED:  # Parquet compresses: check the decoded values too
        assert needle.lower() not in cells.lower(), needle
    assert len(table) == 3 and table["patient_id"].nunique() == 1 and table["patient_id"].iloc[0] != "998877"
    assert table["age"].tolist() == [73, 73, 73]  # 1948-03-17 -> 2021-05-04, the DICOM's dates likewise
    assert set(table["eye"]) == {"L", "R"} and "sex" in table
    deid = json.loads((out / "deid_report.json").read_text())
    assert {"patient_name", "nhs_number", "dob", "visit_date", "address"} <= set(deid["columns_dropped"])
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["rejected_files"][0]["source"].startswith("source-")
    # Pseudonyms are stable for one key and differ for another.
    ingest_again = CliRunner().invoke(app, ["data", "ingest", str(tmp_path / "src"), "--out", str(tmp_path / "again"),
                                            "--size", "64", "--deid-key-file", str(key), "--map", "mrn=patient_id"])
    assert ingest_again.exit_code == 0
    assert sorted(Manifest.read(tmp_path / "again").table["image_id"]) == sorted(table["image_id"])
    other = generate_key(tmp_path / "other.key")
    CliRunner().invoke(app, ["data", "ingest", str(tmp_path / "src"), "--out", str(tmp_path / "other"), "--size", "64",
                             "--deid-key-file", str(other), "--map", "mrn=patient_id"])
    assert set(Manifest.read(tmp_path / "other").table["image_id"]).isdisjoint(table["image_id"])


def test_deid_command_matches_keyed_ingest(tmp_path):
    _plant(tmp_path / "src")
    key = generate_key(tmp_path / "site.key")
    runner = CliRunner()
    args = ["data", "ingest", str(tmp_path / "src"), "--size", "64", "--map", "mrn=patient_id"]
    assert runner.invoke(app, args + ["--out", str(tmp_path / "plain")]).exit_code == 0
    plain = Manifest.read(tmp_path / "plain").table
    assert "Jane Doe" in set(plain["patient_name"])  # no key: nothing removed, but a warning says so
    result = runner.invoke(app, ["data", "deid", str(tmp_path / "plain"), "--key-file", str(key),
                                 "--out", str(tmp_path / "deid")])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, args + ["--out", str(tmp_path / "keyed"), "--deid-key-file", str(key)]).exit_code == 0
    deid = Manifest.read(tmp_path / "deid").table
    keyed = Manifest.read(tmp_path / "keyed").table
    assert sorted(deid["image_id"]) == sorted(keyed["image_id"])
    assert sorted(deid["patient_id"]) == sorted(keyed["patient_id"])
    for path, data in _every_output_byte(tmp_path / "deid"):
        for needle in PLANTED:
            assert needle.lower().encode() not in data, f"{needle!r} found in {path.name}"


def test_column_kinds():
    assert column_kind("PatientBirthDate") == "birth" and column_kind("date_of_birth") == "birth"
    assert column_kind("DOB") == "birth" and column_kind("visit_date") == "date"
    assert {column_kind(c) for c in ("PatientName", "MRN", "subject_id", "Email", "original_path")} == {"direct"}
    assert {column_kind(c) for c in ("dr_grade", "glaucoma", "age", "sex", "eye", "quality")} == {None}


def test_ages_are_capped_and_birth_dates_dropped():
    table = pd.DataFrame({"dob": ["1920-01-01", "1990-06-30", None], "exam_date": ["2020-06-29"] * 3})
    out, report = deidentify_columns(table, protected=set())
    assert out["age"].tolist()[:2] == [90, 29] and pd.isna(out["age"].iloc[2])
    assert set(report["dropped"]) == {"dob", "exam_date"} and list(out.columns) == ["age"]


def test_pseudonyms_are_keyed(tmp_path):
    a, b = Pseudonymizer(b"k" * 32), Pseudonymizer(b"j" * 32)
    assert a.patient_id("s", "123") == a.patient_id("s", "123") != b.patient_id("s", "123")
    assert "123" not in a.patient_id("s", "123") and Pseudonymizer(None).patient_id("s", "123") == "123"
    with pytest.raises(RetfmError, match="key file not found; create one with `retfm data keygen"):
        load_key(tmp_path / "missing.key")
    (tmp_path / "short.key").write_text("abc")
    with pytest.raises(RetfmError, match="too short"):
        load_key(tmp_path / "short.key")
    generate_key(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o077 == 0
    with pytest.raises(RetfmError, match="refusing to overwrite"):
        generate_key(tmp_path / "k")
