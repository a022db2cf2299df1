"""Paired comparisons: DeLong's test (fast midrank algorithm) against scikit-learn and a direct computation, and
the paired bootstrap on predictions files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from retfm.adapt.predictions import write_predictions
from retfm.errors import RetfmError
from retfm.evaluate.compare import (compare_predictions, compare_repeated, delong_covariance, delong_test,
                                   paired_bootstrap)
from retfm.evaluate.metrics import outcomes


def direct_delong(positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """DeLong's covariance straight from its definition: the kernel psi over every positive/negative pair."""
    x, y = scores[:, positive], scores[:, ~positive]
    m, n = x.shape[1], y.shape[1]
    v10 = np.empty((len(scores), m))
    v01 = np.empty((len(scores), n))
    for k in range(len(scores)):
        for i in range(m):
            v10[k, i] = np.mean([1.0 if x[k, i] > y[k, j] else 0.5 if x[k, i] == y[k, j] else 0.0 for j in range(n)])
        for j in range(n):
            v01[k, j] = np.mean([1.0 if x[k, i] > y[k, j] else 0.5 if x[k, i] == y[k, j] else 0.0 for i in range(m)])
    auc = v10.mean(axis=1)
    s10 = (v10 - auc[:, None]) @ (v10 - auc[:, None]).T / (m - 1)
    s01 = (v01 - auc[:, None]) @ (v01 - auc[:, None]).T / (n - 1)
    covariances = s10 / m + s01 / n
    return covariances


def test_delong_auc_is_sklearns_and_its_covariance_the_direct_formula():
    positive = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0, 1], dtype=bool)
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.6, 0.3, 0.55, 0.2, 0.1, 0.4],  # a tie across the classes (0.6)
                       [0.7, 0.2, 0.6, 0.9, 0.5, 0.5, 0.8, 0.1, 0.3, 0.5]])  # ties within and across
    auc, covariance = delong_covariance(positive, scores)
    for k in range(2):
        assert auc[k] == pytest.approx(roc_auc_score(positive, scores[k]), abs=1e-12)
    assert covariance == pytest.approx(direct_delong(positive, scores), abs=1e-12)
    assert auc[0] == pytest.approx(0.78)  # 19.5 of 25 pairs ranked right (the tie counts half)
    result = delong_test(positive, scores[0], scores[1])
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    assert result.se == pytest.approx(np.sqrt(variance))
    assert 0 < result.p < 1


def test_delong_model_against_itself_and_against_a_clearly_worse_one():
    rng = np.random.default_rng(0)
    positive = rng.random(200) < 0.4
    good = positive + rng.normal(0, 0.5, 200)
    noise = rng.normal(0, 1, 200)
    assert delong_test(positive, good, good).p == 1.0
    better = delong_test(positive, good, noise)
    assert better.auc_a > 0.9 and better.auc_b < 0.65
    assert better.p < 0.01
    assert delong_test(positive, noise, good).p == pytest.approx(better.p)  # symmetric
    with pytest.raises(ValueError, match="two positives"):
        delong_covariance(np.array([True, False, False]), np.array([0.1, 0.2, 0.3]))


def _predictions(scores: np.ndarray, labels: np.ndarray, patients: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"img{i}" for i in range(len(labels))], "glaucoma": labels,
                         "prediction": (scores >= 0.5).astype(int), "prob_0": 1 - scores, "prob_1": scores,
                         "patient_id": patients})


def _write(path, table, threshold=0.5):
    write_predictions(path, table, "glaucoma", ["0", "1"], "binary", threshold, {})
    return path


