"""Public fundus datasets, read in the layout their publishers distribute (``retfm data ingest DIR --format NAME``).

retfm never downloads them: point it at the folder you downloaded and unpacked (that folder or any folder above
it). Each reader finds the official files below it, turns the published label coding into manifest columns and
keeps official splits where the publisher released labels for every split. Values the source does not give are
left out (null), never guessed. A table row whose image is absent is listed with ``rejected="missing_file"``, a
file in an image-folder dataset that sits in no recognised class folder with ``rejected="unknown_class"``, and an
image that is a link out of the folder with ``rejected="outside_input"`` (``retfm.data.paths``), so the ingest
report names each one and the rest carries on.

Layouts and codings are documented in docs/data.md ("Public datasets").
"""

from __future__ import annotations

import re
from fnmatch import fnmatch
from pathlib import Path, PurePath

import pandas as pd

from retfm.data.paths import OUTSIDE_INPUT, inside
from retfm.data.sources.imagefolder import list_files
from retfm.data.sources.items import SPLIT_ALIASES, SourceItem, SourceListing
from retfm.data.sources.table import MISSING_FILE
from retfm.errors import RetfmError

UNKNOWN_CLASS = "unknown_class"


# ---- finding the official files ---------------------------------------------------------------------------------

def _find(root: Path, description: str, *names: str, directory: bool = False, required: bool = True) -> Path | None:
    """The shallowest file (or folder) below ``root`` whose name matches one of ``names`` (fnmatch patterns,
    ignoring case; at equal depth the earlier name wins): the user may point at the dataset's folder or at any
    folder above it."""
    patterns = [name.lower() for name in names]
    candidates = []
    for path in root.rglob("*"):
        order = next((i for i, pattern in enumerate(patterns) if fnmatch(path.name.lower(), pattern)), None)
        parts = path.relative_to(root).parts
        if order is not None and path.is_dir() == directory and not any(part.startswith(".") for part in parts):
            candidates.append((len(parts), order, path.as_posix(), path))
    if candidates:
        found = min(candidates)[-1]
        if inside(root, found) is None:
            raise RetfmError(f"{found}: {OUTSIDE_INPUT}: a link that leads outside {root}; not read")
        return found
    if required:
        raise RetfmError(f"{root}: no {description} found (looked for {' or '.join(names)})")
    return None


class _Images:
    """The images of one folder, looked up by file name or by stem, ignoring case: tables name images with or
    without their extension (APTOS ``id_code``, IDRiD ``Image name``), and unzip tools may change its case."""

    def __init__(self, root: Path, folder: Path):
        self.root, self.folder = root, folder
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        self.by_name = {p.name.lower(): p for p in files}
        self.by_stem: dict[str, Path] = {}
        for path in files:
            self.by_stem.setdefault(path.stem.lower(), path)

    def item(self, name, columns: dict, where: str) -> SourceItem:
        """The item for image ``name``; rejected as a missing file (``where`` names the row) when absent."""
        name = "" if pd.isna(name) else str(name).strip()
        if not name:
            return SourceItem(source=where, columns=columns, rejected=MISSING_FILE)
        path = self.by_name.get(name.lower()) or self.by_stem.get(PurePath(name).stem.lower())
        listed = path or self.folder / name  # the report names a missing image where it would have been
        source = listed.relative_to(self.root).as_posix() if listed.is_relative_to(self.root) else name
        if path is None:
            return SourceItem(source=source, columns=columns, rejected=MISSING_FILE)
        real = inside(self.root, path)
        return SourceItem(source=source, file=real, columns=columns, rejected=None if real else OUTSIDE_INPUT)


def _class_items(root: Path) -> list[tuple[SourceItem, str | None]]:
    """Every file below ``root`` with its class (the folder holding it) and, where a folder on its path is named
    train/val/test, that split: RETFound's ``<split>/<class>/*`` and a flat ``<class>/*`` alike."""
    listed = []
    for item in list_files(root):
        folders = item.source.split("/")[:-1]
        splits = [SPLIT_ALIASES[f.lower()] for f in folders[:-1] if f.lower() in SPLIT_ALIASES]
        if splits:
            item.columns["split"] = splits[-1]
        listed.append((item, folders[-1] if folders else None))
    return listed


# ---- reading tables -----------------------------------------------------------------------------------------------

def _read_csv(path: Path, sep: str = ",") -> pd.DataFrame:
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=["", "NA", "NaN", "nan"])
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise RetfmError(f"{path}: cannot read CSV ({exc})".splitlines()[0]) from None
    return _tidy(table)


