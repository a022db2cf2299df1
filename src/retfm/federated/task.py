"""A site's local work in a federation, as plain functions of (global weights, the site's data, options).

Task pretrain: ``local_pretrain`` runs N optimiser steps of retfm's own pretraining objective (the trainer's model,
data and optimiser code) from the global weights and returns the new weights; ``local_evaluate`` embeds the site's
images with the global backbone, fits a logistic-regression probe on the site's train split and returns aggregate
metrics of its test split. Task finetune: ``local_finetune`` runs N optimiser steps of ``retfm finetune``'s recipe
(its model, adaptation, optimiser, augmentations and loss) on the site's labelled train split; ``local_test``
scores the global classifier on the site's test split. Task synth: ``local_synth`` runs N optimiser steps of
``retfm synth train``'s denoising objective (its UNet, data and training step) on the site's images;
``local_synth_test`` measures the global generator's denoising loss on the site's test split. None returns
anything per image: only weights, counts and metrics leave a site.

What trains travels, nothing else: the weights that cross the wire are the trainable parameters (backbone, MAE
decoder, token-reconstruction projector and mask token; a classifier's weights as its adaptation trains them: all,
the head only, or LoRA adapters and head). Everything else is rebuilt identically at every site from the run's seed
and ``init`` / ``weights``: a token-reconstruction teacher (the student's initial weights), MAE's fixed position
table, and, with LoRA (``lora``) or linear adaptation, the frozen base backbone. A generator's UNet trains
whole, so all of it travels.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from retfm.adapt import finetune as recipe
from retfm.adapt.config import FinetuneConfig
from retfm.adapt.predictions import predictions_table, resolve_task, youden_threshold
from retfm.adapt.probe import LogisticHead, hold_out
from retfm.data.datasets import Preprocessing, eval_transform
from retfm.data.manifest import Manifest
from retfm.data.splits import label_fraction_subset
from retfm.data.stats import age_band
from retfm.errors import RetfmError
from retfm.evaluate.metrics import as_strings, class_codes, outcomes, point_metrics
from retfm.federated.config import FederatedConfig
from retfm.models import ModelSpec, memory_format, preprocessing
from retfm.models.inference import manifest_outputs
from retfm.pretrain.config import LoraOptions, PretrainConfig
from retfm.pretrain.sampling import BatchShard
from retfm.pretrain.trainer import (MixedData, build_model, build_optimiser, mixed_precision, optimiser_step,
                                    warmup_cosine, with_lora)
from retfm.synth import train as synth
from retfm.synth.config import SynthTrainConfig
from retfm.synth.generator import Conditions

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


def contributed(site: Site, config: FederatedConfig) -> dict[str, int]:
    """:func:`site_profile` of the images the site trains on: its pretraining split (with ``evaluate_label``'s
    counts), its labelled train split with the fine-tuned label's, or a generator's split with each condition
    column's counts."""
    if config.task == "finetune":
        label = config.finetune_config().label
        return site_profile(site, "train", [label], labelled=label)
    if config.task == "synth":
        options = config.synth_config()
        return site_profile(site, options.split, [options.label, *options.cond], labelled=options.label)
    return site_profile(site, config.pretrain_config().split, [config.evaluate_label] if config.evaluate_label else [])


def site_profile(site: Site, split: str | None, labels: list[str], labelled: str | None = None) -> dict[str, int]:
    """What a site contributes, as counts a report may show: ``images`` (its rows of ``split``, only those with a
    ``labelled`` value when given), and per value of sex, country, age band and each of ``labels`` the number of
    those images, as ``"column=value"``. Values held by fewer than :data:`MIN_CELL` images are pooled into
    ``"column=(fewer than 5 each)"`` (the small-cell rule of health statistics), so no rare group is singled out."""
    table = Manifest.read(site.data).table
    if split:
        table = table[table["split"] == split]
    if labelled is not None:
        table = table[table[labelled].notna()]
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


