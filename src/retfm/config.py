"""Configs are data: pydantic models, filled from defaults < YAML file < command-line options < ``--set k=v``.

The resolved config is saved next to every output so a run can be repeated exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from retfm.errors import RetfmError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class IngestConfig(BaseModel):
    """Options of ``retfm data ingest`` (see ``retfm data ingest --help``)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["auto", "imagefolder", "csv", "retinamnist", "dicom", "retfound", "aptos2019", "idrid",
                    "messidor2", "papila", "glaucoma_fundus", "jsiec", "brset", "odir5k"] = "auto"
    size: int = Field(512, ge=8, le=8192, description="side of the stored square image (never upscaled)")
    site: str = Field("site1", min_length=1, description="site name for sources without a site column")
    split: tuple[float, float, float] = Field((0.7, 0.1, 0.2), description="train,val,test fractions")
    seed: int = 0
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    deid_key_file: Path | None = None
    image_format: Literal["png", "jpg"] = "png"
    jpeg_quality: int = Field(95, ge=50, le=100)
    margin: float = Field(0.02, ge=0, le=0.5, description="border kept around the field of view, as a fraction")
    clahe: bool = False
    max_pixels: int = Field(64_000_000, ge=1)
    modality: Literal["CFP", "UWF", "OCT", "FA"] | None = None
    label_column: str = Field("label", description="column for image-folder class names")
    stratify: str | None = Field(None, description="label column to stratify new splits by "
                                                   "(default: the source's only label column)")
    path_column: str | None = None
    columns: dict[str, str] = Field(default_factory=dict, description="CSV column renames, source -> manifest")
    image_root: Path | None = None
    extension: str | None = None

    @field_validator("split", mode="before")
    @classmethod
    def _parse_split(cls, value):
        if isinstance(value, str):
            try:
                value = tuple(float(v) for v in value.split(","))
            except ValueError:
                raise ValueError("split must be three numbers like 0.7,0.1,0.2") from None
        return value

    @field_validator("split")
    @classmethod
    def _check_split(cls, value):
        if any(v < 0 for v in value) or abs(sum(value) - 1) > 1e-6:
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {value}")
        return value


class EmbedConfig(BaseModel):
    """Options of ``retfm embed``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="registry name or path to a retfm checkpoint")
    weights: str | None = Field(None, description="weights file, 'random', or none for the model's own source")
    batch_size: int | None = Field(None, ge=1, description="images per forward pass (default: 4 on CPU, where "
                                                            "larger batches are slower, 64 on CUDA)")
    device: Literal["cpu", "cuda"] = "cpu"
    engine: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        "auto", description="inference engine; auto: the fastest whose features match PyTorch eager fp32")
    precision: Literal["fp32", "bf16", "int8"] | None = Field(
        None, description="none: fp32, or bf16 under auto where the CPU has it and features match; int8 only "
                          "when asked (OpenVINO, calibrated on the manifest's images)")
    workers: int = Field(default_factory=lambda: min(4, max(1, (os.cpu_count() or 2) // 2)), ge=0,
                         description="decoding processes beside the model")
    split: Literal["train", "val", "test"] | None = Field(None, description="embed one split only")
    image_size: int | None = Field(None, ge=16, description="input side in pixels (default: the model's input size)")


class ProbeConfig(BaseModel):
    """Options of ``retfm probe``."""

    model_config = ConfigDict(extra="forbid")

    label: str
    head: Literal["logreg", "knn"] = "logreg"
    class_weight: Literal["none", "balanced"] = "none"
    task: Literal["auto", "binary", "multiclass", "ordinal"] = "auto"
    by: list[str] = Field(default_factory=list, description="group columns for per-group metrics")
    bootstrap: int = Field(1000, ge=0)
    seed: int = 0

    @field_validator("by", mode="before")
    @classmethod
    def _parse_by(cls, value):
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


class LoraOptions(BaseModel):
    """LoRA adapters on a backbone (peft), as ``retfm finetune``'s lora_* options."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(["qkv"], min_length=1, description="backbone module names that get adapters")


PUBLISHED = "published"  # PretrainConfig.init: the registry model's own weights


