"""A generator folder's contract, shared by training, sampling, export, assembly and audits: the kinds of
generator, their files, the condition classes, and the card (``generator.json``) that names the weights by hash."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from retfm import __version__
from retfm.errors import RetfmError
from retfm.hashing import file_sha256
from retfm.synth.config import SynthTrainConfig

CARD_FILENAME = "generator.json"
UNET_DIR, SCHEDULER_DIR = "unet", "scheduler"
WEIGHTS_FILENAME = "diffusion_pytorch_model.safetensors"  # diffusers' name for safetensors weights
PIXEL, LATENT_LORA = "pixel", "latent-lora"  # the kinds of generator (a card's "type"; older cards: pixel)
# each kind's hashed weights file (the card's weights_sha256), by kind: never a path read from a card
WEIGHTS_FILES = {PIXEL: f"{UNET_DIR}/{WEIGHTS_FILENAME}", LATENT_LORA: "lora/pytorch_lora_weights.safetensors"}
LOCAL_OPTIONS = {"data", "base_model"}  # options naming local paths, never written to a card


# ---- conditions ---------------------------------------------------------------------------------------------------

class Conditions:
    """Condition columns and their values; a combination of values is one class index, the last index is null."""

    def __init__(self, values: dict[str, list]):
        self.values = values
        self.columns = list(values)
        self.shape = tuple(len(v) for v in values.values())
        self.null = int(np.prod(self.shape))

    @classmethod
    def from_table(cls, table, columns: list[str]) -> Conditions:
        return cls({c: sorted(plain_value(v) for v in table[c].dropna().unique()) for c in columns})

    def index(self, rows: dict[str, list]) -> np.ndarray:
        """Class index of each row, from per-column values."""
        positions = []
        for column in self.columns:
            lookup = {v: i for i, v in enumerate(self.values[column])}
            try:
                positions.append([lookup[plain_value(v)] for v in rows[column]])
            except KeyError as exc:
                raise RetfmError(f"condition {column}={exc.args[0]!r}: not one of the generator's values "
                                 f"({', '.join(map(str, self.values[column]))})") from None
        return np.ravel_multi_index(positions, self.shape).astype(np.int64)


def plain_value(value):
    """numpy and pandas scalars as Python ones, so values compare, sort and go to JSON alike."""
    return value.item() if hasattr(value, "item") else value


# ---- the card-------------------------------------------------------------------------------------------------------

def write_card(out: Path, kind: str, name: str, config: SynthTrainConfig, conditions: Conditions, description: str,
               licence: str = "as the training data", **fields) -> dict:
    """Write ``out/generator.json`` for a generator of ``kind`` whose weights are in place: what it is conditioned
    on, ``fields``, the options without any local path and its weights' hash (which names it); returns the card."""
    weights_sha256 = file_sha256(Path(out) / WEIGHTS_FILES[kind])
    card = {
        "kind": "retfm-synth-generator", "type": kind, "name": name, "generator_id": f"{name}-{weights_sha256[:12]}",
        "description": description,
        "label": config.label, "cond": config.cond, "conditions": conditions.values, "null_class": conditions.null,
        "size": config.size, **fields,
        "config": config.model_dump(mode="json", exclude=LOCAL_OPTIONS),  # no local path leaves with the card
        "weights_sha256": weights_sha256, "licence": licence, "retfm_version": __version__,
    }
    (Path(out) / CARD_FILENAME).write_text(json.dumps(card, indent=2) + "\n")
    return card


def card_type(card: dict) -> str:
    """A card's kind of generator (cards written before LoRA generators existed are pixel ones)."""
    return card.get("type", PIXEL)


def verified_card(path: Path) -> dict:
    """The card of a generator folder whose weights are the ones the card's ``weights_sha256`` names."""
    path = Path(path)
    card_file = path / CARD_FILENAME
    if not card_file.is_file():
        raise RetfmError(f"{path}: not a finished `retfm synth train` output (no {CARD_FILENAME})")
    try:
        card = json.loads(card_file.read_text())
    except ValueError:
        raise RetfmError(f"{card_file}: not a JSON generator card") from None
    if not isinstance(card, dict) or card.get("kind") != "retfm-synth-generator":
        raise RetfmError(f"{card_file}: not a `retfm synth train` generator card")
    if card_type(card) not in WEIGHTS_FILES:
        raise RetfmError(f"{card_file}: generator type {card_type(card)!r} is not one of "
                         f"{', '.join(WEIGHTS_FILES)} (a newer retfm's?)")
    weights = path / WEIGHTS_FILES[card_type(card)]
    if not weights.is_file():
        raise RetfmError(f"{path}: not a finished `retfm synth train` output (no {WEIGHTS_FILES[card_type(card)]})")
    if file_sha256(weights) != card.get("weights_sha256"):
        raise RetfmError(f"{path}: its weights differ from its card's weights_sha256 (changed after training, "
                         f"or a partial upload)")
    return card


def forward_flops(run: Callable[[], object], device: torch.device) -> int:
    """FLOPs of ``run()`` counted by torch, without gradients; the RNG is left untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            run()
    return counter.get_total_flops()