def start_weights(config: FederatedConfig) -> Weights:
    """The weights round 1 sends: the task's trainable tensors as every site builds them from the seed."""
    if config.task == "finetune":
        return shared_state(seeded_classifier(config.finetune_config(), config.classes())[2])
    if config.task == "synth":
        return shared_state(synth.build_denoiser(config.synth_config(), Conditions(config.synth_conditions()))[0])
    return initial_weights(config.pretrain_config(), config.lora_options())[1]


def initial_weights(config: PretrainConfig, lora: LoraOptions | None = None) -> tuple[ModelSpec, Weights]:
    """The spec and the shared weights every federation starts from (``config.init`` or the seed's draw)."""
    spec, objective = seeded_model(config, lora)
    return spec, shared_state(objective)


def shared_state(objective: torch.nn.Module) -> Weights:
    """The objective's tensors that travel between sites and coordinator: its trainable parameters (a copy, on
    the CPU)."""
    return {name: p.detach().cpu().clone() for name, p in objective.named_parameters() if p.requires_grad}


def local_pretrain(weights: Weights, site: Site, steps: int, config: PretrainConfig, server_round: int = 1,
                   proximal_mu: float = 0.0, lora: LoraOptions | None = None) -> tuple[Weights, dict[str, float]]:
    """``steps`` optimiser steps of ``config.objective`` on the site's train split, from ``weights``. A fresh
    AdamW each round, its learning rate (``blr * images per step / 256``) following the recipe's warmup and
    cosine over ``config.steps`` (the site's whole share: rounds x local steps) at round ``server_round``'s
    place in it, as one site's ``retfm pretrain`` of that many steps would; ``proximal_mu`` > 0 adds
    FedProx's proximal term mu/2 ||w - w_global||^2; ``lora``: the backbone wears these adapters. Returns the new
    weights and ``{"num-examples": training images at the site, "loss": mean loss of the round's steps,
    "steps": steps}``."""
    config = site_config(config, site)
    device = torch.device(config.device)
    spec, objective = seeded_model(config, lora)
    load_shared(objective, weights, site)
    objective = objective.to(device, memory_format=memory_format(objective.backbone)).train()
    # masks and noise differ between sites and rounds, yet repeat when a round is run again
    torch.manual_seed(_seed(config.seed, site.name, server_round))
    data = MixedData(config, preprocessing(spec))
    lr = config.blr * config.batch_size * config.accum_steps / 256
    optimiser = build_optimiser(objective, config, lr, device)
    # the recipe's warmup + cosine over the site's whole share (config.steps), from where the last round ended
    factor, done = warmup_cosine(config, lr), (server_round - 1) * steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: factor(done + step))
    scaler, autocast = mixed_precision(config, device)
    penalty = _proximal_term(objective, proximal_mu) if proximal_mu > 0 else None

    state = {"epoch": server_round, "batch_in_epoch": 0, "images_seen": 0}
    batches = data.batches(server_round, 0, config.batch_size, config.workers)
    losses = []
    for _ in range(steps):
        losses.append(optimiser_step(objective, objective, batches, optimiser, scaler, autocast, config, BatchShard(),
                                     device, state, penalty)["loss"])
        schedule.step()
    return shared_state(objective), {"num-examples": data.epoch_size, "loss": float(np.mean(losses)),
                                     "steps": steps}


