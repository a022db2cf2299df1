"""LoRA fine-tuning of a local pretrained latent text-to-image model with label prompts (issue 7).

Instead of a pixel UNet learnt from scratch, a site adapts a pretrained Stable-Diffusion-style model to its fundus
photographs. The model is a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``, safetensors weights) read from disk and never downloaded. Only LoRA adapters (peft, added with
diffusers' ``add_adapter``) of the UNet's attention projections learn; the VAE and the text encoder stay frozen.

Each class (one combination of the condition values) is a prompt: the label's caption from retfm's disease
knowledge base (``retfm.knowledge.base``) when every value of the label names a condition there (through a
label map, e.g. ``dr_grade``, or by a condition's name), else ``"a fundus photograph, {label} {value}"``; further
condition columns go before it (``"site site1: a color fundus photograph showing ..."``). The null class is the
empty prompt, so classifier-free guidance works as with the pixel UNet. Images are denoised as the VAE's latents
(times its scaling factor) with the base model's own noise schedule and target (noise or velocity).

What a site shares is ``OUT/lora/pytorch_lora_weights.safetensors`` (diffusers' ``save_lora_adapter``: the LoRA
tensors, their peft config in the file's metadata) and the card, which names the base model by its folder's name
and its UNet weights' SHA-256, never by a path, and lists the prompts; sampling loads the same base model from a
local folder (``base_model``) and the adapter, and prompts with the card's prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from retfm.errors import RetfmError
from retfm.hashing import file_sha256
from retfm.knowledge.base import load_knowledge
from retfm.synth.config import SynthTrainConfig
from retfm.synth.generator import LATENT_LORA, WEIGHTS_FILES, Conditions, forward_flops, write_card

ADAPTER_DIR, ADAPTER_FILENAME = WEIGHTS_FILES[LATENT_LORA].split("/")
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"  # the file whose hash names the base model
# What a Stable-Diffusion-style diffusers folder must hold: each part, as alternatives of files that must all exist.
BASE_PARTS = {
    "unet/config.json": [("unet/config.json",)],
    UNET_WEIGHTS: [(UNET_WEIGHTS,)],
    "vae/config.json": [("vae/config.json",)],
    "vae/diffusion_pytorch_model.safetensors": [("vae/diffusion_pytorch_model.safetensors",)],
    "text_encoder/config.json": [("text_encoder/config.json",)],
    "text_encoder/model.safetensors": [("text_encoder/model.safetensors",)],
    "tokenizer/ (tokenizer.json, or vocab.json and merges.txt)": [("tokenizer/tokenizer.json",),
                                                                  ("tokenizer/vocab.json", "tokenizer/merges.txt")],
    "scheduler/scheduler_config.json": [("scheduler/scheduler_config.json",)],
}


def check_base(path: str | Path) -> Path:
    """The local base model folder, refused in one line naming what is missing."""
    base = Path(path).expanduser()
    if not base.is_dir():
        raise RetfmError(f"base_model {path}: no such local folder (a diffusers Stable-Diffusion-style folder with "
                         "unet/, vae/, text_encoder/, tokenizer/, scheduler/; retfm never downloads one)")
    missing = [part for part, options in BASE_PARTS.items()
               if not any(all((base / name).is_file() for name in names) for names in options)]
    if missing:
        raise RetfmError(f"base_model {base}: an incomplete diffusers text-to-image folder, missing "
                         f"{', '.join(missing)} (safetensors weights, one file each; retfm never downloads them)")
    if (base / "text_encoder_2").exists():
        raise RetfmError(f"base_model {base}: has a second text encoder (SDXL-style); only Stable-Diffusion-style "
                         "models with one text encoder are fine-tuned here")
    return base


def base_identity(base: Path) -> dict:
    """How a card names a base model: its folder's name and its UNet weights' SHA-256 (no path)."""
    return {"name": base.resolve().name, "unet_sha256": file_sha256(base / UNET_WEIGHTS)}


def class_prompts(conditions: Conditions, label: str) -> tuple[list[str], str]:
    """One prompt per class index (the null class not included) and where the label's part came from:
    ``knowledge`` (every value's caption from the knowledge base) or ``plain``."""
    knowledge = load_knowledge()
    try:
        texts = {value: knowledge.caption({label: value}, "cfp") for value in conditions.values[label]}
        source = "knowledge"
    except RetfmError:  # a value names no condition (or none visible on colour fundus photographs)
        texts = {value: f"a fundus photograph, {label} {value}" for value in conditions.values[label]}
        source = "plain"
    prompts = []
    for index in range(conditions.null):
        positions = np.unravel_index(index, conditions.shape)
        values = {c: conditions.values[c][int(p)] for c, p in zip(conditions.columns, positions)}
        others = "; ".join(f"{c} {v}" for c, v in values.items() if c != label)
        prompts.append(f"{others}: {texts[values[label]]}" if others else texts[values[label]])
    return prompts, source


class LatentLoRA:
    """A local pretrained latent text-to-image model with LoRA adapters on its UNet, as the training loop and the
    sampler see a generator (the other kind is :class:`retfm.synth.train.PixelDenoiser`): class ``i`` conditions
    the UNet on prompt ``i``'s text embedding, the null class on the empty prompt's."""

    def __init__(self, base: Path, identity: dict, prompts: list[str], prompt_source: str, size: int):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        local = {"local_files_only": True}
        self.unet = _load(base, "unet", lambda p: UNet2DConditionModel.from_pretrained(p, use_safetensors=True, **local))
        self.vae = _load(base, "vae", lambda p: AutoencoderKL.from_pretrained(p, use_safetensors=True, **local))
        text_encoder = _load(base, "text_encoder",
                             lambda p: CLIPTextModel.from_pretrained(p, use_safetensors=True, **local))
        tokenizer = _load(base, "tokenizer", lambda p: CLIPTokenizer.from_pretrained(p, **local))
        # latents are never clipped (Stable Diffusion's pipelines switch clipping off too)
        self.scheduler = _load(base, "scheduler", lambda p: DDPMScheduler.from_config(
            DDPMScheduler.load_config(p, **local), clip_sample=False))
        self.unet.requires_grad_(False)
        self.vae.requires_grad_(False).eval()
        if self.unet.config.in_channels != self.vae.config.latent_channels:
            raise RetfmError(f"base_model {base}: its UNet takes {self.unet.config.in_channels} channels, its VAE "
                             f"makes {self.vae.config.latent_channels} (an inpainting or other variant?)")
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)  # as diffusers' pipelines compute it
        unet_factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if size % (factor * unet_factor):
            raise RetfmError(f"size {size}: must be a multiple of {factor * unet_factor} for base_model {base} "
                             f"(its VAE shrinks images {factor}x, its UNet has {unet_factor}x downsampling)")
        self.shape = (self.vae.config.latent_channels, size // factor, size // factor)
        self.identity, self.prompts, self.prompt_source = identity, prompts, prompt_source
        with torch.no_grad():  # the frozen text encoder is needed only for these: one embedding per class, then ""
            tokens = tokenizer([*prompts, ""], padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
            mask = tokens.attention_mask if getattr(text_encoder.config, "use_attention_mask", False) else None
            self.embeddings = text_encoder(tokens.input_ids, attention_mask=mask)[0]

    @classmethod
    def for_training(cls, config: SynthTrainConfig, conditions: Conditions) -> LatentLoRA:
        """The base model of ``config.base_model`` with fresh LoRA adapters (drawn from ``config.seed``)."""
        from peft import LoraConfig

        base = check_base(config.base_model)
        prompts, source = class_prompts(conditions, config.label)
        model = cls(base, base_identity(base), prompts, source, config.size)
        adapters = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank,
                              target_modules=config.lora_targets)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            try:
                model.unet.add_adapter(adapters)
            except ValueError as exc:  # peft: no module matches a target
                raise RetfmError(f"lora_targets {','.join(config.lora_targets)}: {str(exc).splitlines()[0]}") from None
        return model

    @classmethod
    def for_sampling(cls, generator: Path, card: dict, base_model: str | None) -> LatentLoRA:
        """The base model from the local folder ``base_model``, checked against the card, with the generator's
        adapter; prompted with the card's prompts."""
        named = card["base_model"]
        if base_model is None:
            raise RetfmError(f"{generator}: a LoRA adapter of the base model {named['name']} (UNet sha256 "
                             f"{named['unet_sha256'][:12]}...); give that model's local folder with --base-model")
        base = check_base(base_model)
        identity = base_identity(base)
        if identity["unet_sha256"] != named["unet_sha256"]:
            raise RetfmError(f"--base-model {base}: its UNet weights (sha256 {identity['unet_sha256'][:12]}...) are "
                             f"not those of {named['name']} (sha256 {named['unet_sha256'][:12]}...), which "
                             f"{generator} adapts")
        model = cls(base, identity, [entry["prompt"] for entry in card["prompts"]], card["prompt_source"],
                    card["size"])
        model.unet.load_lora_adapter(generator / ADAPTER_DIR, prefix=None, weight_name=ADAPTER_FILENAME,
                                     adapter_name="default", local_files_only=True)
        return model

    def to(self, device: torch.device) -> LatentLoRA:
        self.unet.to(device)
        self.vae.to(device)
        self.embeddings = self.embeddings.to(device)
        return self

    def condition(self, classes: torch.Tensor) -> dict:
        return {"encoder_hidden_states": self.embeddings[classes]}

    @torch.no_grad()
    def encode(self, images: torch.Tensor, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        """Images in [-1, 1] -> latents drawn from the VAE's posterior (from ``rng``) times its scaling factor."""
        posterior = self.vae.encode(images.to(device)).latent_dist
        return posterior.sample(generator=rng) * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample

    def training_flops_per_image(self, device: torch.device) -> int:
        """The VAE's encoding of one image, plus the UNet's forward FLOPs times 2 for the backward pass, which
        computes input gradients but no weight gradients for the frozen weights (an estimate)."""
        size = self.shape[-1] * (2 ** (len(self.vae.config.block_out_channels) - 1))
        zero_step = torch.zeros(1, dtype=torch.long, device=device)
        return (forward_flops(lambda: self.vae.encode(torch.zeros(1, 3, size, size, device=device)), device)
                + 2 * forward_flops(lambda: self.unet(torch.zeros(1, *self.shape, device=device), zero_step,
                                                      **self.condition(torch.zeros(1, dtype=torch.long,
                                                                                   device=device))), device))

    def save(self, out: Path, config: SynthTrainConfig, conditions: Conditions, **fields) -> dict:
        """Write the adapter (LoRA tensors only, safetensors) and the card; returns the card."""
        out = Path(out)
        self.unet.cpu().save_lora_adapter(out / ADAPTER_DIR, weight_name=ADAPTER_FILENAME, safe_serialization=True)
        adapter = out / ADAPTER_DIR / ADAPTER_FILENAME
        prompts = [{"condition": {c: conditions.values[c][int(p)] for c, p in
                                  zip(conditions.columns, np.unravel_index(i, conditions.shape))}, "prompt": text}
                   for i, text in enumerate(self.prompts)]
        return write_card(
            out, LATENT_LORA, f"lora-{config.label}-{config.size}px", config, conditions,
            f"LoRA adapter (rank {config.lora_rank}) of the UNet of the latent text-to-image model "
            f"{self.identity['name']}, prompted with {', '.join(conditions.columns)}, for {config.size}px fundus "
            "images", licence="as the training data and the base model's licence",
            base_model={**self.identity, "prediction_type": self.scheduler.config.get("prediction_type", "epsilon")},
            lora={"rank": config.lora_rank, "alpha": config.lora_alpha or config.lora_rank,
                  "targets": config.lora_targets,
                  "parameters": sum(p.numel() for p in self.unet.parameters() if p.requires_grad)},
            adapter_bytes=adapter.stat().st_size, prompt_source=self.prompt_source, prompts=prompts, **fields)


def _load(base: Path, part: str, load):
    """One component of the base model, or one line saying why it cannot be loaded."""
    try:
        return load(base / part)
    except Exception as exc:  # diffusers and transformers raise many kinds for a damaged folder
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RetfmError(f"base_model {base}: cannot load {part}/ ({message})") from None
