"""RetinaMNIST (MedMNIST v2) ``.npz``: keys ``{train,val,test}_images`` (N x H x W x 3 uint8) and ``*_labels``
(N x 1, diabetic-retinopathy grade 0-4). The official splits are kept; the label column is ``dr_grade``."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from retfm.data.sources.items import SourceItem, SourceListing
from retfm.errors import RetfmError


def list_retinamnist(path: Path) -> SourceListing:
    try:
        arrays = np.load(path, allow_pickle=False)
        splits = {split: (arrays[f"{split}_images"], arrays[f"{split}_labels"]) for split in ("train", "val", "test")}
    except KeyError as exc:
        raise RetfmError(f"{path}: not a RetinaMNIST file (missing key {exc})") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise RetfmError(f"{path}: cannot read .npz ({exc})") from None
    items = []
    for split, (images, labels) in splits.items():
        if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(labels):
            raise RetfmError(f"{path}: {split}_images must be N x H x W x 3 with one label per image")
        for index, (image, label) in enumerate(zip(images, labels.reshape(len(labels), -1)[:, 0])):
            items.append(SourceItem(source=f"{split}/{index:05d}", pixels=np.ascontiguousarray(image, dtype=np.uint8),
                                    columns={"split": split, "dr_grade": int(label)}))
    return SourceListing(items, "retinamnist", defaults={"modality": "CFP"}, label_columns=["dr_grade"])
