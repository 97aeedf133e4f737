"""The teacher-surprise annotator on the testbed, judged against the rule annotator.

Responses are the testbed's reference solutions (correct: key route) and solutions with one
injected error (error route). The rule annotator marks the carry steps and the first wrong step;
the surprise annotator only sees the checkpoint. Its best segment must be one of the rule's more
often than a uniformly drawn segment is. (On this barely trained tiny testbed the teacher's
divergence peaks at the first step's format tokens, so the best segment is mostly the first:
docs/real_model.md reports that baseline next to the measured precision.)
"""

from __future__ import annotations

import json
import random

import pytest

from trace_rl.pipeline.chat import encode_chat_prompt
from trace_rl.stages.annotators import AnnotateConfig, annotate_rows
from trace_rl.stages.annotators.surprise import choose_segments
from trace_rl.testbed.config import TestbedConfig
from trace_rl.testbed.task import corrupt_steps, make_prompt_row, render_solution, sample_pairs

CAP = 0.4


def test_choose_segments_best_first_within_the_cap():
    """Property: the chosen segments are the best-scoring that fit, in score order; their
    tokens stay within floor(cap * T) unless the single best one alone exceeds it."""
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 12)
        scores = [(i + 1, rng.random(), rng.randint(1, 20)) for i in range(n)]
        total = sum(s[2] for s in scores)
        cap = rng.choice([0.1, 0.25, 0.4, 1.0])
        chosen = choose_segments(scores, total, cap)
        by_id = {s[0]: s for s in scores}
        budget = int(cap * total + 1e-9)
        used = sum(by_id[i][2] for i in chosen)
        assert chosen and chosen[0] == max(scores, key=lambda s: (s[1], -s[0]))[0]
        assert used <= budget or len(chosen) == 1
        assert [by_id[i][1] for i in chosen] == sorted((by_id[i][1] for i in chosen), reverse=True)
        # Nothing left out would still have fitted.
        for seg_id, _, n_tok in scores:
            if seg_id not in chosen:
                assert used + n_tok > budget


def _items(tok, n: int, route: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for i, (a, b) in enumerate(sample_pairs(TestbedConfig(), n, seed=seed, split="train")):
        prompt = make_prompt_row(a, b, f"{route}-{i}")
        wrong = render_solution(corrupt_steps(a, b, rng)[0])
        text = prompt["solution"] if route == "key" else wrong
        ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        items.append({
            "rollout_id": prompt["prompt_id"], "route": route, "problem": prompt["problem"],
            "answer": prompt["answer"], "solution": prompt["solution"], "meta": prompt["meta"],
            "prompt": prompt, "response_token_ids": ids,
            "response_text": tok.decode(ids, skip_special_tokens=True),
            "prompt_token_ids": encode_chat_prompt(tok, prompt["problem"], False),
            "sampling": json.dumps({"enable_thinking": False}),
        })
    return items


@pytest.mark.slow
@pytest.mark.parametrize("route", ["key", "error"])
def test_surprise_spans_overlap_the_rule_annotator(tiny_testbed_dir, route):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_testbed_dir)
    items = _items(tok, 48, route, seed=5 if route == "key" else 4)
    rule = annotate_rows(AnnotateConfig(backend="rule", coverage_cap=CAP), items, tok,
                         progress=False)
    surprise = annotate_rows(AnnotateConfig(backend="surprise", coverage_cap=CAP), items, tok,
                             progress=False, model_path=tiny_testbed_dir)
    assert [r["rollout_id"] for r in surprise] == [it["rollout_id"] for it in items]
    assert all(r["annotator"] == f"surprise:{tiny_testbed_dir}" for r in surprise)
    assert all(r["status"] == "ok" and r["coverage"] <= CAP + 1e-9 for r in surprise)
    direction = json.loads(surprise[0]["raw_response"])["direction"]
    assert direction == {"key": "forward", "error": "reverse"}[route]

    # The best-scored segment against the rule's: precision vs a uniformly drawn segment.
    hit, chance, compared = 0, 0.0, 0
    for item, r_row, s_row in zip(items, rule, surprise, strict=True):
        if r_row["status"] != "ok":
            continue  # no carry step (key route): nothing to compare with
        truth = {sid for sp in r_row["spans"] for sid in sp["segment_ids"]}
        scores = json.loads(s_row["raw_response"])["segment_scores"]
        best = max(scores, key=lambda sid: (scores[sid], -int(sid)))
        assert int(best) in {sid for sp in s_row["spans"] for sid in sp["segment_ids"]}, item
        hit += int(best) in truth
        chance += len(truth) / len(scores)
        compared += 1
    assert compared >= 25
    assert hit / compared > chance / compared + 0.1, (hit / compared, chance / compared)
