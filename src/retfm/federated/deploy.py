"""A retfm federation on Flower's deployment engine: one ``flower-superlink`` at the coordinator, one
``flower-supernode`` per site, the run started with ``flwr run`` (steps in docs/federated.md).

:data:`server` and :data:`client` are the Flower App's components: the same coordinator loop
(:func:`~retfm.federated.apps.coordinate`, then :func:`~retfm.federated.simulation.finish`) and the same site
(:func:`~retfm.federated.apps.site_app`) as ``retfm federated run``, configured from Flower's run and node configs
instead of one YAML holding every site:

- run config (the app's ``[tool.flwr.app.config]``, written by :func:`write_app`; every node of the run sees it):
  ``federation``, the retfm federated config as YAML text without ``data`` / ``sites``; ``sites``, how many
  SuperNodes take part; ``out``, the coordinator's run folder; ``resume``.
- node config of a SuperNode (``flower-supernode --node-config 'site="site1" data="/data/ingest"'``): ``site``, its
  name; ``data``, its ingest folder or manifest; ``rows`` (optional), the manifest's ``site`` value of its rows. The
  path stays in the site's own process: only the site's name travels, in its replies.
"""

from __future__ import annotations

import json
from pathlib import Path

import tomli_w
import yaml
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from retfm.errors import RetfmError
from retfm.federated.apps import coordinate, site_app
from retfm.federated.config import FederatedConfig
from retfm.federated.credentials import CA_CERT, SERVER_CERT, SERVER_KEY
from retfm.federated.simulation import finish, open_run
from retfm.federated.task import Site

COMPONENTS = {"serverapp": f"{__name__}:server", "clientapp": f"{__name__}:client"}


def federation_config(context: Context) -> FederatedConfig:
    """The run's federated config, from the run config's ``federation`` YAML text."""
    return FederatedConfig.model_validate(yaml.safe_load(str(context.run_config["federation"])))


def node_site(context: Context) -> tuple[Site, FederatedConfig]:
    """A SuperNode's site (from its node config) and the run's federated config."""
    node = context.node_config
    if "site" not in node or "data" not in node:
        raise RetfmError("this SuperNode has no site: start it with "
                         "--node-config 'site=\"NAME\" data=\"/path/to/ingest\"'")
    site = Site(str(node["site"]), str(node["data"]), str(node["rows"]) if "rows" in node else None)
    return site, federation_config(context)


client = site_app(node_site)
server = ServerApp()


@server.main()
def _coordinator(grid: Grid, context: Context) -> None:
    config = federation_config(context)
    resume = bool(context.run_config["resume"])
    out = open_run(config, Path(str(context.run_config["out"])), resume)
    saved = coordinate(grid, config, int(context.run_config["sites"]), out, resume)
    # the coordinator knows its sites by the names they reply with
    names = sorted({name for entry in saved["history"] for part in ("train", "evaluate")
                    for name in entry.get(part, {})})
    finish(config, names, out)


def write_app(folder: Path, config: FederatedConfig, sites: int, out: Path) -> Path:
    """Write the Flower App that ``flwr run FOLDER CONNECTION`` starts: a pyproject.toml whose components are
    :data:`server` / :data:`client` and whose run config is ``config`` (without ``data`` / ``sites``: in a
    deployment a site's data is its SuperNode's; nor the simulation's ``cpus_per_site``), ``sites`` and the
    coordinator's absolute run folder ``out``."""
    if sites < 2:
        raise RetfmError(f"a federation needs at least two sites, not {sites}")
    federation = config.model_dump(mode="json", exclude={"data", "sites", "cpus_per_site"})
    project = {
        "project": {"name": "retfm-federation", "version": "1.0.0", "license": "Apache-2.0",
                    "description": "a retfm federation (retfm must be installed at the coordinator and every "
                                   "site)", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "retfm", "components": COMPONENTS,
            "config": {"federation": yaml.safe_dump(federation, sort_keys=False), "sites": sites,
                       "out": str(Path(out).resolve()), "resume": False}}}}}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pyproject.toml"
    path.write_text("# A Flower App written by `retfm federated app`; start it with `flwr run <this folder> "
                    "<connection>`.\n# Override a run-config value with e.g. --run-config 'resume=true'.\n\n"
                    + tomli_w.dumps(project, multiline_strings=True))
    return path


def superlink_command(credentials: Path, host: str = "0.0.0.0", port: int = 8000) -> list[str]:
    """The coordinator's ``flower-superlink``: TLS with the certificate from ``retfm federated certs``, SuperNode
    authentication on, its ServerApp run in a subprocess with retfm as installed (no runtime ``uv sync``)."""
    credentials = Path(credentials).resolve()
    return ["flower-superlink", "--ssl-ca-certfile", str(credentials / CA_CERT),
            "--ssl-certfile", str(credentials / SERVER_CERT), "--ssl-keyfile", str(credentials / SERVER_KEY),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", host, "--port", str(port)]


def supernode_command(superlink: str, ca: Path, key: Path, site: Site, port: int | None = None) -> list[str]:
    """A site's ``flower-supernode``: it reaches ``superlink`` (host:port) over TLS, trusting ``ca``, signs its
    requests with its private ``key`` and serves ``site`` (name, data, rows) from its node config. ``port``: its
    local Runtime API port (default 9094; two SuperNodes on one machine need two)."""
    values = {"site": site.name, "data": site.data, **({"rows": site.rows} if site.rows is not None else {})}
    if any('"' in value for value in values.values()):
        raise RetfmError(f"site {site.name}: a site name, data path or rows value cannot hold a double quote")
    # each value a TOML string, which is what Flower parses a node config's values as
    node_config = " ".join(f"{name}={json.dumps(value)}" for name, value in values.items())
    command = ["flower-supernode", "--superlink", superlink, "--root-certificates", str(Path(ca).resolve()),
               "--auth-supernode-private-key", str(Path(key).resolve()), "--node-config", node_config]
    return command + (["--port", str(port)] if port is not None else [])

