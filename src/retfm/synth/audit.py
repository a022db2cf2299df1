"""``retfm synth audit``: is a generator's output faithful, labelled as asked, and not a copy of its training data?

Everything is measured in one encoder's feature space (any registry model or retfm checkpoint; Inception is
neither retinal nor available offline). With random weights the space carries disease signs only where the
network's architecture brings them out (a random small ResNet on phantoms, not a random ViT): the label head's
accuracy on held-out real images says how far; real audits need a pretrained retinal encoder.

With ``--model pixels`` the space is the images shrunk to a few pixels a side: no encoder needed, and
near-copies and colour/lesion-load differences show, but anatomy and fine signs do not.

- Fidelity: Fréchet distance between Gaussians fitted to real and synthetic features (FID's formula, in this
  space), and precision / recall against k-nearest-neighbour manifolds (Kynkäänniemi et al. 2019): precision is
  the share of synthetic images inside some real image's ball (radius: distance to its k-th real neighbour),
  recall the share of real images inside some synthetic image's ball.
- Label fidelity: a logistic-regression head (``retfm.adapt.probe.LogisticHead``) trained on the real images'
  features and label predicts the label each synthetic image was conditioned on: accuracy (with its Wilson 95%
  interval) and Cohen's kappa, next to chance agreement (what predicting independently of the image would reach)
  and the head's accuracy on held-out real images (what a perfect generator could reach).
- Memorisation: each synthetic image's distance to its nearest real training image, against the real-to-real
  baseline (each real training image's distance to its nearest other one). A synthetic image closer than
  ``copy_ratio`` x the baseline's median is a near-copy; the generator is flagged when more than ``flag_share``
  of its images are.

Output: ``OUT/audit.json`` and ``OUT/report.html`` (self-contained; near-copies shown as thumbnail pairs: the
report contains real training images, so it stays where they may be seen). Only pseudonymous image ids appear.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import jinja2
import numpy as np
import torch
from PIL import Image
from scipy import linalg
from scipy.stats import binomtest
from sklearn.metrics import ConfusionMatrixDisplay, accuracy_score, cohen_kappa_score, pairwise_distances_chunked
from sklearn.model_selection import train_test_split
from sklearn.neighbors import NearestNeighbors
from torchvision.transforms import v2

from retfm import __version__
from retfm.adapt.probe import LogisticHead
from retfm.data.datasets import eval_transform
from retfm.data.io import open_image
from retfm.data.manifest import Manifest
from retfm.errors import RetfmError
from retfm.evaluate.report import REPORT_CSS, figure_png, new_figure
from retfm.models import create, preprocessing, spec as model_spec
from retfm.models.inference import manifest_outputs
from retfm.synth.config import SynthAuditConfig
from retfm.synth.generator import verified_card

AUDIT_FILENAME, REPORT_FILENAME = "audit.json", "report.html"
PIXELS = "pixels"


def audit(generator: Path, real: Path, synthetic: Path, out: Path, config: SynthAuditConfig) -> dict:
    """Audit the images in ``synthetic`` (from ``generator``) against ``real``; writes audit.json + report.html."""
    card = verified_card(generator)
    label, classes = card["label"], card["conditions"][card["label"]]
    real_all = Manifest.read(real)
    if card["config"].get("sites") is not None:  # a site's generator is measured against that site's images
        real_all = real_all.of_sites(card["config"]["sites"])
    fake = Manifest.read(synthetic)
    if label not in fake.table or label not in real_all.table:
        raise RetfmError(f"{synthetic if label not in fake.table else real}: no column {label!r}, the label the "
                         f"generator was conditioned on")
    foreign = fake.table["generator_sha256"] != card["weights_sha256"] if "generator_sha256" in fake.table else None
    if foreign is None or bool(foreign.any()):
        raise RetfmError(f"{synthetic}: holds images that are not from {card['generator_id']}")

    encoder = Encoder(config, at_size=card["size"])
    real_features = encoder(real_all)
    training = (real_all.table["split"] == config.real_split).to_numpy() if config.real_split else \
        np.ones(len(real_all.table), bool)
    if training.sum() < 2:
        raise RetfmError(f"{real}: fewer than 2 real images in split {config.real_split!r}")
    fake_features = encoder(fake)
    reference = real_features[training]

    result = {
        "generator_id": card["generator_id"], "encoder": encoder.description, "label": label,
        "n_real": int(training.sum()), "n_synthetic": len(fake.table),
        "fidelity": {"frechet_distance": frechet_distance(reference, fake_features),
                     **precision_recall(reference, fake_features, config.k)},
        "label_fidelity": label_fidelity(real_features, real_all.table, training, fake_features,
                                         fake.table[label].tolist(), label, classes, config.seed),
        "memorisation": memorisation(reference, fake_features, config),
        "config": config.model_dump(mode="json"), "retfm_version": __version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / AUDIT_FILENAME).write_text(json.dumps(result, indent=2) + "\n")
    write_report(result, real_all.split(config.real_split) if config.real_split else real_all, fake, out)
    return result


class Encoder:
    """The audit's feature space: a registry model with its own preprocessing, batched, in inference mode; or
    ``pixels``: the image shrunk to ``pixel_size`` (a baseline space that needs no encoder, blind to semantics).
    ``at_size``: every image is first brought to this side (the generator's), so that real and synthetic images
    differ in what the generator drew, not in resolution (as FID is computed at one resolution)."""

    def __init__(self, config: SynthAuditConfig, at_size: int | None = None):
        self.device = torch.device(config.device)
        self.batch_size = config.batch_size
        if config.model == PIXELS:
            self.model = torch.nn.Flatten()
            self.transform = v2.Compose([v2.ToImage(), v2.Resize((config.pixel_size,) * 2, antialias=True),
                                         v2.ToDtype(torch.float32, scale=True)])
            self.description = {"model": f"pixels ({config.pixel_size}x{config.pixel_size} RGB)", "weights": "none",
                                "note": "pixel space: closeness of colours and layout, not of disease signs"}
        else:
            spec = model_spec(config.model)
            if config.weights == "random":
                torch.manual_seed(config.seed)  # the same random network every run, so audits compare
            self.model = create(config.model, weights=config.weights).eval().to(self.device)
            self.transform = eval_transform(preprocessing(spec))
            self.description = {"model": spec.name, "weights": config.weights or "published",
                                "note": "random weights: the space tells the label apart only as well as "
                                        "label_fidelity.real_heldout_accuracy shows" if config.weights == "random"
                                else ""}
        if at_size is not None:
            self.transform = v2.Compose([v2.Resize((at_size, at_size), antialias=True), self.transform])
            self.description["images_at"] = at_size

    def __call__(self, manifest: Manifest) -> np.ndarray:
        batches = manifest_outputs(lambda images: self.model(images.to(self.device)), manifest, self.transform,
                                   self.batch_size)
        return np.concatenate([features for _, features in batches]).astype(np.float64)


# ---- measures -----------------------------------------------------------------------------------------------------

def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of Gaussians fitted to the rows of ``a`` and ``b``."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # singular product (few images): nudge both covariances, as FID code does
        nudge = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + nudge) @ (cov_b + nudge))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(root)))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> dict:
    """Improved precision and recall (k-NN manifolds); k is capped by the number of images."""
    def coverage(manifold: np.ndarray, queries: np.ndarray) -> float:
        neighbours = min(k, len(manifold) - 1)
        radii = NearestNeighbors(n_neighbors=neighbours + 1).fit(manifold).kneighbors(manifold)[0][:, -1]
        inside = [(chunk <= radii[None, :]).any(axis=1)  # query rows in chunks: memory stays small
                  for chunk in pairwise_distances_chunked(queries, manifold)]
        return float(np.concatenate(inside).mean())

    return {"precision": coverage(real, fake), "recall": coverage(fake, real), "k": k}


def label_fidelity(real_features, real_table, training, fake_features, fake_labels, label, classes, seed) -> dict:
    """Train a logistic head on real features (C chosen on the real val split, or on a quarter of the training
    images when there is none), then predict the synthetic images' conditioned labels."""
    if len(classes) < 2:
        return {"note": f"the generator knows one {label} value only: no label to tell apart"}
    index = {value: i for i, value in enumerate(classes)}
    known = real_table[label].notna().to_numpy() & real_table[label].isin(classes).to_numpy()
    y_real = np.array([index.get(v, -1) if k else -1 for v, k in zip(real_table[label].tolist(), known)])
    fit_rows = np.flatnonzero(training & known)
    val_rows = np.flatnonzero((real_table["split"] == "val").to_numpy() & known)
    if len(val_rows) < 2 or len(np.unique(y_real[val_rows])) < 2:
        if len(fit_rows) < 4:
            return {"note": f"fewer than 4 real images with {label}: no classifier trained"}
        counts = np.bincount(y_real[fit_rows])
        present = counts[counts > 0]
        stratify = y_real[fit_rows] if present.min() >= 2 and len(present) <= len(fit_rows) // 4 else None
        fit_rows, val_rows = train_test_split(fit_rows, test_size=0.25, random_state=seed, stratify=stratify)
    head = LogisticHead(seed=seed)
    head.fit(real_features[fit_rows], y_real[fit_rows], real_features[val_rows], y_real[val_rows], len(classes))
    y_fake = np.array([index[v] for v in fake_labels])
    predicted = head.predict_proba(fake_features).argmax(axis=1)
    real_predicted = head.predict_proba(real_features[val_rows]).argmax(axis=1)
    # Chance: agreement expected if predictions were independent of the images (kappa's p_e).
    true_shares = np.bincount(y_fake, minlength=len(classes)) / len(y_fake)
    predicted_shares = np.bincount(predicted, minlength=len(classes)) / len(predicted)
    hits = int((y_fake == predicted).sum())
    interval = binomtest(hits, len(y_fake)).proportion_ci(confidence_level=0.95, method="wilson")
    return {"accuracy": hits / len(y_fake), "accuracy_ci95": [float(interval.low), float(interval.high)],
            "kappa": float(cohen_kappa_score(y_fake, predicted, labels=np.arange(len(classes)))),
            "chance_accuracy": float(true_shares @ predicted_shares),
            "majority_share": float(true_shares.max()),
            "real_heldout_accuracy": float(accuracy_score(y_real[val_rows], real_predicted)),
            "n_classifier_train": len(fit_rows), "n_classifier_heldout": len(val_rows),
            "classes": [str(c) for c in classes],
            "confusion": _confusion(y_fake, predicted, len(classes)).tolist()}


def memorisation(real: np.ndarray, fake: np.ndarray, config: SynthAuditConfig) -> dict:
    """Nearest-real distances of synthetic images against the real-to-real nearest-neighbour baseline."""
    finder = NearestNeighbors(n_neighbors=2).fit(real)
    real_to_real = finder.kneighbors(real)[0][:, 1]  # the first neighbour is the image itself
    distance, nearest = (column[:, 0] for column in finder.kneighbors(fake, n_neighbors=1))
    threshold = config.copy_ratio * float(np.median(real_to_real))
    copies = np.flatnonzero(distance < threshold)
    share = len(copies) / len(fake)
    return {"threshold": threshold, "real_to_real_median": float(np.median(real_to_real)),
            "real_to_real_min": float(real_to_real.min()),
            "synthetic_to_real_median": float(np.median(distance)), "synthetic_to_real_min": float(distance.min()),
            "near_copies": int(len(copies)), "near_copy_share": share, "flagged": share > config.flag_share,
            "distances": {"real_to_real": real_to_real.tolist(), "synthetic_to_real": distance.tolist()},
            "pairs": [(int(i), int(nearest[i]), float(distance[i])) for i in copies[np.argsort(distance[copies])]]}


def _confusion(y: np.ndarray, predicted: np.ndarray, n: int) -> np.ndarray:
    matrix = np.zeros((n, n), int)
    np.add.at(matrix, (y, predicted), 1)
    return matrix


# ---- report -------------------------------------------------------------------------------------------------------

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>retfm synthetic-data audit: {{ r.generator_id }}</title>
<style>
{{ css }}
.flag { color: #b00; font-weight: bold; } .ok { color: #070; }
</style></head><body>
<h1>Audit of generator <code>{{ r.generator_id }}</code></h1>
<p>{{ r.n_synthetic }} synthetic images against {{ r.n_real }} real training images, in the feature space of
<code>{{ r.encoder.model }}</code> (weights: {{ r.encoder.weights }}).
{% if r.encoder.note %}<span class="flag">{{ r.encoder.note }}</span>{% endif %}</p>

<h2>Memorisation</h2>
<p class="{{ 'flag' if m.flagged else 'ok' }}">{{ m.near_copies }} near-copies ({{ (100 * m.near_copy_share) | num(1) }}%
of the synthetic images): {{ "FLAGGED, the generator reproduces training images" if m.flagged
else "not flagged" }} (flagged above {{ (100 * r.config.flag_share) | num(1) }}%).</p>
<table><tr><th>distance to the nearest real training image</th><th>median</th><th>minimum</th></tr>
<tr><td>real to real (baseline)</td><td>{{ m.real_to_real_median | num }}</td><td>{{ m.real_to_real_min | num }}</td></tr>
<tr><td>synthetic to real</td><td>{{ m.synthetic_to_real_median | num }}</td><td>{{ m.synthetic_to_real_min | num }}</td></tr>
</table>
<p class="muted">Near-copy: closer than {{ r.config.copy_ratio }} &times; the baseline's median
({{ m.threshold | num }}).</p>
<img src="data:image/png;base64,{{ histogram }}" alt="nearest-neighbour distances">
{% if thumbnails %}<h3>Closest near-copies (synthetic | nearest real)</h3><table>
<tr><th>synthetic image</th><th>synthetic</th><th>nearest real</th><th>real image</th><th>distance</th></tr>
{% for t in thumbnails %}<tr><td>{{ t.fake_id }}</td><td><img src="data:image/png;base64,{{ t.fake }}" alt=""></td>
<td><img src="data:image/png;base64,{{ t.real }}" alt=""></td><td>{{ t.real_id }}</td><td>{{ t.distance | num }}</td></tr>
{% endfor %}</table>{% endif %}

<h2>Fidelity</h2>
<table><tr><th>measure</th><th>value</th></tr>
<tr><td>Fr&eacute;chet distance (lower is closer)</td><td>{{ r.fidelity.frechet_distance | num }}</td></tr>
<tr><td>precision (synthetic inside the real manifold, k={{ r.fidelity.k }})</td><td>{{ r.fidelity.precision | num }}</td></tr>
<tr><td>recall (real inside the synthetic manifold)</td><td>{{ r.fidelity.recall | num }}</td></tr></table>

<h2>Label fidelity: <code>{{ r.label }}</code></h2>
{% if l.accuracy is defined %}<table><tr><th>measure</th><th>value</th></tr>
<tr><td>accuracy on synthetic images (conditioned label as truth; Wilson 95% CI)</td><td>{{ l.accuracy | num }}
({{ l.accuracy_ci95[0] | num }}&ndash;{{ l.accuracy_ci95[1] | num }})</td></tr>
<tr><td>chance agreement</td><td>{{ l.chance_accuracy | num }}</td></tr>
<tr><td>Cohen's kappa (0 = chance)</td><td>{{ l.kappa | num }}</td></tr>
<tr><td>same classifier on held-out real images</td><td>{{ l.real_heldout_accuracy | num }}</td></tr></table>
<img src="data:image/png;base64,{{ confusion }}" alt="confusion matrix">
{% else %}<p>{{ l.note }}</p>{% endif %}

<h2>Samples</h2><p>{% for t in samples %}<img src="data:image/png;base64,{{ t }}" alt=""> {% endfor %}</p>
<p class="muted">retfm {{ r.retfm_version }}. Definitions: docs/synth.md. Thumbnails of real training images
make this report as confidential as the images.</p>
</body></html>
"""


def write_report(result: dict, real: Manifest, fake: Manifest, out: Path) -> Path:
    m, labels = result["memorisation"], result["label_fidelity"]
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined)
    environment.filters["num"] = lambda v, digits=3: f"{v:.{digits}f}"
    thumbnails = [{"fake_id": str(fake.table["image_id"].iloc[i]), "real_id": str(real.table["image_id"].iloc[j]),
                   "fake": _thumbnail(fake.image_path(i)), "real": _thumbnail(real.image_path(j)), "distance": d}
                  for i, j, d in m["pairs"][: result["config"]["thumbnails"]]]
    html = environment.from_string(TEMPLATE).render(
        css=REPORT_CSS, r=result, m=m, l=labels, histogram=_histogram(m), thumbnails=thumbnails,
        confusion=_confusion_figure(labels) if "confusion" in labels else "",
        samples=[_thumbnail(fake.image_path(i), 64) for i in range(min(16, len(fake.table)))])
    path = out / REPORT_FILENAME
    path.write_text(html, encoding="utf-8")
    return path


def _histogram(m: dict) -> str:
    fig = new_figure(width=5)
    ax = fig.axes[0]
    distances = m["distances"]
    everything = np.concatenate([distances["real_to_real"], distances["synthetic_to_real"]])
    bins = np.linspace(0, everything.max() * 1.05 + 1e-12, 30)
    ax.hist(distances["real_to_real"], bins=bins, alpha=0.6, density=True, label="real to nearest other real")
    ax.hist(distances["synthetic_to_real"], bins=bins, alpha=0.6, density=True, label="synthetic to nearest real")
    ax.axvline(m["threshold"], color="black", linestyle="--", label="near-copy threshold")
    ax.set(xlabel="feature distance", ylabel="density")
    ax.legend()
    return figure_png(fig)


def _confusion_figure(labels: dict) -> str:
    fig = new_figure(width=5)
    ConfusionMatrixDisplay(np.array(labels["confusion"]), display_labels=labels["classes"]).plot(
        ax=fig.axes[0], colorbar=False)
    fig.axes[0].set(xlabel="predicted by the real-image classifier", ylabel="conditioned on")
    return figure_png(fig)


def _thumbnail(path: Path, size: int = 96) -> str:
    with open_image(path.read_bytes()) as image:
        image = image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
