"""``retfm data ingest``: any image source -> preprocessed images + Manifest + report.

Steps: list the source; decode, find the field of view, crop, resize, score quality and write each image in
worker processes; drop byte-identical duplicates (first in source order wins); map source columns to manifest
columns; de-identify when a key is given; assign patient-level splits where the source has none; merge with an
earlier ingest in the same folder (same image ids -> same rows: re-running is idempotent); write
``manifest.parquet``, ``ingest_report.json``, ``ingest_config.yaml`` (and ``deid_report.json``).

The report always reconciles: ``seen == ingested + duplicates + sum(rejected.values())``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from retfm.config import save_config

from retfm.data import fundus
from retfm.data.config import IngestConfig
from retfm.data.deid import (DEID_REPORT_FILENAME, Pseudonymizer, age_in_years, column_kind, deid_report,
                             deidentify_columns, load_key)
from retfm.data.io import (NO_FUNDUS, TOO_MANY_PIXELS, UNREADABLE_DICOM, UNREADABLE_FILE, Decoded, ImageRejected,
                           decode_image, largest_file, write_image)
from retfm.data.manifest import IMAGE_INFO_COLUMNS, MANIFEST_FILENAME, REQUIRED_COLUMNS, Manifest
from retfm.data.sources import SourceItem, list_source
from retfm.data.splits import assign_splits
from retfm.errors import RetfmError

REPORT_FILENAME = "ingest_report.json"
CONFIG_FILENAME = "ingest_config.yaml"
IMAGES_DIRNAME = "images"

_SEX = {"f": "F", "female": "F", "woman": "F", "w": "F", "m": "M", "male": "M", "man": "M", "o": "X", "x": "X",
        "other": "X", "non-binary": "X", "nonbinary": "X"}
_EYE = {"l": "L", "left": "L", "os": "L", "r": "R", "right": "R", "od": "R"}
_MODALITY = {"cfp": "CFP", "fundus": "CFP", "colour fundus": "CFP", "color fundus": "CFP", "uwf": "UWF",
             "oct": "OCT", "opt": "OCT", "fa": "FA", "ffa": "FA"}


@dataclass(frozen=True)
class _Task:
    file: str | None
    pixels: np.ndarray | None
    out_path: str
    size: int
    margin: float
    clahe: bool
    jpeg_quality: int
    max_pixels: int
    expect_dicom: bool


def ingest(src: str | Path, out: str | Path, config: IngestConfig,
           progress: Callable[[int], None] | None = None, total: Callable[[int], None] | None = None) -> dict:
    """Ingest ``src`` into ``out``; returns the report (also written to ``out/ingest_report.json``).
    ``total(n)`` is called once the number of items is known, ``progress(1)`` after each item."""
    src, out = Path(src), Path(out)
    pseudonyms = Pseudonymizer(load_key(config.deid_key_file) if config.deid_key_file else None)
    listing = list_source(src, config.format, config)
    items = listing.items
    (out / IMAGES_DIRNAME).mkdir(parents=True, exist_ok=True)
    if total:
        total(len(items))
    suffix = ".png" if config.image_format == "png" else ".jpg"

    sites = [str(item.columns.get("site") or config.site) for item in items]
    image_ids = [pseudonyms.image_id(site, item.source) for site, item in zip(sites, items)]
    tasks = [_Task(str(item.file) if item.file else None, item.pixels, str(out / IMAGES_DIRNAME / f"{i}{suffix}"),
                   config.size, config.margin, config.clahe, config.jpeg_quality,
                   config.max_pixels, listing.format == "dicom") for item, i in zip(items, image_ids)]
    results = _run(tasks, items, config.workers, progress)

    report = {"seen": len(items), "ingested": 0, "duplicates": 0, "rejected": {}, "rejected_files": [],
              "duplicate_files": [], "converted": {}, "format": listing.format,
              "deidentified": pseudonyms.keyed, "warnings": []}
    rejected, conversions = Counter(), Counter()
    first_by_digest: dict[str, int] = {}
    rows = []
    for index, (item, site, image_id, result) in enumerate(zip(items, sites, image_ids, results)):
        label = pseudonyms.source_label(site, item.source)
        if not result["ok"]:
            rejected[result["reason"]] += 1
            report["rejected_files"].append({"source": label, "reason": result["reason"],
                                             **({"detail": result["detail"]} if result.get("detail") else {})})
            continue
        if result["digest"] in first_by_digest:
            Path(tasks[index].out_path).unlink(missing_ok=True)
            original = first_by_digest[result["digest"]]
            report["duplicates"] += 1
            report["duplicate_files"].append({"source": label, "duplicate_of": image_ids[original]})
            continue
        first_by_digest[result["digest"]] = index
        conversions.update(result["conversions"])
        rows.append(_row(item, site, image_id, result, listing.defaults, config, pseudonyms.keyed, out, suffix))
    report["ingested"] = len(rows)
    report["rejected"] = dict(sorted(rejected.items()))
    report["converted"] = dict(sorted(conversions.items()))
    if not rows:
        _write_json(out / REPORT_FILENAME, report)
        reasons = ", ".join(f"{k}: {v}" for k, v in report["rejected"].items()) or "no items"
        raise RetfmError(f"nothing could be ingested: {report['seen']} item(s) seen, all rejected ({reasons}); "
                         f"see {out / REPORT_FILENAME}")

    table = pd.DataFrame(rows)
    table = _normalise_conventional(table, report)
    table = _numeric_labels(table, listing.label_columns)
    if pseudonyms.keyed:
        if "patient_id" in table:
            table["patient_id"] = [None if pd.isna(p) else pseudonyms.patient_id(s, str(p))
                                   for s, p in zip(table["site"], table["patient_id"])]
        protected = set(REQUIRED_COLUMNS) | set(IMAGE_INFO_COLUMNS) | {"patient_id"}
        table, deid = deidentify_columns(table, protected)
        _write_json(out / DEID_REPORT_FILENAME, deid_report(deid, dicom=bool(conversions.get("dicom"))))
    else:
        owned = set(REQUIRED_COLUMNS) | set(IMAGE_INFO_COLUMNS)
        flagged = ["source (original file names)"] + (["patient_id"] if "patient_id" in table else [])
        flagged += sorted(c for c in table.columns if c not in owned and c != "patient_id" and column_kind(c))
        report["warnings"].append(f"no --deid-key-file: kept as given: {', '.join(flagged)}")

    existing = _read_existing(out)
    fixed = {}
    if existing is not None:  # earlier decisions stand: an image or patient never changes split on a re-run
        fixed = dict(zip(_split_groups(existing.table), existing.table["split"].astype(str)))
    table["split"] = _splits(table, listing.label_columns, config, fixed)
    if existing is not None:
        kept = existing.table[~existing.table["image_id"].isin(table["image_id"])]
        table = pd.concat([kept, table], ignore_index=True) if len(kept) else table
    manifest = Manifest(table.reset_index(drop=True), out, {"retfm.source_format": listing.format,
                                                            "retfm.deidentified": str(pseudonyms.keyed).lower()})
    manifest.write(out / MANIFEST_FILENAME)
    save_config(config, out / CONFIG_FILENAME)
    _write_json(out / REPORT_FILENAME, report)
    return report


# ---- work done per image, in worker processes ---------------------------------------------------------------------

def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe


def _run(tasks: list[_Task], items: list[SourceItem], workers: int, progress) -> list[dict]:
    pending = [i for i, item in enumerate(items) if item.rejected is None]
    results: list[dict] = [{"ok": False, "reason": item.rejected} for item in items]
    for item in items:
        if item.rejected is not None and progress:
            progress(1)
    if workers <= 1 or len(pending) < 2 * workers:
        mapped = map(_process, (tasks[i] for i in pending))
        executor = None
    else:
        # Not fork: the parent may hold threads (OpenCV, torch) whose locks a forked child would inherit held.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        executor = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker)
        chunk = max(1, min(16, len(pending) // (workers * 8)))
        mapped = executor.map(_process, (tasks[i] for i in pending), chunksize=chunk)
    try:
        for index, result in zip(pending, mapped):
            results[index] = result
            if progress:
                progress(1)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    return results


def _process(task: _Task) -> dict:
    digest = None
    try:
        if task.pixels is not None:
            pixels = task.pixels
            digest = hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()
            decoded = Decoded(pixels, (pixels.shape[1], pixels.shape[0]), 1.0)
        else:
            try:
                with open(task.file, "rb") as handle:
                    size = os.fstat(handle.fileno()).st_size
                    if size > largest_file(task.max_pixels):
                        raise ImageRejected(TOO_MANY_PIXELS, f"a file of {size} bytes is larger than any image "
                                                             f"of at most {task.max_pixels} pixels")
                    data = handle.read()
            except OSError as exc:
                raise ImageRejected(UNREADABLE_FILE, exc.strerror or type(exc).__name__) from None
            digest = hashlib.sha256(data).hexdigest()
            if task.expect_dicom and data[128:132] != b"DICM":
                raise ImageRejected(UNREADABLE_DICOM, "not a DICOM file")
            decoded = decode_image(data, min_side=task.size, max_pixels=task.max_pixels)
        processed = fundus.preprocess(decoded.rgb, task.size, task.margin, task.clahe)
        if processed is None:
            raise ImageRejected(NO_FUNDUS, "no circular field of view found")
        image, info = processed
        for key in ("fov_cx", "fov_cy", "fov_radius"):
            info[key] = round(float(info[key]) / decoded.scale, 1)
        write_image(image, Path(task.out_path), task.jpeg_quality)
    except ImageRejected as exc:
        return {"ok": False, "reason": exc.reason, "detail": exc.detail, "digest": digest}
    return {"ok": True, "digest": digest, "info": info, "conversions": decoded.conversions, "dicom": decoded.dicom,
            "source_size": decoded.source_size, "size": (image.shape[1], image.shape[0])}


# ---- from results to manifest rows --------------------------------------------------------------------------------

def _row(item: SourceItem, site: str, image_id: str, result: dict, defaults: dict, config: IngestConfig,
         keyed: bool, out: Path, suffix: str) -> dict:
    row = {"image_id": image_id, "path": f"{IMAGES_DIRNAME}/{image_id}{suffix}", "site": site, "split": None}
    if config.modality:
        row["modality"] = config.modality
    row.update(defaults)
    row.update(_dicom_columns(result["dicom"]))
    # A source column named like one ingest owns (image_id, path, quality, ...) is kept under "source_<name>".
    owned = {"image_id", "path", "source", *IMAGE_INFO_COLUMNS}
    row.update({(f"source_{k}" if k in owned else k): v for k, v in item.columns.items() if k != "site"})
    if not keyed:
        row["source"] = item.source
    info = result["info"]
    row.update({k: float(v) for k, v in info.items() if k != "fov_full_frame"})
    row["fov_full_frame"] = bool(info.get("fov_full_frame", 0))
    row["source_width"], row["source_height"] = result["source_size"]
    row["width"], row["height"] = result["size"]
    return row


def _dicom_columns(tags: dict[str, str]) -> dict:
    """Manifest columns from the DICOM attributes retfm keeps; the raw birth and study dates never leave here."""
    columns: dict = {}
    if "PatientID" in tags:
        columns["patient_id"] = tags["PatientID"]
    if "PatientSex" in tags:
        columns["sex"] = tags["PatientSex"]
    if "PatientBirthDate" in tags and "StudyDate" in tags:
        try:
            columns["age"] = age_in_years(_dicom_date(tags["PatientBirthDate"]), _dicom_date(tags["StudyDate"]))
        except ValueError:
            pass
    eye = tags.get("ImageLaterality") or tags.get("Laterality")
    if eye:
        columns["eye"] = eye
    if tags.get("Modality") == "OPT":
        columns["modality"] = "OCT"
    device = " ".join(tags[k] for k in ("Manufacturer", "ManufacturerModelName") if k in tags)
    if device:
        columns["device"] = device
    return columns


def _dicom_date(value: str) -> date:
    return date(int(value[:4]), int(value[4:6]), int(value[6:8]))


def _numeric_labels(table: pd.DataFrame, label_columns: list[str]) -> pd.DataFrame:
    """A label column whose every value is a number (CSV cells arrive as text) becomes numeric: nullable
    integers when all values are whole, floats otherwise. Any non-number keeps the column as text."""
    for column in label_columns:
        if column not in table or pd.api.types.is_numeric_dtype(table[column]):
            continue
        values = pd.to_numeric(table[column], errors="coerce")
        if (values.isna() != table[column].isna()).any():
            continue
        whole = values.dropna().mod(1).eq(0).all()
        table[column] = values.astype("Int64") if whole else values.astype("float64")
    return table


def _normalise_conventional(table: pd.DataFrame, report: dict) -> pd.DataFrame:
    """Map common spellings of sex, eye and modality to the manifest's codes; unknown spellings become null
    (never guessed) and are counted in the report's warnings."""
    for column, codes in (("sex", _SEX), ("eye", _EYE), ("modality", _MODALITY)):
        if column not in table:
            continue
        raw = table[column]
        mapped = raw.map(lambda v: None if pd.isna(v) else codes.get(str(v).strip().lower(),
                                                                      str(v) if str(v) in codes.values() else None))
        unknown = int((raw.notna() & mapped.isna()).sum())
        if unknown:
            values = sorted({str(v) for v in raw[raw.notna() & mapped.isna()]})[:5]
            report["warnings"].append(f"{unknown} value(s) of {column} not recognised and set to null: {values}")
        table[column] = mapped.astype("string")
    if "age" in table:
        age = pd.to_numeric(table["age"], errors="coerce")
        bad = int((table["age"].notna() & age.isna()).sum())
        if bad:
            report["warnings"].append(f"{bad} value(s) of age are not numbers and were set to null")
        table["age"] = age
    return table


