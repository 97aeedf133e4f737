"""The run-scoped vLLM engine (stages/engines/session.py) against a cold engine, on CPU.

The vLLM tests need the venv of scripts/setup_vllm_cpu.sh (or $TRACE_VLLM_PYTHON) and are
skipped without it. Engine starts dominate (~30-60 s each on 2 cores), so each test reuses one
session for several checks.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from test_engine_vllm import VLLM_PROMPTS, VLLM_PYTHON, _vllm_cfg, needs_vllm
from tiny import PROMPTS, TINY_RUN, build_model_dir
from trace_rl.data_schemas import ROLLOUTS
from trace_rl.data_schemas.errors import StageError
from trace_rl.stages.engines import generate
from trace_rl.stages.engines.session import (
    EngineSession,
    active_session,
    engine_key,
    engine_session,
)
from trace_rl.stages.engines.vllm_engine import cpu_env
from trace_rl.trainer.checkpoint import save_hf_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

LOGPROB_TOL = 1e-4  # float32 end to end; a reload must not change the numbers beyond noise


def _assert_same_rollouts(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    worst = 0.0
    for g, w in zip(got, want):
        assert (g["prompt_id"], g["sample_index"]) == (w["prompt_id"], w["sample_index"])
        assert g["response_token_ids"] == w["response_token_ids"]
        assert g["finish_reason"] == w["finish_reason"]
        diff = torch.tensor(g["response_logprobs"]) - torch.tensor(w["response_logprobs"])
        worst = max(worst, diff.abs().max().item() if len(diff) else 0.0)
    assert worst < LOGPROB_TOL, worst


def _tokens(rows: list[dict]) -> list[list[int]]:
    return [r["response_token_ids"] for r in rows]


@pytest.fixture(scope="module")
def policies(tmp_path_factory) -> tuple[str, str]:
    """Two checkpoints of one architecture: round k's and round k+1's stand-ins."""
    root = tmp_path_factory.mktemp("policies")
    a = build_model_dir(root / "a", p_eos=0.01, seed=0)
    b = build_model_dir(root / "b", p_eos=0.01, seed=1)
    return str(a), str(b)


def _tied_copy(src: str, dst: Path) -> str:
    """`src` re-saved with tied embeddings the way the trainer saves (lm_head.weight on disk)."""
    untied = AutoModelForCausalLM.from_pretrained(src)
    config = untied.config
    config.tie_word_embeddings = True
    tied = Qwen3ForCausalLM(config)
    state = {k: v for k, v in untied.state_dict().items() if k != "lm_head.weight"}
    tied.load_state_dict(state, strict=False)
    tied.tie_weights()
    save_hf_checkpoint(tied, AutoTokenizer.from_pretrained(src), dst)
    (dst / "generation_config.json").write_text((Path(src) / "generation_config.json").read_text())
    return str(dst)


@needs_vllm
@pytest.mark.slow
def test_reloaded_engine_equals_cold_engine_and_survives_a_dead_worker(policies, tmp_path):
    a, b = policies
    cfg = _vllm_cfg(tmp_path / "cache")
    cold_b = generate(cfg, b, VLLM_PROMPTS, progress=False)
    # Each round has its own engine seed; a reused engine keeps the first one, which must not
    # matter since every request carries its own seed.
    cfg_a = cfg.model_copy(update={"seed": cfg.seed + 1})
    with EngineSession() as session:
        rows_a, stats = session.generate_with_stats(cfg_a, a, VLLM_PROMPTS, progress=False)
        assert stats["mode"] == "cold" and stats["engine_start_s"] > 0
        assert "restarted" not in stats  # the run's first start replaced nothing
        assert _tokens(rows_a) != _tokens(cold_b), "the two policies must sample differently"

        rows_b, stats = session.generate_with_stats(cfg, b, VLLM_PROMPTS, progress=False)
        assert stats["mode"] == "resident" and stats["engine_start_s"] == 0
        assert stats["load_weights_s"] > 0
        _assert_same_rollouts(rows_b, cold_b)

        assert session.release_device() == "resident"  # CPU: no sleep mode, nothing to free
        again, stats = session.generate_with_stats(cfg, b, VLLM_PROMPTS, progress=False)
        assert stats["mode"] == "resident" and stats["load_weights_s"] == 0
        _assert_same_rollouts(again, cold_b)
        assert [e["op"] for e in session.events].count("start") == 1

        os.kill(session._workers[0].proc.pid, signal.SIGKILL)
        session._workers[0].proc.wait()
        after, stats = session.generate_with_stats(cfg, b, VLLM_PROMPTS, progress=False)
        assert stats["mode"] == "cold" and stats["load_weights_s"] == 0
        assert stats["restarted"] == "the engine exited between calls"  # the manifest says why
        _assert_same_rollouts(after, cold_b)
    assert not session.running


@needs_vllm
@pytest.mark.slow
def test_tied_embeddings_reach_the_engine_on_reload(policies, tmp_path):
    a, b = (_tied_copy(p, tmp_path / name) for p, name in zip(policies, ("a", "b")))
    cfg = _vllm_cfg(tmp_path / "cache")
    with EngineSession() as session:
        # The session's first start is a cold engine on b: the reference.
        first_b = session.generate(cfg, b, PROMPTS, progress=False)
        rows_a = session.generate(cfg, a, PROMPTS, progress=False)
        assert _tokens(rows_a) != _tokens(first_b)
        reloaded_b, stats = session.generate_with_stats(cfg, b, PROMPTS, progress=False)
        assert stats["mode"] == "resident"
    _assert_same_rollouts(reloaded_b, first_b)


def test_engine_key_ignores_seed_and_path_but_not_engine_options(policies, tmp_path):
    a, b = policies
    cfg = _vllm_cfg(tmp_path)
    assert engine_key(cfg, a) == engine_key(cfg.model_copy(update={"seed": 99}), b)
    longer = cfg.model_copy(update={"vllm": cfg.vllm.model_copy(update={"max_model_len": 1024})})
    assert engine_key(longer, a) != engine_key(cfg, a)
    wider = tmp_path / "wider"
    build_model_dir(wider, hidden=32, p_eos=0.01)
    assert engine_key(cfg, str(wider)) != engine_key(cfg, a)
    saved_again = tmp_path / "resaved"
    saved_again.mkdir()
    config = json.loads((Path(a) / "config.json").read_text())
    config["transformers_version"] = "0.0.0"
    (saved_again / "config.json").write_text(json.dumps(config))
    assert engine_key(cfg, str(saved_again)) == engine_key(cfg, a)


def test_a_worker_that_cannot_start_raises_with_the_fix(policies, tmp_path):
    # The main venv has no vllm: the serving worker dies at import.
    cfg = _vllm_cfg(tmp_path, python=sys.executable)
    with EngineSession() as session, pytest.raises(StageError) as info:
        session.generate(cfg, policies[0], PROMPTS[:1], progress=False)
    assert "No module named 'vllm'" in str(info.value)
    assert "setup_vllm_cpu.sh" in str(info.value)
    assert not session.running and session.release_device() == "idle"


def test_engine_session_is_active_only_inside_its_block():
    assert active_session() is None
    with pytest.raises(KeyError), engine_session() as session:
        assert active_session() is session
        with pytest.raises(RuntimeError, match="already active"), engine_session():
            pass
        raise KeyError("the flow failed")
    assert active_session() is None and not session.running


def _count_engine_starts(monkeypatch) -> list[str]:
    """Every vLLM engine start from here on, session or cold: the checkpoint it started on."""
    from trace_rl.stages.engines import vllm_engine

    starts = []
    real_start, real_cold = EngineSession._start, vllm_engine.generate_with_stats

    def session_start(self, cfg, model_dir, *args, **kwargs):
        starts.append(model_dir)
        return real_start(self, cfg, model_dir, *args, **kwargs)

    def cold(cfg, model_dir, *args, **kwargs):
        starts.append(model_dir)
        return real_cold(cfg, model_dir, *args, **kwargs)

    monkeypatch.setattr(EngineSession, "_start", session_start)
    monkeypatch.setattr(vllm_engine, "generate_with_stats", cold)
    return starts


@needs_vllm
@pytest.mark.slow
def test_three_rounds_and_their_evaluations_start_one_engine_equal_to_cold_starts(
    tmp_path, prefect_harness, monkeypatch
):
    """vLLM's default executor (an engine-core process beside the worker, as users get it):
    the in-place weight load must reach that process by method name."""
    from trace_rl.flows.training import trace_training
    from trace_rl.stages import get_stage
    from trace_rl.stages.common import dataset_name, open_store
    from trace_rl.stages.config import load_config

    starts = _count_engine_starts(monkeypatch)
    env = cpu_env(tmp_path / "cache", omp_threads_bind="0-1")
    env.pop("VLLM_CPU_KVCACHE_SPACE")  # the worker's own bound applies (and is recorded)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env
    # vLLM's CPU attention has no kernel for the tiny testbed's head_dim of 16: two heads of 32.
    overrides = TINY_RUN + [
        "model.testbed.num_heads=2", "model.testbed.num_kv_heads=2",
        f"run.root={tmp_path / 'run'}", f"model.testbed_dir={tmp_path / 'testbed'}", "run.rounds=3",
        "rollout.engine=vllm", f"rollout.vllm.python={VLLM_PYTHON}", "rollout.vllm.dtype=float32",
        f"rollout.vllm.env={json.dumps(env)}", "rollout.vllm.timeout_s=900",
        "eval.every_round=true", "eval.limit=8", "eval.k=2", "eval.max_tokens=32",
        "train.keep_checkpoints=null",  # the cold reruns below read checkpoints 1 and 2
    ]
    trace_training("demo", overrides)
    assert len(starts) == 1, f"one engine for 3 rounds and 4 evaluations, got starts on {starts}"
    assert active_session() is None
    cfg = load_config("demo", overrides)
    assert cfg.rollout.vllm.engine_kwargs == {} and cfg.rollout.vllm.persistent
    store = open_store(cfg)
    engines = [store.manifest(dataset_name("rollout", k)).extra["engine"] for k in range(3)]
    # The initial evaluation started the engine on the initial model: every round reuses it.
    assert [e["mode"] for e in engines] == ["resident"] * 3
    assert [e["engine_start_s"] for e in engines] == [0.0] * 3
    # Round 0 samples the weights the engine started with; policy k >= 1 was loaded in place by
    # its evaluation after round k-1, so round k finds it there (the cold reruns below show the
    # engine held checkpoint k, not the initial model).
    assert [e["load_weights_s"] for e in engines] == [0.0] * 3
    assert all(e["generate_s"] > 0 and e["generated_tokens"] > 0 for e in engines)
    assert all(e["memory"] == {"VLLM_CPU_KVCACHE_SPACE": "2"} for e in engines)
    assert all(0 < e["peak_rss_gb"] < 8 for e in engines)
    from_flow = {k: store.read(dataset_name("rollout", k), ROLLOUTS).to_pylist() for k in (1, 2)}
    for k in (1, 2):  # each round again as a standalone stage: a cold engine on its checkpoint
        manifest = get_stage("rollout")(cfg, k, force=True, progress=False)
        assert manifest.extra["engine"]["mode"] == "cold"
        assert manifest.extra["engine"]["engine_start_s"] > 0
        _assert_same_rollouts(from_flow[k], store.read(dataset_name("rollout", k), ROLLOUTS).to_pylist())
    assert len(starts) == 3


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_stopping_a_killed_worker_ends_the_processes_it_started(tmp_path):
    """vLLM's default executor runs the engine core in a child of the worker; a worker killed
    by pid (or the OOM killer) left it running with the model in memory (measured with vLLM:
    0.6 GB, still up 90 s later). stop() ends the worker's process group. A stand-in worker
    whose child plays the engine core: no vLLM needed."""
    from trace_rl.stages.engines.session import _Worker

    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              "c = subprocess.Popen(['sleep', '300']); "
              f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(300)")
    worker = _Worker([sys.executable, "-c", script], dict(os.environ), "stand-in", False)
    while not pid_file.exists() or not pid_file.read_text():
        assert worker.proc.poll() is None
        time.sleep(0.05)
    child = int(pid_file.read_text())
    os.kill(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait()
    assert _alive(child), "the stand-in engine core outlives its worker, as vLLM's did"
    worker.stop()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
