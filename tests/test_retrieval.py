"""Case retrieval: FAISS indexes against brute force, retrieval metrics by hand, the index folder, the CLI."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from retfm.adapt.config import EmbedConfig
from retfm.adapt.embed import embed
from retfm.adapt.embeddings import read_embeddings
from retfm.cli.main import app
from retfm.data.config import IngestConfig
from retfm.data.ingest import ingest
from retfm.data.phantoms import generate_cohort
from retfm.errors import RetfmError
from retfm.models import create
from retfm.retrieval.config import IndexConfig
from retfm.retrieval.index import RetrievalIndex, evaluate_retrieval

MODEL = "tiny-vit"


def clustered(n: int, dim: int, clusters: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Points around random centres (the same centres for every seed); returns (vectors, cluster of each)."""
    centres = np.random.default_rng(1000).normal(size=(clusters, dim))
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, clusters, n)
    return (centres[cluster] + noise * rng.normal(size=(n, dim))).astype(np.float32), cluster


def items(n: int, **columns) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"img{i:04d}" for i in range(n)], **columns})


def neighbour_sets(hits: pd.DataFrame) -> pd.Series:
    return hits.groupby("query")["image_id"].apply(set)


# ---- search -------------------------------------------------------------------------------------------------------

def test_exact_index_returns_the_brute_force_cosine_neighbours_in_order():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 16)).astype(np.float32) * rng.uniform(0.5, 3, (500, 1)).astype(np.float32)
    queries = rng.normal(size=(20, 16)).astype(np.float32)
    index = RetrievalIndex.build(vectors, items(500), IndexConfig(kind="auto"))
    assert index.kind == "exact"  # auto, below 100,000 vectors
    hits = index.search(queries, k=10)

    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
    expected = np.argsort(-cosine, axis=1)[:, :10]
    assert len(hits) == 20 * 10 and hits["rank"].tolist() == list(range(1, 11)) * 20
    assert hits["image_id"].tolist() == [f"img{i:04d}" for i in expected.ravel()]
    assert np.allclose(hits["similarity"], np.take_along_axis(cosine, expected, axis=1).ravel(), atol=1e-5)


def test_approximate_indexes_recall_the_exact_neighbours():
    """Recall@5 against the exact index on 3,000 clustered vectors: >= 0.95 (ivf) and >= 0.98 (hnsw) with the
    default options; an index starved of its search budget falls below, so the measure can tell."""
    vectors, _ = clustered(3000, 32, clusters=20, noise=1.0, seed=0)
    rng = np.random.default_rng(1)
    queries = vectors[rng.choice(3000, 200)] + rng.normal(size=(200, 32)).astype(np.float32)
    exact = neighbour_sets(RetrievalIndex.build(vectors, items(3000), IndexConfig(kind="exact")).search(queries, 5))

    def recall(config: IndexConfig) -> float:
        found = neighbour_sets(RetrievalIndex.build(vectors, items(3000), config).search(queries, 5))
        return float(np.mean([len(exact[q] & found[q]) / 5 for q in exact.index]))

    assert recall(IndexConfig(kind="ivf")) >= 0.95
    assert recall(IndexConfig(kind="hnsw")) >= 0.98
    assert recall(IndexConfig(kind="ivf", nprobe=1)) < 0.9


def test_search_skips_the_query_itself_and_its_patient_yet_returns_k():
    vectors, _ = clustered(60, 8, clusters=3, noise=0.3, seed=0)
    patients = [f"p{i // 3}" for i in range(60)]  # three images per patient
    table = items(60, patient_id=pd.array(patients, dtype="string"))
    index = RetrievalIndex.build(vectors, table, IndexConfig(kind="hnsw"))
    plain = index.search(vectors[:10], k=5)
    assert (plain.groupby("query")["image_id"].first() == table["image_id"][:10].to_numpy()).all()
    hits = index.search(vectors[:10], k=5, query_ids=table["image_id"][:10], query_patients=patients[:10])
    assert hits.groupby("query").size().tolist() == [5] * 10
    query_patient = np.array(patients)[hits["query"]]
    assert not (hits["patient_id"].to_numpy() == query_patient).any()
    hits = index.search(vectors[:10], k=5, query_ids=table["image_id"][:10])
    assert not (hits["image_id"].to_numpy() == table["image_id"].to_numpy()[hits["query"]]).any()
    assert (hits["patient_id"].to_numpy() == query_patient[: len(hits)]).any()  # its patient's other eye, kept


