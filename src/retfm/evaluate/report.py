"""``report.html``: one self-contained page (plots inlined as base64 PNG, no external CSS or JS) that reads
offline. It shows aggregates only: no image or patient identifiers."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import jinja2
from markupsafe import Markup
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

from retfm.evaluate.metrics import ECE_BINS, METRICS, outcomes

REPORT_FILENAME = "report.html"
METRIC_NAMES = {
    "auroc": "AUROC", "aupr": "AUPR (average precision)", "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy", "f1_macro": "macro F1", "kappa": "Cohen's kappa",
    "kappa_quadratic": "quadratic-weighted kappa", "mcc": "MCC", "sensitivity": "sensitivity",
    "specificity": "specificity", "ece": f"ECE ({ECE_BINS} bins)",
}

# The look every retfm HTML report shares; each template adds its own classes after it.
REPORT_CSS = Markup("""body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; } figure { margin: 0; } img { max-width: 100%; }
.muted { color: #666; font-size: 0.9em; }""")

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>retfm evaluation: {{ r.label }}</title>
<style>
{{ css }}
</style></head><body>
<h1>Evaluation of <code>{{ r.label }}</code></h1>
<p>{{ r.task }} task, classes {{ r.classes | join(", ") }}. {{ r.n }} images evaluated
{%- if r.n_excluded_null_label %}, {{ r.n_excluded_null_label }} without a label left out{% endif %}.
{% if r.threshold is not none %}Positive class {{ r.classes[1] }} called at probability &ge; {{ r.threshold }}.
{% endif %}
95% confidence intervals: percentile bootstrap over {{ boot.n }} resamples of {{ boot.unit }}s
({{ boot.units }} {{ boot.unit }}s, seed {{ boot.seed }}).</p>
<p class="muted">retfm {{ r.meta.retfm_version }}{% if r.meta.get("predictions_sha256") %}; predictions sha256
{{ r.meta.predictions_sha256 }}{% endif %}</p>

<h2>Metrics</h2>
<table><tr><th>metric</th><th>value</th><th>95% CI</th><th>resamples used</th></tr>
{% for name, m in r.metrics.items() %}<tr><td>{{ names[name] }}</td><td>{{ m.value | num }}</td>
<td>{{ m.ci | ci }}</td><td>{{ m.n_boot }}</td></tr>
{% endfor %}</table>

<h2>Curves, confusion matrix, calibration</h2>
<div class="figures">{% for title, png in figures %}
<figure><img src="data:image/png;base64,{{ png }}" alt="{{ title }}"><figcaption>{{ title }}</figcaption></figure>
{% endfor %}</div>

{% if groups %}<h2>Groups</h2>
<p>Bars: {{ names[main] }} per group with its 95% CI. Best and worst leave out the "unknown" group.</p>
{% for column, png in groups %}<h3>{{ column }}</h3>
<img src="data:image/png;base64,{{ png }}" alt="{{ names[main] }} by {{ column }}">
<table><tr><th>{{ column }}</th><th>n</th>{% for name in metric_keys %}<th>{{ names[name] }}</th>{% endfor %}</tr>
{% for value, g in r.groups[column].items() %}<tr><td>{{ value }}</td><td>{{ g.n }}</td>
{% for name in metric_keys %}<td>{{ g.metrics[name].value | num }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% if r.gaps[column] %}<table><tr><th>metric</th><th>best</th><th>worst</th><th>gap</th></tr>
{% for name, gap in r.gaps[column].items() %}<tr><td>{{ names[name] }}</td><td>{{ gap.best }}</td>
<td>{{ gap.worst }}</td><td>{{ gap.gap | num }}</td></tr>
{% endfor %}</table>{% endif %}
{% endfor %}{% endif %}

<h2>Notes</h2>
{% if r.notes %}<ul>{% for note in r.notes %}<li>{{ note }}</li>{% endfor %}</ul>{% else %}<p>None.</p>{% endif %}
<p class="muted">A metric shown as &ndash; is undefined on those images (a note says why). ECE: top-label
confidence in {{ ece_bins }} equal-width bins. See docs/evaluate.md for every definition.</p>
</body></html>
"""


def write_report(result: dict, table: pd.DataFrame, label: str, out_dir: str | Path) -> Path:
    """Write ``out_dir/report.html`` for ``result`` (from ``evaluate_predictions`` on ``table``)."""
    threshold = 0.5 if result["threshold"] is None else result["threshold"]
    o = outcomes(table, label, result["classes"], result["task"], threshold)
    main = "auroc" if result["metrics"]["auroc"]["value"] is not None else "accuracy"
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    environment.filters["num"] = lambda v: "–" if v is None else f"{v:.3f}"
    environment.filters["ci"] = lambda ci: "–" if ci is None else f"{ci[0]:.3f} – {ci[1]:.3f}"
    html = environment.from_string(TEMPLATE).render(
        css=REPORT_CSS, r=result, boot=result["meta"]["bootstrap"], names=METRIC_NAMES, metric_keys=METRICS, main=main,
        ece_bins=ECE_BINS, figures=_figures(o),
        groups=[(column, _group_bars(result, column, main)) for column in result["groups"]])
    out = Path(out_dir) / REPORT_FILENAME
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out


def _figures(o) -> list[tuple[str, str]]:
    """(title, base64 PNG) for ROC, PR (one-vs-rest per class when multi-class), confusion, reliability."""
    columns = [1] if o.binary else range(len(o.classes))
    roc, pr = new_figure(), new_figure()
    for k in columns:
        positive = o.y == k
        name = f"{o.classes[1]} vs {o.classes[0]}" if o.binary else f"{o.classes[k]} vs rest"
        if positive.any() and not positive.all():  # a curve needs both sides
            RocCurveDisplay.from_predictions(positive, o.probs[:, k], name=name, ax=roc.axes[0])
        if positive.any():
            PrecisionRecallDisplay.from_predictions(positive, o.probs[:, k], name=name, ax=pr.axes[0])
    roc.axes[0].set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)")
    pr.axes[0].set(xlabel="recall (sensitivity)", ylabel="precision")
    confusion = new_figure()
    ConfusionMatrixDisplay.from_predictions(o.y, o.pred, labels=np.arange(len(o.classes)),
                                            display_labels=o.classes, ax=confusion.axes[0], colorbar=False)
    confusion.axes[0].set(xlabel="predicted", ylabel="true")
    reliability = new_figure()
    correct = o.probs.argmax(axis=1) == o.y
    CalibrationDisplay.from_predictions(correct, o.probs.max(axis=1), n_bins=ECE_BINS, name="top label",
                                        ax=reliability.axes[0])
    reliability.axes[0].set(xlabel="confidence (largest class probability)", ylabel="fraction correct")
    return [("ROC curve" + ("" if o.binary else "s, one-vs-rest"), figure_png(roc)),
            ("precision-recall curve" + ("" if o.binary else "s, one-vs-rest"), figure_png(pr)),
            ("confusion matrix (counts)", figure_png(confusion)),
            (f"reliability of the top label ({ECE_BINS} equal-width bins)", figure_png(reliability))]


def _group_bars(result: dict, column: str, main: str) -> str:
    groups = result["groups"][column]
    names = list(groups)
    values = [groups[g]["metrics"][main]["value"] for g in names]
    cis = [groups[g]["metrics"][main]["ci"] for g in names]
    heights = np.array([np.nan if v is None else v for v in values])
    fig = new_figure(width=max(4.0, 0.8 * len(names) + 1.5))
    ax = fig.axes[0]
    x = np.arange(len(names))
    ax.bar(x, np.nan_to_num(heights), color="#4c72b0")
    for i, ci in enumerate(cis):  # the interval itself: a percentile CI need not straddle the estimate
        if ci is not None:
            ax.plot([i, i], ci, color="black", marker="_", markersize=12)
    for i in np.flatnonzero(np.isnan(heights)):
        ax.text(i, 0.02, "n/a", ha="center")
    overall = result["metrics"][main]["value"]
    ax.axhline(overall, color="#c44e52", linestyle="--")
    ax.set_xticks(x, [f"{g}\n(n={groups[g]['n']})" for g in names])
    ax.set(ylabel=METRIC_NAMES[main], ylim=(0, 1.05), title=f"{METRIC_NAMES[main]} by {column} "
                                                             f"(dashed: overall {overall:.3f})")
    return figure_png(fig)


def new_figure(width: float = 4.5) -> Figure:
    fig = Figure(figsize=(width, 4))
    FigureCanvasAgg(fig)  # render with Agg: no display needed
    fig.add_subplot()
    return fig


def figure_png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
