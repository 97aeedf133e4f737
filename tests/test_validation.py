"""Bad values are refused when the config is loaded, before any work, each with a message that
names the value and what to do: ranges, model paths, data files and their columns, benchmark
names, YAML that says one thing twice, a `base:` that is not there, and the CLI's own flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from trace_rl.data_schemas.errors import ConfigError
from trace_rl.stages.config import load_config
from trace_rl.stages.preflight import check_checkpoint_arg, check_config


def _refused(overrides: list[str], path: str = "demo") -> str:
    with pytest.raises(ConfigError) as err:
        check_config(load_config(path, overrides))
    return " ".join(str(err.value).split())


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text("{}")
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "1+1?", "answer": "2"}) + "\n")
    return tmp_path


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "lr=-1.0 must be > 0"),
    ("train.lr=0", "lr=0.0 must be > 0"),
    ("train.weight_decay=-0.1", "weight_decay=-0.1 must be >= 0"),
    ("train.betas=[0.9,1.5]", "betas=[0.9, 1.5] must each lie in [0, 1)"),
    ("train.grad_clip=0", "grad_clip=0.0 must be > 0"),
    ("eval.benchmarks=[nope]", "unknown benchmark 'nope' in eval.benchmarks; valid names:"),
    ("eval.benchmarks=[file:/nonexistent/aime.jsonl]", "the file '/nonexistent/aime.jsonl' does not exist"),
    ("model.path=/nonexistent", "model.path='/nonexistent' does not exist"),
    ("data.source=/nonexistent/train.jsonl", "data file '/nonexistent/train.jsonl' does not exist"),
    ("run.rounds=0", "run.rounds: Input should be greater than or equal to 1"),
])
def test_bad_value_is_refused_at_load(override, message):
    assert message in _refused([override])


def test_model_folders_and_data_columns_are_checked(files):
    assert "lacks config.json and weights" in _refused([f"model.path={files / 'empty_model'}"])
    assert "lacks weights (*.safetensors)" in _refused([f"model.path={files / 'no_weights'}"])
    src = f"data.source={files / 'train.jsonl'}"
    assert "cannot find the 'problem' column" in _refused([src])
    assert "no column for ['answer->solution_text']" in _refused(
        [src, "data.columns={problem: text, answer: solution_text}"])
    check_config(load_config("demo", [src, "data.columns={problem: text}"]))  # a good map passes
    data_dir = f"eval.data_dir={files}"
    assert "math500/test.jsonl does not exist" in _refused([data_dir, "eval.benchmarks=[math500]"])


def test_yaml_duplicate_keys_and_missing_base(tmp_path):
    (tmp_path / "dup.yaml").write_text("train:\n  lr: 1.0e-5\n  mini_batch_size: 8\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"key 'lr' appears twice \(first at line 2\)"):
        load_config(tmp_path / "dup.yaml")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nrun:\n  rounds: 2\n")
    with pytest.raises(ConfigError, match=r"child.yaml: its 'base: parent.yaml' names .*parent.yaml, "
                                          r"which does not exist"):
        load_config(tmp_path / "child.yaml")
    (tmp_path / "parent.yaml").write_text("run:\n  rounds: 5\n  seed: 3\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.run.rounds, cfg.run.seed) == (2, 3)


@pytest.mark.parametrize("checkpoint", ["round--1", "round-", "round-x", "checkpoints/nope", "/nonexistent/model"])
def test_eval_checkpoint_names_are_checked(checkpoint):
    with pytest.raises(ConfigError, match="--checkpoint"):
        check_checkpoint_arg(checkpoint)


def test_eval_checkpoint_good_names_pass(tmp_path):
    for ok in ("latest", "initial", "round-0002", "round-3", "org/model"):
        check_checkpoint_arg(ok)


def test_cli_refuses_in_one_line_before_any_work(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRACE_RL_RUN_LOCK"}
    root = f"run.root={tmp_path / 'run'}"
    cases = [
        (["run", "demo", "train.lr=-1", root], "lr=-1.0 must be > 0"),
        (["run", "demo", "--rounds", "0", root], "--rounds 0: a run has at least 1 round"),
        (["stage", "rollout", "demo", "--round", "-1", root], "--round -1: rounds are numbered 0, 1, 2"),
        (["eval", "demo", "--checkpoint", "round--1", root], "--checkpoint 'round--1': use 'latest'"),
        (["eval", "demo", "--checkpoint", str(tmp_path), root], "lacks config.json"),
    ]
    for args, message in cases:
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "trace_rl.flows.cli", *args], capture_output=True,
                              text=True, cwd=ROOT, env=env, timeout=120)
        seconds = time.monotonic() - start
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert message in " ".join(proc.stderr.split()), (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
        assert seconds < 30, (args, seconds)
        print(f"{' '.join(args[:4])}: refused in {seconds:.2f}s")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
