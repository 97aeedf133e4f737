"""The long-chain testbed (issue 30): 8-10 steps in the split layout, rule-annotator spans on the
tokens that decide a step, the default testbed unchanged, and the warm-start data that makes the
teacher right and the student slip."""

from __future__ import annotations

import json
import random
import re

from trace_rl.stages.annotators.align import token_char_offsets
from trace_rl.stages.annotators.segments import segment_response
from trace_rl.stages.annotators.spans import build_spans
from trace_rl.testbed.config import LONG_CHAIN, TestbedConfig, long_chain_overrides
from trace_rl.testbed.rule import parse_events, rule_annotate
from trace_rl.testbed.task import (
    corrupt_steps,
    is_correct,
    make_prompt_row,
    make_prompts,
    reference_steps,
    render_solution,
)
from trace_rl.testbed.tokenizer import build_tokenizer

SPLIT = TestbedConfig(step_layout="split", min_digits=8, max_digits=9)


def _segments(text: str) -> list[str]:
    return [s.text for s in segment_response(text)]


def _first_difference(a: str, b: str) -> int:
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


def test_default_testbed_keeps_its_fingerprint_and_format():
    # The default build's cache key and text are what they were before the split layout existed:
    # the demo's builds, studies and caches stay valid.
    assert TestbedConfig().config_fingerprint() == "aa38711ef08af2bd"
    row = make_prompt_row(4728, 395, "p")
    assert "layout" not in json.loads(row["meta"])
    assert row["solution"].splitlines()[0] == "Step 1: 8+5+0=13, write 3, carry 1"
    assert TestbedConfig(step_layout="split").config_fingerprint() != "aa38711ef08af2bd"


def test_split_column_addition_has_8_to_10_steps_and_parses_back():
    rows = make_prompts(SPLIT, 200, seed=0)
    steps = [json.loads(r["meta"])["num_steps"] for r in rows]
    assert min(steps) >= 8 and max(steps) <= 10
    for r in rows[:50]:
        meta = json.loads(r["meta"])
        assert meta["layout"] == "split"
        events = parse_events(_segments(r["solution"]), "split")
        parsed = [e.step for e in events if e.kind == "step"]
        assert parsed == reference_steps(meta["a"], meta["b"])
        assert is_correct(r["solution"], r["answer"])
    assert "model.testbed.task=digit_chain" in long_chain_overrides()
    assert TestbedConfig(**LONG_CHAIN).task == "digit_chain"


def test_error_span_holds_the_first_wrong_character():
    """Property over 400 injected slips: the one segment the annotator marks contains the first
    character where the wrong solution departs from the reference, and it is the injected step's
    sum line for a wrong sum, its "write w, carry k" line for a dropped carry."""
    rng = random.Random(0)
    for a, b in [(rng.randrange(10**7, 10**9), rng.randrange(10**7, 10**9)) for _ in range(400)]:
        row = make_prompt_row(a, b, "p", "split")
        steps, bad, injected = corrupt_steps(a, b, rng)
        wrong = render_solution(steps, "split")
        segs = segment_response(wrong)
        ids, label = rule_annotate(row, [s.text for s in segs], "error")
        assert ids and len(ids) == 1 and label == injected, (wrong, ids, label)
        seg = segs[ids[0] - 1]
        assert seg.char_start <= _first_difference(wrong, row["solution"]) < seg.char_end
        sum_line, written_line = steps[bad].render(bad + 1, "split").split("\n")
        assert seg.text == (written_line if injected == "carry dropped" else sum_line)


def test_key_spans_are_the_digit_and_carry_written_of_carry_steps():
    rng = random.Random(1)
    for _ in range(100):
        a, b = rng.randrange(10**7, 10**9), rng.randrange(10**7, 10**9)
        row = make_prompt_row(a, b, "p", "split")
        segs = _segments(row["solution"])
        ids, _ = rule_annotate(row, segs, "key")
        carries = [st for st in reference_steps(a, b) if st.k == 1]
        assert len(ids) == len(carries)
        assert all(re.fullmatch(r"write \d, carry 1", segs[i - 1]) for i in ids)


def test_routed_spans_fit_under_the_papers_cap_on_real_tokens():
    """Through the annotate stage's own span builder and the testbed tokenizer: key and error
    spans of long-chain responses are kept whole under a 25% cap (no `too_broad`), and the
    error span's tokens include the token of the first wrong character."""
    tok = build_tokenizer(SPLIT.model_copy(update={"tokenizer_corpus_size": 200}))
    rng = random.Random(2)
    for i in range(60):
        a, b = rng.randrange(10**7, 10**9), rng.randrange(10**7, 10**9)
        row = make_prompt_row(a, b, "p", "split")
        route = "key" if i % 2 else "error"
        text = row["solution"] if route == "key" else render_solution(corrupt_steps(a, b, rng)[0], "split")
        ids_T = tok(text, add_special_tokens=False).input_ids
        offsets = token_char_offsets(tok, ids_T, text)
        segs = segment_response(text)
        seg_ids, label = rule_annotate(row, [s.text for s in segs], route)
        if not seg_ids:  # a problem without carries has no key spans
            continue
        plan = build_spans(segs, seg_ids, label, offsets, text, 0.25)
        assert plan.spans and not plan.too_broad and plan.coverage <= 0.25, plan
        if route == "error":
            wrong_at = _first_difference(text, row["solution"])
            tok_at = next(t for t, (c0, c1) in enumerate(offsets) if c0 <= wrong_at < c1)
            assert any(s["token_start"] <= tok_at < s["token_end"] for s in plan.spans)