def _read_excel(path: Path, header: int | None = 0) -> pd.DataFrame:
    try:
        table = pd.read_excel(path, header=header, dtype=str)
    except ImportError:
        raise RetfmError(f"{path}: reading Excel files needs openpyxl (pip install openpyxl)") from None
    except (OSError, ValueError, KeyError) as exc:
        raise RetfmError(f"{path}: cannot read Excel workbook ({exc})".splitlines()[0]) from None
    return _tidy(table)


def _tidy(table: pd.DataFrame) -> pd.DataFrame:
    """Headers without surrounding spaces (IDRiD's ``Risk of macular edema `` has a trailing one); blank rows gone."""
    table.columns = [str(c).strip() for c in table.columns]
    return table.dropna(how="all").reset_index(drop=True)


def _with_columns(table: pd.DataFrame, path: Path, required: list[str], optional: list[str] = ()) -> pd.DataFrame:
    """``table`` with its columns renamed to the published spelling (matched ignoring case); one line naming the
    file when a required column is absent."""
    by_lower = {c.lower(): c for c in table.columns}
    missing = [c for c in required if c.lower() not in by_lower]
    if missing:
        raise RetfmError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} "
                         f"(header: {', '.join(table.columns)})")
    return table.rename(columns={by_lower[c.lower()]: c for c in [*required, *optional] if c.lower() in by_lower})


def _code(value) -> int | None:
    """A published integer code (``2``, ``'2'``, ``'2.0'``) or None for blanks and anything else."""
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def _text(value) -> str | None:
    return None if pd.isna(value) or not str(value).strip() else str(value).strip()


def _listing(items: list[SourceItem], fmt: str, label_columns: list[str], **defaults) -> SourceListing:
    return SourceListing(items, fmt, defaults={"modality": "CFP", **defaults}, label_columns=label_columns)


# ---- the readers ------------------------------------------------------------------------------------------------

def list_retfound(src: Path, options) -> SourceListing:
    """RETFound's benchmark folders ``train|val|test/<class>/*``: split kept, class name in ``options.label_column``."""
    listed = _class_items(src)
    if not any("split" in item.columns for item, _ in listed):
        raise RetfmError(f"{src}: not the RETFound layout train|val|test/<class>/* (no train, val or test folder); "
                         f"use --format imagefolder for a flat <class>/* folder")
    for item, name in listed:
        if name is None or "split" not in item.columns:
            item.rejected = UNKNOWN_CLASS
        else:
            item.columns[options.label_column] = name
    return _listing([item for item, _ in listed], "retfound", [options.label_column])


def list_aptos2019(src: Path, options) -> SourceListing:
    """APTOS 2019 (Kaggle): ``train.csv`` (``id_code``, ``diagnosis`` 0-4) with ``train_images/<id_code>.png``.

    The competition's ``test.csv`` has no labels and is skipped. The common re-distribution with labelled
    ``train_1.csv`` / ``valid.csv`` / ``test.csv`` and ``train_images`` / ``val_images`` / ``test_images`` keeps
    its splits; with one labelled table, ingest draws the splits."""
    train = _find(src, "APTOS train.csv", "train.csv", "train_1.csv")
    labelled = {"train": (train, _with_columns(_read_csv(train), train, ["id_code", "diagnosis"]))}
    for split, names in (("val", ("valid.csv", "val.csv")), ("test", ("test.csv",))):
        path = _find(src, f"APTOS {split} table", *names, required=False)
        table = _read_csv(path) if path is not None else None
        if table is not None and "diagnosis" in {c.lower() for c in table.columns}:
            labelled[split] = (path, _with_columns(table, path, ["id_code", "diagnosis"]))
    keep_splits = len(labelled) > 1
    folders = {"train": ("train_images",), "val": ("val_images", "valid_images"), "test": ("test_images",)}
    items = []
    for split, (path, table) in labelled.items():
        images = _Images(src, _find(path.parent, f"APTOS {split} image folder", *folders[split], directory=True))
        for index, row in table.iterrows():
            columns = {"dr_grade": _code(row["diagnosis"]), **({"split": split} if keep_splits else {})}
            items.append(images.item(row["id_code"], columns, f"{path.name} row {index + 2}"))
    return _listing(items, "aptos2019", ["dr_grade"], country="India")


