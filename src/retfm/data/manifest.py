"""The Manifest: one Parquet table per image collection, one row per image.

Every retfm stage reads and writes this contract (docs/data.md, "The Manifest"):

- required: ``image_id`` (stable, pseudonymous, unique), ``path`` (relative to the manifest's folder),
  ``site``, ``split`` (train / val / test);
- optional by convention: ``patient_id``, ``eye``, ``modality``, ``country``, ``sex``, ``age``, ``ethnicity``,
  ``device``, ``quality``, ``text`` and one column per label (``dr_grade``, ``glaucoma``, ``amd``, ...).

Unknown values are null, never guessed. Validation names the offending column and row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from retfm import __version__
from retfm.data.paths import OUTSIDE_INPUT, inside
from retfm.errors import RetfmError

MANIFEST_FILENAME = "manifest.parquet"
REQUIRED_COLUMNS = ("image_id", "path", "site", "split")
SPLITS = ("train", "val", "test")
EYES = ("L", "R")
MODALITIES = ("CFP", "UWF", "OCT", "FA")
SEXES = ("F", "M", "X")  # X: another or unspecified-but-recorded sex; null when unknown
GROUP_COLUMNS = ("site", "country", "sex", "age", "ethnicity", "device", "eye", "modality")
STRING_COLUMNS = ("image_id", "path", "site", "split", "patient_id", "eye", "modality", "country", "sex",
                  "ethnicity", "device", "text")
# Columns written by ingest that describe the image itself rather than a label.
IMAGE_INFO_COLUMNS = ("source", "quality", "quality_exposure", "quality_sharpness", "fov_fraction", "fov_cx",
                      "fov_cy", "fov_radius", "fov_full_frame", "source_width", "source_height", "width", "height",
                      "synthetic", "generator_id", "generator_sha256", "source_site")
CONVENTIONAL_COLUMNS = frozenset(REQUIRED_COLUMNS + STRING_COLUMNS + GROUP_COLUMNS + IMAGE_INFO_COLUMNS)


class ManifestError(RetfmError):
    """A manifest that breaks the contract; the message names the file, column and row."""


@dataclass
class Manifest:
    """A validated image table plus the folder its relative paths start from."""

    table: pd.DataFrame
    root: Path
    metadata: dict[str, str] = field(default_factory=dict)

    # ---- reading and writing ---------------------------------------------------------------------------------

    @classmethod
    def read(cls, path: str | Path, validate: bool = True) -> Manifest:
        """Read ``manifest.parquet`` (or a CSV, or a folder holding ``manifest.parquet``)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_FILENAME
        if not path.exists():
            raise ManifestError(f"{path}: no such manifest")
        metadata: dict[str, str] = {}
        try:
            if path.suffix.lower() == ".csv":
                table = pd.read_csv(path, dtype={c: "string" for c in STRING_COLUMNS}, keep_default_na=True)
            else:
                parquet = pq.read_table(path)
                raw = parquet.schema.metadata or {}
                metadata = {k.decode(): v.decode() for k, v in raw.items() if k.startswith(b"retfm.")}
                try:
                    table = parquet.to_pandas()
                except (KeyError, TypeError) as exc:  # pyarrow reading a damaged pandas-metadata entry
                    raise ValueError(f"damaged pandas metadata: {exc.__class__.__name__} {exc}") from None
            manifest = cls(_normalise_types(table), path.parent, metadata)
            if validate:
                manifest.validate(source=path)
        except (OSError, ValueError, pa.ArrowException) as exc:  # text that is not UTF-8 fails only when used
            raise ManifestError(f"{path}: cannot read manifest ({str(exc).splitlines()[0]})") from None
        return manifest

    def write(self, path: str | Path | None = None) -> Path:
        """Validate, then write Parquet atomically (temporary file, then rename). Returns the path written."""
        path = Path(path) if path is not None else self.root / MANIFEST_FILENAME
        if path.suffix == "":
            path = path / MANIFEST_FILENAME
        self.validate(source=path)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(self.table, preserve_index=False)
        metadata = {**(table.schema.metadata or {}),
                    **{k.encode(): str(v).encode() for k, v in {**self.metadata, "retfm.version": __version__}.items()}}
        table = table.replace_schema_metadata(metadata)
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        return path

    # ---- validation -------------------------------------------------------------------------------------------

    def validate(self, source: str | Path | None = None, check_files: bool = False) -> None:
        """Raise :class:`ManifestError` naming the first broken column/row; return quietly when valid."""
        where = str(source or self.root / MANIFEST_FILENAME)
        t = self.table
        missing = [c for c in REQUIRED_COLUMNS if c not in t.columns]
        if missing:
            raise ManifestError(f"{where}: missing required column(s) {', '.join(missing)}")
        for column in REQUIRED_COLUMNS:
            _fail_on(where, column, t[column].isna(), "is empty (required)")
        _fail_on(where, "image_id", t["image_id"].duplicated(), "repeats an earlier image_id")
        paths = t["path"].astype(str)
        _fail_on(where, "path", paths.map(lambda p: PurePosixPath(p).is_absolute() or ".." in PurePosixPath(p).parts),
                 "must be relative to the manifest's folder, without '..'")
        _check_allowed(where, t, "split", SPLITS)
        _check_allowed(where, t, "eye", EYES)
        _check_allowed(where, t, "modality", MODALITIES)
        _check_allowed(where, t, "sex", SEXES)
        if "age" in t.columns:
            age = pd.to_numeric(t["age"], errors="coerce")
            _fail_on(where, "age", age.isna() & t["age"].notna(), "is not a number")
            _fail_on(where, "age", (age < 0) | (age > 130), "is outside 0-130 years")
        for column in ("quality", "quality_exposure", "quality_sharpness", "fov_fraction"):
            if column in t.columns:
                value = pd.to_numeric(t[column], errors="coerce")
                _fail_on(where, column, (value < 0) | (value > 1), "is outside [0, 1]")
        if "patient_id" in t.columns:
            known = t[t["patient_id"].notna()]
            splits_per_patient = known.groupby("patient_id")["split"].nunique()
            leaking = splits_per_patient[splits_per_patient > 1]
            if len(leaking):
                row = int(known.index[known["patient_id"] == leaking.index[0]][0])
                raise ManifestError(f"{where}: column split, row {row}: a patient's images are in more than one "
                                    f"split ({len(leaking)} patient(s)); splits must be patient-level")
        if check_files:
            real = paths.map(lambda p: inside(self.root, self.root / p))
            _fail_on(where, "path", real.isna(), f"leads outside the manifest's folder ({OUTSIDE_INPUT})")
            _fail_on(where, "path", ~real.map(Path.is_file), "points to a file that does not exist")

    # ---- conveniences ----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.table)

    def image_path(self, row: int) -> Path:
        """Absolute path of the image in (positional) row ``row`` (see :func:`image_file`)."""
        return image_file(self.root, str(self.table["path"].iloc[row]))

    def split(self, name: str) -> Manifest:
        """Rows of one split, as a Manifest with the same root."""
        if name not in SPLITS:
            raise ManifestError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return Manifest(self.table[self.table["split"] == name].reset_index(drop=True), self.root, self.metadata)

    def of_sites(self, sites: list[str]) -> Manifest:
        """Rows of these sites only, as a Manifest with the same root."""
        keep = self.table["site"].astype(str).isin([str(s) for s in sites])
        return Manifest(self.table[keep].reset_index(drop=True), self.root, self.metadata)

    @property
    def label_columns(self) -> list[str]:
        """Columns that are neither conventional metadata nor ingest's image information: the labels."""
        return [c for c in self.table.columns if c not in CONVENTIONAL_COLUMNS]