def test_a_query_of_another_size_is_refused():
    index = RetrievalIndex.build(np.eye(4, dtype=np.float32), items(4))
    with pytest.raises(RetfmError, match="size 4"):
        index.search(np.ones((2, 3), np.float32), k=2)
    with pytest.raises(RetfmError, match="zero or not finite"):
        RetrievalIndex.build(np.zeros((3, 4), np.float32), items(3))


# ---- evaluation ---------------------------------------------------------------------------------------------------

ANGLES = (0, 10, 25, 45, 70, 100)  # degrees on the unit circle: neighbours are ranked by angular distance
LABELS = ("A", "A", "B", "A", "B", "B")


def _circle_index(**columns) -> RetrievalIndex:
    radians = np.deg2rad(ANGLES)
    vectors = np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)
    return RetrievalIndex.build(vectors, items(6, grade=list(LABELS), **columns))


def test_precision_and_map_equal_hand_computed_values():
    """Leave-one-out rankings by angle (relevant = same label), e.g. query 2 (25 deg, B) ranks 10,45,0,70,100 deg
    = A,A,A,B,B: P@1 0, P@3 0, P@5 2/5, AP = (1/4 + 2/5) / 2 = 0.325. Every query has R = 2 of 5 candidates."""
    result = evaluate_retrieval(_circle_index(), "grade")
    ap = {0: (1 + 2 / 3) / 2, 1: (1 + 2 / 3) / 2, 2: (1 / 4 + 2 / 5) / 2, 3: (1 / 3 + 2 / 4) / 2,
          4: (1 / 2 + 2 / 3) / 2, 5: (1 + 2 / 3) / 2}
    overall = result["overall"]
    assert result["mode"] == "leave-one-out" and result["map_depth"] == 10 and overall["n"] == 6
    assert overall["precision_at_1"] == pytest.approx(3 / 6)
    assert overall["precision_at_3"] == pytest.approx(3 / 6)
    assert overall["precision_at_5"] == pytest.approx(2 / 5)
    assert overall["map_at_10"] == pytest.approx(np.mean(list(ap.values())))
    assert overall["prior"] == pytest.approx(2 / 5)
    a, b = result["per_label"]["A"], result["per_label"]["B"]
    assert (a["n"], a["precision_at_1"], a["precision_at_3"]) == (3, pytest.approx(2 / 3), pytest.approx(5 / 9))
    assert a["map_at_10"] == pytest.approx((ap[0] + ap[1] + ap[3]) / 3)
    assert (b["precision_at_1"], b["precision_at_3"]) == (pytest.approx(1 / 3), pytest.approx(4 / 9))
    assert b["map_at_10"] == pytest.approx((ap[2] + ap[4] + ap[5]) / 3)
    # Cut at 3: relevant items past the cut still count in min(R, 3) (query 3 ranks B,B,A: AP@3 = (1/3) / 2).
    ap_at_3 = [(1 + 2 / 3) / 2, (1 + 2 / 3) / 2, 0, (1 / 3) / 2, (1 / 2 + 2 / 3) / 2, (1 + 2 / 3) / 2]
    shallow = evaluate_retrieval(_circle_index(), "grade", map_depth=3)["overall"]
    assert shallow["map_at_3"] == pytest.approx(np.mean(ap_at_3))
    assert shallow["precision_at_5"] == overall["precision_at_5"]
    # An unlabelled image right beside query 0 is neither ranked nor a query: nothing changes.
    radians = np.deg2rad([*ANGLES, 2])
    vectors = np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)
    unlabelled = RetrievalIndex.build(vectors, items(7, grade=[*LABELS, None]))
    with_gap = evaluate_retrieval(unlabelled, "grade")
    assert with_gap["overall"] == overall and with_gap["n_queries_without_label"] == 1


def test_same_patient_items_are_left_out_of_rankings_and_of_the_prior():
    """Images 0 and 1 (both A) are one patient: query 0 then ranks 25,45,70,100 deg = B,A,B,B with R = 1 of 4:
    P@1 0, P@3 1/3, AP 1/2, prior 1/4 (the same for query 1); query 3 keeps R = 2 of 5: AP 5/12, prior 2/5."""
    index = _circle_index(patient_id=pd.array(["p1", "p1", "p2", "p3", "p4", "p5"], dtype="string"))
    a = evaluate_retrieval(index, "grade")["per_label"]["A"]
    assert a["precision_at_1"] == pytest.approx(0) and a["precision_at_3"] == pytest.approx(1 / 3)
    assert a["map_at_10"] == pytest.approx((1 / 2 + 1 / 2 + 5 / 12) / 3)
    assert a["prior"] == pytest.approx((1 / 4 + 1 / 4 + 2 / 5) / 3)
    kept = evaluate_retrieval(index, "grade", exclude_same_patient=False)["per_label"]["A"]
    assert kept["precision_at_1"] == pytest.approx(2 / 3) and kept["prior"] == pytest.approx(2 / 5)


