"""Config loading/validation and the prepare stage: named public sources (synthetic rows in their
Hub format), local files, and the real training files in shared/data when present."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, SHARED_DATA, needs_shared_data
from trace_rl.data_schemas import PROMPTS
from trace_rl.stages.config import load_config
from trace_rl.data_schemas.errors import ConfigError
from trace_rl.stages import get_stage
from trace_rl.stages.common import open_store
from trace_rl.stages.sources import CATALOG


def test_overrides_and_base_chain():
    cfg = load_config("qwen3-1.7b-grpo", ["rollout.n=4", "train.lr=3e-6", "eval.benchmarks=[math500,aime24]"])
    assert cfg.model.path == "Qwen/Qwen3-1.7B"          # from the base's base chain
    assert cfg.train.method == "grpo" and cfg.train.lr == 3e-6
    assert cfg.rollout.n == 4 and cfg.eval.benchmarks == ["math500", "aime24"]


@pytest.mark.parametrize("override, message", [
    ("rollout.temperature=0", "rollout.temperature"),
    ("train.method=ppo", "train.method"),
    ("train.micro_batch_size=64", "micro_batch_size"),
    ("annotate.api.api_key_env=sk-abc123", "api_key_env"),
    ("rollout", "section.key=value"),
    ("run.rounds=0", "run.rounds"),
])
def test_bad_values_are_rejected_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


def test_missing_config_lists_packaged_ones():
    with pytest.raises(ConfigError, match="demo"):
        load_config("no-such-config")


def _prepare(tmp_path, source: str, *extra: str):
    cfg = load_config("demo", [f"run.root={tmp_path}/run", f"data.source={source}", *extra])
    manifest = get_stage("prepare")(cfg, None, progress=False)
    return cfg, manifest


def test_shipped_configs_point_inside_the_repository():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert "shared" not in path.read_text(), f"{path.name} points outside the repository"
        cfg = load_config(path.stem)
        assert cfg.eval.data_dir is None
        source = cfg.data.source
        assert source in ("testbed", *CATALOG) or not source.startswith(".."), (path.name, source)


def test_prepare_named_source_reads_math_levels_3_to_5(tmp_path, hub_mirror):
    cfg, m = _prepare(tmp_path, "math_train_lvl3to5")
    table = open_store(cfg).read("prompts", PROMPTS).to_pylist()
    assert m.rows == 21 and m.extra["dropped"] == {} and m.extra["data_id"]
    assert {json.loads(r["meta"])["level"] for r in table} == {"Level 3", "Level 4", "Level 5"}
    # The worked solution travels as the teacher's privileged context (METHOD.md).
    assert all(r["solution"] and r["source"] == "math_train_lvl3to5" for r in table)
    assert table[0]["answer"] == "\\frac{2}{1}"
    assert table[0]["problem"].endswith("put your final answer within \\boxed{}.")
    # Catalog fields can be overridden: GSM8K's train split with a limit.
    cfg2, m2 = _prepare(tmp_path, "gsm8k_train", "data.limit=3", f"run.root={tmp_path}/run2")
    rows = open_store(cfg2).read("prompts", PROMPTS).to_pylist()
    assert [(r["prompt_id"], r["answer"]) for r in rows] == [(f"gsm8k-train-{i}", str(i)) for i in range(3)]


@needs_shared_data
def test_prepare_gsm8k_jsonl(tmp_path):
    cfg, m = _prepare(tmp_path, str(SHARED_DATA / "gsm8k/train.jsonl"))
    assert m.rows == 7473
    table = open_store(cfg).read("prompts", PROMPTS)
    row = table.slice(0, 1).to_pylist()[0]
    assert row["problem"].endswith("put your final answer within \\boxed{}.")
    assert row["answer"] and row["solution"]
    assert json.loads(row["meta"])["raw_problem"] in row["problem"]
    # Skipped when current; redone with force, and the same bytes keep the same fingerprint
    # (staleness follows content: nothing downstream goes stale).
    again = get_stage("prepare")(cfg, None, progress=False)
    assert again.fingerprint == m.fingerprint and again.finished_at == m.finished_at
    forced = get_stage("prepare")(cfg, None, force=True, progress=False)
    assert forced.finished_at > m.finished_at and forced.files == m.files
    assert forced.fingerprint == m.fingerprint


@needs_shared_data
def test_prepare_math_train_with_mapping_and_limit(tmp_path):
    cfg, m = _prepare(tmp_path, str(SHARED_DATA / "math_train/train.jsonl"),
                      "data.columns={prompt_id: id, problem: problem, answer: answer}", "data.limit=500")
    assert m.rows == 500
    t = pq.read_table(tmp_path / "run/prompts/part-00000.parquet")
    assert t.schema.field("solution").type == PROMPTS.field("solution").type
    assert t.column("solution").null_count == 500        # math_train has no solutions
    assert json.loads(t.column("meta")[0].as_py())["level"]


def test_prepare_parquet_source_and_bad_mapping(tmp_path):
    import pyarrow as pa

    src = tmp_path / "src.parquet"
    pq.write_table(pa.table({"q": ["1+1?", "2+2?", ""], "a": ["2", "4", "0"]}), src)
    cfg, m = _prepare(tmp_path, str(src), "data.columns={problem: q, answer: a}")
    assert m.rows == 2 and m.extra["dropped"] == {"empty_problem_or_answer": 1}
    with pytest.raises(ConfigError, match="source has no column"):
        _prepare(tmp_path, str(src), "data.columns={problem: question}", "run.root=" + str(tmp_path / "r2"))


def test_cli_help_shows_the_command_tree_and_errors_are_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "trace_rl.flows.cli", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    for command in ("run", "demo", "stage", "eval", "inspect", "status", "testbed", "config"):
        assert command in out.stdout
    bad = subprocess.run([sys.executable, "-m", "trace_rl.flows.cli", "stage", "prepare", "demo",
                          f"run.root={tmp_path}", "data.source=/nonexistent.jsonl"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2
    assert "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_wheel_ships_the_configs(tmp_path):
    """A non-editable install resolves named configs (and their `base:` chain) from the wheel."""
    import zipfile

    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w",
                            str(tmp_path)], capture_output=True, text=True, timeout=600, check=False)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("trace_rl-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # The distribution owns exactly one import name.
    assert {p.name for p in site.iterdir() if not p.name.endswith(".dist-info")} == {"trace_rl"}
    assert (site / "trace_rl" / "pipeline" / "templates" / "inspect.html").is_file()
    assert list((site / "trace_rl" / "stages" / "annotators" / "templates").glob("*.txt"))
    site_configs = site / "trace_rl" / "configs"
    shipped = {p.relative_to(site_configs).as_posix() for p in site_configs.rglob("*.yaml")}
    assert shipped == {p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    probe = ("import trace_rl.stages.config as c; cfg = c.load_config('qwen3-1.7b-grpo'); "
             "print(c.__file__, c.resolve_config_path('accelerate/ddp.yaml'), cfg.model.path)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    module, accelerate_cfg, model_path = out.stdout.split()
    assert module.startswith(str(site)) and accelerate_cfg.startswith(str(site_configs))
    assert model_path == "Qwen/Qwen3-1.7B"
