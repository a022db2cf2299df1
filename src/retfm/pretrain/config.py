"""Options of ``retfm pretrain``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from retfm.config import CommaSeparated, Device, Options, Seed, Workers


class LoraOptions(Options):
    """LoRA adapters on a backbone (peft), as ``retfm finetune``'s lora_* options."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(["qkv"], min_length=1, description="backbone module names that get adapters")


OBJECTIVES = ("mae", "token-reconstruction", "clip")  # retfm.pretrain.trainer.build_objective builds each
PUBLISHED = "published"  # PretrainConfig.init: the registry model's own weights


class PretrainConfig(Options):
    """Options of ``retfm pretrain`` (see docs/pretrain.md)."""

    objective: Literal[OBJECTIVES] = Field(..., description="mae (RETFound), token-reconstruction (RETFound-Green) "
                                                         "or clip (image-text; objective_options loss: siglip)")
    data: list[str] = Field(..., min_length=1, json_schema_extra={"repeatable": True},
                            description="ingest folders or manifest files (repeatable: mixed by weight), or one set "
                                        "of shards from `retfm data shard`: folder, brace pattern or URL")
    data_weights: Annotated[list[float] | None, CommaSeparated] = Field(
        None, description="sampling share of each --data, e.g. 0.7,0.3 (default: by size)")
    split: Literal["train", "val", "test"] | None = Field("train", description="manifest split used; null: all")
    sites: list[str] | None = Field(None, description="manifests: rows of these sites only (null: every site)")
    shuffle_buffer: int = Field(1000, ge=0, description="shards: mix samples from this many recent reads")
    model: str = Field(..., description="registry name or retfm checkpoint: the architecture and preprocessing")
    init: str | None = Field(None, description=f"initial weights: a file, {PUBLISHED!r} (the model's own published "
                                                "weights, e.g. efficientnet-lite0's ImageNet weights), or null for "
                                                "random initialisation")
    teacher: str | None = Field(None, description="token-reconstruction: the frozen teacher, a registry name or "
                                                   "retfm checkpoint with its own weights (default: a copy of the "
                                                   "student's initial weights)")
    image_size: int | None = Field(None, ge=16, description="default: the model's input size")
    objective_options: dict = Field(default_factory=dict, description="keyword arguments of the objective")
    lora: LoraOptions | None = Field(None, description="train LoRA adapters of the backbone, its own weights frozen "
                                                      "(e.g. a pretrained image tower for clip); merged into the "
                                                      "saved model")
    steps: int = Field(1000, ge=1, description="optimiser steps")
    batch_size: int = Field(64, ge=1, description="images per micro-batch")
    accum_steps: int = Field(1, ge=1, description="micro-batches per optimiser step")
    blr: float = Field(1.5e-4, gt=0, description="base learning rate; lr = blr * images per step / 256 (MAE)")
    min_lr: float = Field(0.0, ge=0)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = Field(None, gt=0, description="max gradient norm (null: no clipping)")
    ema: float | None = Field(None, gt=0, lt=1, description="EMA decay of the backbone saved at the end")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Device = "cpu"
    workers: Workers
    seed: Seed = 0
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)