def local_finetune(weights: Weights, site: Site, steps: int, config: FinetuneConfig, server_round: int = 1,
                   proximal_mu: float = 0.0, *, classes: list[str]) -> tuple[Weights, dict[str, float]]:
    """``steps`` optimiser steps of ``retfm finetune``'s recipe on the site's labelled train split (its
    ``label_fraction``), from ``weights``: the classifier of ``classes`` (the federation's, whatever the site
    holds) adapted as ``config.adaptation`` says, RETFound's augmentations and loss, a fresh AdamW each round at a
    constant learning rate (``blr * images per step / 256``, times layer-wise decay's scale in full fine-tuning).
    ``proximal_mu`` > 0 adds FedProx's proximal term. Returns the new trainable weights and ``{"num-examples":
    training images at the site, "loss": mean classification loss of the round's steps, "steps": steps}``."""
    device = torch.device(config.device)
    _, pre, model = seeded_classifier(config, classes)
    load_shared(model, weights, site)
    model = recipe.train_mode(model.to(device, memory_format=memory_format(model)))
    torch.manual_seed(_seed(config.seed, site.name, server_round))
    rows, root = labelled_rows(site, config.label)
    rows = label_fraction_subset(rows[rows["split"] == "train"].reset_index(drop=True), config.label,
                                 config.label_fraction, config.seed)
    codes = _class_index(rows, config.label, classes, site)
    train_set = recipe.training_set(rows.assign(**{recipe.CLASS_COLUMN: codes}), root, config, pre)
    per_pass = len(train_set) // (config.batch_size * config.accum_steps)
    if per_pass == 0:
        raise RetfmError(f"site {site.name}: {len(train_set)} training images for {config.label!r} are fewer than "
                         f"one batch of {config.batch_size * config.accum_steps}")
    passes = math.ceil(steps / per_pass)  # each round its own passes over the site's images: new orders and crops
    batches = itertools.chain.from_iterable(recipe.epoch_batches(train_set, config, epoch)
                                            for epoch in range((server_round - 1) * passes, server_round * passes))
    optimiser = recipe.build_optimiser(model, config)
    for group in optimiser.param_groups:  # no schedule here: apply layer-wise decay's scale as timm's schedules do
        group["lr"] *= group.get("lr_scale", 1.0)
    criterion, mixup = recipe.loss_function(config, len(classes))
    penalty = _proximal_term(model, proximal_mu) if proximal_mu > 0 else None
    losses = [recipe.train_step(model, batches, optimiser, criterion, mixup, config, device, penalty)[0]
              for _ in range(steps)]
    return shared_state(model), {"num-examples": len(train_set), "loss": float(np.mean(losses)), "steps": steps}


def local_test(weights: Weights, site: Site, label: str, config: FinetuneConfig, *,
               classes: list[str]) -> dict[str, float]:
    """Score the global classifier on the site's labelled test split, as the classifier stands (no site's own
    fitting or threshold: a binary task is decided at probability 0.5). Returns ``num-examples`` (test images)
    and the metrics of :data:`EVALUATION_METRICS` defined on the site's rows."""
    device = torch.device(config.device)
    _, pre, model = seeded_classifier(config, classes)
    load_shared(model, weights, site)
    rows, root = labelled_rows(site, label)
    test = rows[rows["split"] == "test"].reset_index(drop=True)
    if test.empty:
        raise RetfmError(f"{site.data}: site {site.name} has no labelled test rows of {label!r}")
    _class_index(test, label, classes, site)  # a value outside the classes is an error, not a silent miss
    test[label] = as_strings(test[label])
    probabilities = recipe.predict(model.to(device), test, root, pre, config, device)
    task = resolve_task(config.task, label, classes)
    values, _ = point_metrics(outcomes(predictions_table(test, label, classes, probabilities, None), label, classes,
                                       task))
    return {"num-examples": len(test), **{name: values[name] for name in EVALUATION_METRICS
                                           if values[name] is not None}}


