"""Ingest throughput: ``retfm data ingest`` against a plain reference pipeline, in the same run.

Data: N phantom fundus JPEGs of about 2000 x 2000 px (camera-like), stored once under benchmarks/_work/.
Reference: one process, PIL full decode, resize to 512 x 512 (antialiased), PNG write — what a short script does.
retfm: the full ingest (JPEG draft decoding, field-of-view detection and crop, quality score, PNG write, manifest,
report) with 1 worker, 2 workers and all cores.

    python benchmarks/ingest.py [--n 200] [--size 512]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from retfm.data.config import IngestConfig
from retfm.data.ingest import ingest
from retfm.data.phantoms import render_fundus, site_profiles

WORK = Path(__file__).resolve().parent / "_work" / "ingest"


def make_inputs(n: int, side: int = 2000) -> Path:
    src = WORK / f"src_{n}_{side}"
    if src.exists() and len(list(src.glob("*.jpg"))) == n:
        return src
    src.mkdir(parents=True, exist_ok=True)
    sites = site_profiles(3, seed=0)
    for i in range(n):
        rng = np.random.default_rng([7, i])
        rgb, _ = render_fundus(rng, side, eye="LR"[i % 2], dr_grade=i % 5, cdr=0.3 + 0.1 * (i % 5), amd=bool(i % 3 == 0),
                               site=sites[0])
        if rgb.shape[0] != side:  # the clean site renders at scale 1; guard against style changes
            rgb = np.asarray(Image.fromarray(rgb).resize((side, side)))
        Image.fromarray(rgb).save(src / f"img_{i:04d}.jpg", quality=92)
    return src


def reference(src: Path, out: Path, size: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.jpg")):
        with Image.open(path) as image:
            image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS).save(out / f"{path.stem}.png")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    src = make_inputs(args.n)
    megapixels = np.mean([np.prod(Image.open(p).size) for p in sorted(src.glob("*.jpg"))[:5]]) / 1e6
    results = {"images": args.n, "input_megapixels": round(float(megapixels), 2), "output_size": args.size,
               "cores": os.cpu_count()}
    out = WORK / "out"
    runs = [("reference_pil_1proc", lambda: reference(src, out, args.size))]
    for workers in sorted({1, 2, os.cpu_count() or 1}):
        runs.append((f"retfm_{workers}workers",
                     lambda workers=workers: ingest(src, out, IngestConfig(size=args.size, workers=workers))))
    for name, run in runs:
        shutil.rmtree(out, ignore_errors=True)
        seconds = timed(run)
        results[name] = {"seconds": round(seconds, 2), "images_per_s": round(args.n / seconds, 1)}
    ref = results["reference_pil_1proc"]["images_per_s"]
    for name in list(results):
        if name.startswith("retfm_"):
            results[name]["speedup_vs_reference"] = round(results[name]["images_per_s"] / ref, 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
