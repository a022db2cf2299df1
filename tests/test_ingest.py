import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retfm.data import Manifest
from retfm.data.config import IngestConfig
from retfm.data.ingest import ingest
from retfm.errors import RetfmError
from tests.conftest import encode, fundus_rgb, shared_file
from tests.test_io import _dicom_bytes


def _config(**kwargs) -> IngestConfig:
    return IngestConfig(**{"size": 128, "workers": 1, **kwargs})


def _reconciles(report: dict) -> bool:
    return report["seen"] == report["ingested"] + report["duplicates"] + sum(report["rejected"].values())


def test_retinamnist_keeps_official_splits_and_grades(tmp_path):
    path = shared_file("retinamnist.npz")
    report = ingest(path, tmp_path / "out", _config(size=64, workers=2))
    manifest = Manifest.read(tmp_path / "out")
    table = manifest.table
    assert report["ingested"] == 1600 and _reconciles(report)
    assert table["split"].value_counts().to_dict() == {"train": 1080, "test": 400, "val": 120}
    official = np.load(path)
    assert table.loc[table["split"] == "test", "dr_grade"].tolist() == official["test_labels"].ravel().tolist()
    assert set(table["modality"]) == {"CFP"} and manifest.label_columns == ["dr_grade"]
    # Never upscaled to the requested 64 px: stored at the size of the field-of-view crop.
    assert (table["width"] < 64).all() and (table["width"] <= 2 * table["fov_radius"] * 1.02 + 2).all()
    manifest.validate(check_files=True)


