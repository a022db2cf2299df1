"""The deployment engine: the helpers (credentials, the Flower App, a site's command line), then end to end on
127.0.0.1: a SuperLink with TLS and SuperNode authentication, two authenticated SuperNodes (one per phantom site),
the run started with `flwr run`, and SuperNodes that must not get in. Every Flower process runs with its own FLWR_HOME
under tmp_path and is killed (its process group) at the end."""

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from flwr.cli.config_utils import load_and_validate
from typer.testing import CliRunner

from retfm.cli.main import app as cli
from retfm.data.config import IngestConfig
from retfm.data.ingest import ingest
from retfm.data.phantoms import generate_cohort
from retfm.federated.config import FederatedConfig
from retfm.federated.credentials import CA_CERT, make_credentials, site_key_files
from retfm.federated.deploy import superlink_command, supernode_command, write_app
from retfm.federated.task import Site, initial_weights
from retfm.models import create

PRETRAIN = {"objective": "token-reconstruction", "model": "tiny-vit", "batch_size": 4, "workers": 0, "blr": 0.05,
            "warmup_steps": 0}
SRC = Path(__file__).resolve().parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Processes:
    """Flower's processes, each in its own session (process group), its own FLWR_HOME and log file."""

    def __init__(self, root: Path):
        self.root, self.started = root, []
        bin_dir = str(Path(sys.executable).parent)  # flower-superlink & co., and what they start in turn
        self.env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "HOME": str(root),
                    "PYTHONPATH": os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]),
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1"}

    def home(self, name: str) -> dict:
        (self.root / name).mkdir(exist_ok=True)
        return {**self.env, "FLWR_HOME": str(self.root / name)}

    def start(self, command: list[str], name: str) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("w")
        process = subprocess.Popen(command, env=self.home(name), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.started.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def stop(self) -> None:
        for process in self.started:
            _signal_group(process, signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture
def processes(tmp_path):
    started = Processes(tmp_path / "flower")
    (tmp_path / "flower").mkdir()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    generate_cohort(root / "raw", sites=2, per_site=12, size=96, seed=0)
    ingest(root / "raw", root / "ds", IngestConfig(size=64, workers=1))
    return root / "ds"


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "flower-superlink exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port}")


def _flwr(processes: Processes, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["flwr", *args], env=processes.home("cli"), capture_output=True, text=True, timeout=timeout)


def test_the_helpers_write_credentials_an_app_flwr_accepts_and_a_site_command(cohort, tmp_path):
    runner = CliRunner()
    made = runner.invoke(cli, ["federated", "certs", "--out", str(tmp_path / "c"), "--host", "link.example.org",
                               "--sites", "2"])
    assert made.exit_code == 0, made.output
    assert "flower-superlink --ssl-ca-certfile" in made.output and "--enable-supernode-auth" in made.output
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "ca.crt", "ca.key", "site1.key", "site1.pub", "site2.key", "site2.pub", "superlink.crt", "superlink.key"]
    assert {p.name for p in (tmp_path / "c").iterdir() if p.stat().st_mode & 0o077 == 0} >= {
        "ca.key", "superlink.key", "site1.key", "site2.key"}
    again = runner.invoke(cli, ["federated", "certs", "--out", str(tmp_path / "c"), "--host", "127.0.0.1"])
    assert again.exit_code != 0 and "would overwrite" in str(again.exception or again.output)

    config = tmp_path / "federated.yaml"
    config.write_text(yaml.safe_dump({"data": str(cohort), "pretrain": PRETRAIN, "rounds": 4}))
    wrote = runner.invoke(cli, ["federated", "app", str(config), "--out", str(tmp_path / "app"), "--sites", "3",
                                "--run-folder", str(tmp_path / "run")])
    assert wrote.exit_code == 0, wrote.output
    project, _ = load_and_validate(tmp_path / "app" / "pyproject.toml")  # flwr's own check, modules too
    run_config = project["tool"]["flwr"]["app"]["config"]
    assert run_config["sites"] == 3 and run_config["out"] == str(tmp_path / "run") and not run_config["resume"]
    federation = FederatedConfig.model_validate(yaml.safe_load(run_config["federation"]))
    assert federation.rounds == 4 and federation.data is None and str(cohort) not in run_config["federation"]

    site = runner.invoke(cli, ["federated", "site-config", "--superlink", "link.example.org:8000", "--site", "site2",
                               "--data", str(cohort), "--rows", "site2", "--ca", str(tmp_path / "c" / "ca.crt"),
                               "--key", str(tmp_path / "c" / "site2.key")])
    assert site.exit_code == 0, site.output
    assert site.output.strip() == (
        f"flower-supernode --superlink link.example.org:8000 --root-certificates {tmp_path / 'c' / 'ca.crt'} "
        f"--auth-supernode-private-key {tmp_path / 'c' / 'site2.key'} "
        f"--node-config 'site=\"site2\" data=\"{cohort}\" rows=\"site2\"'")
    wrong_key = runner.invoke(cli, ["federated", "site-config", "--superlink", "l:8000", "--site", "s", "--data",
                                    str(cohort), "--ca", str(tmp_path / "c" / "ca.crt"),
                                    "--key", str(tmp_path / "c" / "site2.pub")])
    assert wrong_key.exit_code != 0


