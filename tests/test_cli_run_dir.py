"""One way to name a run: every command takes a config name, a config file or a run directory,
reads a run directory's own config.yaml (so what the run was launched with holds), and logs which
of the three it resolved. Each command is invoked as a user types it (typer's runner, in process).
"""

from __future__ import annotations

import logging

import pytest
import yaml
from trace_rl.data_schemas.errors import TraceError
from trace_rl.flows.cli import app
from trace_rl.stages.config import dump_config, load_config
from typer.testing import CliRunner


@pytest.fixture
def run_dir(tmp_path):
    """A run launched with overrides that the packaged `demo` does not have."""
    root = tmp_path / "runs" / "mine"
    cfg = load_config("demo", [f"run.root={root}", "run.name=mine", "run.rounds=5", "rollout.n=3"])
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(dump_config(cfg))
    return root


def invoke(caplog, *args: str):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trace_rl"):
        result = CliRunner().invoke(app, list(args))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("config: ")]
    return result, said


def test_config_show_reads_the_run_directory(run_dir, caplog):
    result, said = invoke(caplog, "config", "show", str(run_dir))
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["run"]["rounds"] == 5 and shown["rollout"]["n"] == 3
    assert said == [f"config: run directory {run_dir} ({run_dir / 'config.yaml'}) -> run mine at {run_dir}"]


def test_config_show_names_a_packaged_config_and_a_file(run_dir, caplog):
    result, said = invoke(caplog, "config", "show", "demo")
    assert result.exit_code == 0 and said[0].startswith("config: packaged config demo (")
    result, said = invoke(caplog, "config", "show", str(run_dir / "config.yaml"))
    assert result.exit_code == 0 and said[0].startswith(f"config: config file {run_dir / 'config.yaml'}")


@pytest.mark.parametrize("command, missing", [
    (["stage", "annotate", "{run}", "--round", "0"], "needs {run}/prompts, which is missing"),
    (["eval", "{run}", "--checkpoint", "round-0001"], "checkpoint of round 0's train stage")])
def test_stage_and_eval_take_the_run_directory(run_dir, caplog, command, missing):
    """No IsADirectoryError: the command reaches the run and refuses only for what is missing
    there (no rollouts yet, no checkpoint yet)."""
    result, said = invoke(caplog, *[a.format(run=run_dir) for a in command])
    assert said and said[0].startswith(f"config: run directory {run_dir}")
    assert isinstance(result.exception, TraceError), result.exception
    assert missing.format(run=run_dir) in str(result.exception)


def test_run_takes_the_run_directory(run_dir, caplog):
    """`run <dir>` loads the run's config and reaches the run's lock, where it stops: the lock
    is one nobody may take over (unreadable, as one from an unknown writer)."""
    (run_dir / ".lock").write_text("held elsewhere")
    result, said = invoke(caplog, "run", str(run_dir))
    assert said and said[0].startswith(f"config: run directory {run_dir}")
    assert isinstance(result.exception, TraceError) and str(run_dir) in str(result.exception)


def test_status_and_inspect_take_the_run_directory_or_its_name(run_dir, caplog):
    result, said = invoke(caplog, "status", str(run_dir))
    assert result.exit_code == 0, result.output
    assert said[0].startswith(f"config: run directory {run_dir}")
    assert [line.split()[0] for line in result.stdout.splitlines() if line.strip().startswith("│ ")
            and line.split()[1].isdigit()] == ["│"] * 5  # the run's 5 rounds, not demo's 3
    config_file = run_dir / "config.yaml"
    result, said = invoke(caplog, "inspect", str(config_file))
    assert said[0].startswith(f"config: config file {config_file} -> run mine at {run_dir}")


def test_a_plain_directory_is_refused_with_what_to_pass(tmp_path, caplog):
    result, _ = invoke(caplog, "config", "show", str(tmp_path))
    assert isinstance(result.exception, TraceError)
    assert "directory without config.yaml" in str(result.exception)


def test_a_run_directory_named_from_another_folder_is_that_run(tmp_path, monkeypatch, caplog):
    """A run launched the default way keeps `run.root: null` (runs/<name>, relative to the
    launch folder). Named from elsewhere, the directory given is still the run: status reads
    it and a stage addresses it, rather than a fresh ./runs/<name> in the current folder."""
    launch, elsewhere = tmp_path / "launch", tmp_path / "elsewhere"
    run_dir = launch / "runs" / "mine"
    run_dir.mkdir(parents=True)
    elsewhere.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(load_config("demo", ["run.name=mine", "run.rounds=5"])))
    monkeypatch.chdir(elsewhere)
    for arg in (str(run_dir), f"{run_dir}/", str(run_dir / "config.yaml")):
        result, said = invoke(caplog, "status", arg)
        assert result.exit_code == 0, result.output
        assert said[0].endswith(f"-> run mine at {run_dir}"), said
    result, said = invoke(caplog, "stage", "annotate", str(run_dir), "--round", "0")
    assert f"needs {run_dir}/prompts, which is missing" in str(result.exception)
    assert not (elsewhere / "runs").exists()
    monkeypatch.chdir(launch / "runs")  # the bare name of a run directory in cwd: that run
    result, said = invoke(caplog, "status", "mine")
    assert said[0] == f"config: run directory mine (mine/config.yaml) -> run mine at {run_dir}"


def test_a_bare_name_that_is_also_a_plain_folder_is_the_packaged_config(tmp_path, monkeypatch, caplog):
    """`demo` with an unrelated ./demo/ folder in cwd: the packaged config, and the log says the
    folder was passed over; `./demo` or `demo/` means the folder, and is refused."""
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    result, said = invoke(caplog, "config", "show", "demo")
    assert result.exit_code == 0, result.output
    assert said[0].startswith("config: packaged config demo (") and "./demo is a directory" in said[0]
    for arg in ("./demo", "demo/"):
        result, _ = invoke(caplog, "config", "show", arg)
        assert "directory without config.yaml" in str(result.exception)


def test_a_users_own_config_yaml_in_a_folder_named_like_the_run_is_not_a_run(tmp_path, monkeypatch, caplog):
    """`exp/demo/config.yaml` written by hand (a few keys, run.name demo) is a config file: its
    run lives at runs/demo, not in the folder that holds the file."""
    own = tmp_path / "exp" / "demo" / "config.yaml"
    own.parent.mkdir(parents=True)
    own.write_text("run: {name: demo, rounds: 2}\nrollout: {n: 4}\n")
    monkeypatch.chdir(tmp_path)
    result, said = invoke(caplog, "config", "show", "exp/demo/config.yaml")
    assert result.exit_code == 0, result.output
    assert said[0] == "config: config file exp/demo/config.yaml -> run demo at runs/demo"
