"""LoRA adapters on a backbone (peft): wrapped for training, merged back into a plain timm model for saving.
Fine-tuning, pretraining and federated pretraining all adapt a backbone this way."""

from __future__ import annotations

import re

import torch

from retfm.errors import RetfmError


def add_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float, targets: list[str],
             modules_to_save: list[str] | None = None) -> torch.nn.Module:
    """``model`` wrapped by peft with LoRA adapters on the modules named ``targets``: its own weights frozen except
    ``modules_to_save``; ``merge_and_unload()`` gives the plain model back with the adapters merged in. The
    adapters' initial draw comes from torch's global random number generator."""
    from peft import LoraConfig, get_peft_model  # peft is slow to import; only LoRA runs need it

    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                      modules_to_save=modules_to_save)
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        message = " ".join(str(exc).split())  # peft's text may hold a module's many-line repr
        unsupported = re.match(r"Target module (\w+)\(.*\) is not supported", message)
        if unsupported:
            message = (f"targets {', '.join(targets)} name a {unsupported[1]}, which LoRA cannot adapt: name its "
                       "Linear or Conv layers (e.g. qkv, proj)")
        raise RetfmError(f"LoRA: {message}") from None


def merged(backbone: torch.nn.Module) -> torch.nn.Module:
    """A backbone as a plain timm model: LoRA adapters, if any, merged into its weights."""
    return backbone.merge_and_unload() if hasattr(backbone, "merge_and_unload") else backbone
