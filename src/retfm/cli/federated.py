"""``retfm federated``: training across sites where only weights and aggregate metrics travel."""

from __future__ import annotations

from pathlib import Path

import typer

from retfm.cli.common import SetOption, stdout

app = typer.Typer(help="Federated pretraining across sites with Flower: only weights and aggregate metrics travel.",
                  no_args_is_help=True)


@app.command()
def run(
    config: Path = typer.Argument(..., help="YAML config: sites (or one manifest with a site column), pretrain "
                                            "options, rounds, local_steps, strategy, evaluate_label"),
    out: Path = typer.Option(..., "--out", help="run folder: checkpoint.pt, model.safetensors + card, report.json/md"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out after its last finished round"),
    sets: list[str] = typer.Option(None, "--set", help=SetOption),
) -> None:
    """Simulate a whole federation on this machine (Flower's simulation engine, one Ray worker per site)."""
    from retfm.config import FederatedConfig, load_config
    from retfm.federated.simulation import MODEL_FILENAME, simulate

    cfg = load_config(FederatedConfig, config, None, sets)
    report = simulate(cfg, out, resume=resume)
    last = report["rounds"][-1] if report["rounds"] else {}
    stdout.print(f"federated {report['objective']}: {report['rounds_done']} round(s) over {len(report['sites'])} "
                 f"sites ({report['strategy']}); last round aggregated {last.get('aggregated_sites', 0)} site(s), "
                 f"rejected {len(last.get('rejected', []))}; backbone: {out / MODEL_FILENAME}; "
                 f"report: {out / 'report.md'}"
                 + (f"; DP (epsilon, delta) = ({report['dp']['epsilon']:.3g}, {report['dp']['delta']:g})"
                    if report["dp"] else ""), highlight=False)
