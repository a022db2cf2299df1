"""Screening service under load: ``retfm serve`` answering concurrent requests on loopback, next to a plain loop.

Model: a classifier checkpoint with random weights (the numbers measure speed, not accuracy): ViT-Ti/16 at
224 px by default, or RETFound-Green's ViT-S/14 at 392 px (``--arch retfound-green``, for a GPU).
Input: the CC0 fundus photograph in ../shared/data (1411 px JPEG), else a drawn 1024 px fundus.

Measured in one run:

- reference: per image, in a loop: decode, field-of-view crop and quality, preprocessing, one forward pass of
  batch 1 (what a script without a service does; no HTTP);
- served: ``retfm serve`` in a subprocess on 127.0.0.1, ``--requests`` POST /v1/predict sent at once (httpx,
  one connection each), without heatmaps; once with micro-batching (``--batch-size``) and once with batches of 1,
  so the gain of batching is separated from the cost of HTTP. Reported: errors, p50/p95 latency, throughput,
  and the mean images per forward pass (from /healthz).

``--threads N`` sets torch's intra-op threads in both (the server through OMP_NUM_THREADS): on a machine that
other jobs load, two OpenMP threads on two cores can make a batch-1 forward pass ten times slower than one.

``--engines torch,auto`` serves the micro-batched burst once per inference engine (``retfm serve --engine``),
round-robin for ``--rounds`` rounds, instead of the batching comparison: the engines' throughputs are then paired
round by round under the same outside load.

    python benchmarks/serve.py [--requests 100] [--arch vit-tiny|retfound-green] [--device cpu|cuda] [--threads 1]
    python benchmarks/serve.py --engines torch,auto --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from retfm.models import create, save_checkpoint, spec
from retfm.serve.config import ServeConfig
from retfm.serve.screening import Screener

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "retina_cc0.jpg"
KEY = "benchmark-key-0123456789"
ARCHES = {"vit-tiny": ("tiny-vit", {"model_kwargs": {}, "embed_dim": 192, "input_size": 224}),
          "retfound-green": ("retfound-green", {})}


def make_classifier(folder: Path, arch: str) -> Path:
    base, changes = ARCHES[arch]
    model_spec = dataclasses.replace(spec(base), name=f"{arch}-bench", **changes)
    torch.manual_seed(0)
    model = create(base, weights="random", num_classes=2, **({"embed_dim": 192, "depth": 12, "num_heads": 3,
                                                               "img_size": 224} if arch == "vit-tiny" else {}))
    return save_checkpoint(model, model_spec, folder / "model.safetensors", task="binary", label="finding",
                           classes=["0", "1"], threshold=0.5)


def sample_bytes() -> bytes:
    if SAMPLE.exists():
        return SAMPLE.read_bytes()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import encode, fundus_rgb
    return encode(fundus_rgb(1024))


def reference(model_path: Path, image: bytes, n: int, device: str) -> dict:
    """One image at a time through the same steps, no batching, no HTTP."""
    screener = Screener(ServeConfig(model=model_path, api_key=KEY, device=device, engine="torch"))
    latencies = []
    screener.run_batch([(screener.prepare(image), False)])  # warm-up
    started = time.perf_counter()
    for _ in range(n):
        begin = time.perf_counter()
        prepared = screener.prepare(image)
        with torch.inference_mode():
            logits = screener.model(prepared.inputs["classifier"][None].to(screener.device))
        torch.softmax(logits.float(), dim=1).cpu()
        latencies.append(time.perf_counter() - begin)
    return summary(latencies, time.perf_counter() - started, errors=0)


def served(model_path: Path, image: bytes, n: int, batch_size: int, wait_ms: float, device: str,
           engine: str = "auto") -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RETFM_API_KEY": KEY, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    server = subprocess.Popen([sys.executable, "-m", "retfm.cli.main", "serve", "--model", str(model_path),
                               "--host", "127.0.0.1", "--port", str(port), "--batch-size", str(batch_size),
                               "--batch-wait-ms", str(wait_ms), "--device", device, "--engine", engine],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(base, server)
        httpx.post(f"{base}/v1/predict?heatmap=false", content=image, headers={"X-API-Key": KEY}, timeout=120)
        before = httpx.get(f"{base}/healthz").json()
        latencies, errors, wall = asyncio.run(load(base, image, n))
        after = httpx.get(f"{base}/healthz").json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    passes = after["forward_passes"] - before["forward_passes"]
    result = summary(latencies, wall, errors)
    result["mean_images_per_forward_pass"] = round((after["images_in_passes"] - before["images_in_passes"])
                                                   / max(passes, 1), 2)
    result["engine"] = after["engine"]
    return result


def engines_interleaved(model_path: Path, image: bytes, args) -> dict:
    """The micro-batched burst per engine, round-robin; each round's throughput relative to the first engine's."""
    engines = args.engines.split(",")
    runs = {engine: [] for engine in engines}
    for _ in range(args.rounds):
        for engine in engines:
            runs[engine].append(served(model_path, image, args.requests, args.batch_size, args.batch_wait_ms,
                                       args.device, engine))
    first = runs[engines[0]]
    return {engine: {"runs": done, "throughput_vs_" + engines[0]: [
        round(mine["images_per_s"] / base["images_per_s"], 2) for mine, base in zip(done, first)]}
        for engine, done in runs.items()}


def wait_until_up(base: str, server: subprocess.Popen, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"retfm serve exited with code {server.returncode}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("retfm serve did not come up")


async def load(base: str, image: bytes, n: int) -> tuple[list[float], int, float]:
    """``n`` requests at once, each on its own connection; bounded by a timeout, so the run always ends."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=300) as client:
        async def one() -> tuple[float, bool]:
            begin = time.perf_counter()
            try:
                answer = await client.post("/v1/predict?heatmap=false", content=image, headers={"X-API-Key": KEY})
                ok = answer.status_code == 200 and answer.json()["verdict"] == "gradable"
            except httpx.HTTPError:
                ok = False
            return time.perf_counter() - begin, ok

        started = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(n)))
        wall = time.perf_counter() - started
    return [t for t, _ in results], sum(not ok for _, ok in results), wall


