"""Shared test fixtures: offline environment, the real samples in ../shared/data, fundus-like images."""

from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# One share of the cores per test process (pytest-xdist workers, and the commands they start): torch's threads
# contending for the same cores make small-tensor work up to ~100x slower.
os.environ.setdefault("OMP_NUM_THREADS",
                      str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))



@pytest.fixture(scope="session", autouse=True)
def engine_cache(tmp_path_factory):
    """Inference-engine exports (retfm.models.engine) go to a temporary folder, never the user's cache."""
    os.environ["RETFM_CACHE"] = str(tmp_path_factory.mktemp("retfm-cache"))
    return Path(os.environ["RETFM_CACHE"])


def pytest_collection_modifyitems(config, items):
    """Tests marked slow run only when asked for (``-m slow``); the default suite stays fast on 2 cores."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="slow; run with -m slow"))


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_file(name: str) -> Path:
    """A real sample from ../shared/data; the test is skipped where the folder is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def fundus_rgb(size: int = 256, seed: int = 0, width: int | None = None) -> np.ndarray:
    """A plain fundus-like picture: black surround, orange disc with fall-off, a few dark vessels, noise."""
    rng = np.random.default_rng(seed)
    width = width or size
    yy, xx = np.mgrid[:size, :width]
    cx, cy, r = width / 2, size / 2, size * 0.45
    distance = np.hypot(xx - cx, yy - cy) / r
    inside = distance <= 1
    fall_off = np.clip(1.0 - 0.4 * distance ** 2, 0, 1)
    rgb = np.zeros((size, width, 3), np.float32)
    for channel, level in enumerate((210, 95, 40)):
        rgb[..., channel] = inside * level * fall_off
    for _ in range(6):
        angle = rng.uniform(0, 2 * np.pi)
        end = (int(cx + 0.9 * r * np.cos(angle)), int(cy + 0.9 * r * np.sin(angle)))
        cv2.line(rgb, (int(cx - 0.3 * r), int(cy)), end, (120, 30, 20), max(1, size // 100))
    rgb += rng.normal(0, 3, rgb.shape) * inside[..., None]
    return np.clip(rgb, 0, 255).astype(np.uint8)


def encode(image: np.ndarray | Image.Image, fmt: str = "JPEG", **save_options) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    image.save(buffer, format=fmt, **save_options)
    return buffer.getvalue()
