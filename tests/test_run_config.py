"""A run's config.yaml changes only on request: flows refuse a differing config and say what would
change; the explicit path (`trace-rl run`, update_config) rewrites it and logs each change."""

from __future__ import annotations

import logging

import pytest
from trace_rl.data_schemas.errors import ConfigError
from trace_rl.flows.stage_task import config_changes, run_config_path, write_resolved_config
from trace_rl.stages.config import load_config


def test_config_changes_lists_leaves():
    assert config_changes({"a": {"b": 1, "c": [1]}}, {"a": {"b": 2, "c": [1], "d": 0}}) == [
        "a.b: 1 -> 2", "a.d: '<unset>' -> 0"]
    assert config_changes({"a": 1}, {"a": 1}) == []


def test_a_runs_config_is_written_once_and_changed_only_on_request(tmp_path, caplog):
    root = tmp_path / "run"
    first = load_config("demo", [f"run.root={root}", "run.rounds=2"])
    path = write_resolved_config(first)
    written = (root / "config.yaml").read_bytes()
    # the same config again, by name + overrides or by the run directory: nothing changes
    assert run_config_path("demo", [f"run.root={root}", "run.rounds=2"]) == path
    assert run_config_path(str(root)) == path
    assert load_config(path).run.rounds == 2
    # a differing config (demo's default rounds) is refused with the change, file untouched
    with pytest.raises(ConfigError, match=r"run\.rounds: 2 -> 3"):
        run_config_path("demo", [f"run.root={root}"])
    assert (root / "config.yaml").read_bytes() == written
    # the explicit path rewrites it and logs what changed
    with caplog.at_level(logging.WARNING, logger="trace_rl.flows"):
        run_config_path("demo", [f"run.root={root}", "train.lr=0.001"], update=True)
    assert any("train.lr:" in r.getMessage() for r in caplog.records)
    assert load_config(path).train.lr == 0.001 and load_config(path).run.rounds == 3
