"""Case retrieval: the indexed images most similar to a query image, by cosine similarity of embeddings (FAISS).

Vectors are L2-normalised before they are indexed or searched, so FAISS's inner product *is* the cosine
similarity. Index kinds:

- ``exact``: ``IndexFlatIP``, a full scan; the reference the approximate kinds are measured against.
- ``ivf``: ``IndexIVFFlat``: k-means splits the vectors into ``nlist`` lists (default ``4 * sqrt(N)``, but at
  most N / 39 so that every centroid has the 39 training vectors FAISS asks for); a query scans ``nprobe`` lists.
- ``hnsw``: ``IndexHNSWFlat`` with the inner-product metric: a graph with ``hnsw_m`` links per vector; a query
  keeps ``ef_search`` candidates (raised to the number of neighbours asked for when that is larger).
- ``auto``: ``exact`` below 100,000 vectors, where a full scan is fast enough on a CPU; ``hnsw`` above (no
  training step, high recall).

An index is a folder: ``index.faiss`` (row i of the FAISS index is row i of the items), ``items.parquet``
(image_id, patient_id, split, group and label columns; never paths, source names or free text) and
``index.json`` (kind, dim, count, the embeddings' model, weights hash and preprocessing, the build options, and
the hashes of the other two files, so that loading refuses files that do not belong together).

Evaluation (:func:`evaluate_retrieval`): each query with a known label ranks the indexed items that have a
label; a neighbour is relevant when its label equals the query's. Precision@1/3/5 count the relevant items in
the first 1, 3, 5 places. mAP@10 is the mean over queries of AP@10 = sum_{i<=10} P@i * rel_i / min(R, 10), where
R is the number of relevant items the query could retrieve (ml_metrics' ``apk``: a perfect ranking scores 1 even
when R < 10). The label prior, R / (items the query could retrieve), is the precision a random ranking gets on
average: the gain over it is what the embeddings bring.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from retfm import __version__
from retfm.adapt.config import EmbedConfig
from retfm.adapt.embed import embed
from retfm.adapt.embeddings import read_embeddings
from retfm.config import load_config
from retfm.data.config import IngestConfig
from retfm.data.ingest import REPORT_FILENAME, ingest
from retfm.data.manifest import CONVENTIONAL_COLUMNS, GROUP_COLUMNS
from retfm.errors import RetfmError
from retfm.hashing import file_sha256
from retfm.models.identity import IDENTITY_KEYS, weights_sha256
from retfm.pretrain.clip import ImageTower, is_clip_run, load_clip
from retfm.retrieval.config import IndexConfig

INDEX_FILENAME = "index.faiss"
ITEMS_FILENAME = "items.parquet"
META_FILENAME = "index.json"
FORMAT = "retfm-retrieval-index/1"
AUTO_EXACT_BELOW = 100_000
MIN_VECTORS_PER_LIST = 39  # FAISS's k-means warns when a centroid has fewer training vectors
PRECISION_AT = (1, 3, 5)
MAP_DEPTH = 10
QUERY_BATCH = 4096  # queries searched together: bounds the memory of deep re-fetches


def item_columns(table: pd.DataFrame) -> list[str]:
    """The columns an index keeps per image: ids, split, groups and labels; never paths, source names or text."""
    kept = [c for c in ("image_id", "patient_id", "split", *GROUP_COLUMNS) if c in table]
    labels = [c for c in table.columns if c not in CONVENTIONAL_COLUMNS and not c.startswith("source")]
    return kept + labels


def default_nlist(count: int) -> int:
    return max(1, min(round(4 * math.sqrt(count)), count // MIN_VECTORS_PER_LIST))


def unit_rows(vectors: np.ndarray, where: str) -> np.ndarray:
    """Rows scaled to length 1 (float32, C order); zero or non-finite rows are refused, naming the first ones."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise RetfmError(f"{where}: expected a non-empty N x D array of vectors, got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1)
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        raise RetfmError(f"{where}: {int(bad.sum())} vector(s) are zero or not finite (rows "
                         f"{np.flatnonzero(bad)[:5].tolist()}); they have no direction to compare")
    return np.ascontiguousarray(vectors / norms[:, None])


