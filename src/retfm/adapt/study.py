"""``retfm study``: a grid of fine-tuning runs (models x adaptations x label fractions x seeds x sites), each run
cached in its own folder, gathered into one tidy table, paired comparisons and one report.

A *cell* is one ``finetune`` run in ``OUT/cells/<key>/``; the key is a readable slug plus the first 8 hex digits
of the sha256 of the cell's resolved FinetuneConfig, so changing any option makes a new cell and leaves the
old one alone. A cell whose ``metrics.json`` exists is read, not rerun; one with a ``checkpoint.pt`` but no
metrics resumes from its last whole epoch; a cell that fails is recorded with its error and the grid goes on.

Outputs in OUT: ``study_config.yaml`` (resolved), ``cells.csv`` (every cell: status, seconds, error),
``results.parquet`` + ``results.csv`` (one row per cell x metric, overall and per group), ``comparisons.parquet``
+ ``comparisons.csv`` (paired AUROC tests per seed, and over the seeds where there are several) and ``report.html``.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pydantic import ValidationError

from retfm.adapt.config import FinetuneConfig, StudyConfig
from retfm.adapt.finetune import finetune
from retfm.config import save_config
from retfm.data.manifest import Manifest
from retfm.errors import RetfmError
from retfm.evaluate import PREDICTIONS_FILENAME
from retfm.evaluate.compare import compare_predictions, compare_repeated
from retfm.evaluate.study_report import write_study_report
from retfm.runs import CHECKPOINT_FILENAME, read_json

ALL_SITES = "all"  # train_site / test_site of a study whose sites are not crossed
CELL_COLUMNS = ["cell", "model", "adaptation", "label_fraction", "seed", "train_site", "test_site"]
RESULT_COLUMNS = [*CELL_COLUMNS, "group_column", "group_value", "metric", "value", "ci_low", "ci_high", "n"]
# cells that see the same test images, so their models can be compared pair by pair
PAIRING = ["label_fraction", "seed", "train_site", "test_site"]


@dataclass(frozen=True)
class Cell:
    key: str
    model: str  # the study's display name
    adaptation: str
    label_fraction: float
    seed: int
    train_site: str
    test_site: str
    config: FinetuneConfig

    def row(self) -> dict:
        return {"cell": self.key, "model": self.model, "adaptation": self.adaptation,
                "label_fraction": self.label_fraction, "seed": self.seed, "train_site": self.train_site,
                "test_site": self.test_site}


def plan_cells(config: StudyConfig) -> list[Cell]:
    """Every cell of the grid, in a stable order (model, adaptation, fraction, seed, train site, test site)."""
    if config.sites and config.sites.cross:
        sites = config.sites.names or _labelled_sites(config)
        site_pairs = list(itertools.product(sites, sites))
    else:
        site_pairs = [(ALL_SITES, ALL_SITES)]
    cells = []
    for model, adaptation, fraction, seed, (train, test) in itertools.product(
            config.models, config.adaptations, config.label_fractions, config.seeds, site_pairs):
        crossed = train != ALL_SITES
        options = {**config.finetune, "data": config.data, "label": config.label, "by": config.by,
                   "model": model.model, "weights": model.weights, "adaptation": adaptation,
                   "label_fraction": fraction, "seed": seed,
                   "train_sites": [train] if crossed else None, "test_sites": [test] if crossed else None}
        try:
            resolved = FinetuneConfig.model_validate(options)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise RetfmError(f"study option finetune.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        slug = f"{model.name}-{adaptation}-f{fraction:g}-s{seed}" + (f"-{train}-to-{test}" if crossed else "")
        digest = hashlib.sha256(resolved.model_dump_json().encode()).hexdigest()[:8]
        key = re.sub(r"[^a-z0-9.]+", "-", slug.lower()).strip("-") + "-" + digest
        cells.append(Cell(key, model.name, adaptation, fraction, seed, train, test, resolved))
    return cells


def _labelled_sites(config: StudyConfig) -> list[str]:
    table = Manifest.read(config.data).table
    if config.label not in table:
        raise RetfmError(f"{config.data}: no label column {config.label!r}")
    return sorted(table.loc[table[config.label].notna(), "site"].astype(str).unique())


def run_study(config: StudyConfig, out: Path, progress: Callable[[int], None] | None = None,
              total: Callable[[int], None] | None = None,
              on_cell: Callable[[Cell, str, str | None], None] | None = None) -> dict:
    """Run (or read back) every cell, then write the tables and the report. Returns ``cells``, ``results`` and
    ``comparisons`` as DataFrames. ``on_cell(cell, status, error)`` is called after each cell."""
    out = Path(out)
    cells = plan_cells(config)
    save_config(config, out / "study_config.yaml")
    if total:
        total(len(cells))
    statuses = []
    for cell in cells:
        status, seconds, error = _run_cell(cell, out / "cells" / cell.key)
        statuses.append({**cell.row(), "status": status, "seconds": round(seconds, 2), "error": error})
        if on_cell:
            on_cell(cell, status, error)
        if progress:
            progress(1)
    cell_table = pd.DataFrame(statuses)
    cell_table.to_csv(out / "cells.csv", index=False)
    done = [cell for cell, status in zip(cells, statuses) if status["status"] != "failed"]
    results = results_table(done, out)
    _write_table(results, out / "results")
    comparisons = compare_cells(done, out, config.label, config.compare_bootstrap)
    _write_table(comparisons, out / "comparisons")
    write_study_report(config, cell_table, results, comparisons, out)
    return {"cells": cell_table, "results": results, "comparisons": comparisons}


def _run_cell(cell: Cell, folder: Path) -> tuple[str, float, str | None]:
    """(status, seconds, error): cached when its metrics exist, resumed from a checkpoint, ran, or failed."""
    if (folder / "metrics.json").is_file():
        return "cached", 0.0, None
    resume = (folder / CHECKPOINT_FILENAME).is_file()
    started = time.perf_counter()
    try:
        finetune(cell.config, folder, resume=resume)
    except Exception as exc:  # one failed cell must not stop the grid; its error is reported with the results
        message = str(exc).splitlines()[0] if str(exc) else ""
        return "failed", time.perf_counter() - started, f"{type(exc).__name__}: {message}"
    return "resumed" if resume else "ran", time.perf_counter() - started, None


def results_table(cells: list[Cell], out: Path) -> pd.DataFrame:
    """One row per cell x metric: overall (no group) and per group value, read from each cell's metrics.json."""
    rows = []
    for cell in cells:
        result = read_json(out / "cells" / cell.key / "metrics.json")
        scopes = [(None, None, result["n"], result["metrics"])]
        scopes += [(column, value, group["n"], group["metrics"])
                   for column, groups in result["groups"].items() for value, group in groups.items()]
        for column, value, n, metrics in scopes:
            for name, metric in metrics.items():
                ci = metric.get("ci") or [None, None]
                rows.append({**cell.row(), "group_column": column, "group_value": value, "metric": name,
                             "value": metric["value"], "ci_low": ci[0], "ci_high": ci[1], "n": n})
    table = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    return table.astype({"value": float, "ci_low": float, "ci_high": float})


