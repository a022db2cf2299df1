"""``retfm federated run``: a whole federation simulated on one machine with Flower's simulation engine.

Each site is a virtual SuperNode running the retfm ClientApp in its own Ray worker (``cpus_per_site`` cores
each); the coordinator's ServerApp runs in this process. Outputs in ``OUT``: ``checkpoint.pt`` (global weights
and history, after every round: ``--resume`` continues from it), ``model.safetensors`` + ``model.json`` (the
global backbone, or with task finetune the global classifier, as a retfm checkpoint; with task synth the global
generator as ``retfm synth train`` writes it: ``unet/``, ``scheduler/``, ``generator.json``), ``report.json`` and
``report.md`` (metrics per site and round, rejected replies, bytes moved) and ``federated_config.yaml``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

from retfm import __version__
from retfm.adapt.finetune import save_classifier
from retfm.adapt.predictions import resolve_task
from retfm.config import save_config
from retfm.data.manifest import Manifest
from retfm.errors import RetfmError
from retfm.federated.apps import Recorder, build_strategy, client_app, server_app
from retfm.federated.config import FederatedConfig
from retfm.federated.task import MIN_CELL, Site, load_shared, seeded_classifier, seeded_model
from retfm.models import save_checkpoint, spec as model_spec
from retfm.models.lora import merged
from retfm.runs import CHECKPOINT_FILENAME, load_checkpoint, refuse_overwrite
from retfm.synth import train as synth
from retfm.synth.generator import Conditions

MODEL_FILENAME = "model.safetensors"


def resolve_sites(config: FederatedConfig) -> list[Site]:
    """The federation's sites: one per ``site`` value of ``config.data``, or ``config.sites`` as given."""
    if (config.data is None) == (config.sites is None):
        raise RetfmError("federated config: give either data (one manifest, sites by its site column) or sites")
    if config.sites is not None:
        sites = [Site(s.name, s.data, s.rows) for s in config.sites]
    else:
        names = sorted(Manifest.read(config.data).table["site"].astype(str).unique().tolist())
        sites = [Site(name, config.data, name) for name in names]
    if len(sites) < 2:
        raise RetfmError(f"federated config: a federation needs at least two sites, found {len(sites)}")
    if len({s.name for s in sites}) != len(sites):
        raise RetfmError("federated config: site names must be distinct")
    return sites


def simulate(config: FederatedConfig, out: Path, resume: bool = False, recorder: Recorder | None = None,
             client=None) -> dict:
    """Run the federation in Flower's simulation engine; returns the report. ``client`` replaces the retfm
    ClientApp (tests inject failing sites with it)."""
    from flwr.simulation import run_simulation

    sites = resolve_sites(config)
    build_strategy(config, len(sites))  # refuse bad strategy or dp options before any site starts
    out = open_run(config, out, resume)
    backend = {"client_resources": {"num_cpus": config.cpus_per_site, "num_gpus": 0.0},
               # no more sites at once than the machine has cores for: more would only share them, each holding
               # its model and data in memory (4 EfficientNet sites at 224 px: 6 GB beside 2 cores)
               "init_args": {"num_cpus": max(math.ceil(config.cpus_per_site),
                                             min(int(len(sites) * config.cpus_per_site), os.cpu_count() or 1)),
                             "include_dashboard": False,
                             "logging_level": logging.WARNING, "log_to_driver": False}}
    # Ray's FutureWarning about GPU visibility when num_gpus=0; its future behaviour is the one we want
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_simulation(server_app(config, len(sites), out, resume, recorder), client or client_app(sites, config),
                   num_supernodes=len(sites), backend_config=backend)
    if not (out / CHECKPOINT_FILENAME).exists():
        raise RetfmError(f"{out}: the federation stopped before its first round finished (see the log above)")
    return finish(config, [site.name for site in sites], out)


def open_run(config: FederatedConfig, out: Path, resume: bool) -> Path:
    """The coordinator's run folder, with the run's config in it; one holding a run already is refused unless
    the run is resumed."""
    out = Path(out)
    refuse_overwrite(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "federated_config.yaml")
    return out