class PretrainConfig(BaseModel):
    """Options of ``retfm pretrain`` (see docs/pretrain.md)."""

    model_config = ConfigDict(extra="forbid")

    objective: Literal["mae", "token-reconstruction", "clip"]
    data: list[str] = Field(..., min_length=1, description="ingest folders or manifest files (mixed by weight), "
                                                          "or one set of shards: folder, brace pattern or URL")
    data_weights: list[float] | None = Field(None, description="sampling share of each --data (default: by size)")
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
    device: Literal["cpu", "cuda"] = "cpu"
    workers: int = Field(default_factory=lambda: min(4, max(1, (os.cpu_count() or 2) // 2)), ge=0)
    seed: int = 0
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)

    @field_validator("data_weights", mode="before")
    @classmethod
    def _parse_weights(cls, value):
        if isinstance(value, str):
            try:
                return [float(v) for v in value.split(",")]
            except ValueError:
                raise ValueError("data_weights must be numbers like 0.7,0.3") from None
        return value


class SynthTrainConfig(BaseModel):
    """Options of ``retfm synth train`` (see docs/synth.md): a class-conditional pixel-space diffusion model, or
    with ``base_model`` a LoRA adapter of a local pretrained latent text-to-image model prompted with the labels."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(..., description="ingest folder or manifest file")
    label: str = Field(..., description="label column the images are conditioned on")
    cond: list[str] = Field(default_factory=list, description="further condition columns, e.g. site")
    split: Literal["train", "val", "test"] | None = Field("train", description="manifest split used; null: all")
    sites: list[str] | None = Field(None, description="rows of these sites only (a site's own generator); "
                                                       "null: every site")
    base_model: str | None = Field(None, description="local diffusers folder of a pretrained Stable-Diffusion-style "
                                                     "model (unet/, vae/, text_encoder/, tokenizer/, scheduler/; "
                                                     "never downloaded): train a LoRA adapter of its UNet, prompted "
                                                     "with the labels, instead of a pixel UNet from scratch")
    lora_rank: int = Field(8, ge=1, description="base_model: rank of the LoRA matrices")
    lora_alpha: float | None = Field(None, gt=0, description="base_model: LoRA scale numerator (null: the rank)")
    lora_targets: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1,
                                    description="base_model: UNet modules given adapters (default: the attention "
                                                "projections)")
    size: int = Field(64, ge=16, le=1024, description="side of the generated square images (base_model: a size it "
                                                      "was trained at, e.g. 512)")
    block_out_channels: tuple[int, ...] = Field((32, 64, 128), min_length=2,
                                                description="pixel UNet: channels per resolution level")
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
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    flip: bool = Field(True, description="random horizontal flips (left and right eyes mirror each other)")
    ema: bool = Field(True, description="save an exponential moving average of the weights (warmup schedule)")
    ema_max_decay: float = Field(0.9999, gt=0, lt=1)
    device: Literal["cpu", "cuda"] = "cpu"
    precision: Literal["fp32", "bf16"] = "fp32"
    workers: int = Field(default_factory=lambda: min(4, max(1, (os.cpu_count() or 2) // 2)), ge=0)
    seed: int = 0
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(20, ge=1)

    @field_validator("block_out_channels", mode="before")
    @classmethod
    def _parse_channels(cls, value):
        if isinstance(value, str):
            return tuple(int(v) for v in value.split(","))
        return value

    @field_validator("lora_targets", mode="before")
    @classmethod
    def _parse_targets(cls, value):
        return [v.strip() for v in value.split(",")] if isinstance(value, str) else value


class SynthSamplerOptions(BaseModel):
    """How images are drawn from a generator: options shared by ``retfm synth sample`` and ``assemble``."""

    model_config = ConfigDict(extra="forbid")

    base_model: str | None = Field(None, description="local diffusers folder of the base model a LoRA generator "
                                                     "was fine-tuned from (its card names it and its UNet's hash)")
    sampler: Literal["ddim", "dpm"] = Field("ddim", description="DDIM or DPM-Solver++ (multistep)")
    inference_steps: int = Field(50, ge=1, le=1000)
    guidance: float = Field(2.0, ge=0, description="classifier-free guidance scale (1: conditional only, "
                                                   "0: unconditional)")
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    device: Literal["cpu", "cuda"] = "cpu"


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


class SynthAuditConfig(BaseModel):
    """Options of ``retfm synth audit``."""

    model_config = ConfigDict(extra="forbid")

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
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 0


class IndexConfig(BaseModel):
    """Options of ``retfm index build`` (see docs/retrieval.md)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["auto", "exact", "ivf", "hnsw"] = Field("auto", description="auto: exact below 100,000 vectors, "
                                                                               "hnsw above")
    split: Literal["train", "val", "test"] | None = Field(None, description="index one split only; null: all rows")
    nlist: int | None = Field(None, ge=1, description="ivf: number of k-means lists (default: from the count)")
    nprobe: int = Field(16, ge=1, description="ivf: lists searched per query")
    hnsw_m: int = Field(32, ge=4, le=256, description="hnsw: links per vector in the graph")
    ef_construction: int = Field(80, ge=8, description="hnsw: candidates kept while building the graph")
    ef_search: int = Field(64, ge=1, description="hnsw: candidates kept while searching")


class FinetuneConfig(BaseModel):
    """Options of ``retfm finetune`` (see docs/finetune.md); defaults are RETFound's fine-tuning recipe."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(..., description="ingest folder or manifest file with train/val/test splits")
    model: str = Field(..., description="registry name or retfm checkpoint")
    weights: str | None = Field(None, description="weights file, 'random', or none for the model's own weights")
    label: str
    adaptation: Literal["full", "linear", "lora"] = "full"
    label_fraction: float = Field(1.0, gt=0, le=1, description="share of training patients kept, by label")
    train_sites: list[str] | None = Field(None, description="train and validate on these sites only")
    test_sites: list[str] | None = Field(None, description="test on these sites only")
    task: Literal["auto", "binary", "multiclass", "ordinal"] = "auto"
    by: list[str] = Field(default_factory=list, description="group columns for per-group metrics")
    epochs: int = Field(50, ge=1)
    warmup_epochs: int = Field(5, ge=0)
    patience: int = Field(10, ge=1, description="stop after this many epochs without a better validation score")
    select_metric: str = Field("auroc", description="validation metric that picks the best epoch, or 'loss'")
    batch_size: int = Field(16, ge=1)
    accum_steps: int = Field(1, ge=1)
    blr: float = Field(5e-3, gt=0, description="base learning rate; lr = blr * images per step / 256")
    min_lr: float = Field(1e-6, ge=0)
    layer_decay: float = Field(0.65, gt=0, le=1, description="layer-wise lr decay (full fine-tuning)")
    weight_decay: float = Field(0.05, ge=0)
    drop_path: float = Field(0.2, ge=0, lt=1)
    clip_grad: float | None = Field(None, gt=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    mixup: float = Field(0.0, ge=0, description="mixup alpha (0: off)")
    cutmix: float = Field(0.0, ge=0, description="cutmix alpha (0: off)")
    # RETFound's rand-m9-mstd0.5-inc1 with the magnitude noise capped at 9: at 10 timm asks Pillow for a 0-bit
    # posterize, which Pillow 13 refuses
    randaugment: str | None = Field("rand-m9-mstd0.5-inc1-mmax9", description="timm RandAugment spec; null: off")
    random_erasing: float = Field(0.25, ge=0, le=1)
    balanced_sampling: bool = Field(False, description="draw training images with equal weight per class")
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_targets: list[str] = Field(["qkv"], description="module names that get LoRA adapters")
    image_size: int | None = Field(None, ge=16, description="default: the model's input size")
    device: Literal["cpu", "cuda"] = "cpu"
    precision: Literal["fp32", "bf16"] = "fp32"
    workers: int = Field(default_factory=lambda: min(4, max(1, (os.cpu_count() or 2) // 2)), ge=0)
    bootstrap: int = Field(1000, ge=0)
    seed: int = 0

    @field_validator("by", "train_sites", "test_sites", "lora_targets", mode="before")
    @classmethod
    def _parse_list(cls, value):
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


class StudyModel(BaseModel):
    """One model of a study grid: a short display name, the model and its weights (as ``retfm finetune`` takes)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, description="short name shown in tables and plots")
    model: str = Field(..., description="registry name or retfm checkpoint")
    weights: str | None = Field(None, description="weights file, 'random', or none for the model's own weights")


class StudySites(BaseModel):
    """The site axis of a study: ``cross: true`` trains on each site and tests on each site."""

    model_config = ConfigDict(extra="forbid")

    cross: bool = Field(False, description="every train site x every test site (the diagonal is in-site)")
    names: list[str] | None = Field(None, description="sites to cross (default: every site with labelled rows)")


# FinetuneConfig fields that the study's grid sets for each cell; the base ``finetune:`` mapping may not set them.
STUDY_GRID_FIELDS = ("data", "label", "by", "model", "weights", "adaptation", "label_fraction", "seed",
                     "train_sites", "test_sites")


class StudyConfig(BaseModel):
    """Options of ``retfm study`` (see docs/study.md): a grid of fine-tuning runs on one manifest and label."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(..., description="ingest folder or manifest file with train/val/test splits")
    label: str
    by: list[str] = Field(default_factory=list, description="group columns for per-group metrics")
    finetune: dict = Field(default_factory=dict, description="FinetuneConfig options shared by every cell")
    models: list[StudyModel] = Field(..., min_length=1)
    adaptations: list[Literal["full", "linear", "lora"]] = Field(["full"], min_length=1)
    label_fractions: list[float] = Field([1.0], min_length=1)
    seeds: list[int] = Field([0], min_length=1)
    sites: StudySites | None = Field(None, description="omitted: train and test on all sites")
    compare_bootstrap: int = Field(1000, ge=1, description="paired bootstrap resamples per comparison")

    @field_validator("by", mode="before")
    @classmethod
    def _parse_by(cls, value):
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @field_validator("finetune")
    @classmethod
    def _check_finetune(cls, value):
        unknown = sorted(set(value) - set(FinetuneConfig.model_fields))
        if unknown:
            raise ValueError(f"not a finetune option: {', '.join(unknown)}")
        grid = sorted(set(value) & set(STUDY_GRID_FIELDS))
        if grid:
            raise ValueError(f"set by the study itself, not under finetune: {', '.join(grid)}")
        return value

    @field_validator("label_fractions")
    @classmethod
    def _check_fractions(cls, value):
        if any(not 0 < v <= 1 for v in value):
            raise ValueError(f"label fractions must be in (0, 1], got {value}")
        return sorted(set(value))

    @field_validator("models")
    @classmethod
    def _check_names(cls, value):
        names = [m.name for m in value]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be distinct, got {names}")
        return value


class FederatedSite(BaseModel):
    """One site of a simulated federation: its data, and its rows' ``site`` value when sites share a manifest."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1)
    data: str = Field(..., description="ingest folder or manifest file holding the site's images")
    rows: str | None = Field(None, description="the manifest's site value of this site's rows (null: all rows)")


FEDERATED_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
PRIVATE_STRATEGIES = ("fedavg", "fedprox")  # a plain mean of clipped updates: what the noise is calibrated for


class FederatedPrivacy(BaseModel):
    """Site-level differential privacy of a federation (see docs/federated.md)."""

    model_config = ConfigDict(extra="forbid")

    clip_norm: float = Field(1.0, gt=0, description="L2 bound of a site's update per round (all tensors it sends "
                                                    "as one vector)")
    noise_multiplier: float = Field(1.0, gt=0, description="noise std on the sum of the updates, in clip_norms")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta of the reported (epsilon, delta); below 1/sites")


class FederatedConfig(BaseModel):
    """Options of ``retfm federated run`` (see docs/federated.md)."""

    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(None, description="one ingest folder or manifest: one site per value of its site column")
    sites: list[FederatedSite] | None = Field(None, description="or the sites one by one (several manifests)")
    task: Literal["pretrain", "finetune", "synth"] = Field("pretrain", description="what the sites train: pretrain "
                                                           "(the pretrain: objective), finetune (a classifier of "
                                                           "finetune.label) or synth (a conditional generator)")
    pretrain: dict | None = Field(None, description="task pretrain: retfm pretrain options of every site's local "
                                                    "work (objective, model, batch_size, blr, ...); data comes from "
                                                    "the sites")
    finetune: dict | None = Field(None, description="task finetune: retfm finetune options of every site's local "
                                                    "work (model, weights, label, adaptation, blr, ...) and classes, "
                                                    "the label's values in the classifier's order; data comes from "
                                                    "the sites")
    synth: dict | None = Field(None, description="task synth: retfm synth train options of every site's local work "
                                                 "(label, cond, size, block_out_channels, lr, ...) and classes, the "
                                                 "condition values; data comes from the sites")
    rounds: int = Field(3, ge=1)
    local_steps: int = Field(10, ge=1, description="optimiser steps per site and round")
    strategy: Literal[FEDERATED_STRATEGIES] = "fedavg"
    strategy_options: dict = Field(default_factory=dict, description="keyword arguments of the Flower strategy, "
                                                                     "e.g. proximal_mu, beta, num_malicious_nodes")
    evaluate_label: str | None = Field(None, description="label probed at every site after every round "
                                                         "(null: no evaluation)")
    transfer: Literal["fp32", "fp16"] = Field("fp32", description="precision of the weights sites send back")
    transfer_params: Literal["full", "lora"] = Field("full", description="full: every trainable weight travels; "
                                                     "lora: the backbone stays frozen at the shared start, only "
                                                     "LoRA adapters and the objective's head train and travel")
    lora: LoraOptions = Field(default_factory=LoraOptions, description="adapters of transfer_params: lora")
    dp: FederatedPrivacy | None = Field(None, description="site-level differential privacy (null: off)")
    max_abs_weight: float = Field(1e4, gt=0, description="a reply with a weight beyond this (or NaN/Inf) is "
                                                         "rejected before aggregation")
    timeout: float = Field(3600, gt=0, description="seconds the coordinator waits for a round's replies")
    cpus_per_site: float = Field(1, gt=0, description="simulation: CPU cores reserved for each site")

    @field_validator("pretrain")
    @classmethod
    def _check_pretrain(cls, value):
        if value is None:
            return value
        _refuse_site_data("pretrain", value, {"data", "sites"})
        _refuse_option("pretrain", value, "lora", "a federation's adapters are set by transfer_params: lora and lora:")
        PretrainConfig.model_validate({**value, "data": ["site"]})
        return value

    @field_validator("finetune")
    @classmethod
    def _check_finetune(cls, value):
        if value is None:
            return value
        _refuse_site_data("finetune", value, {"data", "train_sites", "test_sites"})
        classes = value.get("classes")
        if not isinstance(classes, list) or len({str(c) for c in classes}) != len(classes) or len(classes) < 2:
            raise ValueError("finetune.classes: the label's values in the classifier's order, at least two distinct "
                             "(every site trains and tests on these, whatever it holds)")
        FinetuneConfig.model_validate({**_without_classes(value), "data": "site"})
        return value

    @field_validator("synth")
    @classmethod
    def _check_synth(cls, value):
        if value is None:
            return value
        _refuse_site_data("synth", value, {"data", "sites"})
        _refuse_option("synth", value, "base_model", "federated training of a LoRA generator is not built; each "
                       "site can train its own with retfm synth train --set base_model=...")
        options = SynthTrainConfig.model_validate({**_without_classes(value), "data": "site"})
        _synth_conditions(options, value.get("classes"))
        return value

    @model_validator(mode="after")
    def _check_task(self):
        given = {"pretrain": self.pretrain, "finetune": self.finetune, "synth": self.synth}
        if given[self.task] is None or any(v is not None for task, v in given.items() if task != self.task):
            others = " or ".join(task for task in given if task != self.task)
            raise ValueError(f"task {self.task}: give {self.task} options, not {others}")
        if self.task == "synth":
            if self.transfer_params == "lora":
                raise ValueError("task synth: every UNet weight travels; transfer_params lora is for task pretrain")
            if self.evaluate_label not in (None, self.synth["label"]):
                raise ValueError(f"task synth: the generator is conditioned on {self.synth['label']!r}; "
                                 "evaluate_label is that (each site's test denoising loss) or null")
        if self.task == "finetune":
            if self.transfer_params == "lora":
                raise ValueError("task finetune: what travels is what finetune.adaptation trains; for LoRA-only "
                                 "transfer set finetune.adaptation: lora (and finetune.lora_rank, ...)")
            label = self.finetune["label"]
            if self.evaluate_label not in (None, label):
                raise ValueError(f"task finetune: the classifier predicts {label!r}; evaluate_label is that or null")
        return self

    @field_validator("dp")
    @classmethod
    def _check_dp(cls, value, info: ValidationInfo):
        if value is not None and info.data.get("strategy") not in PRIVATE_STRATEGIES:
            raise ValueError(f"differential privacy needs strategy {' or '.join(PRIVATE_STRATEGIES)} (the noise is "
                             f"calibrated to a plain mean of clipped updates), not {info.data.get('strategy')}")
        return value

    def pretrain_config(self) -> PretrainConfig:
        """The sites' pretraining options (``data`` is set per site)."""
        return PretrainConfig.model_validate({**self.pretrain, "data": ["site"]})

    def finetune_config(self) -> FinetuneConfig:
        """The sites' fine-tuning options (each site reads its own data)."""
        return FinetuneConfig.model_validate({**_without_classes(self.finetune), "data": "site"})

    def synth_config(self) -> SynthTrainConfig:
        """The sites' generator options (each site reads its own data)."""
        return SynthTrainConfig.model_validate({**_without_classes(self.synth), "data": "site"})

    def synth_conditions(self) -> dict[str, list]:
        """Task synth: the generator's condition values, {column: values} in the class embedding's order."""
        return _synth_conditions(self.synth_config(), self.synth["classes"])

    def classes(self) -> list[str]:
        """Task finetune: the label's classes, as strings, in the classifier's order."""
        return [str(c) for c in self.finetune["classes"]]

    def local_config(self) -> PretrainConfig | FinetuneConfig | SynthTrainConfig:
        """The options of a site's local work for the task."""
        return {"pretrain": self.pretrain_config, "finetune": self.finetune_config,
                "synth": self.synth_config}[self.task]()

    def local_options(self) -> dict:
        """Keyword options of a site's local work: ``classes`` (finetune), ``conditions`` (synth) or ``lora``
        (pretrain)."""
        if self.task == "synth":
            return {"conditions": self.synth_conditions()}
        return {"classes": self.classes()} if self.task == "finetune" else {"lora": self.lora_options()}

    def lora_options(self) -> LoraOptions | None:
        """The adapters when only LoRA weights travel, else None."""
        return self.lora if self.transfer_params == "lora" else None


def _refuse_site_data(block: str, options: dict, keys: set[str]) -> None:
    """A federation's task options may not name data: each site trains on its own."""
    given = sorted(set(options) & keys)
    if given:
        raise ValueError(f"{block}.{f', {block}.'.join(given)}: the data come from the federation's sites; "
                         "leave them out")


def _refuse_option(block: str, options: dict, key: str, reason: str) -> None:
    """A task option a federation does not take."""
    if options.get(key) is not None:
        raise ValueError(f"{block}.{key}: {reason}")


def _without_classes(options: dict) -> dict:
    return {key: value for key, value in options.items() if key != "classes"}


def _synth_conditions(options: SynthTrainConfig, classes) -> dict[str, list]:
    """``synth.classes`` as {column: values}: a mapping of the label and each ``cond`` column to its values, or a
    list of the label's values when there is no ``cond``; each column's values distinct, at least one."""
    columns = [options.label, *options.cond]
    if isinstance(classes, list) and not options.cond:
        classes = {options.label: classes}
    if not isinstance(classes, dict) or list(classes) != columns:
        raise ValueError(f"synth.classes: the values of {', '.join(columns)} as a mapping in that order, e.g. "
                         f"{{{options.label}: [0, 1]}} (a list of {options.label}'s values when cond is empty): every "
                         "site and the coordinator build the same class embedding from them")
    for column, values in classes.items():
        if not isinstance(values, list) or not values or len(set(map(repr, values))) != len(values):
            raise ValueError(f"synth.classes.{column}: a list of distinct values, at least one")
    return classes


def parse_set(assignment: str) -> tuple[list[str], object]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML, so numbers, booleans and lists work)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise RetfmError(f"--set {assignment!r}: expected key=value")
    try:
        return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:  # a tag safe loading refuses (!!python/...), or broken YAML
        raise RetfmError(f"--set {assignment!r}: not a plain YAML value ({str(exc).splitlines()[0]})") from None


