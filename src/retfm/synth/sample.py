"""``retfm synth sample``: images from a generator, with a manifest ``retfm pretrain --data`` reads as it is.

Each image ``i`` has its own condition and its own starting noise, both functions of (seed, i), and DDIM (eta 0)
and DPM-Solver++ are deterministic; so an image is the same whichever batch it is drawn in, and an interrupted
run resumes by skipping the images already written (each is written atomically). Classifier-free guidance:
``eps = eps_null + guidance * (eps_cond - eps_null)``. A LoRA generator (``retfm.synth.latent``) is sampled the
same way in its base model's latent space (null: the empty prompt), then decoded by the base model's VAE; its base
model is read from the local folder ``base_model``.

Output: ``OUT/images/<image_id>.png``, ``OUT/manifest.parquet`` (image_id, path, site, split=train,
synthetic=true, the condition columns, generator_id, generator_sha256) and ``OUT/sample.json`` (generator card
summary and the sampling config, which a resumed run must match).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from retfm.data.manifest import Manifest
from retfm.errors import RetfmError
from retfm.runs import checked_device, read_json
from retfm.synth.config import SynthSampleConfig
from retfm.synth.generator import Conditions
from retfm.synth.train import load_generator

SAMPLE_FILENAME = "sample.json"
SYNTHETIC_SITE = "synthetic"  # the site of images from a generator not conditioned on site
# options that change where and how fast images are drawn, not which: left out of a folder's identity (and the
# base model's path names no image: the generator's card names the base by its hash)
MACHINE_OPTIONS = {"batch_size", "device", "base_model"}


def sample(generator: Path, out: Path, config: SynthSampleConfig,
           progress: Callable[[int], None] | None = None, total: Callable[[int], None] | None = None) -> dict:
    """Write ``config.n`` images and their manifest to ``out``; returns a summary."""
    device = checked_device(config.device)
    denoiser, card = load_generator(generator, config.base_model)
    denoiser.to(device)
    conditions = Conditions(card["conditions"])
    shares = parse_shares(config.labels, card)
    rows = assign_conditions(config.n, shares, config.seed)
    classes = conditions.index({c: rows[c].tolist() for c in conditions.columns})
    short = card["weights_sha256"][:8]
    rows.insert(0, "image_id", [f"syn-{short}-{config.seed}-{i:07d}" for i in range(config.n)])
    rows.insert(1, "path", [f"images/{image_id}.png" for image_id in rows["image_id"]])
    _claim(out, card, config)

    todo = [i for i in range(config.n) if not (out / rows["path"][i]).is_file()]
    if total:
        total(config.n)
    if progress and len(todo) < config.n:
        progress(config.n - len(todo))
    scheduler = _scheduler(config, denoiser.scheduler.config)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), config.batch_size):
        chosen = todo[start:start + config.batch_size]
        noise = torch.stack([initial_noise(config.seed, i, denoiser.shape) for i in chosen])
        images = denoise(denoiser, scheduler, noise, torch.from_numpy(classes[chosen]), conditions.null, config,
                         device)
        for i, image in zip(chosen, images):
            target = out / rows["path"][i]
            partial = target.with_name(target.stem + ".tmp.png")
            Image.fromarray(image).save(partial)
            partial.replace(target)  # an image exists whole or not at all
        if progress:
            progress(len(chosen))

    table = rows.assign(site=rows["site"] if "site" in rows else SYNTHETIC_SITE, split="train", synthetic=True,
                        generator_id=card["generator_id"], generator_sha256=card["weights_sha256"])
    first = ["image_id", "path", "site", "split", "synthetic", *conditions.columns, "generator_id",
             "generator_sha256"]
    table = table[list(dict.fromkeys(first))]
    Manifest(table, out, {"retfm.synthetic": "true", "retfm.generator_id": card["generator_id"]}).write()
    return {"images": config.n, "generated_now": len(todo), "kept": config.n - len(todo),
            "generator_id": card["generator_id"], "out": str(out)}


def parse_shares(spec: str | None, card: dict) -> dict[str, dict]:
    """``"dr_grade=0:0.5,1:0.5;site=site1:1"`` -> {column: {value: share}}; columns not named keep the training
    shares. Values are checked against the generator's, shares normalised to sum to 1."""
    values = card["conditions"]
    by_text = {column: {str(v): v for v in values[column]} for column in values}
    shares = {column: {by_text[column][text]: share for text, share in card["class_shares"][column].items()}
              for column in values}
    for part in filter(None, (p.strip() for p in (spec or "").split(";"))):
        column, _, pairs = part.partition("=")
        column = column.strip()
        if column not in values:
            raise RetfmError(f"--labels {part!r}: the generator is conditioned on {', '.join(values)}, "
                             f"not {column!r}")
        chosen = {}
        for pair in filter(None, pairs.split(",")):
            text, _, share = pair.partition(":")
            if text.strip() not in by_text[column]:
                raise RetfmError(f"--labels {part!r}: {column}={text.strip()!r} is not one of the generator's "
                                 f"values ({', '.join(by_text[column])})")
            try:
                chosen[by_text[column][text.strip()]] = float(share)
            except ValueError:
                raise RetfmError(f"--labels {part!r}: share {share!r} is not a number") from None
        if not chosen or any(s < 0 for s in chosen.values()) or sum(chosen.values()) <= 0:
            raise RetfmError(f"--labels {part!r}: give value:share pairs with shares >= 0 and a positive sum")
        shares[column] = chosen
    return {column: {v: s / sum(c.values()) for v, s in c.items()} for column, c in shares.items()}