def list_idrid(src: Path, options) -> SourceListing:
    """IDRiD part B (disease grading): ``2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv`` and
    ``b. ..._Testing Labels.csv`` (``Image name``, ``Retinopathy grade``, ``Risk of macular edema ``) with images in
    ``1. Original Images/a. Training Set`` and ``b. Testing Set``; the official train/test split is kept."""
    items = []
    for split, table_pattern, folder_pattern in (("train", "*grading*training labels.csv", "*training set"),
                                                 ("test", "*grading*testing labels.csv", "*testing set")):
        path = _find(src, f"IDRiD disease-grading {split} labels", table_pattern)
        grading_root = path.parent.parent  # "B. Disease Grading": holds "1. Original Images" and "2. Groundtruths"
        images = _Images(src, _find(grading_root, f"IDRiD {split} image folder", folder_pattern, directory=True))
        table = _with_columns(_read_csv(path), path, ["Image name", "Retinopathy grade", "Risk of macular edema"])
        for index, row in table.iterrows():
            columns = {"split": split, "dr_grade": _code(row["Retinopathy grade"]),
                       "dme_risk": _code(row["Risk of macular edema"])}
            items.append(images.item(row["Image name"], columns, f"{path.name} row {index + 2}"))
    return _listing(items, "idrid", ["dr_grade", "dme_risk"], country="India")


def list_messidor2(src: Path, options) -> SourceListing:
    """Messidor-2: images from ADCIS (``IMAGES/``), adjudicated grades from the Kaggle/Krause et al.
    ``messidor_data.csv`` (``image_id``, ``adjudicated_dr_grade``, ``adjudicated_dme``, ``adjudicated_gradable``).
    With ADCIS's ``messidor-2.csv`` (``left;right`` image pairs, one examination per row) each image gets its eye
    and an examination number as ``patient_id``; without it both stay null."""
    path = _find(src, "Messidor-2 grades table", "messidor_data.csv")
    table = _with_columns(_read_csv(path), path,
                          ["image_id", "adjudicated_dr_grade", "adjudicated_dme", "adjudicated_gradable"])
    images = _Images(src, _find(src, "Messidor-2 image folder", "images", "preprocess", directory=True))
    examinations = _messidor2_examinations(_find(src, "Messidor-2 pairs", "messidor-2.csv", required=False))
    items = []
    for index, row in table.iterrows():
        columns = {"dr_grade": _code(row["adjudicated_dr_grade"]), "dme": _code(row["adjudicated_dme"]),
                   "gradable": _code(row["adjudicated_gradable"])}
        name = _text(row["image_id"])
        patient, eye = examinations.get(PurePath(name).stem.lower(), (None, None)) if name else (None, None)
        if patient is not None:
            columns.update(patient_id=patient, eye=eye)
        items.append(images.item(name, columns, f"{path.name} row {index + 2}"))
    return _listing(items, "messidor2", ["dr_grade", "dme", "gradable"], country="France")


def _messidor2_examinations(path: Path | None) -> dict[str, tuple[str, str]]:
    """Image stem -> (examination number, eye) from ADCIS's ``messidor-2.csv``."""
    if path is None:
        return {}
    table = _with_columns(_read_csv(path, sep=";"), path, ["left", "right"])
    pairs = {}
    for index, row in table.iterrows():
        for column, eye in (("left", "L"), ("right", "R")):
            name = _text(row[column])
            if name:
                pairs[PurePath(name).stem.lower()] = (f"exam{index + 1:03d}", eye)
    return pairs


PAPILA_SEX = {0: "M", 1: "F"}  # Gender as published in the data descriptor (Kovalyk et al. 2022)
PAPILA_GLAUCOMA = {0: 0, 1: 1}  # Diagnosis 0 healthy, 1 glaucoma; 2 (suspect) is neither, so glaucoma is null


def list_papila(src: Path, options) -> SourceListing:
    """PAPILA: ``FundusImages/RET<id><OD|OS>.jpg`` with ``ClinicalData/patient_data_od.xlsx`` and
    ``patient_data_os.xlsx`` (one row per patient: ``ID`` like ``#002``, ``Age``, ``Gender``, ``Diagnosis``)."""
    images = _Images(src, _find(src, "PAPILA image folder", "FundusImages", directory=True))
    items = []
    for eye_code, eye, name in (("OD", "R", "patient_data_od.xlsx"), ("OS", "L", "patient_data_os.xlsx")):
        path = _find(src, "PAPILA clinical data", name)
        for _, row in _papila_sheet(path).iterrows():
            diagnosis = _code(row["Diagnosis"])
            columns = {"patient_id": row["ID"], "eye": eye, "age": _text(row["Age"]),
                       "sex": PAPILA_SEX.get(_code(row["Gender"])), "glaucoma": PAPILA_GLAUCOMA.get(diagnosis),
                       "glaucoma_diagnosis": diagnosis}
            items.append(images.item(f"RET{row['ID']}{eye_code}", columns, f"{path.name} patient {row['ID']}"))
    return _listing(items, "papila", ["glaucoma", "glaucoma_diagnosis"], country="Spain")


