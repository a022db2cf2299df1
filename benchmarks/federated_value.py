"""Does federated pretraining give sites what pooling would, and more than each site alone? Real photographs.

Sites: the mexfundus patients (benchmarks/mexfundus.py's patient-level train / val / test split, unchanged) are
dealt into 4 sites *by patient*, with clearly different label mixes: within each split, patients with referable
DR go to sites a-d with shares 0.35 / 0.30 / 0.20 / 0.15 and patients without it with 0.15 / 0.20 / 0.30 / 0.35
(so referable DR is common at site a and rare at site d); the ungraded patients (the DME acquisition batch, train
only: pretraining images, never probed) are dealt evenly.

Pretraining, every one with one of retfm's fundus-Lite0 recipes (``--recipe``; by default
``configs/pretrain-fundus-lite0.yaml``: token reconstruction, the ImageNet EfficientNet-Lite0 as its own teacher,
224 px, batch 32, bf16; or ``configs/pretrain-fundus-lite0-from-lite2.yaml``: the ImageNet Lite2 as the teacher):

- ``fedavg`` / ``fedmedian``: ``retfm federated run`` (Flower simulation), ``rounds`` x ``local_steps`` at each
  site; FedAvg and the robust coordinate-wise median;
- ``pooled``: ``retfm pretrain`` on every site's images, as many steps as the whole federation;
- ``local a`` .. ``local d``: ``retfm pretrain`` on one site's images, as many steps as that site did;
- ``imagenet``: the start; ``random``: random weights of the same network.

Downstream, referable DR: one logistic probe per model (``retfm probe``: fitted on every site's training
patients, C chosen on validation), scored on the test patients overall, per site and on the sites a local model
never saw; and its validation AUROC (``validation``: the head fitted on train, scored on val), what designs are
chosen on. Then the classifier itself: ``retfm federated run`` with ``task: finetune`` (full fine-tuning from the
ImageNet start, FedAvg) against each site fine-tuning alone for the same rounds and steps (the same local
function, one site). 95% CIs and paired bootstrap differences (patients resampled) from ``retfm.evaluate``.

    python benchmarks/federated_value.py [--out benchmarks/_work/federated_value] [--recipe CONFIG]
                                         [--parts pretrain,finetune,robust]

Every stage is cached in ``--out`` (a rerun continues); results go to ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import mexfundus
import numpy as np
import pandas as pd
import torch
import yaml
from pretraining_value import validation_auroc
from sklearn.metrics import roc_auc_score

from retfm.adapt.finetune import predict
from retfm.adapt.predictions import predictions_table, write_predictions
from retfm.data.manifest import Manifest
from retfm.evaluate import read_predictions
from retfm.evaluate.compare import compare_predictions
from retfm.evaluate.metrics import as_strings
from retfm.federated.config import FederatedConfig
from retfm.federated.simulation import resolve_sites
from retfm.federated.task import load_shared, local_finetune as site_work, seeded_classifier, shared_state
from retfm.models import create, preprocessing, spec

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RECIPE = ROOT / "configs" / "pretrain-fundus-lite0.yaml"
SITES = ("a", "b", "c", "d")
SHARES = {True: (0.35, 0.30, 0.20, 0.15), False: (0.15, 0.20, 0.30, 0.35)}  # by referable DR
LABEL = "referable_dr"
FINETUNE = {"model": "efficientnet-lite0", "label": LABEL, "classes": [0, 1], "adaptation": "full",
            "batch_size": 16, "blr": 1e-3, "precision": "bf16", "workers": 1}


def retfm(*args: str) -> float:
    """Run one retfm command as a user would; return its wall-clock seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "retfm.cli.main", *args], check=True, stdout=subprocess.DEVNULL)
    return round(time.perf_counter() - start, 1)


