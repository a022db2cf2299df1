"""``retfm demo``: the whole road on built-in data, on any laptop.

1. a multi-site phantom cohort (distinct camera styles, countries, sexes), de-identified with a site key and
   ingested (or an ingest folder given with ``--data``);
2. token-reconstruction pretraining across the sites with Flower's simulation engine (weights only cross);
3. for comparison, the same pretraining pooled in one place (centralised, as many images as the whole
   federation), at each site alone (local-only models, as many steps as one site did in the federation), and
   random weights;
4. a small label-conditioned generator trained at the first site, sampled in that site's label mix and audited
   (fidelity, label fidelity, memorisation);
5. every model embeds every image; a logistic probe per label (DR grade, glaucoma) is fitted on the training
   split and evaluated on the test split, per site, country and sex; each local-only model is set against the
   federated one on the other sites' test images;
6. ``OUT/report.html`` and ``OUT/results.json``: each model's metrics with 95% CIs, per-site results, federated
   against pooled and local-only, the generator's audit, and the compute each stage spent. Every number comes
   from this run.

No image-text model is part of this run, so zero-shot recognition and text retrieval are not shown (see
docs/zeroshot.md and docs/retrieval.md).

``--quick`` shrinks everything (3 sites, fewer images, steps and rounds) to finish in about a minute on two cores.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import jinja2

from retfm import __version__
from retfm.adapt.embed import embed
from retfm.adapt.probe import probe
from retfm.config import (EmbedConfig, FederatedConfig, IngestConfig, ProbeConfig, PretrainConfig, SynthAuditConfig,
                          SynthSampleConfig, SynthTrainConfig)
from retfm.data.deid import generate_key
from retfm.data.ingest import ingest
from retfm.data.manifest import Manifest
from retfm.data.phantoms import generate_cohort
from retfm.errors import RetfmError
from retfm.evaluate.report import REPORT_CSS
from retfm.pretrain.trainer import MODEL_FILENAME, pretrain

LABELS = ("dr_grade", "glaucoma")
GROUPS = ["site", "country", "sex"]


@dataclasses.dataclass(frozen=True)
class Scale:
    sites: int
    per_site: int
    rounds: int
    local_steps: int
    synth_steps: int
    synth_images: int
    bootstrap: int


FULL = Scale(sites=4, per_site=100, rounds=5, local_steps=10, synth_steps=300, synth_images=32, bootstrap=500)
QUICK = Scale(sites=3, per_site=60, rounds=2, local_steps=4, synth_steps=20, synth_images=8, bootstrap=100)
PRETRAIN = {"objective": "token-reconstruction", "model": "vit-demo-p8", "batch_size": 16, "blr": 0.02,
            "warmup_steps": 2, "workers": 0, "log_every": 1}
# benchmarks/synth.py's learning rate for a small UNet's short run (10x SynthTrainConfig's default)
GENERATOR = {"label": "dr_grade", "size": 32, "block_out_channels": (16, 32, 64), "batch_size": 16, "lr": 2e-3,
             "warmup_steps": 10, "workers": 0}


def run_demo(out: Path, data: Path | None = None, quick: bool = False,
             say: Callable[[str], None] = print) -> dict:
    """Run every stage into ``out``; returns the results (also ``out/results.json``)."""
    scale = QUICK if quick else FULL
    out = Path(out)
    if (out / "results.json").exists():
        raise RetfmError(f"{out}: holds a finished demo; choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def stage(name: str, work: Callable[[], object]):
        say(f"[{len(seconds) + 1}] {name}")
        started = time.perf_counter()
        result = work()
        seconds[name] = round(time.perf_counter() - started, 1)
        return result

    cohort = data or out / "cohort"
    if data is None:
        stage("phantom cohort", lambda: generate_cohort(out / "phantoms", scale.sites, scale.per_site, size=128))
        key = generate_key(out / "site.key") if not (out / "site.key").exists() else out / "site.key"
        stage("de-identify and ingest", lambda: ingest(out / "phantoms", cohort, IngestConfig(
            size=64, workers=1, deid_key_file=key, stratify="dr_grade")))
    table = Manifest.read(cohort).table
    missing = [label for label in LABELS if label not in table]
    if missing:  # checked before minutes of pretraining, not when the probes need them
        raise RetfmError(f"{cohort}: the demo probes {' and '.join(LABELS)}; this data has no "
                         f"{' or '.join(missing)} column")
    sites = sorted(table["site"].astype(str).unique())
    if len(sites) < 2:
        raise RetfmError(f"{cohort}: the demo federates sites, and this data has one ({sites[0]})")

    from retfm.federated.simulation import simulate

    federated = FederatedConfig(data=str(cohort), pretrain=PRETRAIN, rounds=scale.rounds,
                                local_steps=scale.local_steps, strategy="fedavg")
    logging.getLogger("flwr").setLevel(logging.ERROR)  # Flower's per-round log lines would bury the demo's
    stage(f"federated token reconstruction ({len(sites)} sites, {scale.rounds} rounds)",
          lambda: simulate(federated, out / "federated"))
    models = {"federated": out / "federated" / MODEL_FILENAME, "pooled": out / "pooled" / MODEL_FILENAME}
    site_steps = scale.rounds * scale.local_steps
    stage("pooled (centralised) pretraining", lambda: pretrain(
        PretrainConfig(**PRETRAIN, data=[str(cohort)], steps=len(sites) * site_steps), out / "pooled"))
    for site in sites:  # the same number of steps as one site did in the federation, on its own images only
        config = PretrainConfig(**PRETRAIN, data=[str(cohort)], sites=[site], steps=site_steps)
        stage(f"local-only pretraining at {site}", lambda c=config, s=site: pretrain(c, out / f"local-{s}"))
        models[f"local {site}"] = out / f"local-{site}" / MODEL_FILENAME

    results: dict = {"models": {}, "seconds": seconds, "sites": sites, "quick": quick, "retfm_version": __version__}
    results["generator"] = stage(f"generator at {sites[0]}: train, sample, audit",
                                 lambda: site_generator(cohort, sites[0], out / "synth", scale))
    for name, path in {"random": None, **models}.items():
        embeddings = out / "embeddings" / f"{name.replace(' ', '-')}.parquet"
        config = (EmbedConfig(model=PRETRAIN["model"], weights="random", workers=0) if path is None
                  else EmbedConfig(model=str(path), workers=0))
        stage(f"embed with {name}", lambda e=embeddings, c=config: embed(cohort, e, c))
        results["models"][name] = {}
        for label in LABELS:
            folder = out / "probes" / f"{name.replace(' ', '-')}-{label}"
            metrics = stage(f"probe {label} on {name}", lambda e=embeddings, f=folder, lab=label: probe(
                e, f, ProbeConfig(label=lab, by=GROUPS, bootstrap=scale.bootstrap)))
            results["models"][name][label] = _summary(metrics, folder.relative_to(out))
    results["other_sites"] = other_sites(results["models"], sites)
    results["compute"] = _compute(out, models)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_demo_report(results, out / "report.html")
    return results


def site_generator(cohort: Path, site: str, out: Path, scale: Scale) -> dict:
    """Train a small DR-grade-conditioned generator on one site's training images, sample it in that site's
    label mix, and audit the samples against the site's real images (in 16 px pixel space: no pretrained retinal
    encoder is available offline). Returns the audit's headline numbers and the audit report's path."""
    from retfm.synth.audit import audit
    from retfm.synth.sample import sample
    from retfm.synth.train import train

    train(SynthTrainConfig(**GENERATOR, data=str(cohort), sites=[site], steps=scale.synth_steps,
                           checkpoint_every=scale.synth_steps, log_every=max(1, scale.synth_steps // 10)),
          out / "generator")
    sample(out / "generator", out / "samples", SynthSampleConfig(n=scale.synth_images, inference_steps=20))
    result = audit(out / "generator", cohort, out / "samples", out / "audit", SynthAuditConfig(model="pixels"))
    labels, memorised = result["label_fidelity"], result["memorisation"]
    return {"site": site, "steps": scale.synth_steps, "images": scale.synth_images,
            "frechet_distance": result["fidelity"]["frechet_distance"],
            "precision": result["fidelity"]["precision"], "recall": result["fidelity"]["recall"],
            "label_accuracy": labels.get("accuracy"), "label_chance_accuracy": labels.get("chance_accuracy"),
            "near_copy_share": memorised["near_copy_share"], "memorising": memorised["flagged"],
            "report": str((out / "audit" / "report.html").relative_to(out.parent))}


def other_sites(models: dict, sites: list[str]) -> dict:
    """For each site's local-only model and label: its mean test AUROC over the other sites, against the federated
    and pooled models' mean over the same sites (sites where a model's AUROC is undefined are left out of every
    mean, so all three always average the same sites)."""
    table: dict = {}
    for site in sites:
        local = models.get(f"local {site}")
        if local is None:
            continue
        for label in LABELS:
            compared = {"local": local, "federated": models["federated"], "pooled": models["pooled"]}
            values = {name: {s: m[label]["groups"]["site"].get(s, {}).get("auroc", {}).get("value")
                             for s in sites if s != site} for name, m in compared.items()}
            shared = [s for s in sites if s != site and all(v[s] is not None for v in values.values())]
            table.setdefault(site, {})[label] = {
                "sites": shared, **{name: (sum(v[s] for s in shared) / len(shared) if shared else None)
                                    for name, v in values.items()}}
    return table


def _summary(metrics: dict, report: Path) -> dict:
    """AUROC and quadratic kappa with CIs, overall and per group value, from a probe's metrics.json dict."""
    def pick(block: dict) -> dict:
        return {name: {"value": block[name]["value"], "ci": block[name].get("ci")}
                for name in ("auroc", "kappa_quadratic") if name in block}
    return {"overall": pick(metrics["metrics"]), "n": metrics["n"], "report": str(report / "report.html"),
            "groups": {column: {value: {"n": group["n"], **pick(group["metrics"])} for value, group in values.items()}
                       for column, values in metrics["groups"].items()}}


