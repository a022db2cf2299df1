"""``retfm finetune``: adapt a foundation model to a labelled task, RETFound's recipe by default.

Adaptations: ``full`` (every weight trains; layer-wise learning-rate decay 0.65 so early blocks move least),
``linear`` (the backbone frozen, a linear head on the pooled features) and ``lora`` (low-rank adapters on the
attention projections via peft, plus the head; the backbone's own weights frozen).

Recipe defaults (RETFound's ``main_finetune.py``): AdamW, lr = blr 5e-3 x batch / 256, weight decay 0.05, drop path
0.2, warmup then cosine per step, RandAugment (``rand-m9-mstd0.5-inc1``) and random erasing (p 0.25) from timm,
label smoothing 0.1; mixup/cutmix off unless asked for; optional class-balanced sampling. After every epoch the
validation split is scored with the chosen metric; the best epoch's weights are kept and the run stops after
``patience`` epochs without improvement. The best model predicts the test split, which ``retfm evaluate``'s code
scores (metrics.json with CIs, report.html).

``label_fraction`` keeps a share of the training patients, stratified by label, the same for a seed whatever the
fraction (smaller fractions are subsets of larger ones). ``train_sites`` / ``test_sites`` restrict the training
and validation rows, and the test rows, to sites (cross-site studies).

Outputs in OUT: ``model.safetensors`` + ``model.json`` (the best classifier, LoRA merged in; loadable by name
with its head), ``predictions.parquet``, ``metrics.json``, ``report.html``, ``log.jsonl``,
``finetune_config.yaml``; ``checkpoint.pt`` after every epoch, so ``--resume`` continues an interrupted run from
its last whole epoch.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from timm.data import Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, WeightedRandomSampler

from retfm import __version__
from retfm.adapt.config import FinetuneConfig
from retfm.adapt.predictions import resolve_task, write_results, youden_threshold
from retfm.data.datasets import ManifestDataset, Preprocessing, eval_transform
from retfm.data.manifest import Manifest
from retfm.data.splits import label_fraction_subset
from retfm.errors import RetfmError
from retfm.evaluate.metrics import outcomes, point_metrics
from retfm.models import ModelSpec, create, memory_format, preprocessing, save_checkpoint, spec as model_spec
from retfm.models.backbones import head_prefix
from retfm.models.inference import manifest_outputs
from retfm.models.lora import add_lora, merged
from retfm.runs import RunFolder, checked_device, load_checkpoint

BEST_FILENAME = "best.pt"
LOWER_IS_BETTER = ("loss",)
CLASS_COLUMN = "_class"  # the label as a class index, for the loader


def finetune(config: FinetuneConfig, out: Path, resume: bool = False,
             progress: Callable[[int], None] | None = None, total: Callable[[int], None] | None = None) -> dict:
    """Train, select on validation, predict and evaluate the test split; returns the metrics dict."""
    run = RunFolder(out, config, "finetune_config.yaml", resume, position="epoch")
    device = checked_device(config.device)
    torch.manual_seed(config.seed)

    rows = _rows(config)
    classes = sorted(rows[config.label].unique().tolist())
    task = resolve_task(config.task, config.label, classes)
    spec, pre, model = build_classifier(config, len(classes))
    model = model.to(device, memory_format=memory_format(model))
    optimiser = build_optimiser(model, config)

    manifest_root = Manifest.read(config.data).root
    train_rows = rows[rows["split"] == "train"].reset_index(drop=True)
    val_rows = rows[rows["split"] == "val"].reset_index(drop=True)
    test_rows = rows[rows["split"] == "test"].reset_index(drop=True)
    train_rows = label_fraction_subset(train_rows, config.label, config.label_fraction, config.seed)
    code = {c: i for i, c in enumerate(classes)}
    train_rows[CLASS_COLUMN] = train_rows[config.label].map(code).astype(int)
    train_set = training_set(train_rows, manifest_root, config, pre)
    steps_per_epoch = len(train_set) // (config.batch_size * config.accum_steps)
    if steps_per_epoch == 0:
        raise RetfmError(f"{config.data}: {len(train_set)} training images for {config.label!r} are fewer than one "
                         f"batch of {config.batch_size * config.accum_steps}")
    schedule = CosineLRScheduler(optimiser, t_initial=config.epochs * steps_per_epoch, lr_min=config.min_lr,
                                 warmup_t=config.warmup_epochs * steps_per_epoch, warmup_lr_init=0.0,
                                 t_in_epochs=False)
    criterion, mixup = loss_function(config, len(classes))

    state = {"epoch": 0, "best": None, "best_epoch": None, "since_best": 0, "seconds": 0.0, "images_seen": 0}
    saved = run.open()
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimiser"])
        state = saved["state"]
        torch.set_rng_state(saved["rng"])

    if total:
        total(config.epochs)
    if progress and state["epoch"]:
        progress(state["epoch"])
    started = time.perf_counter() - state["seconds"]
    while state["epoch"] < config.epochs and state["since_best"] < config.patience:
        epoch = state["epoch"]
        batches = iter(epoch_batches(train_set, config, epoch))
        train_mode(model)
        running = 0.0
        for step in range(steps_per_epoch):
            loss, images = train_step(model, batches, optimiser, criterion, mixup, config, device)
            schedule.step_update(epoch * steps_per_epoch + step + 1)
            running += loss
            state["images_seen"] += images
        val_probs = predict(model, val_rows, manifest_root, pre, config, device)
        score = _selection_score(val_rows, val_probs, config, classes, task)
        better = state["best"] is None or (score < state["best"] if config.select_metric in LOWER_IS_BETTER
                                           else score > state["best"])
        if better:
            state.update(best=score, best_epoch=epoch, since_best=0)
            torch.save(model.state_dict(), out / BEST_FILENAME)
        else:
            state["since_best"] += 1
        state["epoch"] = epoch + 1
        state["seconds"] = time.perf_counter() - started
        record = {"epoch": epoch + 1, "train_loss": round(running / steps_per_epoch, 6),
                  f"val_{config.select_metric}": score, "lr": optimiser.param_groups[0]["lr"],
                  "images_seen": state["images_seen"]}
        run.log(record)
        run.save(model=model.state_dict(), optimiser=optimiser.state_dict(), state=dict(state),
                 rng=torch.get_rng_state())
        if progress:
            progress(1)

    model.load_state_dict(load_checkpoint(out / BEST_FILENAME))
    val_probs = predict(model, val_rows, manifest_root, pre, config, device)
    threshold = (youden_threshold(val_rows[config.label].map(code).to_numpy(), val_probs[:, 1])
                 if task == "binary" else None)
    meta = {"model": spec.name, "weights": config.weights, "adaptation": config.adaptation,
            "label_fraction": config.label_fraction, "train_rows": len(train_set), "selection_rows": len(val_rows),
            "best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "seed": config.seed,
            "select_metric": config.select_metric, "best_val_score": state["best"],
            "config": config.model_dump(mode="json")}
    result = write_results(out, test_rows, config.label, classes, predict(model, test_rows, manifest_root, pre,
                                                                          config, device),
                           task, threshold, meta, config.by, config.bootstrap, config.seed)
    save_classifier(model, spec, pre, config, classes, task, threshold, out / "model.safetensors",
                    name=f"{spec.name}-{config.label}", description=f"{spec.name} fine-tuned on {config.label}",
                    metrics={k: v for k, v in result["metrics"].items()},
                    best_epoch=state["best_epoch"], images_seen=state["images_seen"],
                    compute={"device": str(device), "device_hours": round(state["seconds"] / 3600, 5),
                             "precision": config.precision},
                    retfm_version=__version__)
    (out / BEST_FILENAME).unlink(missing_ok=True)
    return result


# ---- data -------------------------------------------------------------------------------------------------------

def _rows(config: FinetuneConfig) -> pd.DataFrame:
    """Labelled rows of the manifest: train/val from ``train_sites``, test from ``test_sites`` (default: all)."""
    table = Manifest.read(config.data).table
    if config.label not in table:
        raise RetfmError(f"{config.data}: no label column {config.label!r}")
    table = table[table[config.label].notna()]
    for sites, splits in ((config.train_sites, ("train", "val")), (config.test_sites, ("test",))):
        if sites:
            unknown = sorted(set(sites) - set(table["site"].astype(str)))
            if unknown:
                raise RetfmError(f"{config.data}: no site(s) {', '.join(unknown)} "
                                 f"(sites: {', '.join(sorted(table['site'].astype(str).unique()))})")
            table = table[~table["split"].isin(splits) | table["site"].astype(str).isin(sites)]
    for split in ("train", "val", "test"):
        if not (table["split"] == split).any():
            raise RetfmError(f"{config.data}: no labelled {split} images for {config.label!r}")
    if table[config.label].nunique() < 2:
        raise RetfmError(f"{config.data}: label {config.label!r} has fewer than two classes")
    return table.reset_index(drop=True)


def training_set(rows: pd.DataFrame, root: Path, config: FinetuneConfig, pre) -> ManifestDataset:
    """The training images of ``rows`` (their class index in ``CLASS_COLUMN``) with RETFound's augmentations."""
    return ManifestDataset(Manifest(rows, root), _SeedsTimmRandom(_train_transform(config, pre)), label=CLASS_COLUMN,
                           seed=config.seed, group_columns=(), decode_size=pre.size)


