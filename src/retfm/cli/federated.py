"""``retfm federated``: training across sites where only weights and aggregate metrics travel."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from retfm.cli.common import SetOption, stdout

app = typer.Typer(help="Federated pretraining and fine-tuning across sites with Flower: only weights and aggregate "
                       "metrics travel.",
                  no_args_is_help=True)


@app.command()
def run(
    config: Path = typer.Argument(..., help="YAML config: sites (or one manifest with a site column), task and its "
                                            "pretrain, finetune or synth options, rounds, local_steps, strategy, "
                                            "evaluate_label"),
    out: Path = typer.Option(..., "--out", help="run folder: checkpoint.pt, model.safetensors + card (the backbone, or "
                                                "the classifier; task synth: a generator folder), report.json/md"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out after its last finished round"),
    sets: list[str] = typer.Option(None, "--set", help=SetOption),
) -> None:
    """Simulate a whole federation on this machine (Flower's simulation engine, one Ray worker per site)."""
    from retfm.config import load_config
    from retfm.federated.config import FederatedConfig
    from retfm.federated.simulation import MODEL_FILENAME, simulate

    cfg = load_config(FederatedConfig, config, None, sets)
    report = simulate(cfg, out, resume=resume)
    last = report["rounds"][-1] if report["rounds"] else {}
    result = {"pretrain": f"backbone: {out / MODEL_FILENAME}", "finetune": f"classifier: {out / MODEL_FILENAME}",
              "synth": f"generator: {out} (retfm synth sample --generator {out})"}[report["task"]]
    stdout.print(f"federated {report['objective']}: {report['rounds_done']} round(s) over {len(report['sites'])} "
                 f"sites ({report['strategy']}); last round aggregated {last.get('aggregated_sites', 0)} site(s), "
                 f"rejected {len(last.get('rejected', []))}; {result}; report: {out / 'report.md'}"
                 + (f"; DP (epsilon, delta) = ({report['dp']['epsilon']:.3g}, {report['dp']['delta']:g})"
                    if report["dp"] else ""), highlight=False)


@app.command()
def certs(
    out: Path = typer.Option(..., "--out", help="new folder for ca.crt/ca.key, superlink.crt/.key, siteN.key/.pub"),
    hosts: list[str] = typer.Option(..., "--host", help="the SuperLink's address as sites reach it: an IP address "
                                                        "or DNS name (repeatable; 127.0.0.1 is always added)"),
    sites: int = typer.Option(2, "--sites", min=0, help="SuperNode authentication key pairs to make: site1..siteN"),
    days: int = typer.Option(365, "--days", min=1, help="validity of the certificates"),
) -> None:
    """Make a deployment's credentials: a CA, the SuperLink's TLS certificate, one SuperNode key pair per site."""
    from retfm.federated.credentials import CA_CERT, make_credentials, site_key_files
    from retfm.federated.deploy import superlink_command

    names = [f"site{i}" for i in range(1, sites + 1)]
    make_credentials(out, hosts, names, days)
    lines = [f"credentials in {out}: private keys (*.key) readable by you only; keep ca.key offline",
             "coordinator:", "  " + shlex.join(superlink_command(out))]
    if names:
        lines += ["once it runs, register each site's public key:"]
        lines += [f"  flwr supernode register {site_key_files(out, name)[1]} <connection> --name {name}"
                  for name in names]
        lines += [f"give each site {out / CA_CERT} and its own private key ({site_key_files(out, names[0])[0]}, ...)"]
    stdout.print("\n".join(lines), highlight=False, soft_wrap=True)


@app.command("app")
def flower_app(
    config: Path = typer.Argument(..., help="YAML config as for `retfm federated run`; data/sites are left out "
                                            "(each SuperNode names its own data)"),
    out: Path = typer.Option(..., "--out", help="folder of the Flower App (its pyproject.toml)"),
    sites: int = typer.Option(..., "--sites", help="SuperNodes taking part; the coordinator waits for all of them"),
    run_folder: Path = typer.Option(..., "--run-folder", help="the coordinator's run folder: checkpoint.pt, "
                                                              "model.safetensors + card, report.json/md"),
    sets: list[str] = typer.Option(None, "--set", help=SetOption),
) -> None:
    """Write the Flower App that `flwr run` starts on a deployment (SuperLink + one SuperNode per site)."""
    from retfm.config import load_config
    from retfm.federated.config import FederatedConfig
    from retfm.federated.deploy import write_app

    path = write_app(out, load_config(FederatedConfig, config, None, sets), sites, run_folder)
    stdout.print(f"Flower App: {path}\nstart it with: flwr run {out} <connection> --stream", highlight=False,
                 soft_wrap=True)


@app.command("site-config")
def site_config(
    superlink: str = typer.Option(..., "--superlink", help="the SuperLink's address, host:port"),
    site: str = typer.Option(..., "--site", help="this site's name, as the coordinator's report shows it"),
    data: Path = typer.Option(..., "--data", help="this site's ingest folder or manifest (stays at the site)"),
    ca: Path = typer.Option(..., "--ca", help="the federation's CA certificate (ca.crt)"),
    key: Path = typer.Option(..., "--key", help="this site's SuperNode private key (siteN.key)"),
    rows: str = typer.Option(None, "--rows", help="only the manifest's rows with this site value"),
    port: int = typer.Option(None, "--port", help="the SuperNode's local Runtime API port (default 9094)"),
) -> None:
    """Check a site's files and print its exact `flower-supernode` command."""
    from retfm.data.manifest import Manifest
    from retfm.errors import RetfmError
    from retfm.federated.credentials import check_ca, check_site_key
    from retfm.federated.deploy import supernode_command
    from retfm.federated.task import Site

    check_ca(ca)
    check_site_key(key)
    table = Manifest.read(str(data)).table
    if rows is not None:
        table = table[table["site"].astype(str) == rows]
    if table.empty:
        raise RetfmError(f"{data}: no images{'' if rows is None else f' with site {rows!r}'}")
    stdout.print(shlex.join(supernode_command(superlink, ca, key, Site(site, str(data.resolve()), rows), port)),
                 highlight=False, soft_wrap=True)