def _compute(out: Path, models: dict[str, Path]) -> dict:
    """Training FLOPs and device-hours from each pretrained model's card (a federation's: its sites' cards' sum)."""
    compute = {}
    for name, path in models.items():
        card = json.loads(path.with_suffix(".json").read_text())
        compute[name] = {"steps": card.get("steps"), "images_seen": card.get("images_seen"),
                         **{k: v for k, v in (card.get("compute") or {}).items()
                            if k in ("training_flops_estimate", "device_hours")}}
    return compute


REPORT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>retfm demo</title>
<style>
{{ css }}
.best { font-weight: bold; }
</style></head><body>
<h1>retfm demo: a small global model, end to end</h1>
<p>{{ r.sites | length }} sites ({{ r.sites | join(", ") }}){% if r.quick %}, quick run{% endif %}. Token
reconstruction pretraining across the sites with Flower (weights only crossed), against the same pretraining
pooled in one place (as many images as the whole federation), each site's local-only pretraining (as many steps
as one site did in the federation) and random weights; then a logistic probe per label on the training split,
evaluated on the test split. 95% CIs: patient-level percentile bootstrap. Every number below comes from this run;
each probe's full report is linked.</p>

<h2>Overall test AUROC (95% CI)</h2>
<table><tr><th>model</th>{% for label in labels %}<th>{{ label }}</th><th>quadratic kappa</th>{% endfor %}</tr>
{% for name, per_label in r.models.items() %}<tr><td>{{ name }}</td>
{% for label in labels %}{% set m = per_label[label].overall %}
<td><a href="{{ per_label[label].report }}">{{ m.auroc.value | num }}</a> {{ m.auroc.ci | ci }}</td>
<td>{{ m.kappa_quadratic.value | num }}</td>{% endfor %}</tr>
{% endfor %}</table>

