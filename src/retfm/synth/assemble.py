"""The generative prong of Global RETFound: sites submit generators, the coordinator assembles a synthetic set.

A site trains a generator on its own images (``retfm synth train --set sites=[site1]``) and sends only what
:func:`export` copies: ``unet/`` (config and weights), ``scheduler/`` and the card ``generator.json`` (a LoRA
generator: ``lora/`` and the card; the coordinator holds the base model and names it with ``base_model``); not
the checkpoint (optimiser state), the training log or the config file (which names local paths).

The coordinator's :func:`assemble` checks every submission's weights against its card before sampling any,
refuses a generator given twice, samples each one with :func:`retfm.synth.sample.sample` in its own training
label mix (its card's ``class_shares``) into ``OUT/<site>/`` and writes one manifest over all of them,
``OUT/manifest.parquet``, with each image's provenance, plus ``OUT/provenance.json``. ``retfm pretrain --data
OUT`` reads the result as it is. A stopped run resumes: each site's folder keeps the images it holds.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from retfm import __version__
from retfm.data.manifest import Manifest
from retfm.errors import RetfmError
from retfm.runs import read_json
from retfm.synth.config import SynthAssembleConfig, SynthSampleConfig
from retfm.synth.generator import (CARD_FILENAME, LATENT_LORA, PIXEL, SCHEDULER_DIR, UNET_DIR, WEIGHTS_FILES,
                                   card_type, verified_card)
from retfm.synth.sample import MACHINE_OPTIONS, exact_counts, sample

PROVENANCE_FILENAME = "provenance.json"
# What a site sends, by kind of generator: its weights and card, nothing else from its training folder (a LoRA
# generator: the adapter alone; the coordinator holds the base model).
SUBMISSION_FILES = {PIXEL: (f"{UNET_DIR}/config.json", WEIGHTS_FILES[PIXEL], f"{SCHEDULER_DIR}/scheduler_config.json",
                            CARD_FILENAME),
                    LATENT_LORA: (WEIGHTS_FILES[LATENT_LORA], CARD_FILENAME)}
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a site name usable as a folder name as it is


def export(generator: Path, out: Path) -> dict:
    """Copy a trained generator's submission (:data:`SUBMISSION_FILES`) into the new folder ``out``; returns
    its card."""
    generator, out = Path(generator), Path(out)
    card = verified_card(generator)
    if out.exists() and any(out.iterdir()):
        raise RetfmError(f"{out}: is not empty; choose a new --out for the submission")
    for name in SUBMISSION_FILES[card_type(card)]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(generator / name, out / name)
    return verified_card(out)


def assemble(generators: list[Path], out: Path, config: SynthAssembleConfig,
             progress: Callable[[int], None] | None = None, total: Callable[[int], None] | None = None) -> dict:
    """Sample every generator in its own label mix into ``out``; write the central manifest and provenance."""
    generators, out = [Path(g) for g in generators], Path(out)
    if not generators:
        raise RetfmError("give at least one --generator")
    cards = [verified_card(g) for g in generators]  # every submission is checked before any sampling
    _refuse_repeats(generators, cards)
    counts = _counts(generators, cards, config)
    folders = _folders(cards)
    options = config.model_dump(exclude={"n", "allocation"})
    plans = [SynthSampleConfig(**{**options, "n": int(n), "seed": _seed(config.seed, card)})
             for card, n in zip(cards, counts)]
    provenance = {
        "kind": "retfm-synth-assembly",
        "images": int(sum(counts)),
        "sampling": config.model_dump(mode="json", exclude=MACHINE_OPTIONS),
        "generators": [{"generator_id": card["generator_id"], "weights_sha256": card["weights_sha256"],
                        "folder": folder, "sites": card["data"]["sites"], "label": card["label"],
                        "cond": card["cond"], "steps": card["steps"], "images_seen": card["images_seen"],
                        "training_images": card["data"]["images"], "class_shares": card["class_shares"],
                        "base_model": card.get("base_model"),
                        "n": plan.n, "seed": plan.seed, "generator_retfm_version": card.get("retfm_version")}
                       for card, folder, plan in zip(cards, folders, plans)],
        "retfm_version": __version__,
    }
    _claim(out, provenance)

    if total:
        total(provenance["images"])
    summaries, tables = [], []
    for generator, card, folder, plan in zip(generators, cards, folders, plans):
        summaries.append(sample(generator, out / folder, plan, progress=progress))
        table = Manifest.read(out / folder).table
        tables.append(table.assign(path=folder + "/" + table["path"],
                                   source_site=",".join(map(str, card["data"]["sites"]))))
    table = pd.concat(tables, ignore_index=True)
    first = ["image_id", "path", "site", "source_site", "split", "synthetic", "generator_id", "generator_sha256"]
    table = table[first + [c for c in table.columns if c not in first]]
    Manifest(table, out, {"retfm.synthetic": "true"}).write()
    return {"images": provenance["images"], "generators": len(cards),
            "generated_now": sum(s["generated_now"] for s in summaries), "kept": sum(s["kept"] for s in summaries),
            "out": str(out)}


def _refuse_repeats(generators: list[Path], cards: list[dict]) -> None:
    seen: dict[str, Path] = {}
    for generator, card in zip(generators, cards):
        for key in (card["generator_id"], card["weights_sha256"]):
            if key in seen:
                raise RetfmError(f"{generator}: the same generator as {seen[key]} ({card['generator_id']}); "
                                 f"give each generator once")
            seen[key] = generator


def _counts(generators: list[Path], cards: list[dict], config: SynthAssembleConfig) -> np.ndarray:
    """Images per generator: ``n`` each, or ``n`` split by the generators' training images."""
    if config.allocation == "per_generator":
        return np.full(len(cards), config.n)
    images = np.array([card["data"]["images"] for card in cards], dtype=float)
    counts = exact_counts(images / images.sum(), config.n)
    if (counts == 0).any():
        raise RetfmError(f"{generators[int(np.argmin(counts))]}: gets no image of n={config.n} split by training "
                         f"images; raise --n")
    return counts


def _folders(cards: list[dict]) -> list[str]:
    """Each generator's folder: its site's name when it has one site, named by no other generator, and the name
    is plain (letters, digits, _ and -); else ``generator-<first 12 hex of its weights' hash>``."""
    sites = [tuple(map(str, card["data"]["sites"])) for card in cards]
    return [s[0] if len(s) == 1 and _PLAIN_NAME.fullmatch(s[0]) and sites.count(s) == 1
            else f"generator-{card['weights_sha256'][:12]}" for s, card in zip(sites, cards)]


def _seed(seed: int, card: dict) -> int:
    """A generator's own sampling seed, from the run's seed and its weights: generators never share starting
    noise, and the order they are given in does not matter."""
    return int(np.random.SeedSequence([seed, int(card["weights_sha256"][:16], 16)]).generate_state(1)[0])


def _claim(out: Path, provenance: dict) -> None:
    """Write the plan before sampling; a folder holding another assembly, or anything else, is refused."""
    path = out / PROVENANCE_FILENAME
    plan = {k: v for k, v in provenance.items() if k != "retfm_version"}
    if path.exists():
        earlier = read_json(path)
        if not isinstance(earlier, dict) or {k: v for k, v in earlier.items() if k != "retfm_version"} != plan:
            raise RetfmError(f"{out}: holds an assembly of other generators or options; choose a new --out")
    elif out.exists() and any(out.iterdir()):
        raise RetfmError(f"{out}: is not empty and not a `retfm synth assemble` folder; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(provenance, indent=2) + "\n")
