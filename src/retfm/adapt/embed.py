"""``retfm embed``: a Manifest's images -> one embedding per image, with the model's own preprocessing.

Decoding runs in DataLoader worker processes (JPEG draft mode: a 2000 px photograph is decoded at a quarter
scale when the model wants 392 px) while the model computes, in batches, under ``torch.inference_mode``.
Embeddings are written in parts of a few thousand rows as they come (``EMB.parquet.parts/``), so an interrupted
run resumes where it stopped; the finished file joins them with the manifest columns downstream steps need.

The forward pass runs on an inference engine (``retfm.models.engine``): under ``--engine auto`` the fastest of
PyTorch, ONNX Runtime and OpenVINO whose features match PyTorch eager fp32 on the manifest's first images.

Output (the Embeddings contract, docs/adapt.md): Parquet with ``image_id``, ``embedding`` (fixed-size list of
float32) and the manifest's split, site, patient, group and label columns; schema metadata ``retfm.model``,
``retfm.weights_sha256`` (of the loaded tensors, whatever file they came from), ``retfm.preprocessing``,
``retfm.embed_dim``, ``retfm.config``, ``retfm.manifest_sha256``, ``retfm.version``, ``retfm.engine`` (the engine,
precision and measured fidelity of the run that computed the last vectors).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from retfm import __version__
from retfm.adapt.config import EmbedConfig
from retfm.adapt.embeddings import vector_column
from retfm.data.datasets import ManifestDataset, eval_transform
from retfm.data.manifest import IMAGE_INFO_COLUMNS, MANIFEST_FILENAME, Manifest
from retfm.errors import RetfmError
from retfm.hashing import file_sha256
from retfm.models import ModelSpec, create, preprocessing, spec as model_spec
from retfm.models.engine import CALIBRATION_IMAGES, QUANTIZATION_IMAGES, Engine, check, select
from retfm.models.identity import IDENTITY_KEYS, embedding_identity
from retfm.models.inference import manifest_outputs
from retfm.pretrain.clip import ImageTower, is_clip_run, load_clip
from retfm.runs import checked_device

PART_ROWS = 4096  # rows per part file: a resumed run loses at most this much work


def embed(data: Path, out: Path, config: EmbedConfig, progress: Callable[[int], None] | None = None,
          total: Callable[[int], None] | None = None,
          check_identity: Callable[[dict[str, str]], None] | None = None) -> dict:
    """Embed every image of the manifest in ``data`` (or one split) into ``out``; returns a summary dict.
    ``check_identity(metadata)`` may refuse the loaded model (by raising) before any image is embedded."""
    full = Manifest.read(data)
    manifest = full.split(config.split) if config.split else full
    device = checked_device(config.device)
    check(config.engine, config.precision, config.device)  # an impossible pair fails before any loading
    spec, model = _encoder(config)
    model = model.eval().to(device)
    pre = preprocessing(spec)
    metadata = {
        **embedding_identity(spec, model),
        "retfm.embed_dim": str(spec.embed_dim),
        "retfm.config": config.model_dump_json(),
        "retfm.manifest_sha256": file_sha256(data / MANIFEST_FILENAME if Path(data).is_dir() else data),
        "retfm.version": __version__,
    }
    if check_identity:
        check_identity(metadata)
    parts = out.with_name(out.name + ".parts")
    done = _finished_ids(out, parts, metadata)
    todo = manifest.table[~manifest.table["image_id"].isin(done)].reset_index(drop=True)
    if total:
        total(len(manifest.table))
    if progress and done:
        progress(len(manifest.table) - len(todo))
    engine = None
    if len(todo):
        batch_size = config.batch_size or (64 if device.type == "cuda" else 4)
        engine = _engine(model, config, manifest, pre, metadata, len(todo), batch_size)
        metadata["retfm.engine"] = json.dumps(engine.describe())
        batches = manifest_outputs(engine, Manifest(todo, manifest.root), eval_transform(pre), batch_size,
                                   config.workers, pre.size, pin_memory=device.type == "cuda")
        _write_parts(batches, parts, progress)
    elif out.exists():  # nothing computed now: the engine that computed the vectors stays on record
        earlier = (pq.read_schema(out).metadata or {}).get(b"retfm.engine")
        if earlier:
            metadata["retfm.engine"] = earlier.decode()
    table = _finish(out, parts, full, metadata)
    return {"images": len(table), "embedded_now": len(todo), "resumed": len(done), "embed_dim": spec.embed_dim,
            "out": str(out), "engine": engine.summary() if engine else None}


def _encoder(config: EmbedConfig) -> tuple[ModelSpec, torch.nn.Module]:
    """The model's spec and its image encoder: a registry backbone's pooled features, or an image-text model's
    image tower (vectors in the space its texts share)."""
    if is_clip_run(config.model):
        clip, card = load_clip(config.model)
        folder = Path(config.model) if Path(config.model).is_dir() else Path(config.model).parent
        spec = dataclasses.replace(model_spec(folder / card["image_tower"]), embed_dim=clip.embed_dim)
        return spec, ImageTower(clip)
    if config.weights == "random":
        torch.manual_seed(0)  # a random-weights baseline is the same network every time, so it can be resumed
    spec = model_spec(config.model)
    size = config.image_size or spec.input_size
    return dataclasses.replace(spec, input_size=size), create(config.model, weights=config.weights, img_size=size)


def _engine(model: torch.nn.Module, config: EmbedConfig, manifest: Manifest, pre, metadata: dict[str, str],
            images: int, batch_size: int) -> Engine:
    """The engine for this run, measured on the manifest's first images (the same ones on every run, so a resumed
    run chooses as the first did); int8 is calibrated on the images after those."""
    rows = manifest.table
    checked = _decoded(manifest, rows.iloc[:CALIBRATION_IMAGES], pre)
    quantization = None
    if config.precision == "int8":
        held_out = rows.iloc[CALIBRATION_IMAGES:CALIBRATION_IMAGES + QUANTIZATION_IMAGES]
        quantization = _decoded(manifest, held_out if len(held_out) >= CALIBRATION_IMAGES else
                                rows.iloc[:QUANTIZATION_IMAGES], pre)
    identity = json.dumps({k: metadata[k] for k in IDENTITY_KEYS})
    engine = select(model, checked, identity, config.engine, config.precision, batch_size, quantization,
                    config.device, workload=images)
    if engine.precision == "int8":
        engine.fidelity["quantization_images"] = len(quantization)
    return engine


def _decoded(manifest: Manifest, rows: pd.DataFrame, pre) -> torch.Tensor:
    dataset = ManifestDataset(Manifest(rows.reset_index(drop=True), manifest.root), eval_transform(pre),
                              group_columns=(), decode_size=pre.size)
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


# ---- parts written as they come --------------------------------------------------------------------------------------

def _write_parts(batches, parts: Path, progress) -> None:
    """Write the (image ids, vectors) batches into part files of :data:`PART_ROWS` rows as they come."""
    parts.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    part_index = len(list(parts.glob("part-*.parquet")))
    for batch_ids, features in batches:
        ids += batch_ids
        vectors.append(features)
        if progress:
            progress(len(features))
        if len(ids) >= PART_ROWS:
            _write_part(parts / f"part-{part_index:05d}.parquet", ids, np.concatenate(vectors))
            ids, vectors, part_index = [], [], part_index + 1
    if ids:
        _write_part(parts / f"part-{part_index:05d}.parquet", ids, np.concatenate(vectors))


def _write_part(path: Path, ids: list[str], vectors: np.ndarray) -> None:
    partial = path.with_suffix(".tmp")
    pq.write_table(pa.table({"image_id": pa.array(ids, pa.string()), "embedding": vector_column(vectors)}), partial)
    partial.replace(path)  # a part exists whole or not at all


# ---- resume and finish --------------------------------------------------------------------------------------------

def _finished_ids(out: Path, parts: Path, metadata: dict[str, str]) -> set[str]:
    """Image ids already embedded by the same model, weights and preprocessing (in ``out`` or its parts)."""
    done: set[str] = set()
    if out.exists():
        existing = pq.read_schema(out).metadata or {}
        for key in IDENTITY_KEYS:
            if existing.get(key.encode(), b"").decode() != metadata[key]:
                raise RetfmError(f"{out}: made with a different {key.removeprefix('retfm.')}; "
                                 f"write to a new --out (or delete it)")
        done |= set(pq.read_table(out, columns=["image_id"]).column("image_id").to_pylist())
    if parts.exists():
        identity = parts / "identity.json"
        if identity.exists() and json.loads(identity.read_text()) != {k: metadata[k] for k in IDENTITY_KEYS}:
            raise RetfmError(f"{parts}: unfinished parts from a different model or preprocessing; delete the folder")
        for part in sorted(parts.glob("part-*.parquet")):
            done |= set(pq.read_table(part, columns=["image_id"]).column("image_id").to_pylist())
    parts.mkdir(parents=True, exist_ok=True)
    (parts / "identity.json").write_text(json.dumps({k: metadata[k] for k in IDENTITY_KEYS}))
    return done


def _finish(out: Path, parts: Path, manifest: Manifest, metadata: dict[str, str]) -> pd.DataFrame:
    pieces = [pq.read_table(part) for part in sorted(parts.glob("part-*.parquet"))]
    if out.exists():
        pieces.insert(0, pq.read_table(out, columns=["image_id", "embedding"]))
    vectors_table = pa.concat_tables(pieces) if pieces else None
    if vectors_table is None or len(vectors_table) == 0:
        raise RetfmError(f"{manifest.root}: no images to embed")
    ids = vectors_table.column("image_id").to_pylist()
    first = pd.Index(ids).drop_duplicates(keep="first")
    positions = pd.Index(ids).get_indexer(first)
    vectors_table = vectors_table.take(pa.array(positions))
    carried = [c for c in manifest.table.columns if c != "path" and (c not in IMAGE_INFO_COLUMNS or c == "quality")]
    rows = pd.DataFrame({"image_id": vectors_table.column("image_id").to_pylist()})
    rows = rows.merge(manifest.table[carried], on="image_id", how="left")
    table = pa.Table.from_pandas(rows, preserve_index=False).append_column(
        "embedding", vectors_table.column("embedding").combine_chunks())
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           **{k.encode(): v.encode() for k, v in metadata.items()}})
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".tmp")
    pq.write_table(table, partial)
    partial.replace(out)
    shutil.rmtree(parts, ignore_errors=True)
    return rows