def local_synth(weights: Weights, site: Site, steps: int, config: SynthTrainConfig, server_round: int = 1,
                proximal_mu: float = 0.0, *, conditions: dict[str, list]) -> tuple[Weights, dict[str, float]]:
    """``steps`` optimiser steps of ``retfm synth train``'s denoising objective on the site's images (its
    ``split``), from ``weights``: the UNet of the federation's ``conditions`` (whatever values the site holds), the
    same data pipeline and training step (noise, noise levels and condition drops drawn per site and round), a
    fresh AdamW each round at the constant ``lr`` (no warmup, no EMA). ``proximal_mu`` > 0 adds FedProx's
    proximal term. Returns the UNet's weights and ``{"num-examples": training images at the site, "loss": mean
    denoising loss of the round's steps, "steps": steps}``."""
    config = synth_site_config(config, site)
    device = torch.device(config.device)
    data = _site_images(config, conditions, site)
    unet, scheduler = synth.build_denoiser(config, data.conditions)
    load_shared(unet, weights, site)
    unet = unet.to(device).train()
    per_pass = len(data.order(0)) // config.batch_size
    batches = data.batches((server_round - 1) * math.ceil(steps / per_pass), 0)  # each round its own passes
    rng = torch.Generator().manual_seed(_seed(config.seed, site.name, server_round))
    optimiser = synth.build_optimiser(unet, config)
    penalty = _proximal_term(unet, proximal_mu) if proximal_mu > 0 else None
    losses = []
    for _ in range(steps):
        images, classes, _, _ = next(batches)
        losses.append(synth.train_step(unet, scheduler, optimiser, images, classes, data.conditions.null, rng,
                                       config, device, penalty))
    return shared_state(unet), {"num-examples": len(data.table), "loss": float(np.mean(losses)), "steps": steps}


@torch.no_grad()
def local_synth_test(weights: Weights, site: Site, label: str, config: SynthTrainConfig, *,
                     conditions: dict[str, list]) -> dict[str, float]:
    """The global generator's mean denoising loss on the site's test split (``label`` is the generator's): every
    image once, unflipped, with its condition, at noise and noise levels drawn from ``config.seed`` (the same
    draws every round). Returns ``{"num-examples": test images, "loss": ...}``."""
    config = synth_site_config(config, site).model_copy(update={"split": "test", "flip": False})
    device = torch.device(config.device)
    data = _site_images(config, conditions, site)
    unet, scheduler = synth.build_denoiser(config, data.conditions)
    load_shared(unet, weights, site)
    unet = unet.to(device).eval()
    rng = torch.Generator().manual_seed(config.seed)
    total, size = 0.0, config.batch_size
    loader = DataLoader(data.dataset, batch_size=size, num_workers=config.workers)
    for start, batch in zip(range(0, len(data.table), size), loader):
        images = batch["image"]
        loss = synth.denoising_loss(unet, scheduler, images, data.classes[start:start + len(images)],
                                    data.conditions.null, rng, 0.0, device, config.precision)
        total += loss.item() * len(images)
    return {"num-examples": len(data.table), "loss": total / len(data.table)}


def synth_site_config(config: SynthTrainConfig, site: Site) -> SynthTrainConfig:
    """A generator's options at one site: the run's options on the site's own rows."""
    return config.model_copy(update={"data": site.data, "sites": None if site.rows is None else [site.rows]})


def _site_images(config: SynthTrainConfig, conditions: dict[str, list], site: Site) -> synth.ConditionedImages:
    try:
        return synth.ConditionedImages(config, Conditions(conditions))
    except RetfmError as exc:
        raise RetfmError(f"site {site.name}: {exc}") from None


def labelled_rows(site: Site, label: str) -> tuple[pd.DataFrame, Path]:
    """The site's rows with a value of ``label`` (all splits), and the manifest's root."""
    manifest = Manifest.read(site.data)
    table = manifest.table
    if site.rows is not None:
        table = table[table["site"].astype(str) == site.rows]
    if label not in table:
        raise RetfmError(f"{site.data}: no label column {label!r} for site {site.name}")
    return table[table[label].notna()].reset_index(drop=True), manifest.root


def _class_index(rows: pd.DataFrame, label: str, classes: list[str], site: Site) -> np.ndarray:
    return class_codes(as_strings(rows[label]), {c: i for i, c in enumerate(classes)},
                       f"site {site.name}: label column {label!r}")