def _papila_sheet(path: Path) -> pd.DataFrame:
    """The clinical sheet as a table with ``ID`` (digits, ``#`` dropped) and the sheet's column names.

    The workbooks carry a title row, a header row starting with ``ID`` and a row of sub-headers for grouped
    columns (refractive defect, IOP) above the data; this finds the header row rather than trusting its position."""
    raw = _read_excel(path, header=None)
    first = raw.iloc[:, 0].map(lambda v: "" if pd.isna(v) else str(v).strip())
    header_rows = first.index[first.str.lower() == "id"]
    if not len(header_rows):
        raise RetfmError(f"{path}: no header row starting with 'ID' in the first column")
    header = int(header_rows[0])
    names = [str(v).strip() for v in raw.iloc[header]]
    if header + 1 < len(raw) and first.iloc[header + 1] == "":  # a sub-header row names grouped columns
        names = [str(sub).strip() if not pd.isna(sub) else name for name, sub in zip(names, raw.iloc[header + 1])]
    patients = first.str.extract(r"^#?\s*(\d+)$")[0].map(lambda d: d if pd.isna(d) else f"{int(d):03d}")
    table = raw[patients.notna() & (raw.index > header)].copy()
    table.columns = names
    table["ID"] = patients[table.index]
    return _with_columns(table.reset_index(drop=True), path, ["ID", "Age", "Gender", "Diagnosis"])


GLAUCOMA_STAGES = {"normal": 0, "early": 1, "advanced": 2}


def list_glaucoma_fundus(src: Path, options) -> SourceListing:
    """Glaucoma_fundus (Ahn et al. 2018, Kim's Eye Hospital): ``normal_control``, ``early_glaucoma`` and
    ``advanced_glaucoma`` folders (RETFound's copy: ``train|val|test/anormal_control``, ``bearly_glaucoma``,
    ``cadvanced_glaucoma``). ``glaucoma_stage`` 0/1/2 and ``glaucoma`` 0/1; splits kept when present."""
    items = []
    for item, name in _class_items(src):
        stages = [stage for word, stage in GLAUCOMA_STAGES.items() if name and word in name.lower()]
        if len(stages) == 1:
            item.columns.update(glaucoma_stage=stages[0], glaucoma=int(stages[0] > 0))
        else:
            item.rejected = UNKNOWN_CLASS
        items.append(item)
    return _listing(items, "glaucoma_fundus", ["glaucoma", "glaucoma_stage"], country="South Korea")


JSIEC_CLASS = re.compile(r"^\d+(\.\d+)?\.\S")  # "0.0.Normal", "10.1.Optic atrophy", "8.MH"


def list_jsiec(src: Path, options) -> SourceListing:
    """JSIEC "1000 fundus images with 39 categories": one folder per category named ``<code>.<name>``
    (``0.0.Normal`` ... ``29.1.Blur fundus with suspected PDR``), kept as ``diagnosis``; splits kept when present."""
    items = []
    for item, name in _class_items(src):
        if name and JSIEC_CLASS.match(name):
            item.columns["diagnosis"] = name
        else:
            item.rejected = UNKNOWN_CLASS
        items.append(item)
    return _listing(items, "jsiec", ["diagnosis"], country="China")


BRSET_SEX = {1: "M", 2: "F"}
BRSET_EYE = {1: "R", 2: "L"}
BRSET_CONDITIONS = ("diabetic_retinopathy", "macular_edema", "scar", "nevus", "amd", "vascular_occlusion",
                    "hypertensive_retinopathy", "drusens", "hemorrhage", "retinal_detachment", "myopic_fundus",
                    "increased_cup_disc", "other")