<h2>Per site: federated against local-only</h2>
<p>Test AUROC at each site. A local-only model pretrained at one site meets the other sites' camera styles only
through the probe; the federated model saw every site's images during pretraining.</p>
{% for label in labels %}<h3>{{ label }}</h3>
<table><tr><th>model</th>{% for site in r.sites %}<th>{{ site }}</th>{% endfor %}</tr>
{% for name, per_label in r.models.items() %}<tr><td>{{ name }}</td>
{% for site in r.sites %}{% set g = per_label[label].groups.site.get(site) %}
<td>{% if g %}{{ g.auroc.value | num }}{% else %}&ndash;{% endif %}</td>{% endfor %}</tr>
{% endfor %}</table>{% endfor %}

<h2>On the other sites' test images: local-only against federated and pooled</h2>
<p>Mean test AUROC over the sites a local-only model never saw in pretraining.</p>
<table><tr><th>local-only model</th>{% for label in labels %}<th>{{ label }}: local</th><th>federated</th>
<th>pooled</th>{% endfor %}</tr>
{% for site, per_label in r.other_sites.items() %}<tr><td>{{ site }}</td>
{% for label in labels %}{% set c = per_label[label] %}
<td>{{ c.local | num }}</td><td{% if c.federated is not none and c.local is not none and c.federated > c.local %}
 class="best"{% endif %}>{{ c.federated | num }}</td><td>{{ c.pooled | num }}</td>{% endfor %}</tr>
{% endfor %}</table>

