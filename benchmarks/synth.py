"""Synthetic data end to end on a phantom cohort, on the CPU (issue 7's "Done when"):

1. train a generator conditioned on referable DR (dr_grade >= 2) at 32 px and sample from it; audit label
   fidelity, fidelity and memorisation in two feature spaces: ``cnn-demo`` with random weights (no pretrained
   retinal encoder is available offline; a random small ResNet's features still separate referable DR at 32 px:
   docs/models.md) and 16 px pixels; then label fidelity at guidance 1 and 3 besides the default 2;
2. train a deliberately overfitted generator on 4 images until it copies them; the same audit must flag it;
3. two-stage MAE pretraining (synthetic, then real) against real-only pretraining; a logistic probe of
   referable DR on each encoder's frozen features of real images.

Run: ``PYTHONPATH=src python benchmarks/synth.py [--out DIR]``; prints one JSON (and writes DIR/results.json).
Every number comes from this run; docs/synth.md quotes one run on the project's shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pandas as pd
from sklearn.metrics import roc_auc_score

from retfm.adapt.probe import LogisticHead
from retfm.data.config import IngestConfig
from retfm.data.ingest import ingest
from retfm.data.manifest import Manifest
from retfm.data.phantoms import generate_cohort
from retfm.pretrain.config import PretrainConfig
from retfm.pretrain.trainer import pretrain
from retfm.synth.audit import Encoder, audit
from retfm.synth.config import SynthAuditConfig, SynthSampleConfig, SynthTrainConfig
from retfm.synth.sample import sample
from retfm.synth.train import train

LABEL = "referable_dr"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/retfm-synth-bench"))
    parser.add_argument("--per-site", type=int, default=80)
    parser.add_argument("--steps", type=int, default=1500, help="generator training steps")
    parser.add_argument("--size", type=int, default=32, help="generator image size")
    parser.add_argument("--overfit-steps", type=int, default=4000)
    parser.add_argument("--n", type=int, default=120, help="synthetic images sampled")
    parser.add_argument("--prediction", default="v_prediction", choices=["v_prediction", "epsilon"])
    parser.add_argument("--noise-schedule", default="squaredcos_cap_v2", choices=["squaredcos_cap_v2", "linear"])
    parser.add_argument("--generator", type=Path, help="reuse a generator trained on this cohort with the settings "
                                                        "below (skips that training, e.g. on a busy machine)")
    parser.add_argument("--pretrain-steps", type=int, default=60)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    out, results, clock = args.out, {}, time.perf_counter()

    generate_cohort(out / "raw", sites=3, per_site=args.per_site, size=128, seed=0)
    ingest(out / "raw", out / "real", IngestConfig(size=64, workers=1))
    manifest = Manifest.read(out / "real")
    manifest.table[LABEL] = (manifest.table["dr_grade"] >= 2).astype(int)
    manifest.write()
    results["cohort"] = {"images": len(manifest.table), "splits": manifest.table["split"].value_counts().to_dict(),
                         f"{LABEL}_share": round(float(manifest.table[LABEL].mean()), 3)}

    # 1. a normal generator; three UNet levels put attention at 8x8 for 32 px
    config = SynthTrainConfig(data=str(out / "real"), label=LABEL, size=args.size,
                              block_out_channels=(32, 64, 64) if args.size >= 32 else (32, 64),
                              steps=args.steps, batch_size=32, lr=2e-3, warmup_steps=20, workers=0,
                              checkpoint_every=500, log_every=50, prediction=args.prediction,
                              noise_schedule=args.noise_schedule)
    if args.generator:
        shutil.copytree(args.generator, out / "generator")
        card = json.loads((out / "generator" / "generator.json").read_text())
    else:
        card = train(config, out / "generator")
    losses = [json.loads(line)["loss"] for line in (out / "generator" / "log.jsonl").read_text().splitlines()]
    _save(out, results)
    results["generator"] = {"reused": str(args.generator or ""), "steps": card["steps"], "images_seen": card["images_seen"],
                            "cpu_minutes": round(card["compute"]["device_hours"] * 60, 2),
                            "loss_first_logged": losses[0], "loss_last_logged": losses[-1]}
    started = time.perf_counter()
    sampling = SynthSampleConfig(n=args.n, labels=f"{LABEL}=0:0.5,1:0.5", inference_steps=50, guidance=2.0,
                                 batch_size=40)
    sample(out / "generator", out / "synthetic", sampling)
    results["sampling_minutes"] = round((time.perf_counter() - started) / 60, 2)
    # two feature spaces: a random small ResNet's (disease signs at 32 px) and 16 px pixels (copies)
    spaces = {"cnn-demo": SynthAuditConfig(model="cnn-demo", weights="random"),
              "pixels": SynthAuditConfig(model="pixels", pixel_size=16)}
    results["audit_normal"] = {name: _summary(audit(out / "generator", out / "real", out / "synthetic",
                                                    out / f"audit-{name}", space)) for name, space in spaces.items()}
    # how guidance trades label fidelity against fidelity, in the space that sees disease signs
    for guidance in (1.0, 3.0):
        name = f"guidance{guidance:g}"
        sample(out / "generator", out / f"synthetic_{name}", sampling.model_copy(update={"guidance": guidance}))
        results[f"audit_{name}"] = _summary(audit(out / "generator", out / "real", out / f"synthetic_{name}",
                                                  out / f"audit_{name}", spaces["cnn-demo"]))
    _save(out, results)

    # 2. a generator that copies: 4 training images (2 per label value) at 16 px, each seen 8 times per batch at
    # different noise levels, no condition dropout, no flips
    train_rows = manifest.table[manifest.table["split"] == "train"]
    few = pd.concat([train_rows[train_rows[LABEL] == value].head(2) for value in (0, 1)])
    Manifest(few.reset_index(drop=True), manifest.root).write(out / "real" / "few.parquet")
    overfit = config.model_copy(update={"data": str(out / "real" / "few.parquet"), "steps": args.overfit_steps,
                                        "size": 16, "block_out_channels": (32, 64), "cond_drop": 0.0,
                                        "flip": False})
    card = train(overfit, out / "overfit")
    results["overfit_generator"] = {"steps": card["steps"], "batch_size": overfit.batch_size,
                                    "cpu_minutes": round(card["compute"]["device_hours"] * 60, 2)}
    # guidance 1 (conditional only): with no condition dropout the null class never trained
    sample(out / "overfit", out / "overfit_synthetic",
           sampling.model_copy(update={"n": args.n // 4, "labels": None, "guidance": 1.0, "inference_steps": 50}))
    results["audit_overfit"] = {name: _summary(audit(out / "overfit", out / "real" / "few.parquet",
                                                     out / "overfit_synthetic", out / f"overfit_audit-{name}", space))
                                for name, space in spaces.items()}

    _save(out, results)

    # 3. two-stage pretraining against real-only
    results["pretraining"] = _two_stage(out, args.pretrain_steps)
    results["total_minutes"] = round((time.perf_counter() - clock) / 60, 2)
    _save(out, results)
    print(json.dumps(results, indent=2))


def _save(out: Path, results: dict) -> None:
    """Results so far, so that a run stopped early still reports its finished parts."""
    (out / "results.json").write_text(json.dumps(results, indent=2))


def _summary(result: dict) -> dict:
    m, labels = result["memorisation"], result["label_fidelity"]
    return {"frechet_distance": round(result["fidelity"]["frechet_distance"], 3),
            "precision": result["fidelity"]["precision"], "recall": result["fidelity"]["recall"],
            **{f"label_{k}": round(v, 3) for k, v in labels.items() if isinstance(v, float)},
            "label_accuracy_ci95": [round(v, 3) for v in labels.get("accuracy_ci95", [])],
            "near_copies": m["near_copies"], "near_copy_share": round(m["near_copy_share"], 3),
            "flagged": m["flagged"], "real_to_real_median": round(m["real_to_real_median"], 3),
            "synthetic_to_real_median": round(m["synthetic_to_real_median"], 3)}


def _two_stage(out: Path, steps: int) -> dict:
    base = dict(objective="mae", model="tiny-vit", steps=steps, workers=0, warmup_steps=10,
                blr=1.5e-3, checkpoint_every=steps, batch_size=16, log_every=steps,
                objective_options={"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2})
    pretrain(PretrainConfig(data=[str(out / "synthetic")], **base), out / "pre_synthetic")
    synthetic_model = str(out / "pre_synthetic" / "model.safetensors")
    pretrain(PretrainConfig(data=[str(out / "real")], **{**base, "model": synthetic_model, "init": synthetic_model}),
             out / "pre_two_stage")
    pretrain(PretrainConfig(data=[str(out / "real")], **base), out / "pre_real")
    pretrain(PretrainConfig(data=[str(out / "real")], **{**base, "steps": 2 * steps}), out / "pre_real_long")
    real = Manifest.read(out / "real")
    return {name: _probe(real, str(out / folder / "model.safetensors"))
            for name, folder in [("synthetic_then_real", "pre_two_stage"), ("real_only_same_real_steps", "pre_real"),
                                 ("real_only_same_total_steps", "pre_real_long")]}


def _probe(real: Manifest, model: str) -> dict:
    """Logistic probe of the label on frozen features: fit on train, C on val, scored on test."""
    features = Encoder(SynthAuditConfig(model=model))(real)
    y = real.table[LABEL].to_numpy()
    split = real.table["split"].to_numpy()
    head = LogisticHead(seed=0)
    head.fit(features[split == "train"], y[split == "train"], features[split == "val"], y[split == "val"], 2)
    probs = head.predict_proba(features[split == "test"])
    return {"test_accuracy": round(float((probs.argmax(1) == y[split == "test"]).mean()), 3),
            "test_auroc": round(float(roc_auc_score(y[split == "test"], probs[:, 1])), 3),
            "test_majority_share": round(float(max(y[split == "test"].mean(), 1 - y[split == "test"].mean())), 3)}


if __name__ == "__main__":
    main()
