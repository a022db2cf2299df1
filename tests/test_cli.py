import json
import subprocess
import sys

import click
import pytest
import typer
from typer.testing import CliRunner

from retfm import __version__
from retfm.cli.common import literal_values, shown_default
from retfm.cli.main import app
from retfm.config import load_config
from retfm.data import Manifest
from retfm.demo.config import QUICK, DemoConfig, with_quick
from retfm.errors import RetfmError
from retfm.pretrain.config import OBJECTIVES


def _command_paths(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield prefix + (name,)
        if isinstance(command, click.Group):
            yield from _command_paths(command, prefix + (name,))


COMMANDS = list(_command_paths(typer.main.get_command(app)))


def _command(path) -> click.Command:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) for p in COMMANDS])
def test_every_command_has_help(path):
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"retfm {__version__}"


def test_user_errors_are_one_line_without_traceback(tmp_path):
    """Through the real console script: exit 2, one line naming the file and the reason."""
    run = subprocess.run([sys.executable, "-m", "retfm.cli.main", "data", "stats", str(tmp_path / "nowhere")],
                         capture_output=True, text=True)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "nowhere" in lines[0] and "no such manifest" in lines[0]
    assert "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, "-m", "retfm.cli.main", "data", "ingest", str(tmp_path),
                          "--out", str(tmp_path / "o"), "--set", "split=1,1,1"], capture_output=True, text=True)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "sum to 1" in run.stderr


def test_phantoms_ingest_stats_road(tmp_path):
    """The README's main job: a phantom cohort ingests whole, with site-stratified patient-level splits."""
    runner = CliRunner()
    result = runner.invoke(app, ["data", "phantoms", "--out", str(tmp_path / "raw"), "--sites", "3",
                                 "--per-site", "20", "--size", "128"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "ingest", str(tmp_path / "raw"), "--out", str(tmp_path / "ds"),
                                 "--size", "96", "--workers", "2", "--stratify", "dr_grade"])
    assert result.exit_code == 0, result.output
    assert "ingested 60 of 60" in result.output
    result = runner.invoke(app, ["data", "stats", str(tmp_path / "ds")])
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "ds" / "stats.json").read_text())
    assert stats["images"] == 60 and stats["patients"] == 30
    assert {site: counts["all"] for site, counts in stats["groups"]["site"].items()} == {
        "site1": 20, "site2": 20, "site3": 20}
    for counts in stats["groups"]["site"].values():  # every site is in training and in test
        assert counts["train"] >= 10 and counts["test"] >= 2
    table = Manifest.read(tmp_path / "ds").table
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(table["eye"]) == {"L", "R"} and table["quality"].between(0, 1).all()
    assert table["dr_grade"].notna().all() and str(table["dr_grade"].dtype).startswith(("int", "Int"))


def _generated_options(command: click.Command):
    """The options of a command generated from its config: (option, config field) pairs."""
    model, fields = getattr(command.callback, "config_model", None), getattr(command.callback, "config_fields", ())
    return [(p, model.model_fields[p.name]) for p in command.params if p.name in fields]


GENERATED = [(path, command) for path, command in ((p, _command(p)) for p in COMMANDS) if _generated_options(command)]


def test_every_command_that_loads_a_config_generates_its_options():
    """A command taking --set builds its options from its config (so each default is written once), unless the
    config is its YAML argument (federated run and app, study: they have no options of the config's own)."""
    loading = {path for path in COMMANDS if any("--set" in p.opts for p in _command(path).params)}
    yaml_argument = {path for path in loading if any(p.name == "config" for p in _command(path).params)}
    assert yaml_argument == {("federated", "run"), ("federated", "app"), ("study",)}
    assert {path for path, _ in GENERATED} == loading - yaml_argument
    assert {("synth", "train"), ("synth", "sample"), ("synth", "audit"), ("synth", "assemble"), ("index", "build"),
            ("serve",), ("data", "ingest"), ("demo",), ("zeroshot",)} <= {path for path, _ in GENERATED}


@pytest.mark.parametrize("path,command", GENERATED, ids=[" ".join(p) for p, _ in GENERATED])
def test_help_shows_the_config_defaults_and_every_accepted_value(path, command):
    """An option generated from a config field shows that field's default and lists every value a Literal takes."""
    for param, field in _generated_options(command):
        if not field.is_required():
            assert f"[default: {shown_default(field.get_default(call_default_factory=True))}]" in param.help, param.name
        for value in literal_values(field.annotation):
            assert str(value) in param.help, (param.name, value)
    text = CliRunner().invoke(app, [*path, "--help"], terminal_width=200).output
    assert all(param.opts[0] in text for param, _ in _generated_options(command))


def test_pretrain_help_lists_every_objective():
    text = CliRunner().invoke(app, ["pretrain", "--help"], terminal_width=200).output
    assert all(objective in text for objective in OBJECTIVES)


def test_options_of_another_form_fill_their_config_field(tmp_path):
    """--map SOURCE=TARGET (repeatable) fills ingest's columns; a malformed one is one line before any work."""
    result = CliRunner().invoke(app, ["data", "ingest", str(tmp_path), "--out", str(tmp_path / "o"), "--map", "mrn"])
    assert isinstance(result.exception, RetfmError) and "--map 'mrn': expected SOURCE=TARGET" in str(result.exception)
    assert not (tmp_path / "o").exists()


def test_demo_quick_fills_only_what_was_not_given():
    config = with_quick(load_config(DemoConfig, None, {"rounds": 5, "label": "amd"}))
    assert (config.rounds, config.label) == (5, "amd")
    assert {key: getattr(config, key) for key in QUICK if key != "rounds"} == {k: v for k, v in QUICK.items()
                                                                                if k != "rounds"}