def test_precision_at_5_beats_the_label_prior_on_clustered_embeddings():
    vectors, cluster = clustered(300, 16, clusters=4, noise=1.2, seed=0)
    index = RetrievalIndex.build(vectors, items(300, grade=cluster))
    result = evaluate_retrieval(index, "grade")
    overall = result["overall"]
    assert 0.2 < overall["prior"] < 0.3  # four roughly equal classes
    assert overall["precision_at_5"] > overall["prior"] + 0.4
    assert all(v["precision_at_5"] > v["prior"] + 0.3 for v in result["per_label"].values())
    # Held-out queries (another draw) against the index: the same gain, and no query is its own neighbour.
    queries, query_cluster = clustered(50, 16, clusters=4, noise=1.2, seed=1)
    table = pd.DataFrame({"image_id": [f"q{i}" for i in range(50)], "grade": query_cluster})
    held_out = evaluate_retrieval(index, "grade", (table, queries))
    assert held_out["mode"] == "queries" and held_out["n_queries"] == 50
    assert held_out["overall"]["precision_at_5"] > held_out["overall"]["prior"] + 0.4
    # Unrelated labels: no gain beyond chance.
    shuffled = RetrievalIndex.build(vectors, items(300, grade=np.random.default_rng(3).permutation(cluster)))
    chance = evaluate_retrieval(shuffled, "grade")["overall"]
    assert abs(chance["precision_at_5"] - chance["prior"]) < 0.08


# ---- the index folder ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_save_and_load_give_the_same_index(tmp_path, kind):
    vectors, cluster = clustered(400, 8, clusters=4, noise=0.5, seed=0)
    table = items(400, site=["s1", "s2"] * 200, grade=cluster)
    built = RetrievalIndex.build(vectors, table, IndexConfig(kind=kind, nprobe=2, ef_search=16))
    built.save(tmp_path / "idx")
    loaded = RetrievalIndex.load(tmp_path / "idx")
    assert loaded.kind == kind and len(loaded) == 400 and loaded.dim == 8
    assert loaded.meta == json.loads((tmp_path / "idx" / "index.json").read_text()) == built.meta
    pd.testing.assert_frame_equal(loaded.items, table)
    pd.testing.assert_frame_equal(loaded.search(vectors[:30], 5), built.search(vectors[:30], 5))
    assert np.allclose(loaded.stored_vectors(), vectors / np.linalg.norm(vectors, axis=1, keepdims=True), atol=1e-6)


def test_loading_refuses_files_that_do_not_belong_together(tmp_path):
    vectors, _ = clustered(50, 8, clusters=2, noise=0.5, seed=0)
    RetrievalIndex.build(vectors, items(50)).save(tmp_path / "a")
    RetrievalIndex.build(vectors[:40], items(40)).save(tmp_path / "b")
    (tmp_path / "a" / "items.parquet").write_bytes((tmp_path / "b" / "items.parquet").read_bytes())
    with pytest.raises(RetfmError, match="items.parquet: does not belong with index.json"):
        RetrievalIndex.load(tmp_path / "a")
    (tmp_path / "b" / "index.faiss").unlink()
    with pytest.raises(RetfmError, match="index.faiss: missing"):
        RetrievalIndex.load(tmp_path / "b")
    with pytest.raises(RetfmError, match="not a retrieval index"):
        RetrievalIndex.load(tmp_path / "nowhere")


# ---- the command line, end to end ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """24 phantom photographs (2 sites, 12 patients), ingested at 80 px, embedded by tiny-vit (random weights)."""
    root = tmp_path_factory.mktemp("retrieval")
    generate_cohort(root / "raw", sites=2, per_site=12, size=96, seed=0)
    ingest(root / "raw", root / "ds", IngestConfig(size=80, workers=1))
    torch.manual_seed(0)
    weights = root / "tiny.pt"
    torch.save(create(MODEL, weights="random").state_dict(), weights)
    config = EmbedConfig(model=MODEL, weights=str(weights), batch_size=8, workers=0)
    embed(root / "ds", root / "emb.parquet", config)
    return root


