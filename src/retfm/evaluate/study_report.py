"""The study's ``report.html``: label-efficiency curves, the cross-site matrix, per-group fairness and the paired
comparisons, every number read from the cells' results. Self-contained (PNGs inlined), aggregates only."""

from __future__ import annotations

from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup

from retfm.evaluate.metrics import LOWER_IS_BETTER
from retfm.evaluate.report import METRIC_NAMES, REPORT_CSS, REPORT_FILENAME, figure_png, new_figure

UNKNOWN = "unknown"

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>retfm study: {{ c.label }}</title>
<style>
{{ css }}
.failed { color: #b00; }
</style></head><body>
<h1>Study of <code>{{ c.label }}</code></h1>
<p>{{ cells | length }} cells: {{ counts | join(", ") }}. Models {{ models | join(", ") }}; adaptations
{{ c.adaptations | join(", ") }}; label fractions {{ c.label_fractions | join(", ") }}; seeds
{{ c.seeds | join(", ") }}{% if crossed %}; sites crossed ({{ sites | join(", ") }}){% endif %}.
Headline metric: {{ names[main] }} on each cell's test images, 95% bootstrap CIs from the cells.</p>
{% if failed %}<h2 class="failed">Failed cells</h2>
<table><tr><th>cell</th><th>error</th></tr>
{% for row in failed %}<tr><td>{{ row.cell }}</td><td style="text-align:left">{{ row.error }}</td></tr>{% endfor %}
</table>{% endif %}

<h2>Label efficiency</h2>
<p>{{ names[main] }} against the share of training patients kept; one line per model and adaptation, the mean over
seeds, the band the mean of the cells' 95% CIs.{% if crossed %} In-site cells (trained and tested on the same
site).{% endif %}</p>
<div class="figures">{% for title, png in curves %}
<figure><img src="data:image/png;base64,{{ png }}" alt="{{ title }}"><figcaption>{{ title }}</figcaption></figure>
{% endfor %}</div>

{% if matrices %}<h2>Cross-site generalisation</h2>
<p>{{ names[main] }} of a model trained on the row's site and tested on the column's, at label fraction
{{ top_fraction }}, mean over seeds; the diagonal is in-site.</p>
<div class="figures">{% for title, png in matrices %}
<figure><img src="data:image/png;base64,{{ png }}" alt="{{ title }}"><figcaption>{{ title }}</figcaption></figure>
{% endfor %}</div>{% endif %}

{% if fairness is not none %}<h2>Groups</h2>
<p>{{ names[main] }} per group at label fraction {{ top_fraction }}, mean over seeds; the gap is the distance to the
best known group of the same cell and column ("unknown" is never the best).</p>
{{ fairness }}{% endif %}

<h2>Paired comparisons</h2>
{% if comparisons is not none %}<p>AUROC of A minus AUROC of B on the same test images (same fraction, seed and
sites). CI and p (bootstrap): paired bootstrap over patients, both models scored on each resample. p (DeLong):
DeLong's test, binary tasks only. Rows marked over_seeds compare the mean AUROC of A's seeds with B's, resampling
patients and seeds, so their interval holds the run-to-run spread too: read these before any single seed's.</p>
{{ comparisons }}{% else %}<p>None: fewer than two models or adaptations finished on the same test images.</p>{% endif %}