@dataclass
class RetrievalIndex:
    """A FAISS index over unit vectors, the items its rows stand for, and ``meta`` (what ``index.json`` holds)."""

    index: faiss.Index
    items: pd.DataFrame
    meta: dict
    where: str = "in-memory index"  # the folder it was loaded from or saved to, for messages

    # ---- building, saving, loading --------------------------------------------------------------------------------

    @classmethod
    def build(cls, vectors: np.ndarray, items: pd.DataFrame, config: IndexConfig | None = None,
              identity: dict | None = None, where: str = "vectors") -> RetrievalIndex:
        """Index ``vectors`` (row i describes ``items`` row i); ``identity``: the embeddings' model metadata."""
        config = config or IndexConfig()
        vectors = unit_rows(vectors, where)
        if len(items) != len(vectors):
            raise RetfmError(f"{where}: {len(vectors)} vectors but {len(items)} items")
        if "image_id" not in items or items["image_id"].duplicated().any():
            raise RetfmError(f"{where}: items need a unique image_id per row")
        count, dim = vectors.shape
        kind = config.kind if config.kind != "auto" else ("exact" if count < AUTO_EXACT_BELOW else "hnsw")
        if kind == "exact":
            index, options = faiss.IndexFlatIP(dim), {}
        elif kind == "ivf":
            nlist = config.nlist or default_nlist(count)
            if nlist > count:
                raise RetfmError(f"{where}: nlist {nlist} is more than the {count} vectors to index")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            options = {"nlist": nlist, "nprobe": min(config.nprobe, nlist)}
        else:
            index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = config.ef_construction
            options = {"hnsw_m": config.hnsw_m, "ef_construction": config.ef_construction,
                       "ef_search": config.ef_search}
        index.add(vectors)
        meta = {"format": FORMAT, "kind": kind, "dim": dim, "count": count,
                "similarity": "cosine (inner product of L2-normalised vectors)", **(identity or {}),
                "build": {"kind": config.kind, "split": config.split, **options}, "retfm_version": __version__}
        return cls(index, items.reset_index(drop=True), meta, where)

    def save(self, folder: Path) -> RetrievalIndex:
        """Write the folder; ``index.json`` goes last, with the others' hashes, so a half-written folder won't load."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / INDEX_FILENAME))
        pq.write_table(pa.Table.from_pandas(self.items, preserve_index=False), folder / ITEMS_FILENAME)
        self.meta = {**self.meta, "files": {name: file_sha256(folder / name)
                                            for name in (INDEX_FILENAME, ITEMS_FILENAME)}}
        (folder / META_FILENAME).write_text(json.dumps(self.meta, indent=2) + "\n")
        self.where = str(folder)
        return self

    @classmethod
    def load(cls, folder: Path) -> RetrievalIndex:
        folder = Path(folder)
        meta_path = folder / META_FILENAME
        if not meta_path.is_file():
            raise RetfmError(f"{folder}: not a retrieval index (no {META_FILENAME}); "
                             "build one with `retfm index build`")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RetfmError(f"{meta_path}: not JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("files"), dict):
            raise RetfmError(f"{meta_path}: not a retfm retrieval index description (format {FORMAT})")
        for name in (INDEX_FILENAME, ITEMS_FILENAME):
            path = folder / name
            if not path.is_file():
                raise RetfmError(f"{path}: missing; the index folder is incomplete")
            if file_sha256(path) != meta["files"].get(name):
                raise RetfmError(f"{path}: does not belong with {META_FILENAME} (its hash differs); rebuild the index")
        try:
            index = faiss.read_index(str(folder / INDEX_FILENAME))
            items = pq.read_table(folder / ITEMS_FILENAME).to_pandas()
        except (RuntimeError, OSError, pa.ArrowException) as exc:  # FAISS reports a damaged file as RuntimeError
            raise RetfmError(f"{folder}: cannot read the index ({str(exc).splitlines()[0]})") from None
        if not (index.ntotal == len(items) == meta.get("count") and index.d == meta.get("dim")):
            raise RetfmError(f"{folder}: {INDEX_FILENAME} holds {index.ntotal} vectors of size {index.d}, "
                             f"{ITEMS_FILENAME} {len(items)} rows, {META_FILENAME} says {meta.get('count')} of size "
                             f"{meta.get('dim')}")
        return cls(index, items, meta, str(folder))

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    def stored_vectors(self) -> np.ndarray:
        """The indexed unit vectors, N x D (for leave-one-out queries)."""
        if self.kind == "ivf":
            self.index.make_direct_map()  # IVF lists are not addressable by row until asked
        return self.index.reconstruct_n(0, self.index.ntotal)

    # ---- searching ------------------------------------------------------------------------------------------------

    def search(self, vectors: np.ndarray, k: int = 5, *, query_ids: Sequence | None = None,
               query_patients: Sequence | None = None, candidates: np.ndarray | None = None) -> pd.DataFrame:
        """The ``k`` most similar items per query, best first.

        Columns: ``query`` (row of ``vectors``), ``rank`` (1..k), ``image_id``, ``similarity`` (cosine), then the
        item's other columns. Skipped: items whose image_id is the query's (``query_ids``: leave-one-out), items
        of the query's patient (``query_patients``; an unknown patient matches nobody), and items where
        ``candidates`` (a boolean mask over the items) is False. A query gets fewer than k rows only when fewer
        items are left to it, or when an approximate index finds no more (``ivf``: in the lists it scans)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise RetfmError(f"query vectors have shape {vectors.shape}, but {self.where} holds vectors of size "
                             f"{self.dim}; embed the queries with the index's model")
        if k < 1:
            raise RetfmError(f"k must be at least 1, got {k}")
        queries = unit_rows(vectors, "query vectors")
        ids = _keys(query_ids, len(queries), "query_ids")
        patients = _keys(query_patients, len(queries), "query_patients") if "patient_id" in self.items else None
        allowed = None if candidates is None else np.flatnonzero(np.asarray(candidates, dtype=bool))
        found = []
        for start in range(0, len(queries), QUERY_BATCH):
            batch = slice(start, start + QUERY_BATCH)
            found += self._nearest(queries[batch], k, None if ids is None else ids[batch],
                                   None if patients is None else patients[batch], allowed)

        positions = np.concatenate([position for position, _ in found])
        counts = [len(position) for position, _ in found]
        hits = pd.DataFrame({"query": np.repeat(np.arange(len(queries)), counts),
                             "rank": np.concatenate([np.arange(1, n + 1) for n in counts]),
                             "image_id": self.items["image_id"].to_numpy()[positions],
                             "similarity": np.concatenate([similarity for _, similarity in found]).astype(np.float64)})
        rest = self.items.drop(columns=["image_id"]).iloc[positions].reset_index(drop=True)
        return pd.concat([hits, rest], axis=1)

    def _nearest(self, queries: np.ndarray, k: int, ids: np.ndarray | None, patients: np.ndarray | None,
                 allowed: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query (item positions, similarities), at most k. FAISS itself keeps to the ``allowed`` items; the
        query's own image and patient are dropped here, so more neighbours are fetched than k, and fetched again,
        deeper, for the queries that lost too many."""
        available = len(self) if allowed is None else len(allowed)
        selector = None if allowed is None else faiss.IDSelectorBatch(allowed.astype(np.int64))
        found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        pending = np.arange(len(queries))
        fetch = min(available, k if ids is None and patients is None else 2 * k + 1)
        while len(pending):
            similarity, position = self._search(queries[pending], max(fetch, 1), selector)
            safe = np.maximum(position, 0)
            skip = position < 0
            if ids is not None:
                skip |= self._item_ids[safe] == ids[pending, None]
            if patients is not None:
                skip |= (self._item_patients[safe] == patients[pending, None]) & (patients[pending, None] != "")
            # FAISS pads with -1 when it has nothing more to give (all items seen, or ivf's lists exhausted)
            done = ((~skip).sum(axis=1) >= k) | (fetch >= available) | (position < 0).any(axis=1)
            for row in np.flatnonzero(done):
                keep = ~skip[row]
                found[int(pending[row])] = position[row][keep][:k].astype(np.int64), similarity[row][keep][:k]
            pending = pending[~done]
            fetch = min(available, 2 * fetch)
        return [found[q] for q in range(len(queries))]

    @cached_property
    def _item_ids(self) -> np.ndarray:
        return _keys(self.items["image_id"], len(self), "image_id")

    @cached_property
    def _item_patients(self) -> np.ndarray:
        return _keys(self.items["patient_id"], len(self), "patient_id")

    def _search(self, queries: np.ndarray, k: int, selector) -> tuple[np.ndarray, np.ndarray]:
        # Search parameters replace the index's own, so nprobe and efSearch are passed again. HNSW returns at
        # most efSearch results: it is widened when more are asked for.
        build = self.meta["build"]
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(build["ef_search"], k), sel=selector)
        elif self.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=build["nprobe"], sel=selector)
        else:
            params = faiss.SearchParameters(sel=selector)
        return self.index.search(queries, k, params=params)


def _keys(values: Sequence | None, n: int, name: str) -> np.ndarray | None:
    """Ids as a string array for comparisons; unknown values become "" (which matches no known id)."""
    if values is None:
        return None
    keys = pd.Series(list(values), dtype="string").fillna("").to_numpy(dtype=str)
    if len(keys) != n:
        raise RetfmError(f"{name}: {len(keys)} values for {n} rows")
    return keys


# ---- from files -------------------------------------------------------------------------------------------------

def build_index(embeddings: Path, out: Path, config: IndexConfig | None = None) -> RetrievalIndex:
    """Index an embeddings file (or one split of it) into the folder ``out``."""
    config = config or IndexConfig()
    table, vectors, metadata = read_embeddings(embeddings)
    table, vectors = _split_rows(table, vectors, config.split, embeddings)
    embed_config = json.loads(metadata.get("retfm.config", "{}"))
    identity = {"model": metadata.get("retfm.model"), "weights_sha256": metadata.get("retfm.weights_sha256"),
                "preprocessing": json.loads(metadata["retfm.preprocessing"]) if "retfm.preprocessing" in metadata
                else None,
                # the model and weights as they were named to `retfm embed`: how --image and --data queries embed
                "embed_model": embed_config.get("model"), "embed_weights": embed_config.get("weights"),
                "embeddings_sha256": file_sha256(embeddings), "label_columns": [
                    c for c in item_columns(table) if c not in CONVENTIONAL_COLUMNS]}
    index = RetrievalIndex.build(vectors, table[item_columns(table)], config, identity, where=str(embeddings))
    return index.save(out)


def read_queries(index: RetrievalIndex, embeddings: Path, split: str | None = None
                 ) -> tuple[pd.DataFrame, np.ndarray]:
    """Query (table, vectors) from an embeddings file made with the index's model (or one split of it)."""
    table, vectors, metadata = read_embeddings(embeddings)
    check_same_model(index, metadata, str(embeddings))
    return _split_rows(table, vectors, split, embeddings)


def _split_rows(table: pd.DataFrame, vectors: np.ndarray, split: str | None,
                where: Path) -> tuple[pd.DataFrame, np.ndarray]:
    if split is None:
        return table, vectors
    if "split" not in table:
        raise RetfmError(f"{where}: no split column, so split {split} cannot choose rows")
    rows = (table["split"] == split).to_numpy()
    if not rows.any():
        raise RetfmError(f"{where}: no rows with split={split}")
    return table[rows].reset_index(drop=True), vectors[rows]


def check_same_model(index: RetrievalIndex, metadata: dict[str, str], where: str) -> None:
    """Refuse query embeddings (their ``retfm.*`` metadata) made by another model, weights or preprocessing."""
    for key in IDENTITY_KEYS:
        name = key.removeprefix("retfm.")
        expected, got = index.meta.get(name), metadata.get(key)
        if name == "preprocessing" and got is not None:
            got = json.loads(got)
        if got != expected:
            shown = (lambda v: f"{v[:12]}..." if isinstance(v, str) and len(v) > 16 else v)
            raise RetfmError(f"{where}: {name} differs from the index's ({index.where}: {shown(expected)}; here: "
                             f"{shown(got)}); queries must be embedded with the index's model and weights")


def embed_queries(index: RetrievalIndex, *, image: Path | None = None, data: Path | None = None,
                  split: str | None = None, model: str | None = None, weights: str | None = None,
                  device: str | None = None, workers: int | None = None,
                  progress: Callable[[int], None] | None = None,
                  total: Callable[[int], None] | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Embed query images with the index's own model and weights (``model``/``weights`` only say where they are
    now, if they moved): ``image``, one photograph, ingested into a temporary folder as indexed images were (field
    of view crop, resize), or ``data``, an ingest folder or manifest. Other weights are refused before any image
    is embedded. Returns (table, vectors) as :func:`read_embeddings` does."""
    model = model or index.meta.get("embed_model") or index.meta.get("model")
    weights = weights if weights is not None else index.meta.get("embed_weights")
    if not model:
        raise RetfmError(f"{index.where}: the index does not name the model its embeddings came from")
    if weights == "random":
        raise RetfmError(f"{index.where}: built from randomly initialised weights, which cannot be made again; "
                         "pass --weights with the file of those weights")
    options = {"model": model, "weights": weights, "device": device, "workers": workers, "split": split}
    config = load_config(EmbedConfig, None, options)
    with tempfile.TemporaryDirectory(prefix="retfm-query-") as work:
        work = Path(work)
        source = _ingest_one(image, work) if image is not None else data
        out = work / "queries.parquet"
        embed(source, out, config, progress, total,
              check_identity=lambda metadata: check_same_model(index, metadata, weights or model))
        table, vectors, _ = read_embeddings(out)
    return table, vectors


def embed_text(index: RetrievalIndex, text: str, model: str | None = None) -> np.ndarray:
    """A text query as a 1 x D vector, with the text tower of the image-text model whose image vectors the index
    holds (``model`` only says where that run folder is now, if it moved)."""
    model = model or index.meta.get("embed_model")
    if not model or not is_clip_run(model):
        raise RetfmError(f"{index.where}: --text needs an index of image-text embeddings (`retfm zeroshot` writes "
                         f"them to image_embeddings.parquet); this one holds {index.meta.get('model')!r} features")
    clip, _ = load_clip(model)
    if weights_sha256(ImageTower(clip)) != index.meta.get("weights_sha256"):
        raise RetfmError(f"{model}: not the image-text model the index was built with (weights differ)")
    with torch.inference_mode():
        return clip.encode_text(clip.tokenizer()([text])).numpy()


def _ingest_one(image: Path, work: Path) -> Path:
    if not image.is_file():
        raise RetfmError(f"{image}: no such image file")
    folder = work / "photo"
    folder.mkdir()
    # Copied under a neutral name: the original file name reaches no file that ingest writes.
    shutil.copyfile(image, folder / f"query{image.suffix.lower()}")
    out = work / "ingested"
    try:
        ingest(folder, out, IngestConfig(format="imagefolder", workers=1))
    except RetfmError:
        report = out / REPORT_FILENAME
        rejected = json.loads(report.read_text()).get("rejected_files", []) if report.is_file() else []
        reasons = "; ".join(r["reason"] + (f" ({r['detail']})" if r.get("detail") else "") for r in rejected)
        raise RetfmError(f"{image}: cannot be used as a query ({reasons or 'rejected by ingest'})") from None
    return out


# ---- evaluation -------------------------------------------------------------------------------------------------

def evaluate_retrieval(index: RetrievalIndex, label: str, queries: tuple[pd.DataFrame, np.ndarray] | None = None,
                       *, exclude_same_patient: bool = True, map_depth: int = MAP_DEPTH) -> dict:
    """Precision@1/3/5, mAP@``map_depth`` and the label prior, overall and per label value (module docstring).

    ``queries``: (table, vectors), e.g. the test split of an embeddings file against a train-split index;
    default: every labelled indexed item, leave-one-out. The query's own image_id is always skipped (an image
    found as its own neighbour says nothing); with ``exclude_same_patient``, so are its patient's other images
    (the fellow eye or another visit would flatter the numbers)."""
    if label not in index.items:
        labels = index.meta.get("label_columns") or []
        raise RetfmError(f"{index.where}: no label column {label!r} among the indexed items "
                         f"(labels: {', '.join(labels) or 'none'})")
    if map_depth < 1:
        raise RetfmError(f"map_depth must be at least 1, got {map_depth}")
    labelled = index.items[label].notna().to_numpy()
    if queries is None:
        table, vectors, mode = index.items, index.stored_vectors(), "leave-one-out"
    else:
        (table, vectors), mode = queries, "queries"
        if label not in table:
            raise RetfmError(f"queries: no label column {label!r}")
    known = table[label].notna().to_numpy()
    table, vectors = table[known].reset_index(drop=True), np.asarray(vectors)[known]
    if len(table) == 0:
        raise RetfmError(f"{index.where}: no query has a known {label!r}")
    by_patient = exclude_same_patient and "patient_id" in table and "patient_id" in index.items
    depth = max(max(PRECISION_AT), map_depth)
    hits = index.search(vectors, depth, query_ids=table["image_id"],
                        query_patients=table["patient_id"] if by_patient else None, candidates=labelled)

    query_labels = table[label].to_numpy(dtype=object)
    relevant = np.zeros((len(table), depth), dtype=bool)
    rows, places = hits["query"].to_numpy(), hits["rank"].to_numpy() - 1
    relevant[rows, places] = hits[label].to_numpy(dtype=object) == query_labels[rows]
    reachable, candidates = _reachable(index.items[labelled], table, label, by_patient)

    found_by = np.cumsum(relevant, axis=1)
    per_query = {f"precision_at_{k}": found_by[:, k - 1] / k for k in PRECISION_AT}
    ranks = np.arange(1, map_depth + 1)
    precision_where_relevant = (relevant[:, :map_depth] * found_by[:, :map_depth] / ranks).sum(axis=1)
    ideal = np.minimum(reachable, map_depth)
    per_query[f"map_at_{map_depth}"] = np.where(ideal > 0, precision_where_relevant / np.maximum(ideal, 1), np.nan)
    per_query["prior"] = reachable / np.maximum(candidates, 1)

    def summary(rows: np.ndarray) -> dict:
        values = {name: _mean(v[rows]) for name, v in per_query.items()}
        return {"n": int(rows.sum()), **values}

    values = pd.Series(query_labels)
    return {
        "label": label, "mode": mode, "n_queries": int(len(table)), "n_queries_without_label": int((~known).sum()),
        "n_queries_without_relevant_items": int((reachable == 0).sum()), "indexed_with_label": int(labelled.sum()),
        "exclude_same_patient": bool(by_patient), "map_depth": map_depth,
        "index": {"kind": index.kind, "count": len(index), "model": index.meta.get("model")},
        "overall": summary(np.ones(len(table), dtype=bool)),
        "per_label": {_label_name(v): summary((values == v).to_numpy()) for v in sorted(values.unique())},
    }


def _reachable(items: pd.DataFrame, queries: pd.DataFrame, label: str,
               by_patient: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per query: the relevant labelled items it may retrieve (R), and all labelled items it may retrieve."""
    with_label = Counter(items[label])
    own = dict(zip(items["image_id"], zip(items[label], items["patient_id"] if by_patient else [None] * len(items))))
    if by_patient:
        known = items[items["patient_id"].notna()]
        of_patient = Counter(known["patient_id"])
        of_patient_with_label = Counter(zip(known["patient_id"], known[label]))
    relevant, candidates = [], []
    for image_id, value, patient in zip(queries["image_id"], queries[label],
                                        queries["patient_id"] if by_patient else [None] * len(queries)):
        r, n = with_label[value], len(items)
        patient_known = by_patient and not pd.isna(patient)
        if patient_known:
            r, n = r - of_patient_with_label[(patient, value)], n - of_patient[patient]
        if image_id in own:
            own_label, own_patient = own[image_id]
            removed_with_patient = patient_known and not pd.isna(own_patient) and own_patient == patient
            if not removed_with_patient:
                r, n = r - int(own_label == value), n - 1
        relevant.append(r)
        candidates.append(n)
    return np.array(relevant), np.array(candidates)


def _mean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


def _label_name(value) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)
