"""Options of ``retfm synth train``, ``sample``, ``assemble`` and ``audit``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from retfm.config import CommaSeparated, Device, Options, Seed, Workers


class SynthTrainConfig(Options):
    """Options of ``retfm synth train`` (see docs/synth.md): a class-conditional pixel-space diffusion model, or
    with ``base_model`` a LoRA adapter of a local pretrained latent text-to-image model prompted with the labels."""

    data: str = Field(..., description="ingest folder or manifest file")
    label: str = Field(..., description="label column the images are conditioned on")
    cond: list[str] = Field(default_factory=list, json_schema_extra={"repeatable": True},
                            description="further condition columns, e.g. site (repeatable)")
    split: Literal["train", "val", "test"] | None = Field("train", description="manifest split used; null: all")
    sites: list[str] | None = Field(None, description="rows of these sites only (a site's own generator); "
                                                       "null: every site")
    base_model: str | None = Field(None, description="local diffusers folder of a pretrained Stable-Diffusion-style "
                                                     "model (unet/, vae/, text_encoder/, tokenizer/, scheduler/; "
                                                     "never downloaded): train a LoRA adapter of its UNet, prompted "
                                                     "with the labels, instead of a pixel UNet from scratch")
    lora_rank: int = Field(8, ge=1, description="base_model: rank of the LoRA matrices")
    lora_alpha: float | None = Field(None, gt=0, description="base_model: LoRA scale numerator (null: the rank)")
    lora_targets: Annotated[list[str], CommaSeparated] = Field(
        ["to_q", "to_k", "to_v", "to_out.0"], min_length=1,
        description="base_model: UNet modules given adapters (default: the attention projections)")
    size: int = Field(64, ge=16, le=1024, description="side of the generated square images (base_model: a size it "
                                                      "was trained at, e.g. 512)")
    block_out_channels: Annotated[tuple[int, ...], CommaSeparated] = Field(
        (32, 64, 128), min_length=2, description="pixel UNet: channels per resolution level")
    layers_per_block: int = Field(1, ge=1, description="pixel UNet: ResNet blocks per level")
    norm_groups: int = Field(8, ge=1, description="pixel UNet: GroupNorm groups (divides every channel count)")
    train_timesteps: int = Field(1000, ge=10, description="pixel UNet: DDPM noise levels (base_model: its own "
                                                          "scheduler's)")
    prediction: Literal["v_prediction", "epsilon"] = Field(
        "v_prediction", description="pixel UNet: what the network predicts, the velocity (Salimans & Ho 2022) or "
                                    "the noise (DDPM); base_model: its own scheduler's")
    noise_schedule: Literal["squaredcos_cap_v2", "linear"] = Field(
        "squaredcos_cap_v2", description="pixel UNet: the cosine schedule (Nichol & Dhariwal 2021) or DDPM's "
                                         "linear betas")
    cond_drop: float = Field(0.1, ge=0, lt=1, description="share of training images shown with the null class "
                                                           "(base_model: the empty prompt), which "
                                                           "classifier-free guidance needs")
    steps: int = Field(2000, ge=1, description="optimiser steps")
    batch_size: int = Field(32, ge=1, description="images per step")
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    flip: bool = Field(True, description="random horizontal flips (left and right eyes mirror each other)")
    ema: bool = Field(True, description="save an exponential moving average of the weights (warmup schedule)")
    ema_max_decay: float = Field(0.9999, gt=0, lt=1)
    device: Device = "cpu"
    precision: Literal["fp32", "bf16"] = "fp32"
    workers: Workers
    seed: Seed = 0
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(20, ge=1)


class SynthSamplerOptions(Options):
    """How images are drawn from a generator: options shared by ``retfm synth sample`` and ``assemble``."""

    base_model: str | None = Field(None, description="local diffusers folder of the base model a LoRA generator "
                                                     "was fine-tuned from (its card names it and its UNet's hash)")
    sampler: Literal["ddim", "dpm"] = Field("ddim", description="DDIM or DPM-Solver++ (multistep)")
    inference_steps: int = Field(50, ge=1, le=1000, description="denoising steps")
    guidance: float = Field(2.0, ge=0, description="classifier-free guidance scale (1: conditional only, "
                                                   "0: unconditional)")
    batch_size: int = Field(64, ge=1, description="images per batch")
    seed: Seed = 0
    device: Device = "cpu"


class SynthSampleConfig(SynthSamplerOptions):
    """Options of ``retfm synth sample``."""

    n: int = Field(..., ge=1, description="images to generate")
    labels: str | None = Field(None, description='condition shares, e.g. "dr_grade=0:0.5,1:0.5;site=site1:1" '
                                                 "(default: the training data's shares)")


class SynthAssembleConfig(SynthSamplerOptions):
    """Options of ``retfm synth assemble``: every generator is sampled in its own training shares."""

    n: int = Field(..., ge=1, description="images per generator, or in all with allocation=by_images")
    allocation: Literal["per_generator", "by_images"] = Field(
        "per_generator", description="per_generator: n images from each generator; by_images: n in all, split in "
                                     "proportion to each generator's training images (its card's data.images)")


class SynthAuditConfig(Options):
    """Options of ``retfm synth audit``."""

    model: str = Field("tiny-vit", description="encoder whose feature space the audit measures in: registry name "
                                               "or retfm checkpoint (a pretrained retinal encoder for real audits), "
                                               "or 'pixels'")
    pixel_size: int = Field(16, ge=2, le=256, description="side of the images in the 'pixels' feature space")
    weights: str | None = Field(None, description="weights file, 'random', or none for the model's own source")
    real_split: Literal["train", "val", "test"] | None = Field("train", description="real images the generator "
                                                                                     "was trained on")
    k: int = Field(3, ge=1, description="neighbours defining the k-NN manifolds of precision and recall")
    copy_ratio: float = Field(0.5, gt=0, description="a synthetic image is a near-copy when its distance to the "
                                                     "nearest real image is below this share of the median "
                                                     "real-to-real nearest-neighbour distance")
    flag_share: float = Field(0.05, ge=0, le=1, description="the generator is flagged as memorising when more "
                                                           "than this share of its images are near-copies")
    thumbnails: int = Field(12, ge=0, description="near-copies shown in the report")
    batch_size: int = Field(32, ge=1)
    device: Device = "cpu"
    seed: Seed = 0

