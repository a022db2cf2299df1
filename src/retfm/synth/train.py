"""``retfm synth train``: a class-conditional diffusion model of fundus photographs (DERETFound's generator).

The network is diffusers' ``UNet2DModel`` with a class embedding; the class is one combination of the condition
columns' values (the label, then each ``--cond`` column, e.g. site), plus one *null* class. Training hides the
condition (shows the null class) for a share of images, so sampling can use classifier-free guidance. Training is
DDPM's: noise an image at a random level, predict its velocity (default; or the noise), mean squared error, on a
cosine noise schedule (default; or DDPM's linear one); AdamW with a linear warmup. Velocity prediction keeps the
network's image estimate sound at high noise, where a noise-predicting one's errors are multiplied (docs/synth.md).
diffusers' ``EMAModel`` keeps the moving average (with its warmup, so short runs are not stuck at the start).

With ``base_model`` the same loop fine-tunes LoRA adapters of a local pretrained latent text-to-image model
instead (:mod:`retfm.synth.latent`): each class is a prompt, the null class the empty prompt, and the images are
denoised as the model's VAE latents. Both kinds are a :class:`PixelDenoiser`-like object to the loop.

Exact resumes, as in ``retfm pretrain``: an epoch's order is a function of (seed, epoch), each image's flip of
(seed, epoch, index), and noise, noise levels and condition drops come from one generator of our own whose state
is checkpointed (``OUT/checkpoint.pt``, written atomically every ``checkpoint_every`` steps) with the model,
EMA, optimiser and data position.

The result, ``OUT/unet/`` (``save_pretrained``, safetensors), ``OUT/scheduler/`` and the card
``OUT/generator.json`` (label, condition values and the training shares, size, steps, images seen, compute, data
summary, weights hash) is all a site needs to share; no image leaves with it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from retfm.data.datasets import ManifestDataset, run_batches
from retfm.data.manifest import MANIFEST_FILENAME, Manifest
from retfm.errors import RetfmError
from retfm.hashing import file_sha256
from retfm.runs import LOG_FILENAME, RunFolder, checked_device
from retfm.synth.config import SynthTrainConfig
from retfm.synth.generator import (LATENT_LORA, PIXEL, SCHEDULER_DIR, UNET_DIR, Conditions, card_type, forward_flops,
                                   plain_value, verified_card, write_card)
from retfm.synth.latent import LatentLoRA


# ---- training -----------------------------------------------------------------------------------------------------

def train(config: SynthTrainConfig, out: Path, resume: bool = False,
          progress: Callable[[int], None] | None = None, total: Callable[[int], None] | None = None,
          on_log: Callable[[dict], None] | None = None) -> dict:
    """Train (or resume) a generator in ``out``; returns its card."""
    from diffusers.training_utils import EMAModel

    run = RunFolder(out, config, "synth_config.yaml", resume)
    device = checked_device(config.device)

    data = ConditionedImages(config)
    if config.base_model:
        denoiser = LatentLoRA.for_training(config, data.conditions)
    else:
        denoiser = PixelDenoiser(*build_denoiser(config, data.conditions), config.size)
    denoiser.to(device)
    unet = denoiser.unet.train()
    trainable = [p for p in unet.parameters() if p.requires_grad]  # every weight, or the LoRA adapters only
    optimiser = build_optimiser(unet, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min(1.0, (step + 1) / max(1, config.warmup_steps)))
    ema = EMAModel(trainable, decay=config.ema_max_decay, use_ema_warmup=True, power=0.75) if config.ema else None
    noise_rng = torch.Generator().manual_seed(config.seed)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "images_seen": 0, "seconds": 0.0}
    saved = run.open()
    if saved is not None:
        load_trainable_state(unet, saved["unet"])
        optimiser.load_state_dict(saved["optimiser"])
        schedule.load_state_dict(saved["schedule"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        noise_rng.set_state(saved["noise_rng"])
        state = saved["state"]
    if ema is not None:
        ema.to(device)

    flops_per_image = denoiser.training_flops_per_image(device)
    if total:
        total(config.steps)
    if progress and state["step"]:
        progress(state["step"])
    batches = data.batches(state["epoch"], state["batch_in_epoch"])
    started = time.perf_counter() - state["seconds"]
    while state["step"] < config.steps:
        batch, classes, state["epoch"], state["batch_in_epoch"] = next(batches)
        loss = optimiser_step(optimiser, denoising_loss(
            unet, denoiser.scheduler, denoiser.encode(batch, noise_rng, device), classes, data.conditions.null,
            noise_rng, config.cond_drop, device, config.precision, denoiser.condition))
        schedule.step()
        if ema is not None:
            ema.step(trainable)
        state["step"] += 1
        state["images_seen"] += len(batch)
        state["seconds"] = time.perf_counter() - started
        if progress:
            progress(1)
        if state["step"] % config.log_every == 0 or state["step"] == config.steps:
            record = {"step": state["step"], "loss": round(loss, 6), "lr": schedule.get_last_lr()[0],
                      "epoch": state["epoch"], "images_seen": state["images_seen"]}
            run.log(record)
            if on_log:
                on_log(record)
        if state["step"] % config.checkpoint_every == 0 or state["step"] == config.steps:
            _save_checkpoint(run, unet, optimiser, schedule, ema, noise_rng, state)

    if ema is not None:
        ema.copy_to(trainable)  # the shared generator is the moving average
    return denoiser.save(
        out, config, data.conditions,
        class_shares=data.class_shares(), data=data.summary, steps=state["step"], images_seen=state["images_seen"],
        ema=config.ema, compute={"training_flops_estimate": flops_per_image * state["images_seen"],
                                 "device": str(device), "device_hours": round(state["seconds"] / 3600, 5),
                                 "precision": config.precision})


def build_denoiser(config: SynthTrainConfig, conditions: Conditions):
    """The UNet of ``conditions`` (its initial weights drawn from ``config.seed``, the global RNG left as it was)
    and its DDPM noise schedule: the same pair at every site of a federation and in ``retfm synth train``."""
    from diffusers import DDPMScheduler

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        unet = build_unet(config, conditions.null + 1)
    return unet, DDPMScheduler(num_train_timesteps=config.train_timesteps, beta_schedule=config.noise_schedule,
                               prediction_type=config.prediction)


def build_optimiser(unet, config: SynthTrainConfig) -> torch.optim.Optimizer:
    """AdamW over the UNet's trainable weights (all of a pixel UNet's; a LoRA generator's adapters)."""
    return torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=config.lr,
                             weight_decay=config.weight_decay)