def test_superlink_and_two_supernodes_train_with_tls_and_node_authentication(cohort, tmp_path, processes):
    credentials = tmp_path / "credentials"
    make_credentials(credentials, ["127.0.0.1"], ["site1", "site2", "unregistered"])
    assert all((credentials / name).stat().st_mode & 0o777 == 0o600
               for name in ("ca.key", "superlink.key", "site1.key", "unregistered.key"))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    superlink = processes.start(superlink_command(credentials, "127.0.0.1", port), "superlink")
    _wait_for_port(port, superlink)

    # The SuperLink speaks TLS with a certificate of our CA for 127.0.0.1; a client trusting another CA fails.
    other = tmp_path / "other-ca"
    make_credentials(other, ["127.0.0.1"], [])
    for ca, trusted in ((credentials / CA_CERT, True), (other / CA_CERT, False)):
        context = ssl.create_default_context(cafile=str(ca))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1"):
                handshake = True
        except ssl.SSLCertVerificationError:
            handshake = False
        assert handshake is trusted

    # The coordinator registers the two sites' public keys through the flwr CLI (its connection in its FLWR_HOME).
    (Path(processes.home("cli")["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "retfm"\n\n[superlink.retfm]\naddress = "{address}"\n'
        f'root-certificates = "{credentials / CA_CERT}"\n')
    for name in ("site1", "site2"):
        registered = _flwr(processes, "supernode", "register", str(site_key_files(credentials, name)[1]), "retfm",
                           "--name", name)
        assert registered.returncode == 0, registered.stdout + registered.stderr

    for name in ("site1", "site2"):
        processes.start(supernode_command(address, credentials / CA_CERT, site_key_files(credentials, name)[0],
                                          Site(name, str(cohort), rows=name), port=_free_port()), name)
    # Two SuperNodes that must not get in: one signing with a key nobody registered, one with no key at all (it
    # tries to register itself, which --enable-supernode-auth forbids).
    unregistered = processes.start(supernode_command(
        address, credentials / CA_CERT, site_key_files(credentials, "unregistered")[0],
        Site("site1", str(cohort), rows="site1"), port=_free_port()), "unregistered")
    keyless_command = supernode_command(address, credentials / CA_CERT, credentials / "site1.key",
                                        Site("site1", str(cohort), rows="site1"), port=_free_port())
    at = keyless_command.index("--auth-supernode-private-key")
    keyless = processes.start(keyless_command[:at] + keyless_command[at + 2:], "keyless")

    config = FederatedConfig(pretrain=PRETRAIN, rounds=1, local_steps=1)
    app = write_app(tmp_path / "app", config, sites=2, out=tmp_path / "run").parent
    run = _flwr(processes, "run", str(app), "retfm", "--stream", timeout=300)  # returns when the run has finished
    assert run.returncode == 0, run.stdout + run.stderr
    run_id = next(line.split()[-1] for line in run.stdout.splitlines() if "Successfully started run" in line)
    listed = _flwr(processes, "list", "retfm", "--run-id", run_id, "--format", "json")
    assert json.loads(listed.stdout)["runs"][0]["status"] == "finished:completed", run.stdout

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["sites"] == ["site1", "site2"] and report["rounds_done"] == 1
    (entry,) = report["rounds"]
    assert entry["aggregated_sites"] == 2 and entry["rejected"] == [] and set(entry["train"]) == {"site1", "site2"}
    initial = initial_weights(config.pretrain_config())[1]
    final = create(str(tmp_path / "run" / "model.safetensors")).state_dict()
    assert max(float((final[k] - initial[f"backbone.{k}"]).abs().max()) for k in final) > 1e-4
    assert (tmp_path / "run" / "report.md").exists() and (tmp_path / "run" / "federated_config.yaml").exists()

    # the sites' data path stayed with them: it is in no file of the coordinator's run nor in the SuperLink's log
    superlink_log = processes.log("superlink")
    assert not any(str(cohort) in path.read_bytes().decode("latin-1") for path in (tmp_path / "run").iterdir())
    assert str(cohort) not in superlink_log + run.stdout

    for intruder, name in ((unregistered, "unregistered"), (keyless, "keyless")):
        assert intruder.wait(timeout=30) != 0, processes.log(name)
    assert "Failed to activate SuperNode" in processes.log("unregistered")
    assert "No SuperNode found with the given public key" in superlink_log
    assert "SuperNode authentication is enabled. All SuperNodes must be registered" in processes.log("keyless")