def seeded_classifier(config: FinetuneConfig, classes: list[str]) -> tuple[ModelSpec, Preprocessing, torch.nn.Module]:
    """The classifier as ``retfm finetune`` builds it, drawn from the seed: the same frozen weights, random head
    and LoRA adapters at every site and at the coordinator."""
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        return recipe.build_classifier(config, len(classes))


def _proximal_term(objective: torch.nn.Module, mu: float) -> Callable[[], torch.Tensor]:
    """FedProx: mu/2 x the squared distance of the trainable weights from where the round started."""
    anchor = {name: p.detach().clone() for name, p in objective.named_parameters() if p.requires_grad}

    def penalty() -> torch.Tensor:
        return mu / 2 * sum(((p - anchor[name]) ** 2).sum()
                            for name, p in objective.named_parameters() if p.requires_grad)
    return penalty


def local_evaluate(weights: Weights, site: Site, label: str, config: PretrainConfig, classes: list | None = None,
                   batch_size: int = 32, lora: LoraOptions | None = None) -> dict[str, float]:
    """Probe the global backbone at one site: embed its labelled images, fit a logistic-regression head on the
    train split (C chosen on val, or on 15% of the training patients), evaluate on the test split. ``classes``:
    the label's classes across the federation (default: those seen at the site). Returns counts and metrics
    (``num-examples`` = test images); a metric undefined on the site's test rows is left out."""
    config = site_config(config, site)
    spec, objective = seeded_model(config, lora)
    load_shared(objective, weights, site)
    table, root = labelled_rows(site, label)
    classes = sorted(table[label].unique().tolist()) if classes is None else list(classes)
    split = table["split"].astype(str).to_numpy()
    train, val, test = split == "train", split == "val", split == "test"
    if not train.any() or not test.any():
        raise RetfmError(f"{site.data}: site {site.name} needs labelled train and test rows of {label!r}")
    vectors = embed_rows(objective.backbone, Manifest(table, root), spec, batch_size)
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


def embed_rows(backbone: torch.nn.Module, manifest: Manifest, spec: ModelSpec, batch_size: int = 32) -> np.ndarray:
    """Pooled embeddings of a manifest's images, in row order, kept in memory (they never leave the site)."""
    pre = preprocessing(spec)
    backbone = backbone.eval()
    device = next(backbone.parameters()).device
    batches = manifest_outputs(lambda images: backbone(images.to(device)), manifest, eval_transform(pre), batch_size,
                               decode_size=pre.size)
    return np.concatenate([vectors for _, vectors in batches])


def load_shared(objective: torch.nn.Module, weights: Weights, site: Site) -> None:
    """Load the travelling weights into a freshly built objective; a trainable one missing, any extra, or one of
    another shape (say, a head for other classes) is an error."""
    try:
        missing, unexpected = objective.load_state_dict(weights, strict=False)
    except RuntimeError as exc:
        raise RetfmError(f"site {site.name}: the global weights do not fit the configured model "
                         f"({str(exc).splitlines()[-1].strip()})") from None
    trainable = {name for name, p in objective.named_parameters() if p.requires_grad}
    missing = [name for name in missing if name in trainable]
    if missing or unexpected:
        raise RetfmError(f"site {site.name}: the global weights do not fit the configured model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def seeded_model(config: PretrainConfig, lora: LoraOptions | None = None) -> tuple[ModelSpec, torch.nn.Module]:
    """The run's model as ``retfm pretrain`` builds it from the seed: the same initial draw at every site. With
    ``lora`` the backbone is wrapped by peft with adapters (drawn from the same seed) and frozen; the objective's
    own head (MAE decoder, token-reconstruction projector and mask token) stays trainable."""
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        spec, objective = build_model(config)
        return spec, with_lora(objective, lora)


def _seed(seed: int, site: str, server_round: int) -> int:
    digest = hashlib.sha256(f"{seed}/{site}/{server_round}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
