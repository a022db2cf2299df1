"""A site's local work in a federation, as plain functions of (global weights, the site's data, options).

``local_pretrain`` runs N optimiser steps of retfm's own pretraining objective (the trainer's model, data and
optimiser code) from the global weights and returns the new weights; ``local_evaluate`` embeds the site's images
with the global backbone, fits a logistic-regression probe on the site's train split and returns aggregate
metrics of its test split. Neither returns anything per image: only weights, counts and metrics leave a site.

What trains travels, nothing else: the weights that cross the wire are the objective's trainable parameters
(backbone, MAE decoder, token-reconstruction projector and mask token). Everything else is rebuilt identically at
every site from the run's seed and ``init``: a token-reconstruction teacher (the student's initial weights), MAE's
fixed position table, and, with LoRA (``lora``), the frozen base backbone; then only the adapters and the
objective's head train and travel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from retfm.adapt.finetune import add_lora
from retfm.adapt.predictions import predictions_table, resolve_task, youden_threshold
from retfm.adapt.probe import LogisticHead, hold_out
from retfm.config import FederatedLora, PretrainConfig
from retfm.data.datasets import ManifestDataset, Preprocessing, eval_transform
from retfm.data.manifest import Manifest
from retfm.data.stats import age_band
from retfm.errors import RetfmError
from retfm.evaluate.metrics import outcomes, point_metrics
from retfm.models import ModelSpec
from retfm.pretrain.sampling import BatchShard
from retfm.pretrain.trainer import MixedData, build_model, build_optimiser, mixed_precision, optimiser_step

EVALUATION_METRICS = ("auroc", "accuracy", "balanced_accuracy", "f1_macro")
PROFILE_COLUMNS = ("sex", "country", "age_band")  # the groups whose mix each site reports
MIN_CELL = 5

Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Site:
    """One site's data: an ingest folder or manifest file, and (when several sites share one manifest) the value
    of its ``site`` column."""

    name: str
    data: str
    rows: str | None = None


def site_profile(site: Site, config: PretrainConfig, labels: list[str]) -> dict[str, int]:
    """What a site contributes, as counts a report may show: ``images`` (its rows of ``config.split``), and per
    value of sex, country, age band and each of ``labels`` the number of those images, as ``"column=value"``.
    Values held by fewer than :data:`MIN_CELL` images are pooled into ``"column=(fewer than 5 each)"`` (the
    small-cell rule of health statistics), so no rare group is singled out."""
    table = Manifest.read(site.data).table
    if config.split:
        table = table[table["split"] == config.split]
    if site.rows is not None:
        table = table[table["site"].astype(str) == site.rows]
    table = table.assign(age_band=age_band(table["age"])) if "age" in table else table
    profile = {"images": len(table)}
    for column in [*PROFILE_COLUMNS, *labels]:
        if column not in table:
            continue
        counts = table[column].astype("string").fillna("unknown").value_counts()
        profile |= {f"{column}={value}": int(n) for value, n in counts.items() if n >= MIN_CELL}
        if (counts < MIN_CELL).any():
            profile[f"{column}=(fewer than {MIN_CELL} each)"] = int(counts[counts < MIN_CELL].sum())
    return profile


def site_config(config: PretrainConfig, site: Site) -> PretrainConfig:
    """The pretraining options of one site: the run's options on the site's own rows."""
    return config.model_copy(update={"data": [site.data], "data_weights": None,
                                     "sites": None if site.rows is None else [site.rows]})


def initial_weights(config: PretrainConfig, lora: FederatedLora | None = None) -> tuple[ModelSpec, Weights]:
    """The spec and the shared weights every federation starts from (``config.init`` or the seed's draw)."""
    spec, objective = seeded_model(config, lora)
    return spec, shared_state(objective)


def shared_state(objective: torch.nn.Module) -> Weights:
    """The objective's tensors that travel between sites and coordinator: its trainable parameters (a copy, on
    the CPU)."""
    return {name: p.detach().cpu().clone() for name, p in objective.named_parameters() if p.requires_grad}


def local_pretrain(weights: Weights, site: Site, steps: int, config: PretrainConfig, server_round: int = 1,
                   proximal_mu: float = 0.0, lora: FederatedLora | None = None) -> tuple[Weights, dict[str, float]]:
    """``steps`` optimiser steps of ``config.objective`` on the site's train split, from ``weights``. A fresh
    AdamW at a constant learning rate (``blr * images per step / 256``) each round; ``proximal_mu`` > 0 adds
    FedProx's proximal term mu/2 ||w - w_global||^2; ``lora``: the backbone wears these adapters. Returns the new
    weights and ``{"num-examples": training images at the site, "loss": mean loss of the round's steps,
    "steps": steps}``."""
    config = site_config(config, site)
    device = torch.device(config.device)
    spec, objective = seeded_model(config, lora)
    load_shared(objective, weights, site)
    objective = objective.to(device).train()
    # masks and noise differ between sites and rounds, yet repeat when a round is run again
    torch.manual_seed(_seed(config.seed, site.name, server_round))
    data = MixedData(config, Preprocessing(spec.input_size, spec.mean, spec.std))
    optimiser = build_optimiser(objective, config, config.blr * config.batch_size * config.accum_steps / 256, device)
    scaler, autocast = mixed_precision(config, device)
    penalty = _proximal_term(objective, proximal_mu) if proximal_mu > 0 else None

    state = {"epoch": server_round, "batch_in_epoch": 0, "images_seen": 0}
    batches = data.batches(server_round, 0, config.batch_size, config.workers)
    losses = [optimiser_step(objective, objective, batches, optimiser, scaler, autocast, config, BatchShard(),
                             device, state, penalty)["loss"] for _ in range(steps)]
    return shared_state(objective), {"num-examples": data.epoch_size, "loss": float(np.mean(losses)),
                                     "steps": steps}


def _proximal_term(objective: torch.nn.Module, mu: float) -> Callable[[], torch.Tensor]:
    """FedProx: mu/2 x the squared distance of the trainable weights from where the round started."""
    anchor = {name: p.detach().clone() for name, p in objective.named_parameters() if p.requires_grad}

    def penalty() -> torch.Tensor:
        return mu / 2 * sum(((p - anchor[name]) ** 2).sum()
                            for name, p in objective.named_parameters() if p.requires_grad)
    return penalty


def local_evaluate(weights: Weights, site: Site, label: str, config: PretrainConfig, classes: list | None = None,
                   batch_size: int = 32, lora: FederatedLora | None = None) -> dict[str, float]:
    """Probe the global backbone at one site: embed its labelled images, fit a logistic-regression head on the
    train split (C chosen on val, or on 15% of the training patients), evaluate on the test split. ``classes``:
    the label's classes across the federation (default: those seen at the site). Returns counts and metrics
    (``num-examples`` = test images); a metric undefined on the site's test rows is left out."""
    config = site_config(config, site)
    spec, objective = seeded_model(config, lora)
    load_shared(objective, weights, site)
    manifest = Manifest.read(site.data)
    table = manifest.table
    if site.rows is not None:
        table = table[table["site"].astype(str) == site.rows]
    if label not in table:
        raise RetfmError(f"{site.data}: no label column {label!r} for site {site.name}")
    table = table[table[label].notna()].reset_index(drop=True)
    classes = sorted(table[label].unique().tolist()) if classes is None else list(classes)
    split = table["split"].astype(str).to_numpy()
    train, val, test = split == "train", split == "val", split == "test"
    if not train.any() or not test.any():
        raise RetfmError(f"{site.data}: site {site.name} needs labelled train and test rows of {label!r}")
    vectors = embed_rows(objective.backbone, Manifest(table, manifest.root), spec, batch_size)
    y = table[label].map({c: i for i, c in enumerate(classes)}).to_numpy()
    if not val.any() or len(np.unique(y[val])) < 2:
        train, val = hold_out(table, train, y, config.seed)
    head = LogisticHead(config.seed)
    head.fit(vectors[train], y[train], vectors[val], y[val], len(classes))
    task = resolve_task("auto", label, classes)
    threshold = youden_threshold(y[val], head.predict_proba(vectors[val])[:, 1]) if task == "binary" else None
    predictions = predictions_table(table[test], label, classes, head.predict_proba(vectors[test]), threshold)
    values, _ = point_metrics(outcomes(predictions, label, classes, task, 0.5 if threshold is None else threshold))
    metrics = {name: values[name] for name in EVALUATION_METRICS if values[name] is not None}
    return {"num-examples": int(test.sum()), "train-rows": int(train.sum()), **metrics}


@torch.inference_mode()
def embed_rows(backbone: torch.nn.Module, manifest: Manifest, spec: ModelSpec, batch_size: int = 32) -> np.ndarray:
    """Pooled embeddings of a manifest's images, in row order, kept in memory (they never leave the site)."""
    pre = Preprocessing(spec.input_size, spec.mean, spec.std)
    dataset = ManifestDataset(manifest, eval_transform(pre), group_columns=(), decode_size=pre.size)
    backbone = backbone.eval()
    device = next(backbone.parameters()).device
    parts = [backbone(batch["image"].to(device)).float().cpu() for batch in DataLoader(dataset, batch_size=batch_size)]
    return torch.cat(parts).numpy()


def load_shared(objective: torch.nn.Module, weights: Weights, site: Site) -> None:
    """Load the travelling weights into a freshly built objective; a trainable one missing, or any extra, is an
    error."""
    missing, unexpected = objective.load_state_dict(weights, strict=False)
    trainable = {name for name, p in objective.named_parameters() if p.requires_grad}
    missing = [name for name in missing if name in trainable]
    if missing or unexpected:
        raise RetfmError(f"site {site.name}: the global weights do not fit the configured model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def seeded_model(config: PretrainConfig, lora: FederatedLora | None = None) -> tuple[ModelSpec, torch.nn.Module]:
    """The run's model as ``retfm pretrain`` builds it from the seed: the same initial draw at every site. With
    ``lora`` the backbone is wrapped by peft with adapters (drawn from the same seed) and frozen; the objective's
    own head (MAE decoder, token-reconstruction projector and mask token) stays trainable."""
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        spec, objective = build_model(config)
        if lora is not None:
            objective.backbone = add_lora(objective.backbone, lora.rank, lora.alpha, lora.dropout, lora.targets)
        return spec, objective


def plain_backbone(objective: torch.nn.Module) -> torch.nn.Module:
    """The objective's backbone as a plain timm model: LoRA adapters, if any, merged into the base weights."""
    backbone = objective.backbone
    return backbone.merge_and_unload() if hasattr(backbone, "merge_and_unload") else backbone


def _seed(seed: int, site: str, server_round: int) -> int:
    digest = hashlib.sha256(f"{seed}/{site}/{server_round}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