def list_brset(src: Path, options) -> SourceListing:
    """BRSET (PhysioNet): ``labels_brset.csv`` (``labels.csv`` in version 1.0.0) with ``fundus_photos/<image_id>.jpg``.
    ``patient_sex`` 1 male / 2 female, ``exam_eye`` 1 right / 2 left, ``camera`` -> ``device``; ICDR grade ->
    ``dr_grade``, SDRG grade -> ``dr_sdrg``, one 0/1 column per condition."""
    path = _find(src, "BRSET labels table", "labels_brset.csv", "labels.csv")
    optional = ["DR_SDRG", "diabetes", "quality", *BRSET_CONDITIONS]
    table = _with_columns(_read_csv(path), path, ["image_id", "patient_id", "camera", "patient_age", "patient_sex",
                                                  "exam_eye", "DR_ICDR"], optional)
    images = _Images(src, _find(src, "BRSET image folder", "fundus_photos", directory=True))
    present = [c for c in optional if c in table.columns]
    conditions = [c for c in BRSET_CONDITIONS if c in present]
    labels = ["dr_grade", *[name for column, name in (("DR_SDRG", "dr_sdrg"), ("diabetes", "diabetes"),
                                                      ("quality", "quality_adequate")) if column in present],
              *conditions]
    items = []
    for index, row in table.iterrows():
        age = _text(row["patient_age"])
        columns = {"patient_id": _text(row["patient_id"]), "device": _text(row["camera"]),
                   "age": age.replace(",", ".") if age else None,  # some ages use a decimal comma
                   "sex": BRSET_SEX.get(_code(row["patient_sex"])), "eye": BRSET_EYE.get(_code(row["exam_eye"])),
                   "dr_grade": _code(row["DR_ICDR"])}
        if "DR_SDRG" in present:
            columns["dr_sdrg"] = _code(row["DR_SDRG"])
        if "diabetes" in present:
            columns["diabetes"] = {"yes": 1, "no": 0}.get(str(row["diabetes"]).strip().lower())
        if "quality" in present:
            columns["quality_adequate"] = {"adequate": 1, "inadequate": 0}.get(str(row["quality"]).strip().lower())
        columns.update({c: _code(row[c]) for c in conditions})
        items.append(images.item(row["image_id"], columns, f"{path.name} row {index + 2}"))
    return _listing(items, "brset", labels, country="Brazil")


ODIR_FLAGS = {"N": "normal", "D": "diabetes", "G": "glaucoma", "C": "cataract", "A": "amd", "H": "hypertension",
              "M": "myopia", "O": "other"}


def list_odir5k(src: Path, options) -> SourceListing:
    """ODIR-5K: the training workbook (``data.xlsx`` on Kaggle, ``ODIR-5K_Training_Annotations(Updated)_V2.xlsx``
    from the challenge), one row per patient: ``ID``, ``Patient Age``, ``Patient Sex``, ``Left-Fundus``,
    ``Right-Fundus``, ``Left-/Right-Diagnostic Keywords`` and the patient-level flags ``N D G C A H M O``; images in
    ``Training Images`` (or ``ODIR-5K_Training_Dataset``). Each eye's keywords go to ``text``. The testing images
    have no published labels and are not listed."""
    path = _find(src, "ODIR-5K annotation workbook", "data.xlsx", "ODIR-5K_Training_Annotations*.xlsx")
    keywords = ["Left-Diagnostic Keywords", "Right-Diagnostic Keywords"]
    table = _with_columns(_read_excel(path), path, ["ID", "Patient Age", "Patient Sex", "Left-Fundus",
                                                    "Right-Fundus", *ODIR_FLAGS], keywords)
    images = _Images(src, _find(src, "ODIR-5K training image folder", "Training Images", "ODIR-5K_Training_Dataset",
                                "ODIR-5K_Training_Images", directory=True))
    items = []
    for index, row in table.iterrows():
        patient = {"patient_id": _text(row["ID"]), "age": _text(row["Patient Age"]), "sex": _text(row["Patient Sex"]),
                   **{name: _code(row[flag]) for flag, name in ODIR_FLAGS.items()}}
        for eye, side in (("L", "Left"), ("R", "Right")):
            text = _text(row[f"{side}-Diagnostic Keywords"]) if f"{side}-Diagnostic Keywords" in table else None
            columns = {**patient, "eye": eye, **({"text": text} if text else {})}
            items.append(images.item(row[f"{side}-Fundus"], columns, f"{path.name} row {index + 2} {side.lower()}"))
    return _listing(items, "odir5k", list(ODIR_FLAGS.values()), country="China")


PUBLIC_READERS = {"retfound": list_retfound, "aptos2019": list_aptos2019, "idrid": list_idrid,
                  "messidor2": list_messidor2, "papila": list_papila, "glaucoma_fundus": list_glaucoma_fundus,
                  "jsiec": list_jsiec, "brset": list_brset, "odir5k": list_odir5k}