def _class_labels(classes: torch.Tensor) -> dict:
    """How a pixel UNet is conditioned: its class embedding."""
    return {"class_labels": classes}


def denoising_loss(unet, scheduler, images: torch.Tensor, classes: torch.Tensor, null: int, rng: torch.Generator,
                   cond_drop: float, device: torch.device, precision: str = "fp32",
                   condition: Callable[[torch.Tensor], dict] = _class_labels) -> torch.Tensor:
    """DDPM's objective on a batch: noise each image (or latent) at a random level, predict the noise (or the
    velocity, for a scheduler that predicts ``v_prediction``), mean squared error; a ``cond_drop`` share of the
    images is shown the null class. ``condition`` turns class indices into the UNet's conditioning arguments.
    Every draw comes from ``rng`` on the CPU (noise, then levels, then drops), so the numbers are the same on any
    device."""
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise RetfmError(f"a noise schedule predicting {prediction_type!r}: only epsilon and v_prediction are "
                         "trained here")
    noise = torch.randn(images.shape, generator=rng)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), generator=rng)
    dropped = torch.rand(len(images), generator=rng) < cond_drop
    classes = torch.where(dropped, null, classes)
    images, noise = images.to(device), noise.to(device)
    timesteps, classes = timesteps.to(device), classes.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        predicted = unet(scheduler.add_noise(images, noise, timesteps), timesteps, **condition(classes)).sample
    target = scheduler.get_velocity(images, noise, timesteps) if prediction_type == "v_prediction" else noise
    return torch.nn.functional.mse_loss(predicted.float(), target)


def optimiser_step(optimiser, loss: torch.Tensor, penalty: Callable[[], torch.Tensor] | None = None) -> float:
    """Backward ``loss`` (plus ``penalty()``, e.g. FedProx's term), AdamW, clear the gradients; returns the loss."""
    (loss + penalty() if penalty is not None else loss).backward()
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    return loss.item()