def _splits(table: pd.DataFrame, label_columns: list[str], config: IngestConfig, fixed: dict[str, str]) -> pd.Series:
    given = table["split"].astype("string")
    if given.notna().all():
        return given
    groups = _split_groups(table)
    fixed = {**fixed, **{g: s for g, s in zip(groups[given.notna()], given[given.notna()])}}
    candidates = [c for c in label_columns if c in table and not column_kind(c)]
    stratify = config.stratify or (candidates[0] if len(candidates) == 1 else None)
    if stratify is not None and stratify not in table:
        raise RetfmError(f"--stratify {stratify}: no such column (columns: {', '.join(table.columns)})")
    # Every site gets its share of each split, not only the collection as a whole.
    strata = table["site"].astype("string")
    if stratify:
        strata = strata + "|" + table[stratify].astype("string").fillna("<missing>")
    assigned = assign_splits(groups, config.split, config.seed, strata, fixed)
    return given.fillna(assigned)


def _split_groups(table: pd.DataFrame) -> pd.Series:
    """Splits are decided per patient; an image without a known patient is its own group."""
    groups = table["patient_id"].fillna(table["image_id"]) if "patient_id" in table else table["image_id"]
    return groups.astype(str)


def _read_existing(out: Path) -> Manifest | None:
    path = out / MANIFEST_FILENAME
    if not path.exists():
        return None
    return Manifest.read(path)


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