def finish(config: FederatedConfig, sites: list[str], out: Path) -> dict:
    """Write the global model (task pretrain: the backbone as a retfm checkpoint, LoRA adapters merged in; task
    finetune: the classifier, as ``retfm finetune`` writes it; task synth: the generator folder, as ``retfm synth
    train`` writes it) and the report (per site of ``sites``, by name) from the coordinator's checkpoint."""
    saved = load_checkpoint(out / CHECKPOINT_FILENAME)
    local = config.local_config()
    objective, model_name = {
        "pretrain": lambda: (local.objective, model_spec(local.model).name),
        "finetune": lambda: (f"finetune {local.label} ({local.adaptation})", model_spec(local.model).name),
        "synth": lambda: (f"synth {local.label} (ddpm)", f"unet-{local.size}px")}[config.task]()
    privacy = [entry["privacy"] for entry in saved["history"] if "privacy" in entry]
    report = {"rounds_done": saved["round"], "rounds": saved["history"], "sites": list(sites), "task": config.task,
              "strategy": config.strategy, "objective": objective, "model": model_name,
              "transfer": config.transfer, "transfer_params": config.transfer_params,
              "lora": config.lora.model_dump() if config.lora_options() else None,
              "dp": {**config.dp.model_dump(), **privacy[-1]} if config.dp and privacy else None,
              "representativeness": representativeness(saved["history"]), "retfm_version": __version__}
    card = {"federated": {k: v for k, v in report.items() if k != "rounds"},
            "steps": saved["round"] * config.local_steps, "retfm_version": __version__}
    description = f"by a {len(sites)}-site retfm federation ({config.strategy}, {objective})"
    coordinator = Site("coordinator", "")
    if config.task == "finetune":
        classes = config.classes()
        spec, pre, model = seeded_classifier(local, classes)
        load_shared(model, saved["weights"], coordinator)
        # no central validation split to choose a decision threshold on: a binary task decides at 0.5
        save_classifier(model, spec, pre, local, classes, resolve_task(local.task, local.label, classes), None,
                        out / MODEL_FILENAME, name=f"{spec.name}-{local.label}-federated",
                        description=f"{spec.name} fine-tuned on {local.label} {description}", **card)
    elif config.task == "synth":
        save_federated_generator(config, saved, list(sites), out, card["federated"])
    else:
        spec, model = seeded_model(local, config.lora_options())
        load_shared(model, saved["weights"], coordinator)
        save_checkpoint(merged(model.backbone), spec, out / MODEL_FILENAME,
                        name=f"{spec.name}-federated-{local.objective}",
                        description=f"{spec.name} pretrained {description}", objective=local.objective,
                        init=local.init or "random", teacher=local.teacher, **card)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown_report(report))
    return report


def save_federated_generator(config: FederatedConfig, saved: dict, sites: list[str], out: Path,
                             federated: dict) -> dict:
    """The global UNet as a ``retfm synth train`` generator folder in ``out`` (``sample`` and ``assemble`` read
    it as they read a site's): the card's class shares are the federation's training shares from the counts the
    sites sent, its data the sites' names and image count (no manifest hash: the coordinator holds none), its
    images seen those the aggregated replies trained on; no EMA (the last round's average is the generator)."""
    local, conditions = config.synth_config(), Conditions(config.synth_conditions())
    unet, scheduler = synth.build_denoiser(local, conditions)
    load_shared(unet, saved["weights"], Site("coordinator", ""))
    profiles = latest_profiles(saved["history"])
    images_seen = local.batch_size * sum(metrics["steps"] for entry in saved["history"]
                                         for metrics in entry["train"].values())
    flops = synth.training_flops_per_image(unet, local.size, torch.device("cpu")) * images_seen
    return synth.save_generator(
        unet, scheduler, out, local, conditions, class_shares=federation_shares(profiles, conditions),
        data={"images": sum(p["images"] for p in profiles.values()), "split": local.split, "sites": sites},
        steps=saved["round"] * config.local_steps, images_seen=images_seen, ema=False,
        compute={"training_flops_estimate": flops, "device": local.device, "precision": local.precision,
                 "federation_wall_hours": round(sum(entry["seconds"] for entry in saved["history"]) / 3600, 5)},
        federated=federated)


def federation_shares(profiles: dict[str, dict], conditions: Conditions) -> dict[str, dict[str, float]]:
    """Each condition column's value shares over the sites' training images, from their profile counts; a site's
    count pooled by the small-cell rule is spread evenly over the values it did not report (an estimate); uniform
    for a column no site counted."""
    shares = {}
    for column, values in conditions.values.items():
        counts = dict.fromkeys(map(str, values), 0.0)
        for profile in profiles.values():
            reported = {v: profile.get(f"{column}={v}", 0) for v in counts}
            unreported = [v for v, n in reported.items() if not n]
            pooled = profile.get(f"{column}=(fewer than {MIN_CELL} each)", 0)
            for v, n in reported.items():
                counts[v] += n or pooled / len(unreported)
        total = sum(counts.values())
        shares[column] = ({v: round(n / total, 6) for v, n in counts.items() if n} if total
                          else {v: round(1 / len(counts), 6) for v in counts})
    return shares


