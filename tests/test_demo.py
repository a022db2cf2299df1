"""retfm demo --quick: the whole road runs, and every number in the report comes from the run's own files."""

import json

import pytest

from retfm.config import IngestConfig
from retfm.data.ingest import ingest
from retfm.data.manifest import Manifest
from retfm.data.phantoms import generate_cohort
from retfm.demo import LABELS, run_demo
from retfm.errors import RetfmError


def test_quick_demo_builds_compares_and_reports(tmp_path):
    results = run_demo(tmp_path / "demo", quick=True, say=lambda line: None)
    out = tmp_path / "demo"
    sites = results["sites"]
    assert sites == ["site1", "site2", "site3"]
    assert set(results["models"]) == {"random", "federated", "pooled", *(f"local {s}" for s in sites)}
    for name, per_label in results["models"].items():
        for label in LABELS:
            metrics = json.loads((out / per_label[label]["report"]).with_name("metrics.json").read_text())
            assert per_label[label]["overall"]["auroc"]["value"] == metrics["metrics"]["auroc"]["value"]
            assert set(per_label[label]["groups"]["site"]) == set(sites)
    # each local-only model against the federated one on the other sites, from the per-site numbers above
    for site, per_label in results["other_sites"].items():
        for label, compared in per_label.items():
            assert site not in compared["sites"]
            if compared["sites"]:
                per_site = results["models"]["federated"][label]["groups"]["site"]
                mean = sum(per_site[s]["auroc"]["value"] for s in compared["sites"]) / len(compared["sites"])
                assert abs(compared["federated"] - mean) < 1e-12
    # a site's generator: trained on that site only, sampled, audited
    generator = results["generator"]
    card = json.loads((out / "synth" / "generator" / "generator.json").read_text())
    assert card["data"]["sites"] == [generator["site"]] == ["site1"]
    assert len(list((out / "synth" / "samples" / "images").iterdir())) == generator["images"]
    assert (out / generator["report"]).is_file()
    html = (out / "report.html").read_text()
    assert "federated against local-only" in html and all(site in html for site in sites)
    assert json.loads((out / "results.json").read_text())["seconds"]
    # de-identified: the phantom source file names reach no output beyond the phantom folder itself
    names = [p.name for p in (out / "phantoms" / "images").iterdir()][:5]
    manifest = (out / "cohort" / "manifest.parquet").read_bytes()
    assert not any(name.encode() in manifest for name in names)


def test_data_without_a_probed_label_is_refused_before_any_work(tmp_path):
    generate_cohort(tmp_path / "raw", sites=2, per_site=4, size=64)
    ingest(tmp_path / "raw", tmp_path / "cohort", IngestConfig(size=32, workers=1))
    manifest = Manifest.read(tmp_path / "cohort")
    Manifest(manifest.table.drop(columns="glaucoma"), manifest.root, manifest.metadata).write()
    with pytest.raises(RetfmError, match="has no glaucoma column"):
        run_demo(tmp_path / "demo", data=tmp_path / "cohort", say=lambda line: None)
    assert list((tmp_path / "demo").iterdir()) == []  # nothing ran