# --- the digit chain (the long-chain testbed's task) ---------------------------------------

CHAIN = TestbedConfig(task="digit_chain")


def test_chain_problems_are_8_to_11_dependent_steps_and_one_slip_fails():
    from trace_rl.testbed.chain import all_problems, corrupt_chain

    train, heldout = all_problems(CHAIN, "train"), all_problems(CHAIN, "heldout")
    assert not set(train) & set(heldout) and len(heldout) >= CHAIN.eval_size
    rng = random.Random(3)
    for row in make_prompts(CHAIN, 300, seed=0):
        meta = json.loads(row["meta"])
        assert 8 <= meta["num_steps"] <= 11 and is_correct(row["solution"], row["answer"])
        problem = (meta["start"], meta["mul"], meta["add"], meta["num_steps"])
        wrong = render_chain_of(corrupt_chain(problem, rng)[0])
        assert not is_correct(wrong, row["answer"]), wrong


def render_chain_of(steps):
    from trace_rl.testbed.chain import render_chain

    return render_chain(steps)


def test_chain_error_span_is_the_slipped_line_and_key_spans_the_kept_digits():
    """Property over 400 injected slips: the one segment marked holds the first character where
    the wrong solution departs from the reference, and is the "keep k" line for a wrong digit
    kept, the step line for a wrong product; key spans are the "keep k" lines of the steps
    whose product has a tens digit."""
    from trace_rl.testbed.chain import corrupt_chain

    rng = random.Random(4)
    rows = make_prompts(CHAIN, 400, seed=1)
    for row in rows:
        meta = json.loads(row["meta"])
        problem = (meta["start"], meta["mul"], meta["add"], meta["num_steps"])
        steps, bad, injected = corrupt_chain(problem, rng)
        wrong = render_chain_of(steps)
        segs = segment_response(wrong)
        ids, label = rule_annotate(row, [s.text for s in segs], "error")
        assert len(ids) == 1 and label == injected, (wrong, ids, label)
        seg = segs[ids[0] - 1]
        assert seg.char_start <= _first_difference(wrong, row["solution"]) < seg.char_end
        head, kept = steps[bad].render(bad + 1).split("\n")
        assert seg.text == (kept if injected == "wrong digit kept" else head)
        key_ids, _ = rule_annotate(row, _segments(row["solution"]), "key")
        key_segs = [_segments(row["solution"])[i - 1] for i in key_ids]
        assert len(key_ids) == len(meta["key_steps"])
        assert all(re.fullmatch(r"keep \d", s) for s in key_segs)


def test_chain_spans_fit_the_papers_cap_on_real_tokens():
    from trace_rl.testbed.chain import corrupt_chain

    tok = build_tokenizer(CHAIN.model_copy(update={"tokenizer_corpus_size": 300}))
    rng = random.Random(5)
    for i, row in enumerate(make_prompts(CHAIN, 80, seed=2)):
        meta = json.loads(row["meta"])
        route = "key" if i % 2 else "error"
        problem = (meta["start"], meta["mul"], meta["add"], meta["num_steps"])
        text = row["solution"] if route == "key" else render_chain_of(corrupt_chain(problem, rng)[0])
        offsets = token_char_offsets(tok, tok(text, add_special_tokens=False).input_ids, text)
        segs = segment_response(text)
        seg_ids, label = rule_annotate(row, [s.text for s in segs], route)
        if not seg_ids:
            continue
        plan = build_spans(segs, seg_ids, label, offsets, text, 0.25)
        assert plan.spans and not plan.too_broad and plan.coverage <= 0.25, plan
        if route == "error":
            at = _first_difference(text, row["solution"])
            tok_at = next(t for t, (c0, c1) in enumerate(offsets) if c0 <= at < c1)
            assert any(s["token_start"] <= tok_at < s["token_end"] for s in plan.spans)


def test_chain_warm_start_teaches_the_teacher_no_slips_and_the_student_slips_at_corrupt_frac():
    """The gap the long chain is built on, in its SFT data: every privileged-format target is
    the reference solution, and the share of student-format targets with a slip is corrupt_frac
    (binomial 4-sigma band over 4,000 examples)."""
    from trace_rl.testbed.sft import make_sft_texts

    cfg = TestbedConfig(**LONG_CHAIN)
    texts = make_sft_texts(cfg, 4000, seed=0)
    reference = {r["problem"]: r["solution"] for r in make_prompts(cfg, 2544, seed=0)}
    student = [(u, t) for u, t in texts if u in reference]
    teacher = [(u, t) for u, t in texts if u not in reference]
    assert teacher and all(t in reference.values() for _, t in teacher)
    slipped = sum(t != reference[u] for u, t in student) / len(student)
    sd = (cfg.corrupt_frac * (1 - cfg.corrupt_frac) / len(student)) ** 0.5
    assert abs(slipped - cfg.corrupt_frac) < 4 * sd, (slipped, cfg.corrupt_frac)