def load_config(model: type[ConfigT], path: Path | None = None, options: dict | None = None,
                sets: list[str] | None = None) -> ConfigT:
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise RetfmError(f"{path}: cannot read config ({exc.__class__.__name__}: {exc})".splitlines()[0]) from None
        if not isinstance(data, dict):
            raise RetfmError(f"{path}: a config must be a mapping of option: value")
    data.update({k: v for k, v in (options or {}).items() if v is not None})
    for assignment in sets or []:
        keys, value = parse_set(assignment)
        target = data
        for key in keys[:-1]:
            if target.get(key) is None:  # absent, or null in the file (e.g. dp: null, then --set dp.delta=...)
                target[key] = {}
            target = target[key]
        target[keys[-1]] = value
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        origin = f"{path}: " if path else ""
        raise RetfmError(f"{origin}option {where}: {first['msg']} ({len(exc.errors())} problem(s))") from None


def save_config(config: BaseModel, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path


class ServeConfig(BaseModel):
    """Options of ``retfm serve`` (see docs/serve.md)."""

    model_config = ConfigDict(extra="forbid")

    model: Path = Field(..., description="classifier checkpoint from `retfm finetune` (model.safetensors)")
    index: Path | None = Field(None, description="retrieval index folder from `retfm index build` (similar cases)")
    api_key: str = Field(..., min_length=16, repr=False, description="the key clients send as X-API-Key")
    device: Literal["cpu", "cuda"] = "cpu"
    engine: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
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