def deal_sites(labels: pd.DataFrame, seed: int = 0) -> pd.Series:
    """Each image's site, by patient: within each split, referable and non-referable patients dealt to the sites
    with :data:`SHARES`; ungraded patients evenly."""
    split = mexfundus.patient_splits(labels)
    patients = pd.DataFrame({"patient_id": labels["patient_id"], "split": split, "dr": labels["dr"]})
    per_patient = patients.groupby("patient_id").agg(split=("split", "first"), dr=("dr", "max"))
    rng = np.random.default_rng(seed)
    site_of = {}
    for (split_name, graded, referable), group in per_patient.groupby(
            [per_patient["split"], per_patient["dr"].notna(), per_patient["dr"] >= 1]):
        shares = SHARES[bool(referable)] if graded else (0.25,) * 4
        order = rng.permutation(group.index.to_numpy())
        cuts = np.round(np.cumsum(shares[:-1]) * len(order)).astype(int)
        for site, part in zip(SITES, np.split(order, cuts)):
            site_of.update(dict.fromkeys(part, site))
    return labels["patient_id"].map(site_of)


def prepare(out: Path, source: Path) -> Path:
    """The cohort with its sites, ingested at 256 px (the recipe trains at 224)."""
    if (out / "manifest.parquet").exists():
        return out
    labels = pd.read_csv(source / "labels.csv", dtype={"patient_id": str})
    table = pd.DataFrame({
        "path": labels["file"], "patient_id": labels["patient_id"], "eye": labels["eye"].map({"OD": "R", "OS": "L"}),
        LABEL: (labels["dr"] >= 1).astype("Int64").where(labels["dr"].notna()),
        "split": mexfundus.patient_splits(labels), "site": deal_sites(labels)})
    out.parent.mkdir(parents=True, exist_ok=True)
    csv = out.parent / f"{out.name}-labels.csv"
    table.to_csv(csv, index=False)
    retfm("data", "ingest", str(csv), "--out", str(out), "--format", "csv", "--path-column", "path", "--size", "256",
          "--image-format", "jpg", "--set", f"image_root={source}")
    return out


def recipe(path: Path, site_steps: int) -> dict:
    """The pretraining recipe's options a site runs (steps and checkpoint cadence are the federation's; the
    warmup is a single site's of as many steps)."""
    options = yaml.safe_load(path.read_text())
    # workers 0: a simulated site decodes in its own Ray worker (a decoding process per site would double memory)
    return {**{k: v for k, v in options.items() if k not in ("steps", "checkpoint_every", "log_every")},
            "warmup_steps": warmup(site_steps), "workers": 0}


