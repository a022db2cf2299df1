import hashlib
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score, cohen_kappa_score,
                             f1_score, matthews_corrcoef, recall_score, roc_auc_score)
from sklearn.preprocessing import label_binarize
from typer.testing import CliRunner

from retfm.cli.main import app
from retfm.errors import RetfmError
from retfm.evaluate import evaluate_predictions, read_predictions, write_report
from retfm.evaluate import bootstrap as bootstrap_module
from retfm.evaluate.bootstrap import bootstrap_metrics, resample_weights
from retfm.evaluate.metrics import METRICS, outcomes, point_metrics

BINARY = ("binary", ["neg", "pos"])
MULTICLASS = ("multiclass", ["amd", "dr", "glaucoma"])
ORDINAL = ("ordinal", [0, 1, 2, 3, 4])


def _predictions(n: int, classes: list, seed: int = 0, ties: bool = False) -> pd.DataFrame:
    """Probabilities from a random softmax, labels drawn from them (so the model has skill). With ties, every
    row takes one of six probability vectors."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(6 if ties else n, len(classes)))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    if ties:
        probs = probs[rng.integers(0, 6, n)]
    y = (probs.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    values = np.asarray(classes)
    table = pd.DataFrame({"image_id": [f"img{i:04d}" for i in range(n)], "label": values[y],
                          "prediction": values[probs.argmax(axis=1)]})
    for k, c in enumerate(classes):
        table[f"prob_{c}"] = probs[:, k]
    return table


def _sklearn_metrics(table: pd.DataFrame, task: str, classes: list, threshold: float = 0.5) -> dict:
    """Every metric straight from scikit-learn on the table's own values (ECE from calibration_curve)."""
    y = table["label"].to_numpy()
    scores = table[[f"prob_{c}" for c in classes]].to_numpy()
    if task == "binary":
        pred = np.where(scores[:, 1] >= threshold, classes[1], classes[0])
        positive = y == classes[1]
        ref = {"auroc": roc_auc_score(positive, scores[:, 1]), "aupr": average_precision_score(positive, scores[:, 1]),
               "sensitivity": recall_score(y, pred, pos_label=classes[1]),
               "specificity": recall_score(y, pred, pos_label=classes[0])}
    else:
        pred = table["prediction"].to_numpy()
        ref = {"auroc": roc_auc_score(y, scores, multi_class="ovr", labels=classes),
               "aupr": average_precision_score(label_binarize(y, classes=classes), scores),
               "sensitivity": np.mean([recall_score(y == c, pred == c) for c in classes]),
               "specificity": np.mean([recall_score(y != c, pred != c) for c in classes])}
    ref.update(accuracy=accuracy_score(y, pred), balanced_accuracy=balanced_accuracy_score(y, pred),
               f1_macro=f1_score(y, pred, average="macro"), kappa=cohen_kappa_score(y, pred),
               kappa_quadratic=(None if task == "multiclass" else
                                cohen_kappa_score(y, pred, labels=classes, weights="quadratic")),
               mcc=matthews_corrcoef(y, pred))
    confidence = scores.max(axis=1)
    correct = np.asarray(classes)[scores.argmax(axis=1)] == y
    fraction_correct, mean_confidence = calibration_curve(correct, confidence, n_bins=15)
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 16)[1:-1], confidence), minlength=15)
    ref["ece"] = np.sum(counts[counts > 0] / len(y) * np.abs(fraction_correct - mean_confidence))
    return ref


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("task, classes", [BINARY, MULTICLASS, ORDINAL], ids=["binary", "multiclass", "ordinal"])
def test_metrics_equal_sklearn(task, classes, ties):
    table = _predictions(300, classes, seed=1, ties=ties)
    result = evaluate_predictions(table, "label", classes, task, threshold=0.4, n_boot=0)
    expected = _sklearn_metrics(table, task, classes, threshold=0.4)
    for name in METRICS:
        assert result["metrics"][name]["value"] == pytest.approx(expected[name], abs=1e-12), name
    assert result["classes"] == [str(c) for c in classes] and result["n"] == 300
    assert (result["threshold"] == 0.4) == (task == "binary")
    if task == "multiclass":  # string classes have no order
        assert any("kappa_quadratic undefined" in note for note in result["notes"])