def image_file(root: Path, relative: str) -> Path:
    """The image a manifest row names, its links resolved; refused when it leads outside the manifest's folder."""
    real = inside(root, Path(root) / relative)
    if real is None:
        raise ManifestError(f"{Path(root) / relative}: {OUTSIDE_INPUT}: leads outside the manifest's folder {root}")
    return real


def _normalise_types(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    for column in STRING_COLUMNS:
        if column in table.columns:
            table[column] = table[column].astype("string")
    return table.reset_index(drop=True)


def _fail_on(where: str, column: str, bad: pd.Series, reason: str) -> None:
    if bool(bad.any()):
        rows = [int(i) for i in bad[bad].index[:5]]
        more = f" (and {int(bad.sum()) - len(rows)} more)" if bad.sum() > len(rows) else ""
        raise ManifestError(f"{where}: column {column}, row {rows[0]}: {reason}; rows {rows}{more}")


def _check_allowed(where: str, table: pd.DataFrame, column: str, allowed: tuple[str, ...]) -> None:
    if column in table.columns:
        values = table[column]
        bad = values.notna() & ~values.isin(allowed)
        if bool(bad.any()):
            row = int(bad[bad].index[0])
            raise ManifestError(f"{where}: column {column}, row {row}: value {values[row]!r} is not one of "
                                f"{', '.join(allowed)} (or empty when unknown)")