def warmup(steps: int) -> int:
    return max(1, steps // 15)


def once(out: Path, *args: str) -> float | None:
    """Run a pretraining command unless ``out`` already holds its model; its wall-clock seconds, kept in
    ``out/seconds.txt`` so that a rerun from the cache reports them too (None if they were never recorded)."""
    record = out / "seconds.txt"
    if (out / "model.safetensors").exists():
        return float(record.read_text()) if record.exists() else None
    seconds = retfm(*args)
    record.write_text(f"{seconds}\n")
    return seconds


def federate(out: Path, config: dict) -> float | None:
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return once(out, "federated", "run", str(path), "--out", str(out))


def pretrain(out: Path, cohort: Path, recipe_file: Path, steps: int, site: str | None = None) -> float | None:
    sites = ["--set", f"sites=[{site}]"] if site else []
    return once(out, "pretrain", "--config", str(recipe_file), "--data", str(cohort), "--steps", str(steps),
                "--set", f"warmup_steps={warmup(steps)}", "--set", f"checkpoint_every={steps}",
                *sites, "--out", str(out))


def embedded(work: Path, name: str) -> Path:
    return work / "embeddings" / f"{name.replace(' ', '-')}.parquet"


def probe(work: Path, cohort: Path, name: str, model: list[str]) -> Path:
    folder = work / "probes" / name.replace(" ", "-")
    embeddings = embedded(work, name)
    if not (folder / "predictions.parquet").exists():
        # PyTorch eager for every model alike (the first embeddings were made before the engines existed)
        retfm("embed", "--data", str(cohort), *model, "--out", str(embeddings), "--batch-size", "32",
              "--engine", "torch")
        retfm("probe", "--embeddings", str(embeddings), "--label", LABEL, "--by", "site", "--out", str(folder))
    return folder / "predictions.parquet"


def local_finetune(work: Path, cohort: Path, site: str, rounds: int, steps: int) -> Path:
    """One site fine-tuning alone: the federation's own local function, ``rounds`` x ``steps``, then its test
    predictions on every site's test patients."""
    path = work / "finetune" / f"local-{site}.parquet"
    if path.exists():
        return path
    config = FederatedConfig(data=str(cohort), task="finetune", finetune=FINETUNE, rounds=rounds, local_steps=steps)
    chosen = next(s for s in resolve_sites(config) if s.name == site)
    finetune_config, classes = config.finetune_config(), [str(c) for c in config.classes()]
    weights = shared_state(seeded_classifier(finetune_config, classes)[2])
    for server_round in range(1, rounds + 1):
        weights, _ = site_work(weights, chosen, steps, finetune_config, server_round, classes=classes)
    _, pre, model = seeded_classifier(finetune_config, classes)
    load_shared(model, weights, chosen)
    return _test_predictions(model, pre, cohort, finetune_config, classes, path)


def _test_predictions(model, pre, cohort: Path, config, classes: list[str], path: Path) -> Path:
    """The classifier's probabilities on every site's labelled test images, as a predictions file."""
    manifest = Manifest.read(cohort)
    rows = manifest.table
    test = rows[(rows["split"] == "test") & rows[LABEL].notna()].reset_index(drop=True)
    test[LABEL] = as_strings(test[LABEL])
    probabilities = predict(model, test, manifest.root, pre, config, torch.device("cpu"))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_predictions(path, predictions_table(test, LABEL, classes, probabilities, None), LABEL, classes, "binary",
                      None, {})
    return path


def federated_finetune(work: Path, cohort: Path, rounds: int, steps: int) -> Path:
    out = work / "finetune" / "fedavg"
    federate(out, {"data": str(cohort), "task": "finetune", "finetune": FINETUNE, "rounds": rounds,
                   "local_steps": steps, "strategy": "fedavg", "evaluate_label": LABEL})
    config = FederatedConfig(data=str(cohort), task="finetune", finetune=FINETUNE, rounds=rounds, local_steps=steps)
    classes = [str(c) for c in config.classes()]
    model = create(out / "model.safetensors", num_classes=len(classes))
    return _test_predictions(model, preprocessing(spec(out / "model.safetensors")), cohort,
                             config.finetune_config(), classes, work / "finetune" / "fedavg.parquet")


def aurocs(path: Path) -> dict:
    """Overall and per-site test AUROC of one predictions file (the per-site ones are NaN where a site's test
    patients hold one class only)."""
    table, _ = read_predictions(path)
    y, score = table[LABEL].astype(int).to_numpy(), table["prob_1"].to_numpy()
    per_site = {}
    for site in SITES:
        keep = (table["site"] == site).to_numpy()
        per_site[site] = round(float(roc_auc_score(y[keep], score[keep])), 4) if len(set(y[keep])) == 2 else None
    return {"overall": round(float(roc_auc_score(y, score)), 4), "sites": per_site}


def compare(a: Path, b: Path, sites: list[str] | None = None) -> dict:
    result = compare_predictions(a, b, LABEL, n_boot=2000, seed=0, sites=sites)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()
            if k in ("n", "value_a", "value_b", "difference", "ci_low", "ci_high", "p_bootstrap")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mexfundus", type=Path, default=mexfundus.DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=HERE / "_work" / "federated_value")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the pretraining recipe every model runs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=12)
    parser.add_argument("--finetune-rounds", type=int, default=5)
    parser.add_argument("--finetune-steps", type=int, default=10)
    parser.add_argument("--parts", default="pretrain,finetune,robust",
                        help="pretrain: FedAvg, pooled, each site alone and their probes; finetune: federated "
                             "against single-site fine-tuning; robust: FedMedian pretraining and its probe")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    cohort = prepare(work / "cohort", args.mexfundus)
    site_steps = args.rounds * args.local_steps
    seconds = {}
    others = {s: [o for o in SITES if o != s] for s in SITES}
    results: dict = {"settings": {"recipe": args.recipe.name, "rounds": args.rounds, "local_steps": args.local_steps,
                                  "finetune_rounds": args.finetune_rounds, "finetune_steps": args.finetune_steps,
                                  "shares": {str(k): v for k, v in SHARES.items()}},
                     "sites": site_counts(cohort), "pretraining_seconds": seconds}

    def federated_pretraining(strategy: str) -> None:
        seconds[strategy] = federate(work / strategy, {
            "data": str(cohort), "task": "pretrain", "pretrain": recipe(args.recipe, site_steps), "rounds": args.rounds,
            "local_steps": args.local_steps, "strategy": strategy})

    if "pretrain" in parts:  # the done-when comparisons
        federated_pretraining("fedavg")
        seconds["pooled"] = pretrain(work / "pooled", cohort, args.recipe, site_steps * len(SITES))
        for site in SITES:
            seconds[f"local {site}"] = pretrain(work / f"local-{site}", cohort, args.recipe, site_steps, site)
        models = {"random": ["--model", "efficientnet-lite0", "--weights", "random"],
                  "imagenet": ["--model", "efficientnet-lite0"],
                  **{name: ["--model", str(work / name.replace(" ", "-") / "model.safetensors")]
                     for name in ("fedavg", "pooled", *(f"local {s}" for s in SITES))}}
        probes = {name: probe(work, cohort, name, model) for name, model in models.items()}
        results["probe"] = {name: aurocs(path) for name, path in probes.items()}
        results["validation"] = {name: validation_auroc(embedded(work, name), LABEL) for name in probes}
        results["probe_pairs"] = {
            "fedavg - pooled": compare(probes["fedavg"], probes["pooled"]),
            "fedavg - imagenet": compare(probes["fedavg"], probes["imagenet"]),
            "imagenet - random": compare(probes["imagenet"], probes["random"]),
            **{f"fedavg - local {s} (other sites)": compare(probes["fedavg"], probes[f"local {s}"], others[s])
               for s in SITES}}
        results["fedavg_over_pooled"] = round(results["probe"]["fedavg"]["overall"]
                                              / results["probe"]["pooled"]["overall"], 4)
    if "finetune" in parts:
        finetunes = {"fedavg": federated_finetune(work, cohort, args.finetune_rounds, args.finetune_steps),
                     **{f"local {s}": local_finetune(work, cohort, s, args.finetune_rounds, args.finetune_steps)
                        for s in SITES}}
        results["finetune"] = {name: aurocs(path) for name, path in finetunes.items()}
        results["finetune_pairs"] = {f"fedavg - local {s} (other sites)": compare(
            finetunes["fedavg"], finetunes[f"local {s}"], others[s]) for s in SITES}
    if "robust" in parts:
        federated_pretraining("fedmedian")
        robust = probe(work, cohort, "fedmedian", ["--model", str(work / "fedmedian" / "model.safetensors")])
        results.setdefault("probe", {})["fedmedian"] = aurocs(robust)
        results.setdefault("validation", {})["fedmedian"] = validation_auroc(embedded(work, "fedmedian"), LABEL)
        results.setdefault("probe_pairs", {})["fedmedian - pooled"] = compare(
            robust, work / "probes" / "pooled" / "predictions.parquet")
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def site_counts(cohort: Path) -> dict:
    """Labelled images and referable ones per site and split, and all images per site."""
    manifest = pd.read_parquet(cohort / "manifest.parquet")
    labelled = manifest[manifest[LABEL].notna()]
    return {site: {split: {"images": int(((labelled["site"] == site) & (labelled["split"] == split)).sum()),
                           "referable": int(labelled.loc[(labelled["site"] == site) & (labelled["split"] == split),
                                                         LABEL].sum())}
                   for split in ("train", "val", "test")} | {"all images": int((manifest["site"] == site).sum())}
            for site in SITES}


if __name__ == "__main__":
    main()