def test_real_fundus_is_cropped_to_its_field_of_view(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(shared_file("retina_cc0.jpg"), src / "retina.jpg")
    ingest(src, tmp_path / "out", _config(size=512))
    row = Manifest.read(tmp_path / "out").table.iloc[0]
    assert (row["source_width"], row["source_height"]) == (1411, 1411)
    assert row["fov_cx"] == pytest.approx(705, abs=15) and row["fov_cy"] == pytest.approx(705, abs=15)
    assert 0.95 * 705 < row["fov_radius"] < 1.02 * 705
    out = np.asarray(Image.open(tmp_path / "out" / row["path"]))
    assert out.shape == (512, 512, 3)
    # The circle is centred: the four edge midpoints are fundus (bright), the corners are surround (dark).
    assert min(out[256, 8].max(), out[256, -8].max(), out[8, 256].max(), out[-8, 256].max()) > 40
    assert max(out[3, 3].max(), out[-3, -3].max()) < 30
    assert row["quality"] > 0.5


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _bad_folder(root):
    """Good images of every awkward kind plus every bad kind, in a flat <class>/* layout."""
    good = fundus_rgb(160, seed=1)
    _write(root / "normal/good.jpg", encode(good))
    _write(root / "normal/copy_of_good.jpg", encode(good))  # byte-identical duplicate
    _write(root / "normal/grey.png", encode(Image.fromarray(fundus_rgb(160, seed=2)).convert("L"), "PNG"))
    _write(root / "normal/cmyk.jpg", encode(Image.fromarray(fundus_rgb(160, seed=3)).convert("CMYK")))
    _write(root / "normal/rgba.png", encode(Image.fromarray(fundus_rgb(160, seed=4)).convert("RGBA"), "PNG"))
    _write(root / "normal/palette.png", encode(Image.fromarray(fundus_rgb(160, seed=5)).convert("P"), "PNG"))
    _write(root / "normal/deep.png", encode(Image.fromarray(fundus_rgb(160, seed=6)[..., 0].astype(np.uint16) * 256),
                                            "PNG"))
    exif = Image.Exif()
    exif[0x0112] = 6
    _write(root / "disease/rotated.jpg", encode(fundus_rgb(160, seed=7, width=200), exif=exif.tobytes()))
    _write(root / "disease/scan.dcm", _dicom_bytes(fundus_rgb(160, seed=8)))
    _write(root / "disease/empty.jpg", b"")
    _write(root / "disease/notes.jpg", b"this is a text file with a .jpg name\n")
    _write(root / "disease/cut.jpg", encode(fundus_rgb(160, seed=9))[:2000])
    _write(root / "disease/cut.png", encode(fundus_rgb(160, seed=10), "PNG")[:3000])
    _write(root / "disease/black.png", encode(np.zeros((160, 160, 3), np.uint8), "PNG"))
    _write(root / "disease/huge.png", encode(np.zeros((1200, 1200, 3), np.uint8), "PNG"))
    _write(root / "disease/broken.dcm", b"\0" * 128 + b"DICM" + b"\x01" * 40)
    return 8  # good images, the duplicate excluded


def test_every_bad_kind_is_reported_and_counts_reconcile(tmp_path):
    good = _bad_folder(tmp_path / "src")
    report = ingest(tmp_path / "src", tmp_path / "out", _config(max_pixels=1_000_000, workers=2))
    assert _reconciles(report)
    assert report["seen"] == 16 and report["ingested"] == good and report["duplicates"] == 1
    assert report["rejected"] == {"empty_file": 1, "no_fundus": 1, "not_an_image": 1, "too_many_pixels": 1,
                                  "truncated": 2, "unreadable_dicom": 1}
    assert {e["source"] for e in report["rejected_files"]} == {
        "disease/empty.jpg", "disease/notes.jpg", "disease/cut.jpg", "disease/cut.png", "disease/black.png",
        "disease/huge.png", "disease/broken.dcm"}
    assert report["duplicate_files"][0]["source"] == "normal/good.jpg" or \
        report["duplicate_files"][0]["source"] == "normal/copy_of_good.jpg"
    for kind in ("cmyk", "greyscale", "alpha", "palette", "16bit", "exif_rotated", "dicom"):
        assert report["converted"].get(kind, 0) >= 1, kind
    on_disk = json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    assert on_disk == report
    table = Manifest.read(tmp_path / "out").table
    assert sorted(table["label"].value_counts().to_dict().items()) == [("disease", 2), ("normal", 6)]
    assert len(list((tmp_path / "out" / "images").iterdir())) == good  # the duplicate's image is not kept
    rotated = table[table["source"] == "disease/rotated.jpg"].iloc[0]
    assert (rotated["source_width"], rotated["source_height"]) == (160, 200)


def test_rerun_is_idempotent_and_splits_stay(tmp_path):
    _bad_folder(tmp_path / "src")
    first = ingest(tmp_path / "src", tmp_path / "out", _config(max_pixels=1_000_000))
    before = Manifest.read(tmp_path / "out").table
    second = ingest(tmp_path / "src", tmp_path / "out", _config(max_pixels=1_000_000))
    after = Manifest.read(tmp_path / "out").table
    assert first == second
    pd.testing.assert_frame_equal(before.sort_values("image_id").reset_index(drop=True),
                                  after.sort_values("image_id").reset_index(drop=True))
    # A new image joins without moving anyone else between splits.
    _write(tmp_path / "src/normal/new.jpg", encode(fundus_rgb(160, seed=42)))
    ingest(tmp_path / "src", tmp_path / "out", _config(max_pixels=1_000_000))
    grown = Manifest.read(tmp_path / "out").table.set_index("image_id")
    assert len(grown) == len(before) + 1
    assert (grown.loc[before["image_id"], "split"].to_numpy() == before["split"].to_numpy()).all()


def test_nothing_ingested_is_an_error(tmp_path):
    _write(tmp_path / "src/a.jpg", b"")
    _write(tmp_path / "src/b.jpg", b"text")
    with pytest.raises(RetfmError, match=r"nothing could be ingested: 2 item\(s\) seen.*empty_file: 1"):
        ingest(tmp_path / "src", tmp_path / "out", _config())
    assert json.loads((tmp_path / "out/ingest_report.json").read_text())["seen"] == 2


def test_retfound_layout_gives_splits_and_classes(tmp_path):
    seeds = iter(range(100))  # one seed per image: equal images would be (rightly) ingested once
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for label in ("0_normal", "1_dr"):
            for i in range(n):
                _write(tmp_path / f"src/{split}/{label}/{i}.jpg", encode(fundus_rgb(96, seed=next(seeds))))
    ingest(tmp_path / "src", tmp_path / "out", _config(size=64))
    table = Manifest.read(tmp_path / "out").table
    assert table.groupby(["split", "label"]).size().to_dict() == {
        ("test", "0_normal"): 2, ("test", "1_dr"): 2, ("train", "0_normal"): 4, ("train", "1_dr"): 4,
        ("val", "0_normal"): 2, ("val", "1_dr"): 2}


def _csv_cohort(root, patients=60):
    rows = []
    for p in range(patients):
        for eye in ("L", "R"):
            name = f"img_{p}_{eye}.jpg"
            _write(root / "pics" / name, encode(fundus_rgb(96, seed=p * 2 + (eye == "R"))))
            rows.append({"file": f"pics/{name}", "PatientID": f"P{p:03d}", "laterality": "left" if eye == "L" else "OD",
                         "level": p % 3, "gender": "female" if p % 2 else "Male", "hospital": f"h{p % 2}"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)


def test_csv_mapping_and_patient_level_stratified_splits(tmp_path):
    _csv_cohort(tmp_path / "src")
    config = _config(size=64, columns={"file": "path", "PatientID": "patient_id", "laterality": "eye",
                                       "level": "dr_grade", "gender": "sex", "hospital": "site"}, seed=7)
    ingest(tmp_path / "src", tmp_path / "out", config)
    table = Manifest.read(tmp_path / "out").table
    assert len(table) == 120 and set(table["site"]) == {"h0", "h1"}
    assert set(table["eye"]) == {"L", "R"} and set(table["sex"]) == {"F", "M"}
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    counts = table["split"].value_counts(normalize=True)
    assert counts["train"] == pytest.approx(0.7, abs=0.05) and counts["test"] == pytest.approx(0.2, abs=0.05)
    for grade, group in table.groupby("dr_grade"):  # stratified: every grade in every split, near the fractions
        assert group["split"].value_counts(normalize=True)["train"] == pytest.approx(0.7, abs=0.1), grade
    ingest(tmp_path / "src", tmp_path / "again", config)
    again = Manifest.read(tmp_path / "again").table
    assert again.set_index("image_id")["split"].equals(table.set_index("image_id")["split"])  # deterministic
    ingest(tmp_path / "src", tmp_path / "other", config.model_copy(update={"seed": 8}))
    other = Manifest.read(tmp_path / "other").table
    assert not other.set_index("image_id")["split"].equals(table.set_index("image_id")["split"])


def test_csv_rows_with_missing_files_or_bad_split_are_reported(tmp_path):
    _write(tmp_path / "src/a.jpg", encode(fundus_rgb(96)))
    pd.DataFrame({"path": ["a.jpg", "gone.jpg", "a.jpg"], "split": ["train", "test", "holdout"]}).to_csv(
        tmp_path / "src/labels.csv", index=False)
    report = ingest(tmp_path / "src", tmp_path / "out", _config())
    assert report["rejected"] == {"invalid_split": 1, "missing_file": 1} and report["ingested"] == 1
    with pytest.raises(RetfmError, match="mapped column.*nope"):
        ingest(tmp_path / "src", tmp_path / "out2", _config(columns={"nope": "dr_grade"}))
