"""Does pretraining help? RetinaMNIST: pretrain a small ViT on the train split, then embed + probe dr_grade on the
test split, against the same architecture with random weights. Runs the ``retfm`` commands a user would run.

Model: ``vit-tiny-p4`` (ViT-Tiny, 4 px patches, 32 px input). Rows: random weights; MAE; token reconstruction
from random weights (its teacher is then a random network); token reconstruction started from the MAE result
(RETFound-Green's recipe: continue from a pretrained model, the teacher being that model). Reported: test macro
AUROC with its 95% bootstrap CI, quadratic kappa, and the CPU minutes of each pretraining.

    python benchmarks/retinamnist_pretrain.py [--npz ../shared/data/retinamnist.npz] [--steps 400] [--tr-steps N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_NPZ = HERE.parents[1] / "shared" / "data" / "retinamnist.npz"


def retfm(*args: str) -> float:
    """Run one retfm command; return its wall-clock seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "retfm.cli.main", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def probe(work: Path, name: str, model: list[str]) -> dict:
    emb = work / f"{name}.parquet"
    retfm("embed", "--data", str(work / "cohort"), *model, "--out", str(emb), "--batch-size", "256")
    retfm("probe", "--embeddings", str(emb), "--label", "dr_grade", "--out", str(work / f"probe-{name}"))
    metrics = json.loads((work / f"probe-{name}" / "metrics.json").read_text())["metrics"]
    return {"auroc": metrics["auroc"]["value"], "auroc_ci": metrics["auroc"]["ci"],
            "kappa_quadratic": metrics["kappa_quadratic"]["value"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", type=Path, default=DEFAULT_NPZ)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--tr-steps", type=int, help="steps of the token-reconstruction runs [default: --steps]")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--runs", default="mae,token-reconstruction,mae+token-reconstruction",
                        help="which pretrainings to run and probe (comma-separated)")
    parser.add_argument("--out", type=Path, default=HERE / "_work" / "retinamnist")
    args = parser.parse_args()
    work = args.out
    if not (work / "cohort" / "manifest.parquet").exists():
        retfm("data", "ingest", str(args.npz), "--out", str(work / "cohort"), "--workers", "1")
    common = ["--data", str(work / "cohort"), "--model", "vit-tiny-p4", "--steps", str(args.steps),
              "--batch-size", str(args.batch_size), "--workers", "1", "--set", "warmup_steps=100",
              "--set", "checkpoint_every=500"]
    tr_steps = ["--steps", str(args.tr_steps or args.steps)]
    runs = {"mae": ["--objective", "mae", "--set", "blr=1.5e-3",
                    "--set", "objective_options={decoder_dim: 128, decoder_depth: 2, decoder_heads: 4}"],
            "token-reconstruction": ["--objective", "token-reconstruction", "--set", "blr=1.5e-3", *tr_steps],
            "mae+token-reconstruction": ["--objective", "token-reconstruction", "--set", "blr=5e-4", *tr_steps,
                                         "--init", str(work / "mae" / "model.safetensors")]}
    results = {"steps": args.steps, "tr_steps": args.tr_steps or args.steps, "batch_size": args.batch_size,
               "random": {**probe(work, "random", ["--model", "vit-tiny-p4", "--weights", "random"]), "pretrain_cpu_minutes": 0.0}}
    for name in args.runs.split(","):
        options = runs[name]
        out = work / name
        if not (out / "model.safetensors").exists():
            retfm("pretrain", *common, *options, "--out", str(out))
        card = json.loads((out / "model.json").read_text())
        results[name] = {**probe(work, name, ["--model", str(out / "model.safetensors")]),
                         "pretrain_cpu_minutes": round(card["compute"]["device_hours"] * 60, 1)}
        print(name, results[name], flush=True)
    print(json.dumps(results, indent=2))
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
