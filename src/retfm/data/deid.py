"""De-identification: keyed pseudonyms, identifying columns dropped or coarsened, metadata-free images.

- ``image_id`` and ``patient_id`` are HMAC-SHA256 pseudonyms of the source identifiers under a site-held key:
  stable for one key, not reversible without it. Without a key, ``image_id`` is an unkeyed hash (stable, but
  only pseudonymous against someone who cannot guess the source paths) and nothing is de-identified.
- Images are always re-encoded from pixels, so EXIF/XMP/IPTC, PNG text chunks, ICC profiles and DICOM tags never
  reach an output; the DICOM attributes retfm maps to columns are listed in the report.
- Columns whose names mark them as identifying are dropped; a date of birth becomes age in completed years (at
  the visit date when the table has one, else at the ingest date); ages above 89 are coded as 90.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from datetime import date
from pathlib import Path

import pandas as pd

from retfm.data.io import ImageRejected, decode_image, write_image
from retfm.data.manifest import IMAGE_INFO_COLUMNS, REQUIRED_COLUMNS, Manifest
from retfm.errors import RetfmError

MIN_KEY_BYTES = 16
DEID_REPORT_FILENAME = "deid_report.json"
AGE_CAP = 90  # ages above 89 are identifying in small cohorts (HIPAA safe harbour); coded as 90

_DIRECT_TOKENS = {"name", "firstname", "surname", "lastname", "forename", "fullname", "initials", "mrn", "nhs",
                  "ssn", "passport", "address", "street", "postcode", "zipcode", "zip", "phone", "telephone",
                  "mobile", "email", "accession", "filename", "file", "filepath", "path", "source", "id", "uid",
                  "uuid", "ip"}
_DIRECT_PHRASES = ("medical_record", "record_number", "hospital_number", "national_id", "social_security",
                   "insurance", "original_path")
_DATE_TOKENS = {"date", "datetime", "timestamp", "dt"}


def column_kind(column: str) -> str | None:
    """'birth' for a date of birth, 'date' for other dates, 'direct' for identifiers, None for other columns."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", column).lower()
    snake = re.sub(r"[^a-z0-9]+", "_", snake).strip("_")
    tokens = set(snake.split("_"))
    if "birth" in snake or "dob" in tokens or "birthdate" in tokens:
        return "birth"
    if tokens & _DATE_TOKENS:
        return "date"
    if tokens & _DIRECT_TOKENS or any(phrase in snake for phrase in _DIRECT_PHRASES):
        return "direct"
    return None


class Pseudonymizer:
    """Turns source identifiers into stable pseudonyms; keyed (HMAC-SHA256) when a key is given."""

    def __init__(self, key: bytes | None = None):
        self.key = key

    @property
    def keyed(self) -> bool:
        return self.key is not None

    def _digest(self, namespace: str, value: str) -> str:
        message = f"{namespace}\x00{value}".encode()
        if self.key is None:
            return hashlib.sha256(message).hexdigest()
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()

    def image_id(self, site: str, source: str) -> str:
        return self._digest("image", f"{site}\x00{source}")[:20]

    def patient_id(self, site: str, patient: str) -> str:
        """Keyed pseudonym of a patient identifier; the identifier itself when there is no key."""
        if not self.keyed:
            return patient
        return "p" + self._digest("patient", f"{site}\x00{patient}")[:19]

    def source_label(self, site: str, source: str) -> str:
        """What reports and messages may say about a source file: its path, or a pseudonym when keyed."""
        return f"source-{self._digest('source', f'{site}{chr(0)}{source}')[:12]}" if self.keyed else source


def load_key(path: str | Path) -> bytes:
    path = Path(path)
    try:
        key = path.read_bytes().strip()
    except FileNotFoundError:
        raise RetfmError(f"{path}: de-identification key file not found; create one with `retfm data keygen "
                         f"{path}` and keep it at the site") from None
    except OSError as exc:
        raise RetfmError(f"{path}: cannot read de-identification key ({exc.strerror})") from None
    if len(key) < MIN_KEY_BYTES:
        raise RetfmError(f"{path}: de-identification key is too short ({len(key)} bytes, need >= {MIN_KEY_BYTES})")
    return key


def generate_key(path: str | Path) -> Path:
    """Write a new random key readable only by its owner; never overwrite an existing key."""
    path = Path(path)
    if path.exists():
        raise RetfmError(f"{path}: already exists; refusing to overwrite a de-identification key")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    return path