def epoch_batches(train_set: ManifestDataset, config: FinetuneConfig, epoch: int) -> DataLoader:
    """One pass over ``train_set`` in whole micro-batches, its order and augmentations drawn for ``epoch``."""
    train_set.set_epoch(epoch)
    return DataLoader(train_set, batch_size=config.batch_size, sampler=_sampler(train_set, config, epoch),
                      num_workers=config.workers, drop_last=True,
                      generator=torch.Generator().manual_seed(config.seed + epoch), persistent_workers=False)


def _train_transform(config: FinetuneConfig, pre) -> Callable:
    """timm's training transform as RETFound uses it: random resized crop, flip, RandAugment, random erasing."""
    return create_transform(pre.size, is_training=True, auto_augment=config.randaugment or None,
                            re_prob=config.random_erasing, re_mode="pixel", re_count=1, interpolation="bicubic",
                            mean=pre.mean, std=pre.std, color_jitter=None)


class _SeedsTimmRandom:
    """timm's RandAugment draws from Python's ``random`` and numpy's global generator; the dataset seeds torch per
    (seed, epoch, image), so seed both from torch: augmentations then repeat exactly on resume, whatever the loader
    workers, and the callers' generators are left as they were."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image):
        python_state, numpy_state = random.getstate(), np.random.get_state()
        seed = int(torch.randint(2**31, ()))
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.transform(image)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _sampler(dataset: ManifestDataset, config: FinetuneConfig, epoch: int):
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    if not config.balanced_sampling:
        return torch.randperm(len(dataset), generator=generator).tolist()
    labels = dataset.table[CLASS_COLUMN]
    weights = labels.map(1.0 / labels.value_counts()).to_numpy()
    return WeightedRandomSampler(torch.as_tensor(weights), len(dataset), replacement=True, generator=generator)


# ---- model ------------------------------------------------------------------------------------------------------

def build_classifier(config: FinetuneConfig, num_classes: int) -> tuple[ModelSpec, Preprocessing, torch.nn.Module]:
    """The model with a ``num_classes`` head, adapted as ``config.adaptation`` says (its frozen parts, the
    random head and LoRA adapters drawn from torch's global generator), and its preprocessing."""
    spec = model_spec(config.model)
    pre = preprocessing(spec)
    if config.image_size:
        pre = dataclasses.replace(pre, size=config.image_size)
    model = create(config.model, weights=config.weights, num_classes=num_classes, img_size=pre.size,
                   drop_path_rate=config.drop_path if config.adaptation == "full" else 0.0)
    return spec, pre, _adapt(model, config)


def build_optimiser(model: torch.nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW at lr = blr x images per step / 256 over the trainable weights. In full fine-tuning each block's
    group carries layer-wise decay's ``lr_scale``, which timm's schedules multiply the learning rate by."""
    lr = config.blr * config.batch_size * config.accum_steps / 256
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=config.weight_decay,
                               layer_decay=config.layer_decay if config.adaptation == "full" else None)


def loss_function(config: FinetuneConfig, num_classes: int) -> tuple[torch.nn.Module, Mixup | None]:
    """Cross-entropy with label smoothing, or with mixup/cutmix (when asked for) soft-target cross-entropy and
    the batch mixer."""
    mixup = (Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.label_smoothing,
                   num_classes=num_classes) if config.mixup or config.cutmix else None)
    criterion = SoftTargetCrossEntropy() if mixup else torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    return criterion, mixup


def train_step(model: torch.nn.Module, batches: Iterator[dict], optimiser: torch.optim.Optimizer,
               criterion: torch.nn.Module, mixup: Mixup | None, config: FinetuneConfig, device: torch.device,
               penalty: Callable[[], torch.Tensor] | None = None) -> tuple[float, int]:
    """One optimiser step: ``accum_steps`` micro-batches from ``batches``, backward, optional clipping, AdamW.
    ``penalty()`` is added to every micro-batch's loss (a federated site's proximal term). Returns the step's
    mean classification loss and its number of images; the learning-rate schedule is the caller's."""
    total, images_seen = 0.0, 0
    for _ in range(config.accum_steps):
        batch = next(batches)
        images, targets = batch["image"].to(device, memory_format=memory_format(model)), batch["label"].to(device)
        if mixup:
            images, targets = mixup(images, targets)
        with autocast(config, device):
            loss = criterion(model(images), targets)
        ((loss if penalty is None else loss + penalty()) / config.accum_steps).backward()
        total, images_seen = total + float(loss.detach()), images_seen + len(images)
    if config.clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    return total / config.accum_steps, images_seen


def train_mode(model: torch.nn.Module) -> torch.nn.Module:
    """``model.train()``, except BatchNorm layers whose scale and shift are frozen (linear and LoRA adaptation of a
    CNN): they keep their running statistics, so a frozen backbone stays frozen."""
    model.train()
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.weight is not None and not module.weight.requires_grad:
            module.eval()
    return model


def autocast(config: FinetuneConfig, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")


def save_classifier(model: torch.nn.Module, spec: ModelSpec, pre: Preprocessing, config: FinetuneConfig,
                    classes: list, task: str, threshold: float | None, path: Path, **card) -> Path:
    """The classifier (LoRA merged in) as a retfm checkpoint whose card names its task, label, classes,
    decision threshold and adaptation: what ``create(path, num_classes=...)`` and ``retfm serve`` read."""
    return save_checkpoint(merged(model).cpu(), dataclasses.replace(spec, input_size=pre.size), path, task=task,
                           label=config.label, classes=[str(c) for c in classes], threshold=threshold,
                           adaptation=config.adaptation, **card)


def _adapt(model: torch.nn.Module, config: FinetuneConfig) -> torch.nn.Module:
    if config.adaptation == "full":
        return model
    head = head_prefix(model)
    if config.adaptation == "linear":
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(head)
        return model
    return add_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets,
                    [head.rstrip(".")])


def predict(model: torch.nn.Module, rows: pd.DataFrame, root: Path, pre, config: FinetuneConfig,
            device: torch.device) -> np.ndarray:
    """Class probabilities for ``rows`` (in order)."""
    model.eval()

    def probabilities(images: torch.Tensor) -> torch.Tensor:
        with autocast(config, device):
            return torch.softmax(model(images.to(device, memory_format=memory_format(model))).float(), dim=1)

    batches = manifest_outputs(probabilities, Manifest(rows.reset_index(drop=True), root), eval_transform(pre),
                               max(config.batch_size, 32), config.workers, pre.size)
    return np.concatenate([outputs for _, outputs in batches]).astype(np.float64)


def _selection_score(rows: pd.DataFrame, probabilities: np.ndarray, config: FinetuneConfig, classes: list,
                     task: str) -> float:
    labels = rows[config.label].astype(str)
    names = [str(c) for c in classes]
    if config.select_metric == "loss":
        index = labels.map({c: i for i, c in enumerate(names)}).to_numpy()
        return float(-np.mean(np.log(np.clip(probabilities[np.arange(len(index)), index], 1e-12, 1))))
    table = pd.DataFrame({config.label: labels, "prediction": np.asarray(names, dtype=object)[probabilities.argmax(1)],
                          **{f"prob_{c}": probabilities[:, i] for i, c in enumerate(names)}})
    values, _ = point_metrics(outcomes(table, config.label, names, task))
    value = values.get(config.select_metric)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise RetfmError(f"select_metric {config.select_metric!r} is undefined on the validation split "
                         f"(a class may be missing there); choose another, e.g. loss")
    return float(value)