<h2>Cells</h2>
{{ cell_table }}
<p class="muted">Every number on this page comes from results.csv, comparisons.csv and cells.csv beside it.</p>
</body></html>
"""


def write_study_report(config, cells: pd.DataFrame, results: pd.DataFrame, comparisons: pd.DataFrame,
                       out: str | Path) -> Path:
    overall = results[results["group_column"].isna()]
    main = ("auroc" if overall.loc[overall["metric"] == "auroc", "value"].notna().any() else "accuracy")
    crossed = bool(config.sites and config.sites.cross)
    top_fraction = max(config.label_fractions)
    headline = overall[overall["metric"] == main]
    groups = results[results["group_column"].notna() & (results["metric"] == main)
                     & (results["label_fraction"] == top_fraction)]
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = environment.from_string(TEMPLATE).render(
        css=REPORT_CSS, c=config, cells=cells, names=METRIC_NAMES, main=main, crossed=crossed, top_fraction=top_fraction,
        counts=[f"{n} {status}" for status, n in cells["status"].value_counts().sort_index().items()],
        models=[m.name for m in config.models], sites=sorted(set(cells["train_site"])),
        failed=cells[cells["status"] == "failed"].to_dict("records"),
        curves=_curves(headline, main),
        matrices=_matrices(headline[headline["label_fraction"] == top_fraction], main) if crossed else [],
        fairness=_html_table(_fairness(groups, main)),
        comparisons=_html_table(comparisons.drop(columns=["metric"]).dropna(axis=1, how="all")),
        cell_table=_html_table(cells.drop(columns=["error"])))
    path = Path(out) / REPORT_FILENAME
    path.write_text(html, encoding="utf-8")
    return path


def _arms(table: pd.DataFrame) -> list[tuple[str, str]]:
    """(model, adaptation) pairs in the order they first appear."""
    return list(dict.fromkeys(zip(table["model"], table["adaptation"])))


def _curves(headline: pd.DataFrame, main: str) -> list[tuple[str, str]]:
    in_site = headline[headline["train_site"] == headline["test_site"]]
    figures = []
    for site, rows in in_site.groupby("train_site", sort=True):
        fig = new_figure(width=5.5)
        ax = fig.axes[0]
        for model, adaptation in _arms(rows):
            arm = rows[(rows["model"] == model) & (rows["adaptation"] == adaptation)]
            mean = arm.groupby("label_fraction")[["value", "ci_low", "ci_high"]].mean().sort_index()
            line, = ax.plot(mean.index, mean["value"], marker="o", label=f"{model} / {adaptation}")
            ax.fill_between(mean.index, mean["ci_low"], mean["ci_high"], color=line.get_color(), alpha=0.15)
        ax.set(xlabel="label fraction (share of training patients)", ylabel=METRIC_NAMES[main],
               title=f"trained and tested on {site}" if site != "all" else "all sites")
        ax.legend(fontsize="small")
        figures.append((f"{METRIC_NAMES[main]} against label fraction, {site}", figure_png(fig)))
    return figures


def _matrices(headline: pd.DataFrame, main: str) -> list[tuple[str, str]]:
    figures = []
    for model, adaptation in _arms(headline):
        arm = headline[(headline["model"] == model) & (headline["adaptation"] == adaptation)]
        matrix = arm.pivot_table(index="train_site", columns="test_site", values="value", aggfunc="mean",
                                 dropna=False)
        sites = sorted(set(matrix.index) | set(matrix.columns))
        matrix = matrix.reindex(index=sites, columns=sites)
        fig = new_figure(width=1.2 * len(sites) + 2.5)
        ax = fig.axes[0]
        image = ax.imshow(matrix.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis")
        for (i, j), value in np.ndenumerate(matrix.to_numpy(dtype=float)):
            ax.text(j, i, "–" if np.isnan(value) else f"{value:.3f}", ha="center", va="center",
                    color="white" if not np.isnan(value) and value < 0.6 else "black")
        ax.set_xticks(range(len(sites)), sites)
        ax.set_yticks(range(len(sites)), sites)
        ax.set(xlabel="test site", ylabel="train site", title=f"{model} / {adaptation}")
        fig.colorbar(image, ax=ax, label=METRIC_NAMES[main])
        figures.append((f"{METRIC_NAMES[main]}, train site x test site: {model} / {adaptation}", figure_png(fig)))
    return figures


def _fairness(groups: pd.DataFrame, main: str) -> pd.DataFrame:
    """Per cell arm, sites and group value: the mean over seeds, n, and the gap to the best known group."""
    keys = ["model", "adaptation", "train_site", "test_site", "group_column"]
    table = (groups.groupby([*keys, "group_value"], sort=False, dropna=False)
             .agg(n=("n", "max"), value=("value", "mean")).reset_index())
    known = table[table["group_value"] != UNKNOWN]
    pick = "min" if main in LOWER_IS_BETTER else "max"
    best = known.groupby(keys, sort=False, dropna=False)["value"].agg(pick).rename("best").reset_index()
    table = table.merge(best, on=keys, how="left")
    table["gap_to_best"] = (table["value"] - table["best"]).abs()
    return table.drop(columns=["best"]).rename(columns={"value": main})


def _html_table(table: pd.DataFrame) -> str | None:
    if table.empty:
        return None
    # 3 significant digits: metrics read 0.812, small p-values 2.1e-07 rather than 0.000
    return Markup(table.to_html(index=False, float_format=lambda v: f"{v:.3g}", na_rep="–", border=0, escape=True))
