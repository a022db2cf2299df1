"""Options of ``retfm embed``, ``probe``, ``finetune`` and ``study``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from retfm.config import CommaSeparated, Device, Engine, Options, Seed, Workers

Names = Annotated[list[str], CommaSeparated]


class EmbedConfig(Options):
    """Options of ``retfm embed``."""

    model: str = Field(..., description="registry name or path to a retfm checkpoint")
    weights: str | None = Field(None, description="weights file, 'random', or none for the model's own source")
    batch_size: int | None = Field(None, ge=1, description="images per forward pass (default: 4 on CPU, where "
                                                            "larger batches are slower, 64 on CUDA)")
    device: Device = "cpu"
    engine: Engine = Field(
        "auto", description="inference engine; auto: the fastest whose features match PyTorch eager fp32")
    precision: Literal["fp32", "bf16", "int8"] | None = Field(
        None, description="none: fp32, or bf16 under auto where the CPU has it and features match; int8 only "
                          "when asked (OpenVINO, calibrated on the manifest's images)")
    workers: Workers
    split: Literal["train", "val", "test"] | None = Field(None, description="embed one split only")
    image_size: int | None = Field(None, ge=16, description="input side in pixels (default: the model's input size)")


class ProbeConfig(Options):
    """Options of ``retfm probe``."""

    label: str = Field(..., description="label column to predict")
    head: Literal["logreg", "knn"] = "logreg"
    class_weight: Literal["none", "balanced"] = "none"
    task: Literal["auto", "binary", "multiclass", "ordinal"] = "auto"
    by: Names = Field(default_factory=list, description="group columns for per-group metrics")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the 95% CIs")
    seed: Seed = 0


class FinetuneConfig(Options):
    """Options of ``retfm finetune`` (see docs/finetune.md); defaults are RETFound's fine-tuning recipe."""

    data: str = Field(..., description="ingest folder or manifest file with train/val/test splits")
    model: str = Field(..., description="registry name or retfm checkpoint")
    weights: str | None = Field(None, description="weights file, 'random', or none for the model's own weights")
    label: str = Field(..., description="label column to predict")
    adaptation: Literal["full", "linear", "lora"] = "full"
    label_fraction: float = Field(1.0, gt=0, le=1, description="share of training patients kept, by label")
    train_sites: Names | None = Field(None, description="train and validate on these sites only")
    test_sites: Names | None = Field(None, description="test on these sites only")
    task: Literal["auto", "binary", "multiclass", "ordinal"] = "auto"
    by: Names = Field(default_factory=list, description="group columns for per-group metrics")
    epochs: int = Field(50, ge=1, description="training epochs")
    warmup_epochs: int = Field(5, ge=0)
    patience: int = Field(10, ge=1, description="stop after this many epochs without a better validation score")
    select_metric: str = Field("auroc", description="validation metric that picks the best epoch, or 'loss'")
    batch_size: int = Field(16, ge=1, description="images per batch")
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
    lora_targets: Names = Field(["qkv"], description="module names that get LoRA adapters")
    image_size: int | None = Field(None, ge=16, description="default: the model's input size")
    device: Device = "cpu"
    precision: Literal["fp32", "bf16"] = "fp32"
    workers: Workers
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the 95% CIs")
    seed: Seed = 0


class StudyModel(Options):
    """One model of a study grid: a short display name, the model and its weights (as ``retfm finetune`` takes)."""

    name: str = Field(..., min_length=1, description="short name shown in tables and plots")
    model: str = Field(..., description="registry name or retfm checkpoint")
    weights: str | None = Field(None, description="weights file, 'random', or none for the model's own weights")


class StudySites(Options):
    """The site axis of a study: ``cross: true`` trains on each site and tests on each site."""

    cross: bool = Field(False, description="every train site x every test site (the diagonal is in-site)")
    names: list[str] | None = Field(None, description="sites to cross (default: every site with labelled rows)")


# FinetuneConfig fields that the study's grid sets for each cell; the base ``finetune:`` mapping may not set them.
STUDY_GRID_FIELDS = ("data", "label", "by", "model", "weights", "adaptation", "label_fraction", "seed",
                     "train_sites", "test_sites")


class StudyConfig(Options):
    """Options of ``retfm study`` (see docs/study.md): a grid of fine-tuning runs on one manifest and label."""

    data: str = Field(..., description="ingest folder or manifest file with train/val/test splits")
    label: str
    by: Names = Field(default_factory=list, description="group columns for per-group metrics")
    finetune: dict = Field(default_factory=dict, description="FinetuneConfig options shared by every cell")
    models: list[StudyModel] = Field(..., min_length=1)
    adaptations: list[Literal["full", "linear", "lora"]] = Field(["full"], min_length=1)
    label_fractions: list[float] = Field([1.0], min_length=1)
    seeds: list[int] = Field([0], min_length=1)
    sites: StudySites | None = Field(None, description="omitted: train and test on all sites")
    compare_bootstrap: int = Field(1000, ge=1, description="paired bootstrap resamples per comparison")

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

