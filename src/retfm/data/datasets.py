"""A torch Dataset over a Manifest, with the model's preprocessing passed in.

Evaluation transforms are deterministic. Training augmentations are seedable: each item's randomness comes from
(seed, epoch, index), so a run gives the same augmented images whatever the number of loader workers, and a
resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from retfm.data.io import ImageRejected, open_image
from retfm.data.manifest import GROUP_COLUMNS, Manifest, image_file
from retfm.errors import RetfmError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects; it travels with the model (the registry fills it), never guessed by the user."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"


def eval_transform(pre: Preprocessing) -> v2.Compose:
    return v2.Compose([v2.ToImage(),
                       v2.Resize((pre.size, pre.size), INTERPOLATIONS[pre.interpolation], antialias=True),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)])


def train_transform(pre: Preprocessing) -> v2.Compose:
    """Fundus-suitable augmentation: mild crops and rotations (the field of view is round), flips, and small
    colour changes within what cameras differ by. No strong colour or hue shifts: colour carries disease signs."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(pre.size, scale=(0.8, 1.0), ratio=(0.95, 1.05),
                             interpolation=INTERPOLATIONS[pre.interpolation], antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(15),
        v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.1),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(pre.mean, pre.std),
    ])


class ManifestDataset(Dataset):
    """Yields ``{"image": float tensor 3xHxW, "label": ..., "image_id": str, <group columns>: ...}``.

    ``label``: a label column (rows where it is null are dropped); ``split``: keep one split; ``seed``: makes
    ``transform`` reproducible per (seed, epoch, index) — call :meth:`set_epoch` each epoch; ``decode_size``:
    JPEGs at least twice this size are decoded at a reduced scale (still >= decode_size), much faster than a
    full decode for images the transform shrinks anyway.
    """

    def __init__(self, manifest: Manifest, transform=None, label: str | None = None, split: str | None = None,
                 group_columns: Sequence[str] = GROUP_COLUMNS, seed: int | None = None,
                 decode_size: int | None = None):
        source = manifest.split(split) if split else manifest
        table = source.table
        if label is not None:
            if label not in table:
                raise RetfmError(f"{manifest.root}: label column {label!r} not in the manifest "
                                 f"(labels: {', '.join(manifest.label_columns) or 'none'})")
            table = table[table[label].notna()].reset_index(drop=True)
        self.table = table
        self.root = manifest.root
        self.transform = transform
        self.label = label
        self.group_columns = [c for c in group_columns if c in table]
        self.seed = seed
        self.decode_size = decode_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict:
        row = self.table.iloc[index]
        path = image_file(self.root, str(row["path"]))
        try:
            with open_image(path.read_bytes()) as image:
                if self.decode_size:
                    image.draft("RGB", (self.decode_size, self.decode_size))
                image = image.convert("RGB")
        except (ImageRejected, OSError) as exc:
            raise RetfmError(f"{path}: cannot read image ({exc})") from None
        item = {"image": apply_seeded(self.transform, image, self.seed, self.epoch, index),
                "image_id": str(row["image_id"])}
        if self.label is not None:
            value = row[self.label]
            item["label"] = value.item() if hasattr(value, "item") else value
        item.update(group_values(row, self.group_columns))
        return item


class _EpochIndexed(Dataset):
    """``dataset`` (anything with ``set_epoch``) addressed by position ``epoch * len(dataset) + index``; items are
    augmented as (seed, epoch, index) say and carry their ``"position"``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> dict:
        epoch, index = divmod(int(position), len(self.dataset))
        self.dataset.set_epoch(epoch)
        return {**self.dataset[index], "position": int(position)}


def run_batches(dataset, epoch_order: Callable[[int], np.ndarray], epoch: int, batch_in_epoch: int,
                batch_size: int, workers: int, seed: int) -> Iterator[tuple[dict, int, int]]:
    """Yield (batch, epoch, batches done in that epoch) forever from a saved position, through one DataLoader (and
    its worker processes) for the whole run instead of one per epoch: with a few images an epoch is a step or two.
    ``epoch_order(e)``: the indices of ``dataset`` read in epoch ``e``, whole batches only, so that no batch
    straddles two epochs. Each batch also holds the ``"index"`` of its items. The loader's generator is seeded, so
    torch's global RNG is left as it was (an exact resume depends on it)."""
    count = len(dataset)

    def positions():
        start = batch_in_epoch * batch_size
        for run_epoch in itertools.count(epoch):
            yield from (run_epoch * count + epoch_order(run_epoch)[start:]).tolist()
            start = 0

    loader = DataLoader(_EpochIndexed(dataset), batch_size=batch_size, sampler=positions(), num_workers=workers,
                        drop_last=True, generator=torch.Generator().manual_seed(seed))
    done = (epoch, batch_in_epoch)
    for batch in loader:
        position = batch.pop("position")
        batch_epoch, batch["index"] = int(position[0]) // count, position % count
        done = (batch_epoch, done[1] + 1 if batch_epoch == done[0] else 1)
        yield batch, *done


def apply_seeded(transform, image, seed: int | None, *keys: int):
    """``transform(image)`` with torch's RNG seeded from (seed, *keys) and then restored, so an item's
    augmentation depends on what it is, not on which worker or in which order it was loaded."""
    if transform is None:
        return image
    if seed is None:
        return transform(image)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0]))
        return transform(image)


def group_values(row, columns: Sequence[str]) -> dict:
    """Group columns of one row for a batch; batches cannot hold None, so unknown is NaN (age) or "unknown"."""
    values = {}
    for column in columns:
        if column in row:
            value = row[column]
            values[column] = (float("nan") if column == "age" else "unknown") if pd.isna(value) else value
    return values
