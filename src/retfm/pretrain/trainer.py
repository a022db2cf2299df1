"""``retfm pretrain``: one trainer for every self-supervised objective, resumable to the bit.

A run is a loop over optimiser steps. Each step draws ``accum_steps`` micro-batches from the epoch's sample
order, runs the objective (``batch -> dict of losses``), clips, steps AdamW (weight decay off for biases, norms,
tokens and position embeddings), follows a warmup + cosine learning-rate schedule and updates the optional EMA.

Exact resumes: the epoch's sample order is a pure function of (seed, epoch); augmentations of (seed, epoch,
index); DataLoader workers get their seeds from a generator of their own; masks and noise come from torch's
global RNG, whose state is checkpointed with the model, optimiser, schedule, scaler, EMA and data position.
Checkpoints (``OUT/checkpoint.pt``) are written atomically every ``checkpoint_every`` steps, so a run killed
at any moment resumes from the last one and ends with the same weights, bit for bit, as an uninterrupted run.

The end product is a registry-loadable backbone: ``OUT/model.safetensors`` + ``OUT/model.json`` (architecture,
objective, data summary, images seen, compute), usable wherever a model name is (``retfm embed --model
OUT/model.safetensors``). ``OUT/log.jsonl`` holds one line per logged step; ``OUT/pretrain_config.yaml`` the
resolved config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from timm.optim import param_groups_weight_decay
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from retfm import __version__
from retfm.data.datasets import ManifestDataset, Preprocessing, run_batches, train_transform
from retfm.data.manifest import MANIFEST_FILENAME, Manifest
from retfm.data.shards import INDEX_FILENAME, ShardDataset
from retfm.errors import RetfmError
from retfm.hashing import file_sha256
from retfm.models import ModelSpec, create, memory_format, preprocessing, save_checkpoint
from retfm.models import spec as model_spec
from retfm.models.lora import add_lora, merged
from retfm.pretrain.clip import CLIP, Captions
from retfm.pretrain.config import PUBLISHED, LoraOptions, PretrainConfig
from retfm.pretrain.mae import MAE
from retfm.pretrain.sampling import BatchShard
from retfm.pretrain.token_reconstruction import TokenReconstruction
from retfm.runs import RunFolder, checked_device

MODEL_FILENAME = "model.safetensors"


def pretrain(config: PretrainConfig, out: Path, resume: bool = False,
             progress: Callable[[int], None] | None = None, total: Callable[[int], None] | None = None,
             on_log: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) a pretraining; returns the final card."""
    run = RunFolder(out, config, "pretrain_config.yaml", resume)
    shard, device = _join_process_group(checked_device(config.device))
    if shard.rank:  # one voice: the first process reports and writes
        progress = total = on_log = None
    torch.manual_seed(config.seed)

    spec, objective = build_model(config)
    size = spec.input_size
    objective = objective.to(device, memory_format=memory_format(objective.backbone)).train()
    objective.shard = shard
    tokenizer = objective.tokenizer() if hasattr(objective, "tokenizer") else None
    data = open_data(config, preprocessing(spec), tokenizer)

    images_per_step = config.batch_size * config.accum_steps * shard.world
    lr = config.blr * images_per_step / 256
    optimiser = build_optimiser(objective, config, lr, device)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(config, lr))
    scaler, autocast = mixed_precision(config, device)
    ema = (AveragedModel(objective.backbone, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
           if config.ema else None)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "images_seen": 0, "seconds": 0.0}
    saved = run.open(writer=shard.rank == 0)
    if saved is not None:
        objective.load_state_dict(saved["objective"])
        optimiser.load_state_dict(saved["optimiser"])
        schedule.load_state_dict(saved["schedule"])
        scaler.load_state_dict(saved["scaler"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        state = saved["state"]
        torch.set_rng_state(saved["rng"])
        if device.type == "cuda" and "cuda_rng" in saved:
            torch.cuda.set_rng_state(saved["cuda_rng"])

    flops_per_image = _training_flops_per_image(objective, size, device)
    # DDP averages gradients over processes; the frozen teacher's buffers never change, so none are broadcast.
    step_model = (torch.nn.parallel.DistributedDataParallel(objective, broadcast_buffers=False)
                  if shard.world > 1 else objective)
    if total:
        total(config.steps)
    if progress and state["step"]:
        progress(state["step"])
    tensorboard = _tensorboard_writer(out) if shard.rank == 0 else None
    batches = data.batches(state["epoch"], state["batch_in_epoch"], config.batch_size, config.workers, shard)
    started = time.perf_counter() - state["seconds"]
    window = (time.perf_counter(), state["images_seen"])
    while state["step"] < config.steps:
        losses = optimiser_step(step_model, objective, batches, optimiser, scaler, autocast, config, shard, device,
                                state)
        schedule.step()
        if ema is not None:
            ema.update_parameters(objective.backbone)
        state["step"] += 1
        state["seconds"] = time.perf_counter() - started
        if progress:
            progress(1)
        if state["step"] % config.log_every == 0 or state["step"] == config.steps:
            losses = _mean_over_processes(losses, shard)
            now = time.perf_counter()
            record = {"step": state["step"], **{k: round(v, 6) for k, v in losses.items()},
                      "lr": schedule.get_last_lr()[0], "epoch": state["epoch"], "images_seen": state["images_seen"],
                      "images_per_s": round((state["images_seen"] - window[1]) / max(now - window[0], 1e-9), 2)}
            window = (now, state["images_seen"])
            if shard.rank == 0:
                run.log(record)
                if tensorboard is not None:
                    for key, value in record.items():
                        if key != "step":
                            tensorboard.add_scalar(key, value, record["step"])
            if on_log:
                on_log(record)
        if shard.rank == 0 and (state["step"] % config.checkpoint_every == 0 or state["step"] == config.steps):
            _save_checkpoint(run, objective, optimiser, schedule, scaler, ema, state, device)

    if tensorboard is not None:
        tensorboard.close()
    final = merged(ema.module if ema is not None else objective.backbone)
    if shard.world > 1:
        torch.distributed.destroy_process_group()
    card = {
        "name": f"{spec.name}-{config.objective}",
        "description": f"{spec.name} pretrained by retfm with {config.objective}",
        "objective": config.objective, "objective_options": config.objective_options,
        "init": config.init or "random", "teacher": config.teacher, "data": data.summary(), "steps": state["step"],
        "images_seen": state["images_seen"], "ema": config.ema,
        "compute": {"training_flops_estimate": flops_per_image * state["images_seen"], "processes": shard.world,
                    "device": str(device), "device_hours": round(shard.world * state["seconds"] / 3600, 5),
                    "precision": config.precision},
        "retfm_version": __version__,
    }
    if shard.rank == 0:
        save_checkpoint(final.cpu(), spec, out / MODEL_FILENAME, **card)
        if hasattr(objective, "export"):  # image-text models also write both towers
            objective.export(out, final, card)
    return card


def optimiser_step(step_model: torch.nn.Module, objective: torch.nn.Module, batches, optimiser: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, autocast, config: PretrainConfig, shard: BatchShard,
                   device: torch.device, state: dict,
                   penalty: Callable[[], torch.Tensor] | None = None) -> dict[str, float]:
    """One optimiser step: ``accum_steps`` micro-batches from ``batches``, backward, optional clipping, AdamW.
    Advances ``state``'s data position and images seen; returns the step's mean losses. ``penalty()`` is added
    to every micro-batch's loss (a federated site's proximal term); the learning-rate schedule is the caller's."""
    losses: dict[str, float] = {}
    for micro in range(config.accum_steps):
        batch, state["epoch"], state["batch_in_epoch"] = next(batches)
        images = batch["image"].to(device, non_blocking=True, memory_format=memory_format(objective.backbone))
        inputs = (images, batch["text"].to(device), batch["text_key"].to(device)) if "text" in batch else (images,)
        # Under DDP gradients are averaged once per step, at the last micro-batch's backward.
        accumulating = shard.world > 1 and micro < config.accum_steps - 1
        with step_model.no_sync() if accumulating else contextlib.nullcontext():
            with autocast:
                result = step_model(*inputs)
                loss = result["loss"] if penalty is None else result["loss"] + penalty()
            scaler.scale(loss / config.accum_steps).backward()
        for key, value in result.items():
            if value.ndim == 0:
                losses[key] = losses.get(key, 0.0) + float(value.detach()) / config.accum_steps
        state["images_seen"] += len(images) * shard.world
    if config.clip_grad:
        scaler.unscale_(optimiser)
        torch.nn.utils.clip_grad_norm_(objective.parameters(), config.clip_grad)
    scaler.step(optimiser)
    scaler.update()
    optimiser.zero_grad(set_to_none=True)
    return losses


# ---- data -------------------------------------------------------------------------------------------------------

def open_data(config: PretrainConfig, pre: Preprocessing, tokenizer=None) -> MixedData | ShardStream:
    """Manifests (``retfm data ingest`` folders) are mixed by weight; shards (``retfm data shard`` folders,
    brace patterns, fsspec URLs) are streamed, so a corpus never needs a manifest scan. Image-text objectives
    (with a ``tokenizer``) get each image's tokenised text too."""
    streamed = [is_shards(source) for source in config.data]
    if not any(streamed):
        return MixedData(config, pre, tokenizer)
    if tokenizer is not None:
        raise RetfmError(f"{config.data[0]}: image-text pretraining reads manifests, not shards")
    if len(config.data) > 1:
        raise RetfmError(f"{config.data[0]}: shards stream as the only --data; to mix corpora, shard them together "
                         f"(or mix their manifests)")
    return ShardStream(config, pre)


def is_shards(source: str) -> bool:
    """Shards, not a manifest: a URL, a brace pattern, a .tar, or a folder with a shard index and no manifest."""
    if "://" in source or "{" in source or source.endswith(".tar"):
        return True
    folder = Path(source)
    return folder.is_dir() and (folder / INDEX_FILENAME).is_file() and not (folder / MANIFEST_FILENAME).exists()


class ShardStream:
    """Batches streamed from WebDataset shards. Shards go to ranks, then to loader workers; an epoch's order is a
    function of (seed, epoch), so a resumed run re-reads (without training on) the batches it had done. Under
    several processes every rank stops the epoch after the same number of batches (from the index's counts)."""

    def __init__(self, config: PretrainConfig, pre: Preprocessing):
        source = config.data[0]
        self.seed = config.seed
        self.dataset = ShardDataset(source, train_transform(pre), seed=config.seed,
                                    shuffle_buffer=config.shuffle_buffer, group_columns=())
        index = self.dataset.index or {}
        if config.split and index.get("split") != config.split:
            raise RetfmError(f"{source}: the shards hold split {index.get('split')!r}, the run wants "
                             f"{config.split!r}; write them with `retfm data shard --split {config.split}` or "
                             f"pass --set split=null")
        self.source = {"shards": len(self.dataset.urls), "images": index.get("total"),
                       "source_manifest_sha256": index.get("source_manifest_sha256")}

    def batches(self, epoch: int, batch_in_epoch: int, batch_size: int, workers: int,
                shard: BatchShard = BatchShard()):
        while True:
            self.dataset.set_epoch(epoch)
            limit = self.dataset.full_batches(batch_size, workers, shard.world) if shard.world > 1 else None
            # A loader draws its workers' base seed from its generator; from torch's global one (masks, noise)
            # without it, which would make a resumed run differ.
            loader = DataLoader(self.dataset, batch_size=batch_size, num_workers=workers, drop_last=True,
                                generator=torch.Generator().manual_seed(self.seed + epoch), persistent_workers=False)
            for done, batch in enumerate(loader):
                if done == limit:
                    break
                if done >= batch_in_epoch:
                    batch_in_epoch += 1
                    yield batch, epoch, batch_in_epoch
            if batch_in_epoch == 0:
                raise RetfmError(f"{self.dataset.urls[0]}: the shards hold fewer than one batch of {batch_size} "
                                 f"images per process and loader worker")
            epoch, batch_in_epoch = epoch + 1, 0

    def summary(self) -> list[dict]:
        return [self.source]


class MixedData:
    """One or more manifests sampled by weight; an epoch's order is a pure function of (seed, epoch)."""

    def __init__(self, config: PretrainConfig, pre: Preprocessing, tokenizer=None):
        self.seed = config.seed
        self.datasets: list[ManifestDataset] = []
        self.sources: list[dict] = []
        for path in config.data:
            manifest = Manifest.read(path)
            if config.split:
                manifest = manifest.split(config.split)
            if config.sites is not None:
                manifest = manifest.of_sites(config.sites)
            if not len(manifest.table):
                raise RetfmError(f"{path}: no images in split {config.split!r}"
                                 + (f" of site(s) {', '.join(config.sites)}" if config.sites is not None else ""))
            dataset = ManifestDataset(manifest, train_transform(pre), seed=config.seed, group_columns=(),
                                      decode_size=pre.size)
            if tokenizer is not None:
                dataset = CaptionedDataset(dataset, Captions(dataset.table, tokenizer, config.seed, path))
            self.datasets.append(dataset)
            self.sources.append({"manifest_sha256": file_sha256(_manifest_file(path)), "images": len(manifest.table),
                                 "sites": sorted(manifest.table["site"].astype(str).unique().tolist())})
        sizes = np.array([len(d) for d in self.datasets], dtype=float)
        weights = np.asarray(config.data_weights if config.data_weights else sizes, dtype=float)
        if len(weights) != len(sizes) or (weights < 0).any() or weights.sum() <= 0:
            raise RetfmError(f"--data-weights: need {len(sizes)} non-negative numbers, one per --data")
        self.weights = weights / weights.sum()
        self.epoch_size = int(sizes.sum())
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
        for source, weight in zip(self.sources, self.weights):
            source["weight"] = round(float(weight), 4)

    def order(self, epoch: int) -> np.ndarray:
        """Global indices of one epoch: each source's share of ``epoch_size`` draws, from its own reshuffled
        permutation (repeated when its share exceeds its size), interleaved at random."""
        rng = np.random.default_rng([self.seed, epoch])
        counts = np.floor(self.weights * self.epoch_size).astype(int)
        counts[np.argmax(self.weights)] += self.epoch_size - counts.sum()
        picks = []
        for dataset, offset, count in zip(self.datasets, self.offsets, counts):
            repeats = -(-count // len(dataset))
            permutation = np.concatenate([rng.permutation(len(dataset)) for _ in range(repeats)])[:count]
            picks.append(permutation + offset)
        return rng.permutation(np.concatenate(picks))

    def batches(self, epoch: int, batch_in_epoch: int, batch_size: int, workers: int,
                shard: BatchShard = BatchShard()):
        """Yield (this process's rows of a global batch, epoch, global batches done in that epoch) forever,
        starting at a saved position. A global batch is ``batch_size`` rows from each of ``shard.world``
        processes."""
        global_batch = batch_size * shard.world
        if global_batch > self.epoch_size:
            raise RetfmError(f"batch size {global_batch} is larger than the data ({self.epoch_size} images)")

        def mine(epoch_now: int) -> np.ndarray:  # this process's rows of every whole global batch
            whole = self.order(epoch_now)[: self.epoch_size // global_batch * global_batch]
            return whole.reshape(-1, shard.world, batch_size)[:, shard.rank].ravel()

        yield from run_batches(_Concat(self.datasets, self.offsets), mine, epoch, batch_in_epoch, batch_size,
                               workers, self.seed)

    def summary(self) -> list[dict]:
        return self.sources


class CaptionedDataset(Dataset):
    """A manifest dataset whose items also carry their tokenised text (``"text"``) and what it says
    (``"text_key"``, see ``Captions.key``)."""

    def __init__(self, dataset: ManifestDataset, captions):
        self.dataset, self.captions = dataset, captions

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "text": self.captions.tokens(index, self.dataset.epoch),
                "text_key": self.captions.key(index)}


class _Concat(Dataset):
    def __init__(self, datasets: list[ManifestDataset], offsets: np.ndarray):
        self.datasets, self.offsets = datasets, offsets

    def set_epoch(self, epoch: int) -> None:
        for dataset in self.datasets:
            dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return int(self.offsets[-1]) + len(self.datasets[-1])

    def __getitem__(self, index: int) -> dict:
        source = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.datasets[source][index - int(self.offsets[source])]


def _manifest_file(path: str) -> Path:
    return Path(path) / MANIFEST_FILENAME if Path(path).is_dir() else Path(path)


# ---- model and optimisation -------------------------------------------------------------------------------------

def build_model(config: PretrainConfig) -> tuple[ModelSpec, torch.nn.Module]:
    """The run's model spec (at the run's image size) and its objective around a fresh backbone, initialised from
    ``config.init`` (a file, or ``published``: the model's own weights) or at random from torch's global RNG."""
    spec = model_spec(config.model)
    size = config.image_size or spec.input_size
    spec = dataclasses.replace(spec, input_size=size)
    init = {None: "random", PUBLISHED: None}.get(config.init, config.init)
    backbone = create(config.model, weights=init, img_size=size)
    if config.objective == "mae":
        if not hasattr(backbone, "patch_embed"):
            raise RetfmError(f"{spec.name}: mae works on patch tokens and needs a ViT; this model is convolutional "
                             "(use --objective token-reconstruction, or clip for an image tower)")
        patch = backbone.patch_embed.patch_size[0]
        if size % patch:
            raise RetfmError(f"image size {size} is not a multiple of {spec.name}'s patch size {patch}")
    return spec, with_lora(build_objective(config, backbone, spec), config.lora)


def with_lora(objective: torch.nn.Module, lora: LoraOptions | None) -> torch.nn.Module:
    """``objective`` with its backbone wrapped by peft: LoRA adapters (drawn from torch's global RNG) train, the
    backbone's own weights are frozen; the objective's other parts (decoder, projector, text tower) still train."""
    if lora is not None:
        objective.backbone = add_lora(objective.backbone, lora.rank, lora.alpha, lora.dropout, lora.targets)
    return objective


def mixed_precision(config: PretrainConfig, device: torch.device) -> tuple[torch.amp.GradScaler, torch.autocast]:
    """The gradient scaler (fp16 only) and the autocast context of ``config.precision``."""
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if config.precision == "bf16" else torch.float16,
                              enabled=config.precision != "fp32")
    return scaler, autocast


def build_objective(config: PretrainConfig, backbone: torch.nn.Module, spec: ModelSpec) -> torch.nn.Module:
    """The objective around ``backbone`` (built from ``spec``, at ``spec.input_size``)."""
    if config.teacher and config.objective != "token-reconstruction":
        raise RetfmError(f"teacher {config.teacher!r}: only token-reconstruction has a teacher")
    try:
        if config.objective == "mae":
            return MAE(backbone, **config.objective_options)
        if config.objective == "clip":
            return CLIP(backbone, **config.objective_options)
        options = dict(config.objective_options)
        teacher = None
        if config.teacher:
            teacher_spec = model_spec(config.teacher)
            teacher = create(config.teacher, img_size=spec.input_size)
            if (teacher_spec.mean, teacher_spec.std) != (spec.mean, spec.std):
                options["teacher_normalisation"] = ((spec.mean, spec.std), (teacher_spec.mean, teacher_spec.std))
        return TokenReconstruction(backbone, teacher=teacher, **options)
    except TypeError as exc:
        raise RetfmError(f"objective_options for {config.objective}: {exc}") from None


def build_optimiser(objective: torch.nn.Module, config: PretrainConfig, lr: float,
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norms, tokens and position embeddings; fused (one kernel for all
    parameters) where torch supports it on the device."""
    groups = param_groups_weight_decay(objective, config.weight_decay, no_weight_decay_list=_no_decay_names(objective))
    return torch.optim.AdamW(groups, lr=lr, betas=config.betas, fused=device.type in ("cpu", "cuda"))


def _no_decay_names(objective: torch.nn.Module) -> set[str]:
    """Tokens and position embeddings are not decayed (as in MAE and timm), wherever they sit in the objective."""
    return {name for name, _ in objective.named_parameters()
            if name.split(".")[-1] in ("pos_embed", "cls_token", "reg_token", "mask_token", "decoder_pos_embed")}


def warmup_cosine(config: PretrainConfig, lr: float) -> Callable[[int], float]:
    """The learning rate's factor at each step: linear warmup over ``warmup_steps``, then a cosine down to
    ``min_lr`` at ``steps``."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return (config.min_lr + (lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))) / lr
    return factor


def _training_flops_per_image(objective: torch.nn.Module, size: int, device: torch.device) -> int:
    """Forward FLOPs of one image counted by torch, times 3 for the backward pass (the usual estimate).
    The global RNG is left as it was, so counting does not change the run."""
    example = (objective.example_inputs(size, device) if hasattr(objective, "example_inputs")
               else (torch.zeros(1, 3, size, size, device=device),))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            objective(*example)
    return 3 * counter.get_total_flops()


def _join_process_group(device: torch.device) -> tuple[BatchShard, torch.device]:
    """Under torchrun (``WORLD_SIZE`` > 1) join the process group: gloo on CPU, NCCL on GPUs, one GPU per process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return BatchShard(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return BatchShard(torch.distributed.get_rank(), world), device


def _mean_over_processes(losses: dict[str, float], shard: BatchShard) -> dict[str, float]:
    if shard.world == 1:
        return losses
    values = torch.tensor(list(losses.values()), dtype=torch.float64)
    torch.distributed.all_reduce(values)
    return dict(zip(losses, (values / shard.world).tolist()))


def _tensorboard_writer(out: Path):
    """TensorBoard event files in ``OUT/tensorboard`` when tensorboard is installed; log.jsonl is always written.
    A resumed run appends: TensorBoard shows the latest value of a step that was run twice."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _save_checkpoint(run: RunFolder, objective, optimiser, schedule, scaler, ema, state, device) -> None:
    parts = {"objective": objective.state_dict(), "optimiser": optimiser.state_dict(), "schedule": schedule.state_dict(),
             "scaler": scaler.state_dict(), "state": dict(state), "rng": torch.get_rng_state()}
    if ema is not None:
        parts["ema"] = ema.state_dict()
    if device.type == "cuda":
        parts["cuda_rng"] = torch.cuda.get_rng_state()
    run.save(**parts)
