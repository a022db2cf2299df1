"""The probe heads: scikit-learn's logistic-regression solution, C / k chosen on validation, the whole command."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from retfm.adapt.probe import KnnHead, LogisticHead, fit_logistic


def _blobs(n: int, d: int = 16, k: int = 3, seed: int = 0, separation: float = 1.0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d)) * separation
    y = rng.integers(0, k, n)
    return (rng.normal(size=(n, d)) + means[y]).astype(np.float32), y


@pytest.mark.parametrize("class_weight,collinear", [(None, False), ("balanced", False), (None, True)])
def test_logistic_fit_equals_scikit_learn(class_weight, collinear):
    x, y = _blobs(600, k=3)
    y[:400] = 0  # imbalanced, so balanced weights matter
    if collinear:  # a repeated feature and a zero one: singular second moments, as real embeddings can have
        x = np.column_stack([x, x[:, :1], np.zeros(len(x), np.float32)])
    reference = LogisticRegression(C=0.3, tol=1e-10, max_iter=10000, class_weight=class_weight).fit(x, y)
    weight = None
    if class_weight:
        counts = np.bincount(y)
        weight = torch.from_numpy((len(y) / (3 * counts[y])).astype(np.float32))
    parameters = fit_logistic(torch.from_numpy(x), torch.from_numpy(y), 3, 0.3, weight, tol=1e-7)
    ours = torch.softmax(torch.from_numpy(x) @ parameters[:-1] + parameters[-1], 1).numpy()
    assert np.abs(ours - reference.predict_proba(x)).max() < 5e-4  # a float32 solver
    assert np.abs(parameters[:-1].numpy() - reference.coef_.T).max() < 5e-3


def test_probe_fits_embeddings_with_few_live_features_among_zeros():
    # 23 correlated live features scattered among 1,257 exact zeros, as a collapsed model's 1280-wide embeddings
    # had: torch.linalg.eigh (LAPACK divide and conquer) failed to converge on these second moments here.
    live = [242, 316, 323, 329, 345, 525, 531, 629, 689, 723, 772, 795, 849, 860, 967, 977, 1041, 1084, 1156, 1178,
            1180, 1239, 1241]
    generator = torch.Generator().manual_seed(0)
    loadings, factors = torch.randn(4, 23, generator=generator), torch.randn(300, 4, generator=generator)
    x = np.zeros((300, 1280), np.float32)
    x[:, live] = (factors @ loadings + 1e-3 * torch.randn(300, 23, generator=generator)).numpy()
    y = (factors[:, 0] > 0).long().numpy()
    head = LogisticHead()
    head.fit(x[:200], y[:200], x[200:], y[200:], 2)
    assert roc_auc_score(y[200:], head.predict_proba(x[200:])[:, 1]) > 0.95


def test_c_is_chosen_on_validation_and_predicts_well():
    x, y = _blobs(1500, d=32, k=4, separation=0.35)
    head = LogisticHead()
    choice = head.fit(x[:1000], y[:1000], x[1000:1250], y[1000:1250], 4)
    losses = choice["selection_log_loss"]
    assert min(losses, key=losses.get) == f"{choice['C']:.0e}" and len(losses) == 7
    auroc = roc_auc_score(y[1250:], head.predict_proba(x[1250:]), multi_class="ovr")
    assert auroc > 0.8
    assert np.allclose(head.predict_proba(x[1250:]).sum(1), 1)


def test_knn_head_covers_classes_missing_from_training():
    x, y = _blobs(300, k=3, separation=2.0)
    train = y != 2
    head = KnnHead()
    choice = head.fit(x[train][:150], y[train][:150], x[train][150:], y[train][150:], 3)
    probabilities = head.predict_proba(x[~train])
    assert probabilities.shape == (int((~train).sum()), 3) and np.all(probabilities[:, 2] == 0)
    assert choice["k"] in (5, 10, 20, 50)


def test_embed_probe_evaluate_road_with_per_site_groups(tmp_path):
    """phantoms -> ingest -> embed -> probe through the CLI; predictions, metrics and report follow the contracts."""
    from typer.testing import CliRunner

    from retfm.cli.main import app
    from retfm.data import Manifest
    from retfm.models import create

    runner = CliRunner()
    for args in (["data", "phantoms", "--out", str(tmp_path / "raw"), "--sites", "3", "--per-site", "16",
                  "--size", "96"],
                 ["data", "ingest", str(tmp_path / "raw"), "--out", str(tmp_path / "ds"), "--size", "64",
                  "--workers", "1"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    manifest = Manifest.read(tmp_path / "ds")
    manifest.table.loc[manifest.table.index[:3], "glaucoma"] = None  # unknown labels are excluded and counted
    manifest.write()
    torch.manual_seed(0)
    torch.save(create("tiny-vit", weights="random").state_dict(), tmp_path / "tiny.pt")
    result = runner.invoke(app, ["embed", "--data", str(tmp_path / "ds"), "--model", "tiny-vit", "--weights",
                                 str(tmp_path / "tiny.pt"), "--out", str(tmp_path / "emb.parquet"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["probe", "--embeddings", str(tmp_path / "emb.parquet"), "--label", "glaucoma",
                                 "--out", str(tmp_path / "probe"), "--by", "site,sex", "--bootstrap", "200"])
    assert result.exit_code == 0, result.output

    table = manifest.table
    predictions = pd.read_parquet(tmp_path / "probe" / "predictions.parquet")
    test_rows = table[(table["split"] == "test") & table["glaucoma"].notna()]
    assert sorted(predictions["image_id"]) == sorted(test_rows["image_id"])
    assert {"glaucoma", "prediction", "prob_0", "prob_1", "site", "sex", "patient_id"} <= set(predictions.columns)
    assert np.allclose(predictions[["prob_0", "prob_1"]].sum(axis=1), 1)
    metadata = pq.read_schema(tmp_path / "probe" / "predictions.parquet").metadata
    assert json.loads(metadata[b"retfm.classes"]) == ["0", "1"] and metadata[b"retfm.task"] == b"binary"
    metrics = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert metrics["n"] == len(test_rows) and metrics["n_excluded_null_label"] == 3
    assert set(metrics["groups"]["site"]) <= {"site1", "site2", "site3"} and "auroc" in metrics["metrics"]
    assert metrics["meta"]["model"] == "tiny-vit" and metrics["meta"]["C"] in [float(c) for c in np.logspace(-4, 2, 7)]
    report = (tmp_path / "probe" / "report.html").read_text()
    assert "data:image/png;base64," in report
    assert not any(image_id in report for image_id in table["image_id"])
    assert (tmp_path / "probe" / "probe_config.yaml").exists()
