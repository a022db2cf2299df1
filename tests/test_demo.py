"""retfm demo: the whole road runs from the real ImageNet start, every number in the report comes from the run's own
files, and every headline sentence says what its numbers say."""

import html as html_text
import json
import re

import pandas as pd
import pytest

from retfm.data.config import IngestConfig
from retfm.data.ingest import ingest
from retfm.data.manifest import Manifest
from retfm.data.phantoms import generate_cohort
from retfm.demo import QUICK, DemoConfig
from retfm.demo.run import deal_sites, findings, run_demo
from retfm.errors import RetfmError
from retfm.evaluate.compare import compare_predictions

TINY = {**QUICK, "phantom_sites": 2, "phantom_per_site": 40, "image_size": 64, "rounds": 1, "local_steps": 2,
        "generator_steps": 4, "generator_images": 4, "bootstrap": 50, "batch_size": 8}
NUMBER = re.compile(r"[+-]?\d+\.\d+|\d+(?=%)")


class Recorder:
    def __init__(self):
        self.stages, self.units, self.planned = [], {}, None

    def total(self, seconds):
        self.planned = seconds

    def stage(self, name, units, seconds_per_unit):
        self.stages.append(name)
        self.units[name] = [units, 0]

    def advance(self, units=1):
        self.units[self.stages[-1]][1] += units


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    recorder = Recorder()
    return out, run_demo(out, DemoConfig(**TINY), recorder), recorder


def test_the_demo_compares_every_model_from_the_imagenet_start(run):
    out, results, recorder = run
    sites = results["sites"]
    assert sites == ["site1", "site2"]
    assert list(results["models"]) == ["random weights", "ImageNet start", "federated", "pooled", "site1 alone",
                                       "site2 alone"]
    for name, model in results["models"].items():
        metrics = json.loads((out / model["probe"] / "metrics.json").read_text())
        assert model["auroc"] == metrics["metrics"]["auroc"]["value"] and model["n"] == metrics["n"]
        assert set(model["groups"]["site"]) == set(sites)
    # the federation and the pooled run start from the ImageNet weights, not a random draw
    card = json.loads((out / "federated" / "model.json").read_text())
    assert card["init"] == "published" and card["teacher"] is None  # the start is its own teacher
    # every stage reported its work, and the run's estimate was set first
    assert recorder.planned > 0 and recorder.stages[0] == "phantom cohort"
    assert all(done >= units for units, done in recorder.units.values()), recorder.units
    assert json.loads((out / "config.json").read_text())["image_size"] == 64


def test_comparisons_are_paired_on_the_right_test_patients(run):
    out, results, _ = run
    probes = {name: out / model["probe"] / "predictions.parquet" for name, model in results["models"].items()}
    for title, compared in results["comparisons"].items():
        again = compare_predictions(probes[compared["a"]], probes[compared["b"]], "referable_dr", n_boot=50,
                                    sites=compared["sites"])
        assert {k: compared[k] for k in again} == again, title
    other = results["comparisons"]["federated vs site1 alone, on the other sites"]
    table = pd.read_parquet(probes["federated"])
    assert other["sites"] == ["site2"] and other["n"] == int((table["site"] == "site2").sum())


def test_every_headline_number_comes_from_the_run_files(run):
    """Each number in a sentence is an AUROC of a probe's metrics.json, a paired difference or CI bound recomputed
    from the predictions files, a federated/pooled percentage, or the generator's audit; the words 'significant'
    and 'not significant' follow the interval."""
    out, results, _ = run
    allowed = set()
    for model in results["models"].values():
        metrics = json.loads((out / model["probe"] / "metrics.json").read_text())
        allowed.add(f"{metrics['metrics']['auroc']['value']:.3f}")
    probes = {name: out / model["probe"] / "predictions.parquet" for name, model in results["models"].items()}
    for compared in results["comparisons"].values():
        again = compare_predictions(probes[compared["a"]], probes[compared["b"]], "referable_dr", n_boot=50,
                                    sites=compared["sites"])
        allowed |= {f"{again['value_a']:.3f}", f"{again['value_b']:.3f}"}
        allowed |= {f"{again[k]:+.3f}" for k in ("difference", "ci_low", "ci_high") if again[k] is not None}
    pooled = results["comparisons"]["federated vs pooled"]
    allowed.add(f"{100 * pooled['value_a'] / pooled['value_b']:.0f}")
    audit = json.loads((out / "synth" / "audit" / "audit.json").read_text())
    allowed |= {f"{audit['label_fidelity'][k]:.3f}" for k in ("accuracy", "chance_accuracy")}
    allowed.add(f"{audit['memorisation']['near_copy_share']:.3f}")
    sentences = results["findings"]
    assert len(sentences) == 5
    for sentence in sentences:
        for number in NUMBER.findall(sentence.replace("95% CI", "CI")):
            assert number in allowed, (number, sentence)
        for low, high, verdict in re.findall(r"CI ([+-]\d\.\d+) to ([+-]\d\.\d+); (not significant|significant)",
                                             sentence):
            assert (verdict == "significant") == (float(low) > 0 or float(high) < 0), sentence
    html = html_text.unescape((out / "report.html").read_text())
    assert all(sentence in html for sentence in sentences)
    assert html.count("<svg") == 2  # the forest plot and the site heatmap


