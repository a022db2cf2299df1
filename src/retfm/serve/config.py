"""Options of ``retfm serve``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from retfm.config import Device, Engine, Options


class ServeConfig(Options):
    """Options of ``retfm serve`` (see docs/serve.md)."""

    model: Path = Field(..., description="classifier checkpoint from `retfm finetune` (model.safetensors)")
    index: Path | None = Field(None, description="retrieval index folder from `retfm index build` (similar cases)")
    api_key: str = Field(..., min_length=16, repr=False, description="the key clients send as X-API-Key")
    device: Device = "cpu"
    engine: Engine = Field(
        "auto", description="inference engine of the prediction and similar-case passes (heatmaps use PyTorch)")
    precision: Literal["fp32", "bf16"] | None = Field(
        None, description="none: fp32, or bf16 under auto where the CPU has it and features match")
    max_upload_mb: float = Field(20.0, gt=0, description="largest request body accepted")
    max_pixels: int = Field(40_000_000, ge=1, description="largest decoded image; more is refused as a bomb")
    max_batch_images: int = Field(200, ge=1, description="images per /v1/batch request (files plus zip entries)")
    min_quality: float = Field(0.5, ge=0, le=1, description="below this quality score an image is ungradable")
    fundus_size: int = Field(512, ge=16, description="side the field-of-view crop is shrunk to, as ingest does")
    batch_size: int = Field(16, ge=1, description="micro-batching: most images in one forward pass")
    batch_wait_ms: float = Field(10.0, ge=0, description="micro-batching: longest wait for a batch to fill")
    k: int = Field(5, ge=1, le=50, description="similar cases returned")
    keep_uploads: Path | None = Field(None, description="write each upload here under a random name (default: "
                                                        "uploads stay in memory only)")

