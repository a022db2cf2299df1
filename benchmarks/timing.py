"""Timing a training step the same way in every benchmark: one warm-up step, then ``steps`` timed ones; peak
memory is max RSS on CPU (so run each variant in its own process) or max allocated on CUDA."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import torch


def time_steps(step: Callable[[], None], steps: int, batch: int, device: str) -> dict:
    step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"images_per_s": round(steps * batch / seconds, 2), "peak_memory_mb": round(peak / 2**20),
            "step_seconds": round(seconds / steps, 3)}