def assign_conditions(n: int, shares: dict[str, dict], seed: int) -> pd.DataFrame:
    """Conditions for ``n`` images: each column's counts follow its shares exactly (largest remainders), in an
    order shuffled by ``seed``; columns are drawn independently of each other."""
    rng = np.random.default_rng([seed, n])
    columns = {}
    for column, column_shares in shares.items():
        values = list(column_shares)
        counts = exact_counts(list(column_shares.values()), n)
        columns[column] = rng.permutation(np.repeat(np.arange(len(values)), counts))
        columns[column] = pd.Series([values[k] for k in columns[column]])
    return pd.DataFrame(columns)


def exact_counts(shares, n: int) -> np.ndarray:
    """``n`` split by ``shares`` (summing to 1) by largest remainders: each count is within 1 of its share of
    ``n`` and the counts sum to ``n`` (ties go to the earlier share)."""
    shares = np.asarray(shares, dtype=float)
    counts = np.floor(shares * n).astype(int)
    remainders = shares * n - counts
    counts[np.argsort(-remainders, kind="stable")[: n - counts.sum()]] += 1
    return counts


def initial_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Image ``index``'s starting noise (of one sample's ``shape``: pixels or latents): its own generator, seeded
    from (seed, index)."""
    child = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    return torch.randn(*shape, generator=torch.Generator().manual_seed(child))


@torch.inference_mode()
def denoise(denoiser, scheduler, noise: torch.Tensor, classes: torch.Tensor, null: int, config: SynthSampleConfig,
            device: torch.device) -> np.ndarray:
    """Run the sampler from ``noise`` with guidance, then decode (a latent generator's VAE); returns
    N x H x W x 3 uint8 images."""
    scheduler.set_timesteps(config.inference_steps)
    x = noise.to(device)
    classes = classes.to(device)
    conditional, unconditional = denoiser.condition(classes), denoiser.condition(torch.full_like(classes, null))
    both = {key: torch.cat([conditional[key], unconditional[key]]) for key in conditional}
    for t in scheduler.timesteps:
        if config.guidance == 1:
            eps = denoiser.unet(x, t, **conditional).sample
        elif config.guidance == 0:
            eps = denoiser.unet(x, t, **unconditional).sample
        else:  # one pass over both halves
            eps_conditional, eps_unconditional = denoiser.unet(torch.cat([x, x]), t, **both).sample.chunk(2)
            eps = eps_unconditional + config.guidance * (eps_conditional - eps_unconditional)
        x = scheduler.step(eps, t, x).prev_sample
    pixels = ((denoiser.decode(x).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def _scheduler(config: SynthSampleConfig, ddpm_config: dict):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if config.sampler == "ddim":
        return DDIMScheduler.from_config(ddpm_config)
    return DPMSolverMultistepScheduler.from_config(ddpm_config, algorithm_type="dpmsolver++")


def _claim(out: Path, card: dict, config: SynthSampleConfig) -> None:
    """Record which generator and options fill ``out``; a folder filled by others is refused, not mixed."""
    identity = {"generator_id": card["generator_id"], "generator_sha256": card["weights_sha256"],
                "config": config.model_dump(mode="json", exclude=MACHINE_OPTIONS)}
    path = out / SAMPLE_FILENAME
    if path.exists():
        if read_json(path) != identity:
            raise RetfmError(f"{out}: holds samples of another generator or other options; choose a new --out")
        return
    if out.exists() and any(out.iterdir()):
        raise RetfmError(f"{out}: is not empty and not a `retfm synth sample` folder; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity, indent=2) + "\n")