def test_cli_builds_retrieves_and_evaluates(embedded, tmp_path):
    runner = CliRunner()
    emb, idx = embedded / "emb.parquet", tmp_path / "idx"
    result = runner.invoke(app, ["index", "build", "--embeddings", str(emb), "--out", str(idx), "--split", "train"])
    assert result.exit_code == 0, result.output
    table, _, metadata = read_embeddings(emb)
    train, test = table[table["split"] == "train"], table[table["split"] == "test"]
    meta = json.loads((idx / "index.json").read_text())
    assert (meta["kind"], meta["count"], meta["dim"], meta["model"]) == ("exact", len(train), 64, MODEL)
    assert meta["weights_sha256"] == metadata["retfm.weights_sha256"] and meta["build"]["split"] == "train"
    indexed = pd.read_parquet(idx / "items.parquet")
    assert set(indexed["image_id"]) == set(train["image_id"])
    assert {"patient_id", "site", "dr_grade"} <= set(indexed.columns)
    assert not {"path", "source", "quality"} & set(indexed.columns)

    out, metrics = tmp_path / "neighbours.csv", tmp_path / "metrics.json"
    result = runner.invoke(app, ["retrieve", "--index", str(idx), "--embeddings", str(emb), "--split", "test",
                                 "--k", "3", "--out", str(out), "--evaluate", "--label", "dr_grade",
                                 "--metrics", str(metrics)])
    assert result.exit_code == 0, result.output
    neighbours = pd.read_csv(out)
    assert len(neighbours) == 3 * len(test) and set(neighbours["query_image_id"]) == set(test["image_id"])
    assert neighbours.groupby("query_image_id")["similarity"].apply(lambda s: s.is_monotonic_decreasing).all()
    query_patient = neighbours["query_image_id"].map(dict(zip(table["image_id"], table["patient_id"])))
    assert not (neighbours["patient_id"] == query_patient).any()
    written = json.loads(metrics.read_text())
    index = RetrievalIndex.load(idx)
    test_vectors = read_embeddings(emb)[1][(table["split"] == "test").to_numpy()]
    direct = evaluate_retrieval(index, "dr_grade", (test.reset_index(drop=True), test_vectors))
    assert written["overall"] == pytest.approx(direct["overall"]) and written["n_queries"] == len(test)
    assert "P@5" in result.output and "prior" in result.output

    result = runner.invoke(app, ["retrieve", "--index", str(idx), "--evaluate", "--label", "dr_grade"])
    assert result.exit_code == 0, result.output
    assert "leave-one-out" in result.output
    for wrong, reason in ((["--embeddings", str(emb), "--label", "dr_grade"], "belong to --evaluate"),
                          ([], "give --embeddings, --image"), (["--evaluate", "--label", "nope"], "no label column")):
        result = runner.invoke(app, ["retrieve", "--index", str(idx), *wrong])
        assert isinstance(result.exception, RetfmError) and reason in str(result.exception)


def test_cli_embeds_query_images_with_the_index_model_and_refuses_other_weights(embedded, tmp_path):
    runner = CliRunner()
    idx = tmp_path / "idx"
    assert runner.invoke(app, ["index", "build", "--embeddings", str(embedded / "emb.parquet"),
                               "--out", str(idx), "--kind", "hnsw"]).exit_code == 0
    # One raw photograph of an indexed image: ingested and embedded like the index, it finds itself first.
    raw = pd.read_csv(embedded / "raw" / "labels.csv").iloc[5]
    result = runner.invoke(app, ["retrieve", "--index", str(idx), "--image", str(embedded / "raw" / raw["path"]),
                                 "--k", "4", "--out", str(tmp_path / "one.parquet"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    one = pd.read_parquet(tmp_path / "one.parquet")
    manifest_row = pd.read_parquet(embedded / "ds" / "manifest.parquet").query("patient_id == @raw.patient_id "
                                                                              "and eye == @raw.eye")
    assert len(one) == 4 and one["image_id"].iloc[0] == manifest_row["image_id"].iloc[0]
    assert one["similarity"].iloc[0] > 0.99 and "most similar" in result.output
    assert raw["path"].split("/")[-1] not in one.to_csv()  # the photograph's file name is nowhere in the output

    result = runner.invoke(app, ["retrieve", "--index", str(idx), "--data", str(embedded / "ds"), "--split", "val",
                                 "--out", str(tmp_path / "val.parquet"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    val = pd.read_parquet(tmp_path / "val.parquet")
    assert not (val["query_image_id"] == val["image_id"]).any()  # indexed too, but never its own neighbour

    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    torch.save(create(MODEL, weights="random").state_dict(), other)
    result = runner.invoke(app, ["retrieve", "--index", str(idx), "--data", str(embedded / "ds"),
                                 "--weights", str(other), "--workers", "0"])
    assert isinstance(result.exception, RetfmError)
    message = str(result.exception)
    assert "weights_sha256 differs from the index's" in message and str(other) in message
    assert len(message.splitlines()) == 1