def test_paired_bootstrap_and_delong_on_prediction_files(tmp_path):
    rng = np.random.default_rng(1)
    labels = (rng.random(120) < 0.4).astype(int)
    patients = np.repeat(np.arange(60), 2)  # two eyes per patient: the bootstrap resamples patients
    good = 1 / (1 + np.exp(-(3 * (labels - 0.5) + rng.normal(0, 0.8, 120))))
    poor = rng.random(120)
    a = _write(tmp_path / "a.parquet", _predictions(good, labels, patients))
    b = _write(tmp_path / "b.parquet", _predictions(poor, labels, patients).iloc[::-1])  # another row order
    result = compare_predictions(a, b, "glaucoma", n_boot=500, seed=0)
    assert result["value_a"] == pytest.approx(roc_auc_score(labels, good))
    assert result["value_b"] == pytest.approx(roc_auc_score(labels, poor))
    assert result["difference"] == pytest.approx(result["value_a"] - result["value_b"])
    assert 0 < result["ci_low"] < result["difference"] < result["ci_high"]
    assert result["p_bootstrap"] == pytest.approx(2 / 501)  # no resample where the poor model wins
    assert result["p_delong"] < 1e-6
    same = compare_predictions(a, a, "glaucoma", n_boot=200, seed=0)
    assert same["difference"] == 0 and same["ci_low"] == same["ci_high"] == 0
    assert same["p_bootstrap"] == 1.0 and same["p_delong"] == 1.0
    other = _write(tmp_path / "c.parquet", _predictions(poor[:100], labels[:100], patients[:100]))
    with pytest.raises(RetfmError, match="other test images"):
        compare_predictions(a, other, "glaucoma")


def test_comparison_on_some_sites_only(tmp_path):
    """``sites`` compares the two models on those sites' images alone: the AUROCs are those of the subset."""
    rng = np.random.default_rng(2)
    labels = (rng.random(160) < 0.4).astype(int)
    patients, sites = np.arange(160), np.repeat(["s1", "s2", "s3", "s4"], 40)
    good = 1 / (1 + np.exp(-(3 * (labels - 0.5) + rng.normal(0, 1.5, 160))))
    poor = rng.random(160)
    a = _write(tmp_path / "a.parquet", _predictions(good, labels, patients).assign(site=sites))
    b = _write(tmp_path / "b.parquet", _predictions(poor, labels, patients).assign(site=sites))
    result = compare_predictions(a, b, "glaucoma", n_boot=200, sites=["s2", "s4"])
    keep = np.isin(sites, ["s2", "s4"])
    assert result["n"] == 80
    assert result["value_a"] == pytest.approx(roc_auc_score(labels[keep], good[keep]))
    assert result["value_b"] == pytest.approx(roc_auc_score(labels[keep], poor[keep]))
    with pytest.raises(RetfmError, match="no test image of the sites"):
        compare_predictions(a, b, "glaucoma", sites=["elsewhere"])
    with pytest.raises(RetfmError, match="no site column"):
        compare_predictions(_write(tmp_path / "c.parquet", _predictions(good, labels, patients)), b, "glaucoma",
                            sites=["s1"])


def test_paired_bootstrap_resamples_both_models_together():
    """With the same resamples, the spread of the difference of two highly correlated models is far smaller
    than the spread of either AUROC alone: resampling them independently would not give that."""
    rng = np.random.default_rng(2)
    labels = (rng.random(300) < 0.5).astype(int)
    base = labels + rng.normal(0, 1.0, 300)
    scores_a = 1 / (1 + np.exp(-base))
    scores_b = 1 / (1 + np.exp(-(base + rng.normal(0, 0.05, 300))))
    table = _predictions(scores_a, labels, np.arange(300))
    a = outcomes(table, "glaucoma", ["0", "1"], "binary")
    b = outcomes(_predictions(scores_b, labels, np.arange(300)), "glaucoma", ["0", "1"], "binary")
    result = paired_bootstrap(a, b, np.arange(300), 400, seed=0, metrics=("auroc", "accuracy"))
    auroc = result["auroc"]
    assert auroc.n_boot == 400
    assert auroc.ci[1] - auroc.ci[0] < 0.02  # one AUROC's own 95% CI is about 0.1 wide here
    assert auroc.ci[0] <= auroc.difference <= auroc.ci[1]
    assert set(result) == {"auroc", "accuracy"}


