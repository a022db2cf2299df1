"""Image-text (CLIP-style) pretraining, as RetiZero, MM-Fundus-CLIP and FLAIR do it for fundus images.

The image tower is any registry backbone (its pooled features, then a linear projection); the text tower is
open_clip's text transformer with its bundled BPE tokenizer (works offline), or a Hugging Face text model (e.g. a
clinical BERT) through open_clip when its files are present locally (``text: {hf_model_name: /path/to/model}``).
The loss is CLIP's symmetric contrastive loss with a learnable temperature, or SigLIP's pairwise sigmoid loss
(learnable temperature and bias). By default it is label-aware, as FLAIR's is: pairs whose texts say the same
(the same given text, or captions composed from the same conditions) are positives, not negatives; with
``label_aware: false``, or when every text differs, it is CLIP's and SigLIP's own loss. Under several processes
features are gathered across processes (with gradients, by open_clip), so the contrast is over the global batch.

Texts come from the manifest's ``text`` column, or are composed from the image's labels with the disease knowledge
base (``retfm.knowledge.base``: a template and a synonym drawn per image and epoch, so the wording varies).

``export(folder)`` writes ``clip.safetensors`` (both towers, projections, temperature) and ``clip.json`` beside
the run's ``model.safetensors`` (the image backbone alone, usable wherever a model name is).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from open_clip.loss import gather_features
from open_clip.model import CLIPTextCfg, _build_text_tower
from safetensors.torch import load_file, save_file
from torch import nn

from retfm.errors import RetfmError
from retfm.knowledge.base import load_knowledge
from retfm.models import create
from retfm.pretrain.sampling import BatchShard
from retfm.runs import read_json

CLIP_WEIGHTS = "clip.safetensors"
CLIP_CARD = "clip.json"
DEFAULT_TEXT = {"width": 512, "heads": 8, "layers": 12, "context_length": 77}  # CLIP ViT-B's text transformer
TOKENIZER = "ViT-B-32"  # open_clip's bundled BPE vocabulary (49,408 tokens)


class CLIP(nn.Module):
    """``forward(images, tokens) -> {"loss", "logit_scale"}``; ``encode_image`` / ``encode_text`` give unit vectors
    in the shared space."""

    def __init__(self, backbone: nn.Module, embed_dim: int = 256, text: dict | None = None, loss: str = "clip",
                 init_temperature: float = 0.07, label_aware: bool = True):
        super().__init__()
        if loss not in ("clip", "siglip"):
            raise RetfmError(f"clip: loss {loss!r} is not clip or siglip")
        self.shard = BatchShard()  # the trainer sets this process's place among several
        self.text_options = {**DEFAULT_TEXT, **(text or {})}
        self.embed_dim, self.loss_name, self.label_aware = embed_dim, loss, label_aware
        self.backbone = backbone
        self.image_projection = nn.Linear(backbone.num_features, embed_dim, bias=False)
        try:
            # open_clip's own builder: its text transformer, or a Hugging Face model when hf_model_name is given
            self.text = _build_text_tower(embed_dim, CLIPTextCfg(**self.text_options))
        except (TypeError, OSError, ValueError) as exc:
            raise RetfmError(f"clip: cannot build the text tower from {self.text_options} ({exc})".splitlines()[0]) \
                from None
        # SigLIP starts at temperature 1/10 and bias -10 (its paper); CLIP at 0.07
        scale = math.log(10.0) if loss == "siglip" else math.log(1 / init_temperature)
        self.logit_scale = nn.Parameter(torch.tensor(scale))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if loss == "siglip" else None

    @property
    def context_length(self) -> int:
        return int(self.text_options["context_length"])

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.image_projection(self.backbone(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.text(tokens), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor,
                text_keys: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``text_keys`` (int64, one per text; see ``Captions.key``) mark texts that say the same."""
        image_features, text_features = self.encode_image(images), self.encode_text(tokens)
        if text_keys is None or not self.label_aware:  # every pair its own: CLIP's and SigLIP's own targets
            text_keys = torch.arange(len(images), device=images.device) + self.shard.rank * len(images)
        if self.shard.world > 1:
            image_features, text_features = gather_features(image_features, text_features, gather_with_grad=True,
                                                             rank=self.shard.rank, world_size=self.shard.world)
            keys = [torch.empty_like(text_keys) for _ in range(self.shard.world)]
            torch.distributed.all_gather(keys, text_keys.contiguous())
            text_keys = torch.cat(keys)
        scale = self.logit_scale.clamp(max=math.log(100)).exp()  # CLIP's cap on the temperature
        logits = scale * image_features @ text_features.T
        positive = text_keys[:, None] == text_keys[None, :]
        if self.loss_name == "siglip":
            signs = positive.to(logits.dtype) * 2 - 1
            loss = -nn.functional.logsigmoid(signs * (logits + self.logit_bias)).sum() / len(logits)
        else:  # the targets of an image (and of a text) spread evenly over its positives; symmetric
            targets = positive.to(logits.dtype) / positive.sum(1, keepdim=True)
            loss = (nn.functional.cross_entropy(logits, targets) + nn.functional.cross_entropy(logits.T, targets)) / 2
        return {"loss": loss, "logit_scale": scale.detach()}

    def example_inputs(self, size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """One image and one text, for counting FLOPs."""
        return (torch.zeros(1, 3, size, size, device=device),
                torch.zeros(1, self.context_length, dtype=torch.long, device=device))

    def export(self, folder: Path, backbone: nn.Module, card: dict) -> None:
        """Write the whole image-text model; ``backbone`` (e.g. the EMA one) replaces the trained image tower."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                 if not k.startswith("backbone.")}
        state.update({f"backbone.{k}": v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()})
        save_file(state, str(folder / CLIP_WEIGHTS))
        options = {"embed_dim": self.embed_dim, "text": self.text_options, "loss": self.loss_name,
                   "label_aware": self.label_aware}
        (folder / CLIP_CARD).write_text(json.dumps({**card, "kind": "retfm-clip", "image_tower": "model.safetensors",
                                                    "tokenizer": self.tokenizer_name, "clip_options": options},
                                                   indent=2, default=str) + "\n")

    @property
    def tokenizer_name(self) -> str:
        return self.text_options.get("hf_tokenizer_name") or self.text_options.get("hf_model_name") or TOKENIZER

    def tokenizer(self):
        """open_clip's bundled tokenizer (offline), or a Hugging Face tokenizer from the text model's local folder."""
        import open_clip

        if self.tokenizer_name == TOKENIZER:
            return open_clip.get_tokenizer(TOKENIZER, context_length=self.context_length)
        try:
            return open_clip.tokenizer.HFTokenizer(self.tokenizer_name, context_length=self.context_length)
        except OSError as exc:
            raise RetfmError(f"{self.tokenizer_name}: no tokenizer files there ({exc})".splitlines()[0]) from None


def load_clip(path: str | Path) -> tuple[CLIP, dict]:
    """A trained image-text model from its run folder (or its ``clip.json``), in eval mode, and its card."""
    folder = Path(path)
    folder = folder.parent if folder.is_file() else folder
    card_path = folder / CLIP_CARD
    if not card_path.is_file():
        raise RetfmError(f"{folder}: no {CLIP_CARD}; pass the folder of a `retfm pretrain --objective clip` run")
    card = read_json(card_path)
    if not isinstance(card, dict) or not {"image_tower", "clip_options"} <= card.keys():
        raise RetfmError(f"{card_path}: not a {CLIP_CARD} retfm wrote (no image_tower and clip_options)")
    backbone = create(folder / card["image_tower"])
    model = CLIP(backbone, **card["clip_options"])
    try:
        model.load_state_dict(load_file(str(folder / CLIP_WEIGHTS)))
    except (RuntimeError, OSError) as exc:
        raise RetfmError(f"{folder / CLIP_WEIGHTS}: does not fit {CLIP_CARD} ({exc})".splitlines()[0]) from None
    return model.eval(), card


class Captions:
    """The text of each image: the manifest's ``text`` where given, else a caption composed from the image's
    labels (columns the knowledge base has label maps for), varied per (seed, epoch, image); then tokenised."""

    def __init__(self, table: pd.DataFrame, tokenizer, seed: int, where: str):
        self.knowledge = load_knowledge()
        self.labels = [c for c in table.columns if c in self.knowledge.label_maps]
        self.texts = table["text"] if "text" in table else pd.Series([None] * len(table), index=table.index)
        self.table, self.tokenizer, self.seed = table, tokenizer, seed
        lacking = self.texts.isna() & (table[self.labels].isna().all(axis=1) if self.labels else True)
        if bool(np.any(lacking)):
            raise RetfmError(f"{where}: {int(np.sum(lacking))} image(s) have neither a text nor a label the knowledge "
                             f"base can describe (label maps: {', '.join(sorted(self.knowledge.label_maps))})")

    def text(self, index: int, epoch: int) -> str:
        given = self.texts.iloc[index]
        if isinstance(given, str) and given.strip():
            return given
        row = self.table.iloc[index]
        return self.knowledge.caption({c: row[c] for c in self.labels}, self._modality(row),
                                      np.random.default_rng([self.seed, epoch, index]))

    @staticmethod
    def _modality(row: pd.Series) -> str:
        return str(row["modality"]).lower() if "modality" in row and pd.notna(row["modality"]) else "cfp"

    def tokens(self, index: int, epoch: int) -> torch.Tensor:
        return self.tokenizer([self.text(index, epoch)])[0]

    def key(self, index: int) -> int:
        """What the image's text says, as a number: its given text (case and spacing aside), or the conditions a
        composed caption names, whatever its wording. Texts with equal keys are positives of each other."""
        given = self.texts.iloc[index]
        if isinstance(given, str) and given.strip():
            meaning = "text:" + " ".join(given.lower().split())
        else:
            row = self.table.iloc[index]
            conditions = self.knowledge.caption_conditions({c: row[c] for c in self.labels}, self._modality(row))
            meaning = "conditions:" + ",".join(sorted(c.key for c in conditions))
        return int.from_bytes(hashlib.sha256(meaning.encode()).digest()[:8], "big") >> 1  # fits an int64


def is_clip_run(path: str | Path) -> bool:
    """A `retfm pretrain --objective clip` run folder (or its clip.json)."""
    path = Path(path)
    return (path / CLIP_CARD).is_file() or (path.name == CLIP_CARD and path.is_file())


class ImageTower(nn.Module):
    """The image side of an image-text model as a plain encoder: images -> unit vectors in the shared space."""

    def __init__(self, clip: CLIP):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images)