def test_perfect_and_undefined_scores():
    table = pd.DataFrame({"label": [0, 0, 1, 1, 1], "prob_0": [0.9, 0.8, 0.3, 0.2, 0.2]})
    table["prob_1"] = 1 - table["prob_0"]
    values = evaluate_predictions(table, "label", [0, 1], "binary", n_boot=0)["metrics"]
    for name in ("auroc", "aupr", "accuracy", "balanced_accuracy", "f1_macro", "kappa", "kappa_quadratic", "mcc",
                 "sensitivity", "specificity"):
        assert values[name]["value"] == 1.0, name
    one_class = table.assign(label=1)  # AUROC, specificity and MCC are undefined; scikit-learn's MCC says 0
    result = evaluate_predictions(one_class, "label", [0, 1], "binary", n_boot=50)
    metrics = result["metrics"]
    assert matthews_corrcoef(one_class["label"], (one_class["prob_1"] >= 0.5).astype(int)) == 0.0
    for name in ("auroc", "specificity", "mcc"):
        assert metrics[name] == {"value": None, "ci": None, "n_boot": 0}, name
    assert metrics["aupr"]["value"] == 1.0 and metrics["sensitivity"]["value"] == pytest.approx(0.6)
    assert any("auroc, specificity undefined: no labels of class '0'" in note for note in result["notes"])
    assert any("mcc undefined: all labels are class '1'" in note for note in result["notes"])
    constant = table.assign(prob_1=0.9, prob_0=0.1)  # every prediction positive
    metrics = evaluate_predictions(constant, "label", [0, 1], "binary", n_boot=0)["metrics"]
    assert metrics["mcc"]["value"] is None and metrics["kappa"]["value"] == 0.0
    with pytest.raises(RetfmError, match="two classes are a binary task"):
        evaluate_predictions(table, "label", [0, 1], "ordinal")