def test_multiclass_comparison_is_bootstrap_only(tmp_path):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 90)
    logits_a = np.eye(3)[labels] * 2 + rng.normal(0, 1, (90, 3))
    logits_b = rng.normal(0, 1, (90, 3))
    paths = []
    for name, logits in (("a", logits_a), ("b", logits_b)):
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        table = pd.DataFrame({"image_id": [f"img{i}" for i in range(90)], "dr_grade": labels,
                              "prediction": probs.argmax(axis=1), **{f"prob_{k}": probs[:, k] for k in range(3)}})
        paths.append(tmp_path / f"{name}.parquet")
        write_predictions(paths[-1], table, "dr_grade", ["0", "1", "2"], "multiclass", None, {})
        if name == "a":
            expected = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    result = compare_predictions(*paths, "dr_grade", n_boot=300, seed=0)
    assert result["value_a"] == pytest.approx(expected)
    assert result["p_delong"] is None and result["p_bootstrap"] < 0.05
    assert result["ci_low"] > 0


def test_repeated_runs_one_a_side_is_the_paired_bootstrap_and_run_spread_widens_the_interval(tmp_path):
    """compare_repeated with one run a side gives compare_predictions' numbers resample for resample; copies of
    one run change nothing; runs that disagree widen the interval (the run-to-run spread is in it), and the point
    estimate is the mean of the runs' AUROCs less the other side's."""
    rng = np.random.default_rng(4)
    labels = (rng.random(120) < 0.4).astype(int)
    patients = np.repeat(np.arange(60), 2)

    def run(name, noise):
        scores = 1 / (1 + np.exp(-(2 * (labels - 0.5) + rng.normal(0, noise, 120))))
        return _write(tmp_path / f"{name}.parquet", _predictions(scores, labels, patients)), scores

    a, scores_a = run("a", 1.0)
    b, scores_b = run("b", 1.5)
    single = compare_predictions(a, b, "glaucoma", n_boot=400, seed=3)
    repeated = compare_repeated([a], [b], "glaucoma", n_boot=400, seed=3)
    for key in ("value_a", "value_b", "difference", "ci_low", "ci_high", "p_bootstrap", "n_boot"):
        assert repeated[key] == pytest.approx(single[key])
    copies = compare_repeated([a, a, a], [b], "glaucoma", n_boot=400, seed=3)
    assert (copies["ci_low"], copies["ci_high"]) == pytest.approx((single["ci_low"], single["ci_high"]))
    weak, scores_weak = run("weak", 6.0)
    spread = compare_repeated([a, weak], [b], "glaucoma", n_boot=400, seed=3)
    mean_a = (roc_auc_score(labels, scores_a) + roc_auc_score(labels, scores_weak)) / 2
    assert spread["value_a"] == pytest.approx(mean_a)
    assert spread["difference"] == pytest.approx(mean_a - roc_auc_score(labels, scores_b))
    assert spread["runs_a"] == pytest.approx([roc_auc_score(labels, scores_a), roc_auc_score(labels, scores_weak)])
    pairs = compare_predictions(weak, b, "glaucoma", n_boot=400, seed=3)
    assert spread["ci_high"] - spread["ci_low"] > single["ci_high"] - single["ci_low"]
    assert spread["ci_high"] - spread["ci_low"] > pairs["ci_high"] - pairs["ci_low"]
    other = _write(tmp_path / "c.parquet", _predictions(scores_b[:100], labels[:100], patients[:100]))
    with pytest.raises(RetfmError, match="other test images"):
        compare_repeated([a, other], [b], "glaucoma")
    with pytest.raises(RetfmError, match="at least one"):
        compare_repeated([], [b], "glaucoma")