def train_step(unet, scheduler, optimiser, images: torch.Tensor, classes: torch.Tensor, null: int,
               rng: torch.Generator, config: SynthTrainConfig, device: torch.device,
               penalty: Callable[[], torch.Tensor] | None = None) -> float:
    """One optimiser step of a pixel UNet's :func:`denoising_loss` (plus ``penalty()``); returns the loss."""
    return optimiser_step(optimiser, denoising_loss(unet, scheduler, images, classes, null, rng, config.cond_drop,
                                                    device, config.precision), penalty)


class PixelDenoiser:
    """The pixel UNet as the training loop and the sampler see a generator (:class:`retfm.synth.latent.LatentLoRA`
    is the other kind): its UNet, DDPM ``scheduler``, ``condition`` (class indices -> UNet arguments), the space it
    denoises (``encode`` / ``decode`` of images in [-1, 1]; here the pixels themselves) and one sample's ``shape``."""

    def __init__(self, unet, scheduler, size: int):
        self.unet, self.scheduler, self.shape = unet, scheduler, (3, size, size)
        self.condition = _class_labels

    def to(self, device: torch.device) -> PixelDenoiser:
        self.unet.to(device)
        return self

    def encode(self, images: torch.Tensor, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        return images

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def training_flops_per_image(self, device: torch.device) -> int:
        return training_flops_per_image(self.unet, self.shape[-1], device)

    def save(self, out: Path, config: SynthTrainConfig, conditions: Conditions, **fields) -> dict:
        return save_generator(self.unet, self.scheduler, out, config, conditions, **fields)


def save_generator(unet, scheduler, out: Path, config: SynthTrainConfig, conditions: Conditions, **fields) -> dict:
    """Write a pixel generator folder: ``unet/`` (safetensors), ``scheduler/`` and the card (:func:`write_card`,
    with ``fields``: class shares, data summary, steps, ...); returns the card."""
    out = Path(out)
    unet.cpu().save_pretrained(out / UNET_DIR, safe_serialization=True)
    scheduler.save_pretrained(out / SCHEDULER_DIR)
    return write_card(out, PIXEL, f"ddpm-{config.label}-{config.size}px", config, conditions,
                      f"class-conditional pixel diffusion (diffusers UNet2DModel) of {config.size}px fundus images, "
                      f"conditioned on {', '.join(conditions.columns)}", **fields)


def build_unet(config: SynthTrainConfig, num_classes: int):
    """A UNet2DModel whose lowest resolution level has attention; the class embedding holds the null class too."""
    from diffusers import UNet2DModel

    levels = len(config.block_out_channels)
    if config.size % 2 ** (levels - 1):
        raise RetfmError(f"size {config.size}: must be divisible by {2 ** (levels - 1)} for "
                         f"{levels} UNet levels")
    if any(c % config.norm_groups for c in config.block_out_channels):
        raise RetfmError(f"norm_groups {config.norm_groups} must divide every block_out_channels "
                         f"{config.block_out_channels}")
    down = ("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",)
    up = ("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1)
    return UNet2DModel(sample_size=config.size, in_channels=3, out_channels=3,
                       layers_per_block=config.layers_per_block, block_out_channels=config.block_out_channels,
                       down_block_types=down, up_block_types=up, norm_num_groups=config.norm_groups,
                       num_class_embeds=num_classes)


class ConditionedImages:
    """The training images at the generator's size, in [-1, 1], with their class index; rows whose condition is
    unknown are left out (never guessed). ``conditions``: the generator's condition values (a federation's, from
    its config; a row holding another value is an error); by default the values found in the rows."""

    def __init__(self, config: SynthTrainConfig, conditions: Conditions | None = None):
        manifest = Manifest.read(config.data)
        if config.split:
            manifest = manifest.split(config.split)
        if config.sites is not None:
            manifest = manifest.of_sites(config.sites)
        columns = [config.label, *config.cond]
        missing = [c for c in columns if c not in manifest.table]
        if missing:
            raise RetfmError(f"{config.data}: condition column(s) {', '.join(missing)} not in the manifest "
                             f"(labels: {', '.join(manifest.label_columns) or 'none'})")
        table = manifest.table.dropna(subset=columns).reset_index(drop=True)
        if not len(table):
            raise RetfmError(f"{config.data}: no images with {', '.join(columns)} known in split {config.split!r}"
                             + (f" of site(s) {', '.join(config.sites)}" if config.sites is not None else ""))
        self.conditions = Conditions.from_table(table, columns) if conditions is None else conditions
        self.classes = torch.from_numpy(self.conditions.index({c: table[c].tolist() for c in columns}))
        transform = v2.Compose([v2.ToImage(), v2.Resize((config.size, config.size), antialias=True),
                                *([v2.RandomHorizontalFlip()] if config.flip else []),
                                v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)])
        self.dataset = ManifestDataset(Manifest(table, manifest.root), transform, group_columns=(), seed=config.seed,
                                       decode_size=config.size)
        self.table, self.config = table, config
        self.summary = {"manifest_sha256": file_sha256(_manifest_file(config.data)), "images": len(table),
                        "split": config.split,
                        "sites": sorted(table["site"].astype(str).unique().tolist())}

    def class_shares(self) -> dict[str, dict[str, float]]:
        """Each condition column's value shares in the training data: the default sampling shares."""
        return {c: {str(v): round(float(s), 6) for v, s in self.table[c].map(plain_value).value_counts(normalize=True)
                    .sort_index().items()} for c in self.conditions.columns}

    def order(self, epoch: int) -> np.ndarray:
        """An epoch: enough reshuffled passes over the images for one batch, as a function of (seed, epoch)."""
        rng = np.random.default_rng([self.config.seed, epoch])
        passes = -(-self.config.batch_size // len(self.table))
        return np.concatenate([rng.permutation(len(self.table)) for _ in range(passes)])

    def batches(self, epoch: int, batch_in_epoch: int):
        """Yield (images, class indices, epoch, batches done in that epoch) forever from a saved position, through
        one DataLoader for the whole run."""
        size = self.config.batch_size

        def whole_batches(run_epoch: int) -> np.ndarray:
            order = self.order(run_epoch)
            return order[: len(order) // size * size]

        for batch, *done in run_batches(self.dataset, whole_batches, epoch, batch_in_epoch, size,
                                        self.config.workers, self.config.seed):
            yield batch["image"], self.classes[batch["index"]], *done


def _manifest_file(path: str) -> Path:
    return Path(path) / MANIFEST_FILENAME if Path(path).is_dir() else Path(path)


def training_flops_per_image(unet, size: int, device: torch.device) -> int:
    """Forward FLOPs of one image through a pixel UNet, times 3 for the backward pass."""
    zeros = torch.zeros(1, dtype=torch.long, device=device)
    return 3 * forward_flops(lambda: unet(torch.zeros(1, 3, size, size, device=device), zeros, class_labels=zeros),
                             device)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a run trains (every weight of a pixel UNet, a LoRA generator's adapters), by name."""
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put :func:`trainable_state`'s weights back; the names must be exactly the module's trainable ones."""
    own = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if set(own) != set(state):
        raise RetfmError("the checkpoint's trained weights are not this model's; resume with the same options")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)


def _save_checkpoint(run: RunFolder, unet, optimiser, schedule, ema, noise_rng, state) -> None:
    parts = {"unet": trainable_state(unet), "optimiser": optimiser.state_dict(), "schedule": schedule.state_dict(),
             "noise_rng": noise_rng.get_state(), "state": dict(state)}
    if ema is not None:
        parts["ema"] = ema.state_dict()
    run.save(**parts)


# ---- loading ------------------------------------------------------------------------------------------------------

def load_generator(path: Path, base_model: str | None = None):
    """(denoiser in eval mode, card) of a ``retfm synth train`` output folder; a LoRA generator's base model is
    read from the local folder ``base_model``."""
    from diffusers import DDPMScheduler, UNet2DModel

    path = Path(path)
    card = verified_card(path)
    if card_type(card) == LATENT_LORA:
        denoiser = LatentLoRA.for_sampling(path, card, base_model)
    else:
        unet = UNet2DModel.from_pretrained(path / UNET_DIR, use_safetensors=True, local_files_only=True)
        scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(path / SCHEDULER_DIR))
        denoiser = PixelDenoiser(unet, scheduler, card["size"])
    denoiser.unet.eval()
    return denoiser, card


def log_losses(out: Path) -> list[float]:
    path = Path(out) / LOG_FILENAME
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()] if path.exists() else []