def test_the_run_stays_de_identified(run):
    out, results, _ = run
    names = [p.name for p in (out / "phantoms" / "images").iterdir()][:5]
    manifest = (out / "cohort" / "manifest.parquet").read_bytes()
    assert not any(name.encode() in manifest for name in names)
    card = json.loads((out / "synth" / "generator" / "generator.json").read_text())
    assert card["data"]["sites"] == [results["generator"]["site"]] == ["site1"]


def _comparison(a, b, difference, low, high):
    return {"a": a, "b": b, "value_a": 0.8, "value_b": 0.8 - difference, "difference": difference, "ci_low": low,
            "ci_high": high}


def test_findings_say_not_significant_where_the_interval_holds_zero():
    results = {"label": "referable_dr", "comparisons": {
        "ImageNet start vs random weights": _comparison("ImageNet start", "random weights", 0.2, 0.1, 0.3),
        "federated vs ImageNet start": _comparison("federated", "ImageNet start", -0.01, -0.05, 0.03),
        "federated vs pooled": _comparison("federated", "pooled", -0.02, -0.06, 0.01),
        "federated vs a alone, on the other sites": _comparison("federated", "a alone", 0.04, 0.01, 0.07),
        "federated vs b alone, on the other sites": _comparison("federated", "b alone", 0.02, -0.01, 0.05),
        "federated vs c alone, on the other sites": _comparison("federated", "c alone", -0.01, -0.04, 0.02)}}
    start, adapted, pooled, alone = findings(results)
    assert start.startswith("The ImageNet start is higher than random weights") and "; significant)" in start
    assert "not significantly different from its ImageNet start" in adapted and "not significant)" in adapted
    assert pooled.startswith("Federated reaches 98% of pooled") and "not significant" in pooled
    assert "beats 2 of 3 sites alone (1 of 3 significantly)" in alone


def _cohort(tmp_path, sites=2):
    generate_cohort(tmp_path / "raw", sites=sites, per_site=12, size=64)
    ingest(tmp_path / "raw", tmp_path / "cohort", IngestConfig(size=32, workers=1))
    return tmp_path / "cohort"


def test_data_the_demo_cannot_use_is_refused_before_any_work(tmp_path):
    cohort = _cohort(tmp_path)
    with pytest.raises(RetfmError, match="has no such column"):
        run_demo(tmp_path / "demo", DemoConfig(data=str(cohort), label="myopia"))
    manifest = Manifest.read(cohort)
    Manifest(manifest.table.assign(site="only"), manifest.root, manifest.metadata).write()
    with pytest.raises(RetfmError, match="has one .only.; deal its patients into sites with --sites N"):
        run_demo(tmp_path / "demo", DemoConfig(data=str(cohort)))
    with pytest.raises(RetfmError, match="the test split holds 1 value.s. of 'amd'"):
        run_demo(tmp_path / "demo", DemoConfig(data=str(cohort), label="amd", sites=2))
    assert not (tmp_path / "demo").exists()  # nothing ran


def test_patients_are_dealt_whole_into_sites(tmp_path):
    cohort = Manifest.read(_cohort(tmp_path, sites=3))
    dealt = deal_sites(cohort, 4, tmp_path / "dealt", seed=1)
    table = dealt.table
    assert sorted(table["site"].unique()) == ["site1", "site2", "site3", "site4"]
    assert (table.groupby("patient_id")["site"].nunique() == 1).all()
    assert len(table) == len(cohort.table) and (table["image_id"] == cohort.table["image_id"]).all()
    again = Manifest.read(tmp_path / "dealt")
    assert all(again.image_path(i).read_bytes() == cohort.image_path(i).read_bytes() for i in range(len(table)))
