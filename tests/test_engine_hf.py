"""The `hf` rollout engine on a tiny random Qwen3: row contract, determinism, log-probs."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import PROMPTS, build_model_dir, teacher_forced_logprobs
from transformers import AutoModelForCausalLM, AutoTokenizer

from trace_rl.stages.engines import generate, get_engine
from trace_rl.stages.engines.protocol import ROW_KEYS, encode_prompt
from trace_rl.stages.engines.config import RolloutConfig
from trace_rl.pipeline.generation import cut_at_stop


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(build_model_dir(tmp_path_factory.mktemp("qwen3-tiny"), p_eos=0.01))


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _cfg(**kw) -> RolloutConfig:
    base = {
        "engine": "hf",
        "n": 4,
        "max_tokens": 48,
        "seed": 3,
        "enable_thinking": True,
        "hf": {"num_threads": 1},
    }
    return RolloutConfig(**{**base, **kw})


def test_rows_follow_the_contract(model_dir):
    cfg = _cfg(enable_thinking=False)
    rows = generate(cfg, model_dir, PROMPTS, progress=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    stop_ids = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}

    assert [(r["prompt_id"], r["sample_index"]) for r in rows] == [
        (p["prompt_id"], j) for p in PROMPTS for j in range(cfg.n)
    ]
    for r in rows:
        assert tuple(r) == ROW_KEYS
        problem = next(p["problem"] for p in PROMPTS if p["prompt_id"] == r["prompt_id"])
        expected_text = (
            f"<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        )
        assert tok.decode(r["prompt_token_ids"]) == expected_text
        assert r["prompt_token_ids"] == encode_prompt(tok, problem, enable_thinking=False)
        ids = r["response_token_ids"]
        assert len(r["response_logprobs"]) == len(ids) >= 1
        assert all(isinstance(x, float) and x <= 0.0 for x in r["response_logprobs"])
        assert r["engine"] == "hf"
        assert json.loads(r["sampling"]) == {
            "n": 4,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "max_tokens": 48,
            "enable_thinking": False,
            "seed": 3,
        }
        # A stopped response ends with exactly one stop token; padding never leaks in.
        if r["finish_reason"] == "stop":
            assert ids[-1] in stop_ids and not stop_ids & set(ids[:-1])
        else:
            assert r["finish_reason"] == "length" and len(ids) == 48
            assert not stop_ids & set(ids)
        assert r["response_text"] == tok.decode(ids, skip_special_tokens=True)
        assert "<|im_end|>" not in r["response_text"]
    reasons = {r["finish_reason"] for r in rows}
    assert reasons == {"stop", "length"}, f"fixture should yield both endings, got {reasons}"


def test_thinking_prompt_ends_with_open_assistant_turn(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = encode_prompt(tok, "Add 1 and 2.", enable_thinking=True)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_same_seed_same_samples_and_new_seed_new_samples(model_dir):
    first = generate(_cfg(), model_dir, PROMPTS, progress=False)
    again = generate(_cfg(), model_dir, PROMPTS, progress=False)
    other = generate(_cfg(seed=4), model_dir, PROMPTS, progress=False)
    assert first == again
    assert [r["response_token_ids"] for r in first] != [r["response_token_ids"] for r in other]
    # Samples of one prompt differ from one another (n independent draws, not n copies).
    p0 = [tuple(r["response_token_ids"]) for r in first if r["prompt_id"] == "p0"]
    assert len(set(p0)) > 1


def test_batch_size_does_not_change_the_row_contract(model_dir):
    rows = generate(
        _cfg(n=3, hf={"batch_size": 2, "num_threads": 1}), model_dir, PROMPTS, progress=False
    )
    assert len(rows) == 9
    assert [r["sample_index"] for r in rows] == [0, 1, 2] * 3


def test_max_tokens_marks_length_and_keeps_the_row(model_dir):
    rows = generate(_cfg(max_tokens=2, n=8), model_dir, PROMPTS, progress=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    stop_ids = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    assert len(rows) == 3 * 8
    for r in rows:
        ids = r["response_token_ids"]
        expected = "stop" if ids[-1] in stop_ids else "length"
        assert r["finish_reason"] == expected
        assert len(ids) == 2 or expected == "stop"
    assert sum(r["finish_reason"] == "length" for r in rows) > 0


@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 50}, {"temperature": 0.6, "top_p": 0.95}],
    ids=["t1", "t0.7-topk50", "t0.6-topp0.95"],
)
def test_logprobs_equal_teacher_forced_recomputation(model_dir, model, sampling):
    rows = generate(_cfg(**sampling), model_dir, PROMPTS, progress=False)
    worst = 0.0
    for r in rows:
        ref_T = teacher_forced_logprobs(
            model,
            r["prompt_token_ids"],
            r["response_token_ids"],
            temperature=sampling["temperature"],
            top_k=sampling.get("top_k", -1),
            top_p=sampling.get("top_p", 1.0),
        )
        got_T = torch.tensor(r["response_logprobs"])
        assert torch.isfinite(got_T).all()
        worst = max(worst, (ref_T - got_T).abs().max().item())
    assert worst < 1e-4, f"max |engine - teacher-forced| = {worst}"


def test_cut_at_stop_drops_padding_after_eos():
    ids, logps, reason = cut_at_stop([5, 6, 2, 0, 0], [-1.0, -2.0, -0.5, 0.0, 0.0], {2, 0}, 5)
    assert (ids, logps, reason) == ([5, 6, 2], [-1.0, -2.0, -0.5], "stop")
    assert cut_at_stop([5, 6], [-1.0, -2.0], {2}, 2) == ([5, 6], [-1.0, -2.0], "length")


def test_unknown_engine_and_bad_values_raise_with_the_fix():
    with pytest.raises(ValueError, match=r"valid engines: \['hf', 'vllm'\]"):
        RolloutConfig(engine="sglang")
    with pytest.raises(ValueError, match="valid engines"):
        get_engine("sglang")
    with pytest.raises(ValueError, match="top_p"):
        RolloutConfig(top_p=0.0)
    with pytest.raises(ValueError, match="extra"):
        RolloutConfig(temprature=1.0)
    assert RolloutConfig(top_k=0).top_k == -1


def test_engine_session_keeps_the_hf_model_and_loads_new_weights_in_place(tmp_path, model_dir):
    """Run-scoped like vLLM: one from_pretrained for a flow's rounds; a new checkpoint of the same
    architecture has its weights copied in, and every round samples exactly what a cold engine
    samples from that checkpoint."""
    import shutil

    from trace_rl.stages.engines.session import engine_session

    other = tmp_path / "round-0001"
    shutil.copytree(model_dir, other)
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in m.model.layers[0].parameters():
            p.mul_(1.5)
    m.save_pretrained(other)
    cfg, prompts = _cfg(n=2, max_tokens=16), PROMPTS[:2]
    cold = {d: generate(cfg, d, prompts, progress=False) for d in (model_dir, str(other))}
    assert cold[model_dir] != cold[str(other)]  # the weights matter to the samples
    with engine_session() as session:
        got = [session.generate_hf(cfg, d, prompts, progress=False)
               for d in (model_dir, str(other), model_dir)]
        assert (session.hf.loads, session.hf.refreshes) == (1, 2)
        assert session.release_device() == "idle"  # on CPU the model stays loaded
        assert session.hf.model is not None
    assert session.hf.model is None  # closed with the session
    assert got == [cold[model_dir], cold[str(other)], cold[model_dir]]


def test_one_batch_reports_progress_within_it(model_dir, caplog, monkeypatch):
    """A round that fits one batch (one `generate` call) still logs lines while it samples:
    sequences that reached a stop token and tokens so far, then the last line once."""
    import logging
    import re

    from trace_rl.pipeline.progress_lines import PROGRESS_LOGGER

    monkeypatch.setenv("TRACE_PROGRESS_EVERY_S", "0")  # a line whenever asked
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        rows = generate(_cfg(hf={"batch_size": 12, "num_threads": 1}), model_dir, PROMPTS, progress=True)
    said = [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER]
    counts = [int(re.match(r"hf sampling: (\d+)/12 sequences", s).group(1)) for s in said]
    assert len(rows) == 12 and len(said) > 10, said  # a line per decoding step, not one per batch
    assert counts == sorted(counts) and counts.count(12) == 1 and counts[-1] == 12
    assert all("tok/s" in s for s in said) and "done in" in said[-1]