def summary(latencies: list[float], wall: float, errors: int) -> dict:
    values = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": errors, "p50_ms": round(float(np.percentile(values, 50)), 1),
            "p95_ms": round(float(np.percentile(values, 95)), 1), "wall_s": round(wall, 2),
            "images_per_s": round(len(latencies) / wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--arch", choices=sorted(ARCHES), default="vit-tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--engines", help="comma-separated retfm serve --engine values to compare, e.g. torch,auto")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the --engines comparison")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    image = sample_bytes()
    with tempfile.TemporaryDirectory(prefix="retfm-serve-bench-") as work:
        os.environ["RETFM_CACHE"] = work  # the servers' engine exports stay in the scratch folder
        model_path = make_classifier(Path(work), args.arch)
        setup = {"arch": args.arch, "device": args.device, "requests": args.requests,
                 "image_px": list(Image.open(io.BytesIO(image)).size), "torch_threads": torch.get_num_threads(),
                 "cpu_count": os.cpu_count(), "load_average_before": [round(v, 2) for v in os.getloadavg()]}
        if args.engines:
            results = {"setup": setup, "engines": engines_interleaved(model_path, image, args)}
            results["setup"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
            print(json.dumps(results, indent=2))
            if args.out:
                args.out.write_text(json.dumps(results, indent=2) + "\n")
            return
        results = {
            "setup": setup,
            "reference_one_at_a_time": reference(model_path, image, args.requests, args.device),
            "served_micro_batched": served(model_path, image, args.requests, args.batch_size, args.batch_wait_ms,
                                           args.device),
            "served_batch_1": served(model_path, image, args.requests, 1, 0.0, args.device),
        }
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if results["served_micro_batched"]["errors"] or results["served_batch_1"]["errors"]:
        raise SystemExit("some requests failed")


if __name__ == "__main__":
    main()