def compare_cells(cells: list[Cell], out: Path, label: str, n_boot: int) -> pd.DataFrame:
    """Paired AUROC comparisons between every two model/adaptation pairs of cells that share fraction, seed and
    sites (so the same test images); and, where either pair ran under two seeds or more, one row over the seeds
    (``seed`` empty, ``over_seeds``): the mean AUROC of A's seeds less B's, patients and seeds resampled."""
    rows = []
    same_images: dict[tuple, list[Cell]] = {}
    for cell in cells:
        same_images.setdefault(tuple(cell.row()[c] for c in PAIRING), []).append(cell)
    for group in same_images.values():
        for a, b in itertools.combinations(group, 2):
            rows.append(_compared(a, b, compare_predictions, _predictions(out, a), _predictions(out, b), label,
                                  n_boot, seed=a.seed))
    seeded: dict[tuple, dict[tuple, list[Cell]]] = {}
    for cell in cells:
        setting = tuple(cell.row()[c] for c in PAIRING if c != "seed")
        seeded.setdefault(setting, {}).setdefault((cell.model, cell.adaptation), []).append(cell)
    for arms in seeded.values():
        for runs_a, runs_b in itertools.combinations(arms.values(), 2):
            if max(len(runs_a), len(runs_b)) > 1:
                rows.append(_compared(runs_a[0], runs_b[0], compare_repeated,
                                      [_predictions(out, c) for c in runs_a], [_predictions(out, c) for c in runs_b],
                                      label, n_boot, seed=0) | {"seed": None, "over_seeds": True})
    columns = [*PAIRING, "over_seeds", "model_a", "adaptation_a", "model_b", "adaptation_b", "metric", "n", "value_a",
               "value_b", "difference", "ci_low", "ci_high", "p_bootstrap", "n_boot", "p_delong", "se_delong", "error"]
    table = pd.DataFrame(rows).reindex(columns=columns)
    return table.astype({"seed": "Int64", "over_seeds": bool})


def _predictions(out: Path, cell: Cell) -> Path:
    return out / "cells" / cell.key / PREDICTIONS_FILENAME


def _compared(a: Cell, b: Cell, compare, paths_a, paths_b, label: str, n_boot: int, seed: int) -> dict:
    """One comparison row of arm ``a`` against arm ``b``; a comparison that cannot be made is reported, not fatal."""
    row = {**{c: a.row()[c] for c in PAIRING}, "over_seeds": False, "model_a": a.model,
           "adaptation_a": a.adaptation, "model_b": b.model, "adaptation_b": b.adaptation}
    try:
        row.update(compare(paths_a, paths_b, label, n_boot, seed=seed))
    except (RetfmError, ValueError) as exc:
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return row


def _write_table(table: pd.DataFrame, stem: Path) -> None:
    table.to_parquet(stem.with_suffix(".parquet"), index=False)
    table.to_csv(stem.with_suffix(".csv"), index=False)
