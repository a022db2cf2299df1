"""What every resumable run shares: the rules of its folder, its device, and checkpoints written whole."""

from __future__ import annotations

from pathlib import Path

import torch

from retfm.errors import RetfmError


def check_run_folder(out: Path, checkpoint: Path, resume: bool) -> None:
    """A new run never overwrites an old one; ``--resume`` needs something to resume."""
    if checkpoint.exists() and not resume:
        raise RetfmError(f"{out}: holds a run already; pass --resume to continue it, or choose a new --out")
    if resume and not checkpoint.exists():
        raise RetfmError(f"{checkpoint}: nothing to resume")


def checked_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RetfmError("--device cuda: no CUDA device is available here (use --device cpu)")
    return torch.device(name)


def save_whole(payload: dict, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a checkpoint exists whole or not at all."""
    partial = path.with_name(path.name + ".tmp")
    torch.save(payload, partial)
    partial.replace(path)


def load_own_checkpoint(path: Path, config) -> dict:
    """A run's checkpoint, refused unless it was made with the same resolved config (a pydantic model)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved["config"] != config.model_dump_json():
        raise RetfmError(f"{path}: was made with another config; resume with the same options")
    return saved
