"""Zero-shot recognition and retrieval from a small image-text model trained on CPU (issue: vision-language).

A 4-site phantom cohort (texts composed from the labels with the disease knowledge base), a CLIP model with the
``cnn-demo`` image tower (``--model``) and a small open_clip text transformer trained on the train split; then, on the held-out
test split: zero-shot Top-1 accuracy and AUROC for glaucoma, AMD and DR grade against chance, and retrieval
Precision@5 by label against the label prior (leave-one-out over the test images in the shared space). Runs the
``retfm`` commands a user would run.

    python benchmarks/clip_phantoms.py [--per-site 150] [--steps 400] [--model cnn-demo] [--pairwise] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT_TOWER = "embed_dim: 64, text: {width: 128, heads: 4, layers: 4, context_length: 64}"


def retfm(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "retfm.cli.main", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-site", type=int, default=150)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--model", default="cnn-demo", help="image tower (registry name)")
    parser.add_argument("--loss", default="clip", choices=["clip", "siglip"])
    parser.add_argument("--pairwise", action="store_true", help="CLIP's own pairwise targets, not label-aware ones")
    parser.add_argument("--out", type=Path, default=HERE / "_work" / "clip")
    args = parser.parse_args()
    work = args.out
    if not (work / "cohort" / "manifest.parquet").exists():
        retfm("data", "phantoms", "--out", str(work / "raw"), "--sites", "4", "--per-site", str(args.per_site),
              "--size", "128")
        retfm("data", "ingest", str(work / "raw"), "--out", str(work / "cohort"), "--size", "64", "--workers", "1")
    results: dict = {"per_site": args.per_site, "steps": args.steps, "model": args.model, "loss": args.loss,
                     "label_aware": not args.pairwise}
    if not (work / "clip" / "clip.json").exists():
        results["train_seconds"] = round(retfm(
            "pretrain", "--objective", "clip", "--data", str(work / "cohort"), "--model", args.model,
            "--out", str(work / "clip"), "--steps", str(args.steps), "--batch-size", "64", "--workers", "1",
            "--set", f"objective_options={{{TEXT_TOWER}, loss: {args.loss}, label_aware: {not args.pairwise}}}",
            "--set", "blr=2e-3", "--set", "warmup_steps=50",
            "--set", "checkpoint_every=200"), 1)
    for label in ("glaucoma", "amd", "dr_grade"):
        out = work / f"zeroshot-{label}"
        retfm("zeroshot", "--data", str(work / "cohort"), "--model", str(work / "clip"), "--label", label,
              "--out", str(out), "--bootstrap", "200")
        metrics = json.loads((out / "metrics.json").read_text())
        counts = {c: int(n) for c, n in zip(metrics["classes"], _class_counts(out / "predictions.parquet", label))}
        results[label] = {**metrics["top_k"], "auroc": metrics["metrics"]["auroc"]["value"],
                          "auroc_ci": metrics["metrics"]["auroc"]["ci"],
                          "chance_top1_uniform": round(1 / len(metrics["classes"]), 4),
                          "chance_top1_majority": round(max(counts.values()) / sum(counts.values()), 4),
                          "test_counts": counts}
        print(label, results[label], flush=True)
    index = work / "index"
    retfm("index", "build", "--embeddings", str(work / "zeroshot-glaucoma" / "image_embeddings.parquet"),
          "--out", str(index))
    for label in ("glaucoma", "amd", "dr_grade"):
        retfm("retrieve", "--index", str(index), "--evaluate", "--label", label, "--metrics",
              str(work / f"retrieval-{label}.json"))
        overall = json.loads((work / f"retrieval-{label}.json").read_text())["overall"]
        results[f"retrieval_{label}"] = overall
        print(f"retrieval {label}", overall, flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def _class_counts(predictions: Path, label: str):
    import pandas as pd

    return pd.read_parquet(predictions)[label].astype(str).value_counts().sort_index().to_numpy()


if __name__ == "__main__":
    main()
