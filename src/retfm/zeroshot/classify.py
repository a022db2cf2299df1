"""``retfm zeroshot``: recognise conditions no classifier was trained on, from their descriptions.

Each class is a condition of the knowledge base (through the label column's label map, or named with
``--classes``). Its text embedding is the mean of the unit text embeddings of all its prompts (templates x name,
synonyms and visible signs: prompt ensembling), renormalised. An image's class probabilities are the softmax of
the image-text model's scaled cosine similarities. Results go through the same writer as every head:
``predictions.parquet``, ``metrics.json`` (with Top-1/3/5 accuracy added) and ``report.html``; the images' vectors
in the shared space are kept in ``image_embeddings.parquet`` so ``retfm index build`` can make them searchable by
text (``retfm retrieve --text``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from retfm.adapt.config import EmbedConfig
from retfm.adapt.embed import embed
from retfm.adapt.embeddings import read_embeddings
from retfm.adapt.predictions import resolve_task, write_results
from retfm.config import comma_separated
from retfm.errors import RetfmError
from retfm.knowledge.base import load_knowledge
from retfm.pretrain.clip import CLIP, load_clip
from retfm.zeroshot.config import ZeroshotConfig

EMBEDDINGS_FILENAME = "image_embeddings.parquet"


def class_texts(label: str, values: list, classes: str | None, modality: str) -> dict[object, list[str]]:
    """The prompts of each label value: via the knowledge base's label map for ``label``, or ``classes`` —
    ``"0=normal fundus,1=glaucoma"`` or, in the order of the sorted values, ``"normal fundus,glaucoma"``."""
    knowledge = load_knowledge()
    if not classes:
        return knowledge.class_prompts(label, values, modality)
    parts = comma_separated(classes)
    if all("=" in part for part in parts):
        named = dict(part.split("=", 1) for part in parts)
        by_value = {value: named.get(str(value)) for value in values}
    elif len(parts) == len(values):
        by_value = dict(zip(values, parts))
    else:
        raise RetfmError(f"--classes: {len(parts)} names for {len(values)} values of {label!r} "
                         f"({', '.join(map(str, values))}); give one per value, or value=condition pairs")
    missing = [str(v) for v, name in by_value.items() if not name]
    if missing:
        raise RetfmError(f"--classes: no condition named for value(s) {', '.join(missing)} of {label!r}")
    return {value: knowledge.prompts(name.strip(), modality) for value, name in by_value.items()}


@torch.inference_mode()
def text_embeddings(model: CLIP, texts: list[list[str]]) -> torch.Tensor:
    """One unit vector per class: the renormalised mean of its prompts' unit text embeddings."""
    tokenizer = model.tokenizer()
    rows = [model.encode_text(tokenizer(prompts)).mean(0) for prompts in texts]
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def top_k_accuracy(y: np.ndarray, probabilities: np.ndarray, ks: tuple[int, ...] = (1, 3, 5)) -> dict[str, float]:
    """Share of images whose true class is among the k most probable (ties broken by class order)."""
    ranked = np.argsort(-probabilities, axis=1, kind="stable")
    return {f"top{k}_accuracy": float(np.mean((ranked[:, :k] == y[:, None]).any(axis=1)))
            for k in ks if k <= probabilities.shape[1]}


def zeroshot(data: Path, model_path: Path, out: Path, config: ZeroshotConfig,
             progress: Callable[[int], None] | None = None, total: Callable[[int], None] | None = None) -> dict:
    """Classify the images of ``data`` (one split, or all) zero-shot; write and return the metrics."""
    label, classes, modality = config.label, config.classes, config.modality
    split = None if config.split == "all" else config.split
    model, card = load_clip(model_path)
    out.mkdir(parents=True, exist_ok=True)
    embeddings = out / EMBEDDINGS_FILENAME
    embed(data, embeddings, EmbedConfig(model=str(model_path), workers=config.workers, device=config.device,
                                        split=split),
          progress, total)
    table, vectors, metadata = read_embeddings(embeddings)
    if label not in table:
        raise RetfmError(f"{data}: no label column {label!r}")
    if split:
        keep = (table["split"] == split).to_numpy()
        table, vectors = table[keep].reset_index(drop=True), vectors[keep]
    known = table[label].notna().to_numpy()
    table, vectors = table[known].reset_index(drop=True), vectors[known]
    if not len(table):
        raise RetfmError(f"{data}: no {split or ''} images with a {label!r} label")
    values = sorted(table[label].unique().tolist())
    if len(values) < 2:
        raise RetfmError(f"{data}: label {label!r} has fewer than two classes in split {split}")
    if modality is None:
        modality = str(table["modality"].mode().iat[0]).lower() if "modality" in table and \
            table["modality"].notna().any() else "cfp"
    prompts = class_texts(label, values, classes, modality)
    text = text_embeddings(model, [prompts[v] for v in values])
    scale = float(model.logit_scale.detach().exp().clamp(max=100))
    logits = scale * torch.from_numpy(vectors) @ text.T
    probabilities = torch.softmax(logits.double(), dim=1).numpy()
    y = table[label].map({v: i for i, v in enumerate(values)}).to_numpy()
    meta = {"model": str(model_path), "weights_sha256": metadata.get("retfm.weights_sha256"), "head": "zero-shot",
            "modality": modality, "prompts_per_class": {str(v): len(prompts[v]) for v in values},
            "classes_given": classes, "split": split, "seed": config.seed, "image_text_card": card.get("name")}
    return write_results(out, table, label, values, probabilities, resolve_task("auto", label, values), None,
                         meta, config.by, config.bootstrap, config.seed,
                         extra={"top_k": top_k_accuracy(y, probabilities)})
