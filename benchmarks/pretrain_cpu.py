"""What a CPU training step of token reconstruction costs in each memory layout and precision, side by side.

EfficientNet-Lite0 (ImageNet start, its own teacher) at 224 px, batch 32, random images in memory (no decoding):
the plain step (default contiguous layout, fp32) against channels_last, bf16 autocast, and both (what
``retfm pretrain`` does for a CNN with ``--precision bf16``). Variants are interleaved over ``--rounds`` so that a
load beside the run touches each alike; reported: median images/s and the ratio to the plain step.

    python benchmarks/pretrain_cpu.py [--size 224] [--batch 32] [--steps 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from retfm.models import create
from retfm.pretrain.token_reconstruction import TokenReconstruction

VARIANTS = {"fp32, contiguous (plain)": (False, False), "fp32, channels_last": (True, False),
            "bf16, contiguous": (False, True), "bf16, channels_last (retfm)": (True, True)}


def step_rate(size: int, batch: int, steps: int, channels_last: bool, bf16: bool) -> float:
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    objective = TokenReconstruction(create("efficientnet-lite0", img_size=size)).to(memory_format=layout).train()
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
    optimiser = torch.optim.AdamW(objective.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = objective(images)["loss"]
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, (channels_last, bf16) in VARIANTS.items():
            rates[name].append(step_rate(args.size, args.batch, args.steps, channels_last, bf16))
    plain = statistics.median(rates["fp32, contiguous (plain)"])
    print(f"| EfficientNet-Lite0 token reconstruction, {args.size} px, batch {args.batch} | images/s | vs plain |")
    print("|---|---|---|")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {median / plain:.2f}x |")


if __name__ == "__main__":
    main()
