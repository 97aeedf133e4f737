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
        assert stats["mode"] == "cold_start" and stats["engine_start_s"] > 0
        assert _tokens(rows_a) != _tokens(cold_b), "the two policies must sample differently"

        rows_b, stats = session.generate_with_stats(cfg, b, VLLM_PROMPTS, progress=False)
        assert stats["mode"] == "reused" and stats["engine_start_s"] == 0
        assert stats["load_weights_s"] > 0
        _assert_same_rollouts(rows_b, cold_b)

        assert session.release_device() == "resident"  # CPU: no sleep mode, nothing to free
        again, stats = session.generate_with_stats(cfg, b, VLLM_PROMPTS, progress=False)
        assert stats["mode"] == "reused" and stats["load_weights_s"] == 0
        _assert_same_rollouts(again, cold_b)
        assert [e["op"] for e in session.events].count("start") == 1

        os.kill(session._workers[0].proc.pid, signal.SIGKILL)
        session._workers[0].proc.wait()
        after, stats = session.generate_with_stats(cfg, b, VLLM_PROMPTS, progress=False)
        assert stats["mode"] == "cold_start"
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
        assert stats["mode"] == "reused"
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


@needs_vllm
@pytest.mark.slow
def test_training_flow_starts_one_engine_and_equals_a_cold_rerun(
    tmp_path, prefect_harness, monkeypatch
):
    from trace_rl.flows.training import trace_training
    from trace_rl.stages import get_stage
    from trace_rl.stages.common import dataset_name, open_store
    from trace_rl.stages.config import load_config

    starts = []
    real_start = EngineSession._start

    def counting_start(self, *args, **kwargs):
        starts.append(args[1])  # the checkpoint the engine starts on
        return real_start(self, *args, **kwargs)

    monkeypatch.setattr(EngineSession, "_start", counting_start)
    env = cpu_env(tmp_path / "cache", omp_threads_bind="0-1", in_process=True)
    # vLLM's CPU attention has no kernel for the tiny testbed's head_dim of 16: two heads of 32.
    overrides = TINY_RUN + [
        "model.testbed.num_heads=2", "model.testbed.num_kv_heads=2",
        f"run.root={tmp_path / 'run'}", f"model.testbed_dir={tmp_path / 'testbed'}", "run.rounds=2",
        "rollout.engine=vllm", f"rollout.vllm.python={VLLM_PYTHON}", "rollout.vllm.dtype=float32",
        f"rollout.vllm.env={json.dumps(env)}",
        'rollout.vllm.engine_kwargs={"distributed_executor_backend": "uni"}',
    ]
    trace_training("demo", overrides)
    assert len(starts) == 1, "one engine for both rounds"
    assert active_session() is None
    cfg = load_config("demo", overrides)
    store = open_store(cfg)
    from_flow = store.read(dataset_name("rollout", 1), ROLLOUTS).to_pylist()
    # Round 1 again as a standalone stage: a cold engine on round 1's checkpoint.
    get_stage("rollout")(cfg, 1, force=True, progress=False)
    cold = store.read(dataset_name("rollout", 1), ROLLOUTS).to_pylist()
    assert len(starts) == 1
    _assert_same_rollouts(from_flow, cold)
