"""Embedding throughput: ``retfm embed`` against the published READMEs' loop, in the same run.

Data: ~200 full-resolution (2000 x 2000) fundus JPEGs (the ingest benchmark's, made once under
benchmarks/_work/), listed in a Manifest as they are. Model: the ``retfound-green`` architecture (timm
ViT-S/14 with registers at 392 px) with random weights; the reference uses the very same weights.
Reference: per image, PIL open + torchvision Resize/ToTensor/Normalize + an eager timm forward, in a loop.
retfm: ``retfm embed`` (DataLoader decoding with JPEG draft mode in a worker process, batches of 4 on CPU).
Also checked: on identical input tensors, retfm's model gives the reference model's features.

    python benchmarks/embed.py [--n 200] [--batch-size N] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
from PIL import Image
from torchvision import transforms

from retfm.adapt.embed import embed
from retfm.adapt.embeddings import read_embeddings
from retfm.config import EmbedConfig
from retfm.data.manifest import Manifest
from retfm.models import create, spec
from retfm.models.backbones import POOLING_KWARGS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import WORK, make_inputs  # noqa: E402  (the same 2000 px inputs)


def manifest_over(src: Path, n: int) -> Path:
    files = sorted(src.glob("*.jpg"))[:n]
    table = pd.DataFrame({"image_id": [f"img{i:04d}" for i in range(len(files))],
                          "path": [f.name for f in files], "site": "site1", "split": "test"})
    return Manifest(table, src).write(src / "manifest.parquet")


def reference(files: list[Path], model: torch.nn.Module, size: int, mean, std) -> np.ndarray:
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                    transforms.Normalize(mean, std)])
    features = []
    with torch.no_grad():
        for path in files:
            image = Image.open(path).convert("RGB")
            features.append(model(transform(image).unsqueeze(0))[0].numpy())
    return np.stack(features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    src = make_inputs(args.n)
    manifest_over(src, args.n)
    files = sorted(src.glob("*.jpg"))[:args.n]
    green = spec("retfound-green")
    torch.manual_seed(0)
    ours = create("retfound-green", weights="random").eval()
    plain = timm.create_model(green.architecture, img_size=green.input_size, num_classes=0, **green.model_kwargs,
                              **POOLING_KWARGS[green.pooling]).eval()
    plain.load_state_dict(ours.state_dict())

    batch = torch.randn(4, 3, green.input_size, green.input_size)
    with torch.no_grad():
        same_input_gap = float((ours(batch) - plain(batch)).abs().max())

    start = time.perf_counter()
    reference_features = reference(files, plain, green.input_size, green.mean, green.std)
    reference_s = time.perf_counter() - start

    out = WORK / "embeddings.parquet"
    out.unlink(missing_ok=True)
    shutil.rmtree(out.with_name(out.name + ".parts"), ignore_errors=True)
    # The weights file: retfm loads what the reference uses, through the registry's loading path.
    weights = WORK / "green_random.pt"
    torch.save(plain.state_dict(), weights)
    config = EmbedConfig(model="retfound-green", weights=str(weights), batch_size=args.batch_size,
                         workers=args.workers)
    start = time.perf_counter()
    embed(src / "manifest.parquet", out, config)
    retfm_s = time.perf_counter() - start
    table, vectors, _ = read_embeddings(out)
    order = np.argsort(table["image_id"].to_numpy())
    vectors = vectors[order]
    cosine = np.sum(vectors * reference_features, 1) / (
        np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference_features, axis=1))
    results = {
        "images": len(files), "input_px": Image.open(files[0]).size[0], "model_input_px": green.input_size,
        "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "reference_loop": {"seconds": round(reference_s, 2), "images_per_s": round(len(files) / reference_s, 2)},
        "retfm_embed": {"seconds": round(retfm_s, 2), "images_per_s": round(len(files) / retfm_s, 2),
                        "batch_size": args.batch_size, "workers": args.workers},
        "speedup_vs_reference": round(reference_s / retfm_s, 2),
        "max_abs_feature_gap_on_identical_input": same_input_gap,
        "cosine_retfm_vs_reference_features": {"mean": round(float(cosine.mean()), 5),
                                               "min": round(float(cosine.min()), 5)},
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
