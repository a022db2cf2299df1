"""Embedding throughput and fidelity per inference engine: a plain eager loop against ``retfm embed``, interleaved.

Data: the first ``--n`` real fundus JPEGs of ../shared/data/mexfundus (512 x 512, copied under benchmarks/_work so
that a manifest can sit beside them), listed in a Manifest as they are; decoding is part of every timing.
Models: ``efficientnet-lite0`` (its ImageNet weights), ``retfound-green`` (ViT-S/14 with registers at 392 px) or
``retfound-mae-cfp`` (ViT-L/16 at 224 px), random weights for the ViTs; every variant uses the very same weights.

Variants, run round-robin for ``--rounds`` rounds so that a job beside this one slows all of them alike:
``loop``, the published READMEs' loop (per image: PIL open, torchvision Resize/ToTensor/Normalize, an eager timm
forward); then ``retfm embed`` end to end (model loading, the engine's export on the first round, its fidelity
check on the calibration images, DataLoader decoding) per engine and precision, and ``auto`` (its default, and
``--precision fp32``: what auto does on a CPU without bf16 instructions). Fidelity: each
variant's features against ``retfm embed --engine torch --precision fp32`` on the same images (same
preprocessing), cosine raw and after subtracting the mean feature. ``auto`` is made to choose here whatever
``--n`` (retfm embed otherwise keeps a job that PyTorch eager finishes within a minute on PyTorch eager).

``--probe``: also the probe AUROC for referable DR (dr >= 1) on mexfundus's graded images with the patient split
of benchmarks/mexfundus.py, from fp32, bf16 and int8 embeddings (int8 calibrated on those images).

On a 2-core machine shared with another job, give every variant one thread (``--threads 1``): two OpenMP threads
that wait for each other on one free core make PyTorch eager 30x slower (1.0-1.5 s instead of 34 ms per
EfficientNet-Lite0 image, measured here), which would flatter every other engine.

    python benchmarks/embed.py --model efficientnet-lite0 --n 400 --rounds 3 --probe --threads 1
    python benchmarks/embed.py --model retfound-green --n 120 --rounds 2 --threads 1
    python benchmarks/embed.py --model retfound-mae-cfp --n 48 --rounds 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
from PIL import Image
from torchvision import transforms

from retfm.adapt.config import EmbedConfig, ProbeConfig
from retfm.adapt.embed import embed
from retfm.adapt.embeddings import read_embeddings
from retfm.adapt.probe import probe
from retfm.data.manifest import Manifest
from retfm.models import create, spec
from retfm.models import engine as engine_module
from retfm.models.backbones import POOLING_KWARGS
from retfm.models.engine import cpu_has_bf16, fidelity

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from mexfundus import DEFAULT_SOURCE, prepare  # noqa: E402

WORK = HERE / "_work" / "embed"
VARIANTS = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "fp32"),
            ("openvino", "bf16"), ("openvino", "int8"), ("auto", None), ("auto", "fp32")]
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def photographs(n: int) -> Path:
    """The first n mexfundus JPEGs, copied into a work folder with a manifest beside them."""
    folder = WORK / f"mexfundus-{n}"
    if not (folder / "manifest.parquet").exists():
        folder.mkdir(parents=True, exist_ok=True)
        files = sorted((DEFAULT_SOURCE / "images").glob("*.jpg"))[:n]
        for file in files:
            shutil.copyfile(file, folder / file.name)
        table = pd.DataFrame({"image_id": [f.stem for f in files], "path": [f.name for f in files],
                              "site": "mex", "split": "test"})
        Manifest(table, folder).write(folder / "manifest.parquet")
    return folder


def weights_file(name: str) -> tuple[torch.nn.Module, str | None]:
    """The model retfm loads, and the weights file it loads (None: the model's own, shipped weights)."""
    if spec(name).package_file:
        return create(name), None
    path = WORK / f"{name}-random.pt"
    if not path.exists():
        torch.manual_seed(0)
        WORK.mkdir(parents=True, exist_ok=True)
        torch.save(create(name, weights="random").state_dict(), path)
    return create(name, weights=str(path)), str(path)


def eager_loop(files: list[Path], model: torch.nn.Module, model_spec) -> np.ndarray:
    interpolation = transforms.InterpolationMode(model_spec.interpolation)
    transform = transforms.Compose([transforms.Resize((model_spec.input_size,) * 2, interpolation=interpolation),
                                    transforms.ToTensor(), transforms.Normalize(model_spec.mean, model_spec.std)])
    features = []
    with torch.no_grad():
        for path in files:
            image = Image.open(path).convert("RGB")
            features.append(model(transform(image).unsqueeze(0))[0].numpy())
    return np.stack(features)


def cosines(a: np.ndarray, b: np.ndarray) -> dict:
    """retfm's engine check (``fidelity``) of features ``a`` against reference ``b``: raw and centred cosines."""
    values = fidelity(torch.from_numpy(a), torch.from_numpy(b))
    return {k: values[k] for k in ("cosine_mean", "cosine_min", "centred_cosine", "centred_cosine_mean",
                                   "centred_cosine_min")}


def run_embed(data: Path, name: str, weights: str | None, engine: str, precision: str | None, batch: int | None,
              out: Path) -> tuple[float, np.ndarray, dict]:
    shutil.rmtree(out.with_name(out.name + ".parts"), ignore_errors=True)
    out.unlink(missing_ok=True)
    config = EmbedConfig(model=name, weights=weights, engine=engine, precision=precision, batch_size=batch,
                         workers=1)
    start = time.perf_counter()
    embed(data, out, config)
    seconds = time.perf_counter() - start
    table, vectors, meta = read_embeddings(out)
    return seconds, vectors[np.argsort(table["image_id"].to_numpy())], json.loads(meta["retfm.engine"])


def throughput(args) -> dict:
    model_spec = spec(args.model)
    data = photographs(args.n)
    files = sorted(data.glob("*.jpg"))
    ours, weights = weights_file(args.model)
    plain = timm.create_model(model_spec.architecture, num_classes=0, **model_spec.model_kwargs,
                              **POOLING_KWARGS[model_spec.pooling],
                              **({} if model_spec.pooling == "conv_avg" else {"img_size": model_spec.input_size}))
    plain.load_state_dict(ours.state_dict())
    plain.eval()
    variants = ["loop"] + [v for v in (f"{e} {p or 'default'}" for e, p in VARIANTS)
                           if not args.variants or v in args.variants.split(",")]
    seconds = {v: [] for v in variants}
    features, engines, loads = {}, {}, []
    for round_index in range(args.rounds):
        for variant in variants:
            loads.append(os.getloadavg()[0])
            if variant == "loop":
                start = time.perf_counter()
                features[variant] = eager_loop(files, plain, model_spec)
                seconds[variant].append(time.perf_counter() - start)
                continue
            engine, precision = variant.split()
            took, features[variant], engines[variant] = run_embed(
                data, args.model, weights, engine, None if precision == "default" else precision, args.batch_size,
                WORK / f"{args.model}-{engine}-{precision}.parquet")
            seconds[variant].append(took)
            print(f"round {round_index + 1} {variant}: {took:.1f} s", file=sys.stderr, flush=True)
    reference = features.get("torch fp32", features["loop"])  # the loop's resize differs slightly
    rows = {}
    for variant in variants:
        ratios = [loop / mine for loop, mine in zip(seconds["loop"], seconds[variant])]  # paired, round by round
        later = seconds[variant][1:] or seconds[variant]  # after the first round: exports cached
        rows[variant] = {
            "images_per_s": round(len(files) / statistics.median(later), 2),
            "vs_loop": round(statistics.median(ratios[1:] or ratios), 2),
            "first_round_s": round(seconds[variant][0], 1), "seconds": [round(s, 1) for s in seconds[variant]],
            "vs_retfm_torch_fp32": cosines(features[variant], reference),
            "engine": None if variant == "loop" else {k: engines[variant][k] for k in ("engine", "precision")},
        }
    for variant in {"auto default", "auto fp32"} & set(rows):
        rows[variant]["chosen_from"] = engines[variant]["fidelity"].get("tried")
    return {"model": args.model, "input_px": model_spec.input_size, "images": len(files),
            "photograph_px": Image.open(files[0]).size[0], "rounds": args.rounds,
            "batch_size": args.batch_size or 4, "torch_threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "cpu_flags": cpu_flags(), "bf16_per_openvino": cpu_has_bf16(),
            "load_average_1min": {"min": round(min(loads), 2), "max": round(max(loads), 2),
                                  "mean": round(statistics.mean(loads), 2)},
            "variants": rows}


def probe_auroc(args) -> dict:
    """Referable-DR probe AUROC from fp32, bf16 and int8 embeddings of mexfundus's graded images."""
    cohort = prepare(HERE / "_work" / "mexfundus")
    table = Manifest.read(cohort).table
    graded = Manifest(table[table["referable_dr"].notna()].reset_index(drop=True), cohort)
    manifest = graded.write(cohort / "graded.parquet")
    _, weights = weights_file(args.model)
    results = {}
    vectors = {}
    for engine, precision in (("torch", "fp32"), ("openvino", "bf16"), ("openvino", "int8")):
        out = WORK / f"probe-{args.model}-{precision}.parquet"
        _, vectors[precision], record = run_embed(manifest, args.model, weights, engine, precision, args.batch_size,
                                                  out)
        metrics = probe(out, WORK / f"probe-{args.model}-{precision}", ProbeConfig(label="referable_dr",
                                                                                  bootstrap=200))
        results[precision] = {"test_auroc": round(metrics["metrics"]["auroc"]["value"], 4),
                              "engine": record["engine"], "calibration": record["fidelity"]}
    for precision in ("bf16", "int8"):
        results[precision]["auroc_change"] = round(results[precision]["test_auroc"] - results["fp32"]["test_auroc"], 4)
        results[precision]["features_vs_fp32_all_images"] = cosines(vectors[precision], vectors["fp32"])
    return {"images": len(graded.table), "split_counts": graded.table["split"].value_counts().to_dict(),
            **results}


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [flag for flag in FLAGS if flag in flags]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="retfound-green",
                        choices=["efficientnet-lite0", "retfound-green", "retfound-mae-cfp"])
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=2, help="0: no throughput part")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--variants", default=None,
                        help="comma list of the variants to time beside the loop, e.g. 'onnxruntime fp32,auto "
                             "default' (default: all; fidelity is against 'torch fp32' when timed, else the loop)")
    parser.add_argument("--probe", action="store_true", help="also the int8 probe AUROC change on mexfundus")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads, and so every engine's (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine_module.AUTO_MIN_EAGER_SECONDS = 0  # measure auto's choice on any --n
    os.environ["RETFM_CACHE"] = str(WORK / "cache")  # emptied: the first round pays every export
    shutil.rmtree(WORK / "cache", ignore_errors=True)
    results = {}
    for part, measure, wanted in (("throughput", throughput, args.rounds > 0),
                                  ("probe_referable_dr", probe_auroc, args.probe)):
        if wanted:
            results[part] = measure(args)
            (WORK / f"results-{args.model}-{part}.json").write_text(json.dumps(results[part], indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
