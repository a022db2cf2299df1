import pandas as pd
import pytest

from retfm.data import Manifest, ManifestError


def _table(**overrides):
    table = pd.DataFrame({
        "image_id": ["a", "b", "c"],
        "path": ["images/a.png", "images/b.png", "images/c.png"],
        "site": ["s1", "s1", "s2"],
        "split": ["train", "val", "test"],
        "patient_id": ["p1", "p2", "p3"],
        "dr_grade": [0, 2, 4],
        "quality": [0.9, 0.5, 0.7],
    })
    for column, values in overrides.items():
        table[column] = values
    return table


def test_round_trip_keeps_rows_types_and_metadata(tmp_path):
    Manifest(_table(), tmp_path, {"retfm.note": "x"}).write()
    back = Manifest.read(tmp_path)
    pd.testing.assert_frame_equal(back.table, Manifest(_table(), tmp_path).table.pipe(
        lambda t: t.astype({c: "string" for c in ("image_id", "path", "site", "split", "patient_id")})))
    assert back.metadata["retfm.note"] == "x" and "retfm.version" in back.metadata
    assert back.label_columns == ["dr_grade"]
    assert back.image_path(1) == tmp_path / "images/b.png"
    assert list(back.split("test").table["image_id"]) == ["c"]


def test_csv_manifest_is_accepted(tmp_path):
    _table().to_csv(tmp_path / "m.csv", index=False)
    assert len(Manifest.read(tmp_path / "m.csv")) == 3


@pytest.mark.parametrize("overrides, message", [
    ({"split": ["train", "training", "test"]}, "column split, row 1: value 'training' is not one of"),
    ({"image_id": ["a", "b", "a"]}, "column image_id, row 2: repeats"),
    ({"path": ["images/a.png", "/abs/b.png", "images/c.png"]}, "column path, row 1: must be relative"),
    ({"path": ["images/a.png", "../b.png", "images/c.png"]}, "column path, row 1: must be relative"),
    ({"site": ["s1", None, "s2"]}, "column site, row 1: is empty"),
    ({"eye": ["L", "right", "R"]}, "column eye, row 1"),
    ({"age": [30, -2, 50]}, "column age, row 1: is outside"),
    ({"quality": [0.3, 1.5, 0.2]}, "column quality, row 1: is outside [0, 1]"),
    ({"patient_id": ["p1", "p1", "p3"]}, "a patient's images are in more than one split"),
])
def test_validation_names_column_and_row(tmp_path, overrides, message):
    with pytest.raises(ManifestError, match="manifest.parquet: column") as info:
        Manifest(_table(**overrides), tmp_path).write()
    assert message in str(info.value)
    assert not (tmp_path / "manifest.parquet").exists()


def test_missing_required_column_is_named(tmp_path):
    with pytest.raises(ManifestError, match="missing required column.*split"):
        Manifest(_table().drop(columns=["split"]), tmp_path).validate()


def test_check_files_reports_missing_images(tmp_path):
    with pytest.raises(ManifestError, match="column path, row 0: points to a file that does not exist"):
        Manifest(_table(), tmp_path).validate(check_files=True)


def test_unreadable_manifest_is_one_clear_error(tmp_path):
    (tmp_path / "manifest.parquet").write_text("not parquet")
    with pytest.raises(ManifestError, match="manifest.parquet: cannot read manifest"):
        Manifest.read(tmp_path)
    with pytest.raises(ManifestError, match="no such manifest"):
        Manifest.read(tmp_path / "nowhere")