<h2>Per country and sex (federated model)</h2>
{% for label in labels %}<h3>{{ label }}</h3>{% for column in ["country", "sex"] %}
<table><tr><th>{{ column }}</th><th>n</th><th>AUROC</th><th>95% CI</th></tr>
{% for value, g in r.models.federated[label].groups[column].items() %}<tr><td>{{ value }}</td><td>{{ g.n }}</td>
<td>{{ g.auroc.value | num }}</td><td>{{ g.auroc.ci | ci }}</td></tr>{% endfor %}</table>
{% endfor %}{% endfor %}

<h2>A site's generator</h2>
{% set g = r.generator %}<p>A DR-grade-conditioned diffusion model trained {{ g.steps }} steps on {{ g.site }}'s
training images, sampled {{ g.images }} images in that site's label mix, audited against the site's real images
in 16 px pixel space (<a href="{{ g.report }}">audit report</a>, with the samples).</p>
<table><tr><th>Fr&eacute;chet distance</th><th>precision</th><th>recall</th><th>label accuracy</th>
<th>chance accuracy</th><th>near-copies</th></tr>
<tr><td>{{ g.frechet_distance | num }}</td><td>{{ g.precision | num }}</td><td>{{ g.recall | num }}</td>
<td>{{ g.label_accuracy | num }}</td><td>{{ g.label_chance_accuracy | num }}</td>
<td>{{ g.near_copy_share | num }}{% if g.memorising %} (flagged: memorising){% endif %}</td></tr></table>

<h2>Compute spent</h2>
<table><tr><th>stage</th><th>seconds</th></tr>
{% for name, s in r.seconds.items() %}<tr><td>{{ name }}</td><td>{{ s }}</td></tr>{% endfor %}</table>
<table><tr><th>pretrained model</th><th>steps</th><th>images seen</th><th>training FLOPs (est.)</th></tr>
{% for name, c in r.compute.items() %}<tr><td>{{ name }}</td><td>{{ c.steps }}</td><td>{{ c.images_seen }}</td>
<td>{{ c.training_flops_estimate | flops }}</td></tr>{% endfor %}</table>
<p class="muted">retfm {{ r.retfm_version }}. Phantom images are drawn by retfm; they show the machinery working,
not clinical performance.</p>
</body></html>
"""


def write_demo_report(results: dict, path: Path) -> Path:
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined)
    number = (lambda form: lambda v: format(v, form) if isinstance(v, (int, float)) else "–")
    environment.filters["num"] = number(".3f")
    environment.filters["flops"] = number(".2e")
    environment.filters["ci"] = lambda ci: f"({ci[0]:.3f}–{ci[1]:.3f})" if ci and ci[0] is not None else ""
    path.write_text(environment.from_string(REPORT).render(css=REPORT_CSS, r=results, labels=LABELS), encoding="utf-8")
    return path
