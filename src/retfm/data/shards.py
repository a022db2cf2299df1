"""WebDataset shards: a Manifest's images packed into tar files that trainers stream without a manifest scan.

``retfm data shard DIR --out SHARDS`` writes ``SHARDS/shard-000000.tar``, ... and ``SHARDS/index.json``. Each
image is two tar members, ``<image_id>.png`` (or ``.jpg``: the stored bytes exactly as ingested, never
re-encoded) and ``<image_id>.json`` (its manifest row, safe columns only: never ``path`` or ``source``, so no
original file name reaches a shard). The index gives each shard's file, sample count and SHA-256, the corpus
size and the columns, so a trainer knows how much data there is without opening a shard.

The same manifest and options give byte-identical shards (fixed member times, owners and order), so shards can
be checked against their index and compared across sites.

:class:`ShardDataset` streams shards from local paths, brace patterns, a folder holding ``index.json`` or any
fsspec URL (``s3://``, ``gs://``, ``memory://``, ...). Shards are split across DDP ranks, then across loader
workers, so each sample is seen exactly once per epoch; training transforms are seeded per (seed, epoch, shard,
position in shard), so augmentations do not depend on the number of ranks or workers.
"""

from __future__ import annotations

import json
import random
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from os import PathLike
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import webdataset
from torch.utils.data import IterableDataset
from webdataset.shardlists import expand_urls, split_by_worker
from webdataset.tariterators import base_plus_ext
from webdataset.utils import pytorch_worker_info

from retfm import __version__
from retfm.data.datasets import apply_seeded, group_values
from retfm.data.deid import column_kind
from retfm.data.io import ImageRejected, open_image
from retfm.data.manifest import GROUP_COLUMNS, MANIFEST_FILENAME, Manifest, ManifestError, image_file
from retfm.errors import RetfmError
from retfm.hashing import file_sha256

INDEX_FILENAME = "index.json"
SHARD_NAME = "shard-{:06d}.tar"
_SHARD_NAME_RE = re.compile(r"shard-\d{6}\.tar")
# Pseudonymous or coarse columns that may travel in shards. ``path`` and ``source`` never do: they can hold
# original file names.
SAFE_COLUMNS = ("image_id", "site", "split", "patient_id", "eye", "modality", "country", "sex", "age", "ethnicity",
                "device", "quality")
# Free text may name people or places: it goes into shards only when asked for by name.
OPT_IN_COLUMNS = ("text",)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff")
_MAX_KEY_BYTES = 90  # a ustar member name holds 100 bytes: the key plus ".json"


# ---- writing ----------------------------------------------------------------------------------------------------


