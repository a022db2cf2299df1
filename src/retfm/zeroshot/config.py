"""Options of ``retfm zeroshot``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from retfm.adapt.config import Names
from retfm.config import Device, Options, Seed


class ZeroshotConfig(Options):
    """Options of ``retfm zeroshot`` (see docs/zeroshot.md)."""

    label: str = Field(..., description="label column whose values are the classes")
    classes: str | None = Field(None, description="conditions per label value: '0=normal fundus,1=glaucoma', or "
                                                  "names in sorted-value order; null: the knowledge base's label "
                                                  "map for the label")
    split: Literal["train", "val", "test", "all"] = Field("test", description="split to classify; all: every image")
    modality: Literal["cfp", "uwf", "oct", "fa"] | None = Field(
        None, description="which signs the prompts describe; null: the images' modality, else cfp")
    by: Names = Field(default_factory=list, description="group columns for per-group metrics")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the 95% CIs")
    seed: Seed = 0
    workers: int = Field(0, ge=0, description="decoding processes beside the model")
    device: Device = "cpu"