def latest_profiles(history: list[dict]) -> dict[str, dict]:
    """Each site's latest profile (the counts of its training images it sent)."""
    profiles: dict[str, dict] = {}
    for entry in history:
        profiles |= entry.get("profile", {})
    return profiles


def representativeness(history: list[dict]) -> list[dict]:
    """How each site's contributed images compare with the whole federation's, from the counts the sites sent
    (their latest profile): one row per group value with its share of all images and of each site's, and each
    site's gap from the federation in percentage points."""
    profiles = latest_profiles(history)
    if not profiles:
        return []
    total = sum(p["images"] for p in profiles.values())
    keys = sorted({key for p in profiles.values() for key in p if key != "images"})
    rows = []
    for key in keys:
        column, _, value = key.partition("=")
        share = sum(p.get(key, 0) for p in profiles.values()) / total
        sites = {site: p.get(key, 0) / p["images"] for site, p in sorted(profiles.items()) if p["images"]}
        rows.append({"column": column, "value": value, "federation": round(share, 4),
                     "sites": {site: round(v, 4) for site, v in sites.items()},
                     "max_gap_pp": round(100 * max(abs(v - share) for v in sites.values()), 1)})
    return rows


def markdown_report(report: dict) -> str:
    """A small human-readable report: one table row per round and site."""
    lines = [f"# Federated run: {report['objective']} on {report['model']}, {report['strategy']}", "",
             f"Sites: {', '.join(report['sites'])}. Rounds done: {report['rounds_done']}. Weights sent: "
             f"{report['transfer_params']}, {report['transfer']}.", ""]
    if report["dp"]:
        dp = report["dp"]
        lines += [f"Differential privacy (site level, noise added by the coordinator): clip norm {dp['clip_norm']:g}, "
                  f"noise multiplier {dp['noise_multiplier']:g}; (epsilon, delta) = ({dp['epsilon']:.3g}, "
                  f"{dp['delta']:g}) after {dp['releases']} noised round(s).", ""]
    lines += ["| round | site | train loss | images | test AUROC | test accuracy | test loss | test images |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for entry in report["rounds"]:
        for site in report["sites"]:
            train = entry["train"].get(site, {})
            test = entry.get("evaluate", {}).get(site, {})
            lines.append(f"| {entry['round']} | {site} | {_cell(train.get('loss'))} | {train.get('num-examples', '')} "
                         f"| {_cell(test.get('auroc'))} | {_cell(test.get('accuracy'))} | {_cell(test.get('loss'))} | "
                         f"{test.get('num-examples', '')} |")
    lines += ["", "| round | sites aggregated | rejected | MB sent | MB received | seconds | epsilon |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for entry in report["rounds"]:
        rejected = "; ".join(f"{r['site'] or 'node ' + str(r['node'])}: {r['reason']}" for r in entry["rejected"])
        lines.append(f"| {entry['round']} | {entry['aggregated_sites']} | {rejected or 'none'} | "
                     f"{entry['bytes_sent'] / 1e6:.2f} | {entry['bytes_received'] / 1e6:.2f} | {entry['seconds']} | "
                     f"{_cell(entry.get('privacy', {}).get('epsilon'))} |")
    if report["representativeness"]:
        sites = list(report["representativeness"][0]["sites"])
        lines += ["", "## Contributed data", "",
                  "Share of the training images in each group: the whole federation's and each site's (from counts "
                  "the sites sent; a value fewer than 5 images hold is pooled).", "",
                  f"| group | value | federation | {' | '.join(sites)} | largest gap (pp) |",
                  "| --- | --- | --- | " + "--- | " * len(sites) + "--- |"]
        lines += [f"| {row['column']} | {row['value']} | {row['federation']:.2f} | "
                  + " | ".join(f"{row['sites'].get(site, 0):.2f}" for site in sites) + f" | {row['max_gap_pp']} |"
                  for row in report["representativeness"]]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    return "" if value is None else f"{value:.4f}"