def write_shards(data: str | Path, out: str | Path, shard_size: int = 1000, split: str | None = None,
                 columns: Sequence[str] | None = None, shuffle_seed: int | None = None,
                 progress: Callable[[int], None] | None = None, total: Callable[[int], None] | None = None) -> dict:
    """Pack the images of the Manifest in ``data`` into tar shards in ``out``; return the index (also written to
    ``out/index.json``). ``columns``: manifest columns for each image's JSON (default: every safe column and
    label present); ``shuffle_seed``: shuffle images before sharding (None keeps manifest order). Shards and
    index left in ``out`` by an earlier run are replaced."""
    data, out = Path(data), Path(out)
    if shard_size < 1:
        raise RetfmError(f"shard size {shard_size}: must be at least 1")
    manifest_file = data / MANIFEST_FILENAME if data.is_dir() else data
    manifest = Manifest.read(manifest_file)
    if split is not None:
        try:
            manifest = manifest.split(split)
        except ManifestError as exc:
            raise RetfmError(f"{manifest_file}: {exc}") from None
    table = manifest.table
    if table.empty:
        raise RetfmError(f"{manifest_file}: no images{f' in split {split!r}' if split else ''} to shard")
    chosen = _shard_columns(manifest, columns, manifest_file)
    _check_keys(table["image_id"], manifest_file)
    labels = [c for c in chosen if c in manifest.label_columns]
    order = (np.arange(len(table)) if shuffle_seed is None
             else np.random.default_rng(shuffle_seed).permutation(len(table)))
    if total:
        total(len(table))

    out.mkdir(parents=True, exist_ok=True)
    # A folder with an index is complete: drop the old index first, so a crash mid-way never leaves new shards
    # described by an old index.
    (out / INDEX_FILENAME).unlink(missing_ok=True)
    shards = []
    for number, start in enumerate(range(0, len(order), shard_size)):
        rows = table.iloc[order[start:start + shard_size]]
        name = SHARD_NAME.format(number)
        _write_shard(out / name, rows, chosen, manifest, progress)
        shards.append({"file": name, "count": len(rows), "sha256": file_sha256(out / name),
                       "labelled": {c: int(rows[c].notna().sum()) for c in labels}})
    written = {s["file"] for s in shards}
    for stale in out.iterdir():  # shards of an earlier, longer run would otherwise match a brace pattern or glob
        if _SHARD_NAME_RE.fullmatch(stale.name) and stale.name not in written:
            stale.unlink()
    deidentified = manifest.metadata.get("retfm.deidentified")
    index = {"shards": shards, "total": len(table), "columns": chosen, "split": split, "shuffle_seed": shuffle_seed,
             "deidentified": None if deidentified is None else deidentified == "true",
             "source_manifest_sha256": file_sha256(manifest_file), "retfm_version": __version__}
    tmp = out / (INDEX_FILENAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    tmp.replace(out / INDEX_FILENAME)
    return index


def _shard_columns(manifest: Manifest, requested: Sequence[str] | None, where: Path) -> list[str]:
    present = list(manifest.table.columns)
    # Label columns whose names mark them as identifying (dates, names, record numbers) stay out, as in deid.
    labels = [c for c in manifest.label_columns if column_kind(c) is None]
    if requested is None:
        return [c for c in SAFE_COLUMNS if c in present] + labels
    allowed = set(SAFE_COLUMNS) | set(OPT_IN_COLUMNS) | set(labels)
    for column in requested:
        if column not in present:
            raise RetfmError(f"{where}: column {column!r} is not in the manifest")
        if column not in allowed:
            raise RetfmError(f"{where}: column {column!r} cannot go into shards (it may identify a patient or "
                             f"name a source file); allowed: {', '.join(c for c in present if c in allowed)}")
    return ["image_id", *dict.fromkeys(c for c in requested if c != "image_id")]


def _check_keys(image_ids: pd.Series, where: Path) -> None:
    # WebDataset groups members by the name up to the first dot; a slash would make folders inside the tar.
    bad = image_ids.map(lambda i: "." in i or "/" in i or "\\" in i or len(i.encode()) > _MAX_KEY_BYTES)
    if bool(bad.any()):
        row = int(bad[bad].index[0])
        raise RetfmError(f"{where}: column image_id, row {row}: {image_ids[row]!r} cannot name a shard member "
                         f"(no '.', '/' or '\\', at most {_MAX_KEY_BYTES} bytes)")


def _write_shard(path: Path, rows: pd.DataFrame, columns: list[str], manifest: Manifest,
                 progress: Callable[[int], None] | None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        # encoder=False: members are written as the bytes given, never re-encoded. A fixed mtime (TarWriter uses
        # the clock otherwise) plus its fixed owner names and modes make the same rows give the same bytes.
        with open(tmp, "wb") as stream, webdataset.TarWriter(stream, encoder=False, mtime=0) as tar:
            for values in rows.to_dict("records"):
                image = image_file(manifest.root, str(values["path"]))
                extension = image.suffix.lower().lstrip(".").replace("jpeg", "jpg")
                if extension not in IMAGE_EXTENSIONS:
                    raise RetfmError(f"{image}: not a stored image type ({', '.join(IMAGE_EXTENSIONS)})")
                try:
                    pixels = image.read_bytes()
                except OSError as exc:
                    raise RetfmError(f"{image}: cannot read image listed in the manifest ({exc.strerror})") from None
                record = {c: _plain(values[c]) for c in columns}
                tar.write({"__key__": str(values["image_id"]), extension: pixels,
                           "json": json.dumps(record, allow_nan=False).encode()})
                if progress:
                    progress(1)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _plain(value):
    """A JSON-ready Python value: numpy and pandas scalars unwrapped, missing values as null."""
    if pd.isna(value):
        return None
    return value.item() if hasattr(value, "item") else value


# ---- reading ----------------------------------------------------------------------------------------------------


class ShardDataset(IterableDataset):
    """Streams shards; yields ``{"image": ..., "image_id": str, "label": ..., <group columns>: ...}`` like
    :class:`~retfm.data.datasets.ManifestDataset`.

    ``urls``: a folder (local or fsspec URL) holding ``index.json``, a brace pattern
    (``shards/shard-{000000..000009}.tar``), or a list of shard paths/URLs. ``transform``: applied to the PIL
    image, seeded per (seed, epoch, shard, position) unless ``seed`` is None. ``shuffle_buffer``: mix samples
    from this many recent reads (0: shard order only). ``shuffle_shards``: visit shards in an order drawn from
    (seed, epoch); False keeps index order (evaluation). ``label``: yield this column as ``label`` and skip
    samples where it is null. Call :meth:`set_epoch` before each epoch (with ``persistent_workers`` the loader's
    workers keep the epoch they started with).

    Shards are split across DDP ranks (``RANK``/``WORLD_SIZE`` or an initialised ``torch.distributed``), then
    across loader workers; ``len()`` is this rank's sample count for the current epoch, from ``index.json``.
    """

    def __init__(self, urls: str | PathLike | Sequence[str | PathLike], transform=None, seed: int | None = 0,
                 shuffle_buffer: int = 0, label: str | None = None, shuffle_shards: bool = True,
                 group_columns: Sequence[str] = GROUP_COLUMNS):
        self.urls, self.index = _resolve_shards(urls)
        index = self.index
        self.counts: list[int] | None = None
        self.labelled: list[dict] | None = None
        if index is not None:
            by_file = {entry["file"]: entry for entry in index["shards"]}
            entries = [by_file.get(url.rsplit("/", 1)[-1]) for url in self.urls]
            if all(entries):
                self.counts = [int(entry["count"]) for entry in entries]
                self.labelled = [entry.get("labelled", {}) for entry in entries]
            if label is not None and label not in index["columns"]:
                raise RetfmError(f"{self.urls[0]}: label column {label!r} not in the shards "
                                 f"(columns: {', '.join(index['columns'])})")
        self.transform = transform
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.label = label
        self.shuffle_shards = shuffle_shards
        self.group_columns = list(group_columns)
        self.epoch = 0
        self._node: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getstate__(self) -> dict:
        # Loader workers started by spawn/forkserver do not inherit an initialised torch.distributed: take the
        # rank and world size along from the process that owns them (only a distributed view, so a copy made
        # before the process group starts does not pin a single-process one).
        rank, world = pytorch_worker_info()[:2]
        return {**self.__dict__, "_node": self._node or ((rank, world) if world > 1 else None)}

    def _rank_and_world(self) -> tuple[int, int]:
        return self._node or pytorch_worker_info()[:2]

    def _shards_of_this_rank(self) -> list[int]:
        return self._shards_of(*self._rank_and_world())

    def _shards_of(self, rank: int, world: int) -> list[int]:
        if world > len(self.urls):
            raise RetfmError(f"{self.urls[0]}: {len(self.urls)} shard(s) for {world} ranks would leave a rank "
                             f"without data; write more, smaller shards (--shard-size)")
        order = list(range(len(self.urls)))
        if self.shuffle_shards:
            order = np.random.default_rng([self.seed or 0, self.epoch]).permutation(len(self.urls)).tolist()
        # webdataset's split_by_node, but with the rank that __getstate__ carried into loader workers
        return order[rank::world]

    def __len__(self) -> int:
        if self.counts is None:
            raise TypeError(f"{self.urls[0]}: no index.json lists these shards, so their length is unknown")
        if self.label is None:
            return sum(self.counts[i] for i in self._shards_of_this_rank())
        if not all(self.label in labelled for labelled in self.labelled):
            raise TypeError(f"{self.urls[0]}: index.json does not count non-null {self.label!r} values")
        return sum(self.labelled[i][self.label] for i in self._shards_of_this_rank())

    def full_batches(self, batch_size: int, workers: int, world: int) -> int:
        """The fewest whole batches any rank gets this epoch from a DataLoader with ``workers`` workers and
        ``drop_last`` (each worker drops its own remainder): the steps an epoch can take in step on every rank."""
        if self.counts is None or self.label is not None:
            raise RetfmError(f"{self.urls[0]}: batches per rank need {INDEX_FILENAME}'s sample counts")
        readers = max(workers, 1)
        return min(sum(sum(self.counts[i] for i in shards[worker::readers]) // batch_size
                       for worker in range(readers))
                   for shards in (self._shards_of(rank, world) for rank in range(world)))

    def __iter__(self) -> Iterator[dict]:
        shards = list(split_by_worker(iter(self._shards_of_this_rank())))
        samples = self._read(shards)
        if self.shuffle_buffer > 1:
            rank, worker = self._rank_and_world()[0], pytorch_worker_info()[2]
            rng = random.Random(_entropy(self.seed or 0, self.epoch, rank, worker))
            samples = webdataset.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(samples)
        for sample in samples:
            item = self._item(sample)
            if item is not None:
                yield item

    def _read(self, shards: list[int]) -> Iterator[dict]:
        for number in shards:
            expected = self.counts[number] if self.counts is not None else None
            yield from _read_shard(self.urls[number], number, expected)

    def _item(self, sample: dict) -> dict | None:
        url, key, files = sample["url"], sample["key"], sample["files"]
        if "json" not in files:
            raise RetfmError(f"{url}: sample {key} has no member {key}.json")
        try:
            meta = json.loads(files["json"])
        except ValueError as exc:
            raise RetfmError(f"{url}: member {key}.json is not valid JSON ({exc})") from None
        if self.label is not None:
            if self.label not in meta:
                raise RetfmError(f"{url}: member {key}.json has no label column {self.label!r}")
            if meta[self.label] is None:
                return None
        extension = next((e for e in IMAGE_EXTENSIONS if e in files), None)
        if extension is None:
            members = ", ".join(f"{key}.{e}" for e in files)
            raise RetfmError(f"{url}: sample {key} has no image member (members: {members})")
        try:
            with open_image(files[extension]) as opened:
                image = opened.convert("RGB")
        except (ImageRejected, OSError) as exc:
            raise RetfmError(f"{url}: member {key}.{extension} is not a readable image ({exc})") from None
        item = {"image": apply_seeded(self.transform, image, self.seed, self.epoch, sample["shard"],
                                      sample["position"]),
                "image_id": key}
        if self.label is not None:
            item["label"] = meta[self.label]
        item.update(group_values(meta, self.group_columns))
        return item


def _entropy(*values: int) -> int:
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


def _resolve_shards(urls) -> tuple[list[str], dict | None]:
    """Shard URLs in index order, and the index that lists them when there is one."""
    if isinstance(urls, (str, PathLike)):
        url = str(urls)
        if "{" not in url and "::" not in url:
            with _storage_errors(url, "read"):
                fs, path = fsspec.core.url_to_fs(url)
                is_folder = fs.isdir(path)
            if is_folder or url.endswith("/" + INDEX_FILENAME) or url == INDEX_FILENAME:
                folder = url if is_folder else url[:-len(INDEX_FILENAME)]
                folder = folder.rstrip("/") or "."
                index = _read_index(folder)
                if index is None:
                    raise RetfmError(f"{folder}: no {INDEX_FILENAME} (write shards with `retfm data shard`, or "
                                     f"pass a brace pattern such as shard-{{000000..000009}}.tar)")
                return [f"{folder}/{entry['file']}" for entry in index["shards"]], index
        shards = expand_urls(url)
    else:
        shards = [str(u) for u in urls]
    if not shards:
        raise RetfmError("no shards given")
    folder = shards[0].rsplit("/", 1)[0] if "/" in shards[0] else "."
    return shards, _read_index(folder)


def _read_index(folder: str) -> dict | None:
    url = f"{folder}/{INDEX_FILENAME}"
    try:
        with _open(url, "shard index") as handle:
            index = json.load(handle)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise RetfmError(f"{url}: not a JSON shard index ({exc})") from None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list) or "columns" not in index:
        raise RetfmError(f"{url}: not a retfm shard index (expected 'shards' and 'columns')")
    for entry in index["shards"]:
        name = str(entry.get("file", ""))
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise RetfmError(f"{url}: shard file {name!r} must be a plain file name in the index's folder")
    return index


@contextmanager
def _storage_errors(url: str, action: str):
    """Storage failures other than a missing file become one line naming the URL."""
    try:
        yield
    except FileNotFoundError:
        raise
    except ImportError as exc:  # e.g. s3:// without s3fs installed; fsspec's message names the package
        raise RetfmError(f"{url}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise RetfmError(f"{url}: cannot {action} ({exc})") from None


def _open(url: str, what: str):
    """Open a local path or fsspec URL for reading."""
    with _storage_errors(url, f"open {what}"):
        return fsspec.open(url, "rb").open()


def _read_shard(url: str, number: int, expected: int | None) -> Iterator[dict]:
    """Samples of one shard in tar order: ``{"key", "files": {extension: bytes}, "url", "shard", "position"}``.
    Members are grouped by key like WebDataset does; the file is streamed, never held whole."""
    try:
        handle = _open(url, "shard")
    except FileNotFoundError:
        raise RetfmError(f"{url}: shard not found") from None
    sample, count, last, reading = None, 0, None, None
    try:
        with handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                reading = member.name
                data = tar.extractfile(member).read()
                tar.members = []  # a streamed tar keeps every header it has read: memory would grow with the shard
                last, reading = member.name, None
                key, extension = base_plus_ext(member.name)
                if key is None:
                    continue
                if sample is not None and sample["key"] != key:
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"key": key, "files": {}, "url": url, "shard": number, "position": count}
                    count += 1
                sample["files"][extension.lower()] = data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        where = f"at member {reading}" if reading else f"after member {last}" if last else "at its start"
        raise RetfmError(f"{url}: unreadable shard {where} ({exc})") from None
    # Checked before the last sample goes out: a shard cut between members reads as a short, valid tar, and its
    # last sample may be missing its image.
    if expected is not None and count != expected:
        raise RetfmError(f"{url}: {count} sample(s), but {INDEX_FILENAME} lists {expected}; the shard is truncated "
                         f"or was replaced")
    if sample is not None:
        yield sample