@pytest.mark.parametrize("task, classes", [BINARY, MULTICLASS, ORDINAL], ids=["binary", "multiclass", "ordinal"])
def test_fast_bootstrap_equals_sklearn_on_resamples(task, classes):
    """Each weighted resample equals scikit-learn (via point_metrics) on the rows repeated that many times."""
    n = 60
    o = outcomes(_predictions(n, classes, seed=2, ties=True), "label", classes, task)
    drawn = resample_weights(5, np.arange(n) // 3, np.random.default_rng(0))
    without_first_class = (o.y != 0).astype(float)
    one_agreed_class = ((o.y == o.pred) & (o.y == o.y[o.y == o.pred][0])).astype(float)
    weights = np.vstack([drawn, np.ones(n), without_first_class, one_agreed_class])
    fast = bootstrap_metrics(o, weights)
    for b, w in enumerate(weights):
        expected, _ = point_metrics(o.subset(np.repeat(np.arange(n), w.astype(int))))
        for name in METRICS:
            if expected[name] is None:
                assert np.isnan(fast[name][b]), (b, name)
            else:
                assert fast[name][b] == pytest.approx(expected[name], abs=1e-10), (b, name)
    assert np.isnan(fast["auroc"][-2]) and np.isnan(fast["kappa"][-1])  # the undefined cases were exercised


def test_cis_contain_the_estimate_and_shrink_with_n():
    widths = {}
    for n in (200, 2000):
        metrics = evaluate_predictions(_predictions(n, BINARY[1], seed=4), "label", BINARY[1], "binary",
                                       n_boot=400, seed=0)["metrics"]
        for name, m in metrics.items():
            assert m["n_boot"] == 400 and m["ci"][0] < m["ci"][1], name
            if name != "ece":  # ECE is biased upwards in resamples; its CI need not cover the estimate
                assert m["ci"][0] <= m["value"] <= m["ci"][1], name
        widths[n] = {name: m["ci"][1] - m["ci"][0] for name, m in metrics.items()}
    for name in METRICS:
        assert widths[2000][name] < widths[200][name], name


def test_bootstrap_in_blocks_equals_one_block(monkeypatch):
    """Large test sets are resampled in blocks to bound memory; the CIs do not depend on the block size."""
    table = _predictions(100, MULTICLASS[1], seed=11)
    whole = evaluate_predictions(table, "label", MULTICLASS[1], "multiclass", n_boot=50, seed=2)
    monkeypatch.setattr(bootstrap_module, "MAX_WEIGHTS", 700)  # blocks of 7 resamples
    blocks = evaluate_predictions(table, "label", MULTICLASS[1], "multiclass", n_boot=50, seed=2)
    assert blocks == whole


def test_patient_resampling_keeps_a_patients_images_together():
    """Copying every image of every patient changes nothing when whole patients are resampled; resampling
    images would treat the copies as new evidence and narrow the CI."""
    table = _predictions(150, BINARY[1], seed=5)
    table["patient_id"] = [f"p{i // 3:03d}" for i in range(150)]
    doubled = pd.concat([table, table], ignore_index=True)
    weights = resample_weights(20, doubled["patient_id"].to_numpy(), np.random.default_rng(0))
    assert (weights[:, :150] == weights[:, 150:]).all()
    assert (weights.reshape(20, 2, 50, 3) == weights.reshape(20, 2, 50, 3)[..., :1]).all()
    runs = [evaluate_predictions(t, "label", BINARY[1], "binary", n_boot=300, seed=3)
            for t in (table, doubled, table.drop(columns="patient_id"), doubled.drop(columns="patient_id"))]
    by_patient, doubled_by_patient, by_image, doubled_by_image = (r["metrics"] for r in runs)
    assert runs[0]["meta"]["bootstrap"]["unit"] == "patient" and runs[2]["meta"]["bootstrap"]["unit"] == "image"
    for name in METRICS:
        assert doubled_by_patient[name]["ci"] == pytest.approx(by_patient[name]["ci"], abs=1e-12), name
    image_widths = [m["accuracy"]["ci"][1] - m["accuracy"]["ci"][0] for m in (by_image, doubled_by_image)]
    assert image_widths[1] < 0.85 * image_widths[0]


def test_group_without_a_class_gets_null_auroc_and_a_note(tmp_path):
    table = _predictions(200, BINARY[1], seed=6)
    table["site"] = np.where(np.arange(200) < 150, "A", "B")
    table.loc[150:, ["label", "prob_neg", "prob_pos"]] = ["neg", 0.7, 0.3]
    result = evaluate_predictions(table, "label", BINARY[1], "binary", by=["site"], n_boot=100)
    site_b = result["groups"]["site"]["B"]
    assert site_b["n"] == 50 and site_b["metrics"]["auroc"] == {"value": None, "ci": None, "n_boot": 0}
    assert site_b["metrics"]["accuracy"]["value"] == 1.0
    assert result["groups"]["site"]["A"]["metrics"]["auroc"]["value"] is not None
    assert "site=B (n=50): auroc, aupr, sensitivity undefined: no labels of class 'pos'" in result["notes"]
    assert "auroc" not in result["gaps"]["site"]  # one site with a value is no comparison
    html = write_report(result, table, "label", tmp_path).read_text()  # the null AUROC shows as a dash
    assert "<td>B</td><td>50</td>\n<td>–</td>" in html


def test_gaps_on_a_hand_made_example():
    """Per site four images, (label, probability of pos); the unknown site is worst but is no group."""
    rows = {"A": [(1, .9), (1, .9), (0, .1), (0, .1)],  # all correct: accuracy 1, AUROC 1, ECE 0.1
            "B": [(1, .9), (0, .1), (0, .9), (1, .1)],  # half correct: accuracy 0.5, AUROC 0.5, ECE 0.4
            "C": [(1, .9), (0, .1), (0, .1), (1, .1)],  # accuracy 0.75, AUROC 0.75 (a tie), ECE 0.15
            None: [(1, .1), (0, .9), (1, .1), (0, .9)]}  # all wrong
    table = pd.DataFrame([(site, label, 1 - p, p) for site, group in rows.items() for label, p in group],
                         columns=["site", "label", "prob_0", "prob_1"])
    result = evaluate_predictions(table, "label", [0, 1], "binary", by=["site"], n_boot=0)
    assert list(result["groups"]["site"]) == ["A", "B", "C", "unknown"]
    assert result["groups"]["site"]["C"]["metrics"]["auroc"]["value"] == 0.75
    gaps = result["gaps"]["site"]
    assert gaps["accuracy"] == {"best": "A", "worst": "B", "gap": 0.5}
    assert gaps["auroc"] == {"best": "A", "worst": "B", "gap": 0.5}
    assert gaps["ece"]["best"] == "A" and gaps["ece"]["worst"] == "B" and gaps["ece"]["gap"] == pytest.approx(0.3)


def test_age_is_banded_into_decades_and_nulls_are_unknown():
    table = _predictions(7, BINARY[1], seed=7)
    table["age"] = [35, 40, 59.9, 80, 95, None, 61]
    result = evaluate_predictions(table, "label", BINARY[1], "binary", by=["age"], n_boot=0)
    assert {band: g["n"] for band, g in result["groups"]["age"].items()} == {
        "<40": 1, "40-49": 1, "50-59": 1, "60-69": 1, "80+": 2, "unknown": 1}
    assert list(result["groups"]["age"]) == ["<40", "40-49", "50-59", "60-69", "80+", "unknown"]


def _write(table: pd.DataFrame, path, **metadata) -> None:
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    extra = {f"retfm.{k}".encode(): (v if isinstance(v, str) else json.dumps(v)).encode() for k, v in metadata.items()}
    pq.write_table(arrow.replace_schema_metadata({**arrow.schema.metadata, **extra}), path)


def _check_schema(result: dict) -> None:
    """metrics.json as docs/evaluate.md describes it."""
    assert set(result) == {"n", "n_excluded_null_label", "label", "task", "classes", "threshold", "metrics", "groups",
                           "gaps", "notes", "meta"}
    assert isinstance(result["n"], int) and isinstance(result["n_excluded_null_label"], int)
    assert result["task"] in ("binary", "multiclass", "ordinal") and all(isinstance(c, str) for c in result["classes"])
    scopes = [result["metrics"]] + [g["metrics"] for col in result["groups"].values() for g in col.values()]
    for metrics in scopes:
        assert list(metrics) == list(METRICS)
        for m in metrics.values():
            assert set(m) == {"value", "ci", "n_boot"} and isinstance(m["n_boot"], int)
            assert m["value"] is None or isinstance(m["value"], float)
            assert m["ci"] is None or (len(m["ci"]) == 2 and m["ci"][0] <= m["ci"][1])
    for column, gaps in result["gaps"].items():
        for gap in gaps.values():
            assert gap["best"] in result["groups"][column] and gap["worst"] in result["groups"][column]
            assert gap["gap"] >= 0
    assert all(isinstance(note, str) for note in result["notes"])
    assert {"bootstrap", "retfm_version"} <= set(result["meta"])


def test_cli_writes_metrics_and_report(tmp_path):
    table = _predictions(240, BINARY[1], seed=8)
    table["patient_id"] = [f"patient{i // 2:03d}" for i in range(240)]
    table["site"] = np.where(np.arange(240) % 3 == 0, "site1", "site2")
    table["sex"] = np.where(np.arange(240) % 5 == 0, None, np.where(np.arange(240) % 2 == 0, "F", "M"))
    table.loc[:3, "label"] = None
    path = tmp_path / "predictions.parquet"
    _write(table, path, classes=BINARY[1], task="binary", threshold="0.3", meta={"model": "toy", "seed": 7})
    result = CliRunner().invoke(app, ["evaluate", "--predictions", str(path), "--label", "label", "--by", "site,sex",
                                      "--out", str(tmp_path / "eval"), "--bootstrap", "200"])
    assert result.exit_code == 0, result.output
    assert "AUROC" in result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    _check_schema(metrics)
    assert metrics["n"] == 236 and metrics["n_excluded_null_label"] == 4 and metrics["threshold"] == 0.3
    assert list(metrics["groups"]["sex"]) == ["F", "M", "unknown"] and set(metrics["gaps"]) == {"site", "sex"}
    assert metrics["meta"]["model"] == "toy" and metrics["meta"]["seed"] == 7
    assert metrics["meta"]["predictions_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert metrics["meta"]["bootstrap"] == {"n": 200, "seed": 0, "unit": "patient", "units": 118, "confidence": 0.95,
                                            "method": "percentile"}
    labelled = table.dropna(subset=["label"])
    assert metrics["metrics"]["sensitivity"]["value"] == pytest.approx(_sklearn_metrics(
        labelled, "binary", BINARY[1], threshold=0.3)["sensitivity"])
    assert any("metrics use the threshold" in note for note in metrics["notes"])
    html = (tmp_path / "eval" / "report.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == 6  # ROC, PR, confusion, reliability, two groups
    assert "img0" not in html and "patient0" not in html and "http" not in html


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "retfm.cli.main", "evaluate", *args], capture_output=True, text=True)


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "predictions.parquet"
    bad.write_text("image_id,label\n")
    run = _cli("--predictions", str(bad), "--label", "label", "--out", str(tmp_path / "o"))
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and str(bad) in lines[0] and "cannot read predictions" in lines[0]
    table = _predictions(20, ORDINAL[1], seed=9)
    table.loc[3, "label"] = 7
    _write(table, bad)
    run = _cli("--predictions", str(bad), "--label", "label", "--out", str(tmp_path / "o"))
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and str(bad) in lines[0] and "'7'" in lines[0]
    assert "Traceback" not in run.stderr


def test_read_predictions_without_metadata(tmp_path):
    _write(_predictions(30, MULTICLASS[1], seed=10), tmp_path / "predictions.parquet")
    table, info = read_predictions(tmp_path)  # a folder holding predictions.parquet
    assert len(table) == 30 and info["classes"] == MULTICLASS[1] and info["task"] == "multiclass"
    assert info["threshold"] == 0.5 and set(info["meta"]) == {"predictions_sha256"}