def age_in_years(birth: date, on: date) -> int:
    """Completed years between two dates."""
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def deidentify_columns(table: pd.DataFrame, protected: set[str], today: date | None = None) -> tuple[pd.DataFrame, dict]:
    """Drop identifying columns (except ``protected`` ones, which the caller pseudonymises), turn a date of birth
    into ``age``, cap ages. Returns the new table and a report {dropped, coarsened, kept}."""
    today = today or date.today()
    kinds = {c: column_kind(c) for c in table.columns if c not in protected}
    birth_columns = [c for c, k in kinds.items() if k == "birth"]
    date_columns = [c for c, k in kinds.items() if k == "date"]
    table = table.copy()
    coarsened: dict[str, str] = {}
    if birth_columns:
        birth = pd.to_datetime(table[birth_columns[0]], errors="coerce", format="mixed")
        visit = (pd.to_datetime(table[date_columns[0]], errors="coerce", format="mixed") if date_columns
                 else pd.Series(pd.NaT, index=table.index))
        at = visit.fillna(pd.Timestamp(today))
        derived = [age_in_years(b.date(), v.date()) if pd.notna(b) else None for b, v in zip(birth, at)]
        derived_age = pd.Series(derived, index=table.index, dtype="Float64")
        table["age"] = derived_age if "age" not in table else pd.to_numeric(table["age"], errors="coerce").fillna(derived_age)
        reference = f"the visit date ({date_columns[0]})" if date_columns else "the ingest date"
        coarsened[birth_columns[0]] = f"age in completed years at {reference}"
    if "age" in table:
        age = pd.to_numeric(table["age"], errors="coerce")
        table["age"] = age.where(age.isna(), age.clip(upper=AGE_CAP).round()).astype("Int64")
        coarsened.setdefault("age", f"whole years, ages above {AGE_CAP - 1} coded as {AGE_CAP}")
    dropped = sorted(c for c, k in kinds.items() if k is not None)
    table = table.drop(columns=dropped)
    return table, {"dropped": dropped, "coarsened": coarsened, "kept": [c for c in table.columns]}


def deidentify_ingest(src: str | Path, out: str | Path, key: bytes) -> dict:
    """De-identify an earlier ingest made without a key: the same pseudonyms as ``ingest --deid-key-file`` gives,
    identifying columns dropped or coarsened, every image re-encoded from pixels (PNG) under its new id."""
    manifest = Manifest.read(src)
    src, out = Path(src), Path(out)
    if out.resolve() == manifest.root.resolve():
        raise RetfmError(f"{out}: write the de-identified copy to a new folder, not over its source")
    table = manifest.table.copy()
    if "source" not in table:
        raise RetfmError(f"{src}: the manifest has no source column (already de-identified, or not made by "
                         f"`retfm data ingest`)")
    pseudonyms = Pseudonymizer(key)
    new_ids = [pseudonyms.image_id(str(site), str(source)) for site, source in zip(table["site"], table["source"])]
    (out / "images").mkdir(parents=True, exist_ok=True)
    for row, new_id in enumerate(new_ids):
        path = manifest.image_path(row)
        try:
            rgb = decode_image(path.read_bytes()).rgb
        except (OSError, ImageRejected) as exc:
            raise RetfmError(f"{path}: cannot re-encode image ({exc})") from None
        write_image(rgb, out / "images" / f"{new_id}.png")
    table["image_id"] = new_ids
    table["path"] = [f"images/{i}.png" for i in new_ids]
    if "patient_id" in table:
        table["patient_id"] = [None if pd.isna(p) else pseudonyms.patient_id(str(s), str(p))
                               for s, p in zip(table["site"], table["patient_id"])]
    table = table.drop(columns=["source"])
    protected = set(REQUIRED_COLUMNS) | set(IMAGE_INFO_COLUMNS) | {"patient_id"}
    table, report = deidentify_columns(table, protected)
    Manifest(table, out, {**manifest.metadata, "retfm.deidentified": "true"}).write(out / "manifest.parquet")
    full = deid_report(report, dicom=False)
    (out / DEID_REPORT_FILENAME).write_text(json.dumps(full, indent=2) + "\n")
    return full


def deid_report(columns: dict, dicom: bool) -> dict:
    """What de-identification removed and kept, for ``deid_report.json``."""
    return {
        "pseudonymised": {"image_id": "HMAC-SHA256 of site and source path under the site key",
                          "patient_id": "HMAC-SHA256 of site and patient identifier under the site key"},
        "columns_dropped": columns["dropped"],
        "columns_coarsened": columns["coarsened"],
        "columns_kept": columns["kept"],
        "image_metadata_removed": ["EXIF", "XMP", "IPTC", "ICC profile", "PNG text chunks", "DICOM tags",
                                   "original filenames"],
        "dicom_tags_read": ["PatientID -> patient_id (pseudonymised)", "PatientSex -> sex",
                            "PatientBirthDate + StudyDate -> age (years)", "ImageLaterality/Laterality -> eye",
                            "Modality -> modality", "Manufacturer + ManufacturerModelName -> device"] if dicom else [],
    }
