"""``retfm embed``: the model's own preprocessing, the Embeddings contract, resuming, refusing mixed weights."""

import numpy as np
import pytest
import torch
from PIL import Image

from retfm.adapt import embed as embed_module
from retfm.adapt.config import EmbedConfig
from retfm.adapt.embed import embed
from retfm.adapt.embeddings import read_embeddings
from retfm.data import Manifest
from retfm.data.config import IngestConfig
from retfm.data.datasets import eval_transform
from retfm.data.ingest import ingest
from retfm.data.phantoms import generate_cohort
from retfm.errors import RetfmError
from retfm.models import create, preprocessing, spec

MODEL = "tiny-vit"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    generate_cohort(root / "raw", sites=2, per_site=12, size=96, seed=0)
    ingest(root / "raw", root / "ds", IngestConfig(size=80, workers=1))
    torch.manual_seed(0)
    weights = root / "tiny.pt"
    torch.save(create(MODEL, weights="random").state_dict(), weights)
    return root / "ds", weights


def _config(weights, **kwargs) -> EmbedConfig:
    return EmbedConfig(**{"model": MODEL, "weights": str(weights), "batch_size": 5, "workers": 0, **kwargs})


def test_embeddings_follow_the_contract_and_the_models_preprocessing(cohort, tmp_path):
    data, weights = cohort
    summary = embed(data, tmp_path / "emb.parquet", _config(weights))
    table, vectors, meta = read_embeddings(tmp_path / "emb.parquet")
    manifest = Manifest.read(data).table
    model_spec = spec(MODEL)
    assert summary["images"] == len(manifest) == len(table) and vectors.shape == (len(manifest), model_spec.embed_dim)
    assert set(table["image_id"]) == set(manifest["image_id"]) and not (tmp_path / "emb.parquet.parts").exists()
    assert {"split", "site", "patient_id", "dr_grade", "sex", "quality"} <= set(table.columns)
    assert "path" not in table and "source" not in table
    assert meta["retfm.model"] == MODEL and int(meta["retfm.embed_dim"]) == model_spec.embed_dim
    assert len(meta["retfm.weights_sha256"]) == 64 and "retfm.preprocessing" in meta
    # One image by hand: decode, the model's eval transform, forward.
    row = manifest.iloc[3]
    model = create(MODEL, weights=str(weights)).eval()
    image = eval_transform(preprocessing(model_spec))(Image.open(data / row["path"]).convert("RGB"))
    with torch.no_grad():
        expected = model(image[None])[0].numpy()
    got = vectors[table.index[table["image_id"] == row["image_id"]][0]]
    assert np.allclose(got, expected, atol=1e-5)


def test_resume_after_an_interruption_gives_the_uninterrupted_result(cohort, tmp_path, monkeypatch):
    data, weights = cohort
    embed(data, tmp_path / "whole.parquet", _config(weights))
    _, whole, _ = read_embeddings(tmp_path / "whole.parquet")

    monkeypatch.setattr(embed_module, "PART_ROWS", 5)
    original = embed_module.vector_column
    calls = []

    def fail_on_third_part(vectors):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(vectors)

    monkeypatch.setattr(embed_module, "vector_column", fail_on_third_part)
    with pytest.raises(KeyboardInterrupt):
        embed(data, tmp_path / "emb.parquet", _config(weights))
    assert len(list((tmp_path / "emb.parquet.parts").glob("part-*.parquet"))) == 2
    monkeypatch.setattr(embed_module, "vector_column", original)
    summary = embed(data, tmp_path / "emb.parquet", _config(weights))
    assert summary["resumed"] == 10 and summary["embedded_now"] == summary["images"] - 10
    table, vectors, _ = read_embeddings(tmp_path / "emb.parquet")
    whole_table, _, _ = read_embeddings(tmp_path / "whole.parquet")
    order = {image_id: i for i, image_id in enumerate(whole_table["image_id"])}
    assert np.allclose(vectors, whole[[order[i] for i in table["image_id"]]], atol=1e-6)


def test_a_split_then_the_rest_and_other_weights_are_refused(cohort, tmp_path):
    data, weights = cohort
    first = embed(data, tmp_path / "emb.parquet", _config(weights, split="test"))
    second = embed(data, tmp_path / "emb.parquet", _config(weights))
    assert second["resumed"] == first["images"] and second["images"] == len(Manifest.read(data).table)
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    torch.save(create(MODEL, weights="random").state_dict(), other)
    with pytest.raises(RetfmError, match="different weights_sha256"):
        embed(data, tmp_path / "emb.parquet", _config(other))
