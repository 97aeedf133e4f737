"""The CPU testbed: task, tokenizer, tiny model build (cached, reloadable), rule annotator."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny import TINY_TESTBED_FIELDS as TINY

from trace_rl.pipeline.chat import encode_chat_prompt
from trace_rl.testbed.build import MANIFEST, build_testbed, read_manifest
from trace_rl.testbed.config import TestbedConfig
from trace_rl.testbed.accuracy import generate_responses, measure_accuracy
from trace_rl.testbed.rule import rule_annotate
from trace_rl.testbed.task import (
    corrupt_steps,
    extract_answer,
    is_correct,
    make_prompt_row,
    make_prompts,
    reference_steps,
    render_solution,
)
from trace_rl.testbed.tokenizer import build_tokenizer



@pytest.fixture(scope="module")
def tiny_cfg() -> TestbedConfig:
    return TestbedConfig(**TINY)


@pytest.fixture(scope="module")
def tiny_build(tiny_cfg, tmp_path_factory) -> str:
    return build_testbed(tiny_cfg, str(tmp_path_factory.mktemp("tb") / "build"), progress=False)


# --- task ---------------------------------------------------------------------------------


def test_reference_solution_is_hand_computed():
    assert render_solution(reference_steps(4728, 395)) == (
        "Step 1: 8+5+0=13, write 3, carry 1\n"
        "Step 2: 2+9+1=12, write 2, carry 1\n"
        "Step 3: 7+3+1=11, write 1, carry 1\n"
        "Step 4: 4+0+1=5, write 5, carry 0\n"
        "Answer: \\boxed{5123}"
    )
    # A final carry gets its own step of the same shape.
    assert render_solution(reference_steps(95, 7)).splitlines()[-2:] == [
        "Step 3: 0+0+1=1, write 1, carry 0",
        "Answer: \\boxed{102}",
    ]


def test_prompts_are_deterministic_disjoint_and_self_consistent():
    cfg = TestbedConfig(min_digits=1, max_digits=3)
    train = make_prompts(cfg, 400, seed=3, split="train")
    assert train == make_prompts(cfg, 400, seed=3, split="train")
    assert train != make_prompts(cfg, 400, seed=4, split="train")
    heldout = make_prompts(cfg, 200, seed=3, split="heldout")

    def key(row):
        meta = json.loads(row["meta"])
        return tuple(sorted((meta["a"], meta["b"])))

    assert not {key(r) for r in train} & {key(r) for r in heldout}
    assert len({r["prompt_id"] for r in train + heldout}) == 600
    assert train[0]["prompt_id"] == "tb-train-3-000000"
    for row in train[:50] + heldout[:50]:
        meta = json.loads(row["meta"])
        assert row["answer"] == str(meta["a"] + meta["b"])
        assert row["problem"].endswith(f"\n{meta['a']} + {meta['b']}")
        assert is_correct(row["solution"], row["answer"])
        assert len(row["solution"].splitlines()) == meta["num_steps"] + 1
        assert row["source"] == "testbed"


def test_answer_extraction_normalises_and_takes_last_box():
    assert extract_answer("\\boxed{12} then \\boxed{ 0,512 }") == "512"
    assert extract_answer("no box") is None
    assert extract_answer("\\boxed{12a}") is None
    assert is_correct("Answer: \\boxed{007}", "7") and not is_correct("\\boxed{8}", "7")


def test_corrupted_solution_is_wrong_and_rule_finds_the_injected_step():
    rng = random.Random(0)
    labels_seen = set()
    for _ in range(200):
        a, b = rng.randint(1, 9999), rng.randint(1, 9999)
        steps, bad, label = corrupt_steps(a, b, rng)
        text = render_solution(steps)
        assert extract_answer(text) != str(a + b)
        row = make_prompt_row(a, b, "p")
        assert rule_annotate(row, text.splitlines(), "error") == ([bad + 1], label)
        labels_seen.add(label)
    assert labels_seen == {"carry dropped", "digit sum wrong"}


# --- rule annotator -----------------------------------------------------------------------

ROW = make_prompt_row(4728, 395, "p")  # carries in steps 1, 2, 3


def test_rule_key_route_marks_carry_steps_of_a_correct_response():
    segments = ROW["solution"].splitlines()
    assert rule_annotate(ROW, segments, "key") == ([1, 2, 3], "carry propagation")
    no_carry = make_prompt_row(123, 456, "q")
    assert rule_annotate(no_carry, no_carry["solution"].splitlines(), "key") == ([], "")
    assert rule_annotate(ROW, segments, "none") == ([], "")


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        # carry dropped in step 2, later steps consistent with the slip
        (
            [
                "Step 1: 8+5+0=13, write 3, carry 1",
                "Step 2: 2+9+1=12, write 2, carry 0",
                "Step 3: 7+3+0=10, write 0, carry 1",
                "Step 4: 4+0+1=5, write 5, carry 0",
                "Answer: \\boxed{5023}",
            ],
            ([2], "carry dropped"),
        ),
        # misread digit, with messy spacing the parser must still accept
        (
            ["Step 1 : 8 + 5 + 0 = 13 , write 3 , carry 1", "Step 2: 2+8+1=11, write 1, carry 1"],
            ([2], "wrong digit read"),
        ),
        (["Step 1: 8+5+0=14, write 4, carry 1"], ([1], "digit sum wrong")),
        (["Step 1: 8+5+0=13, write 3, carry 1", "Step 2: 2+9+1=1"], ([2], "malformed step")),
        (["Step 1: 8+5+0=13, write 3, carry 1", "Answer: \\boxed{3}"], ([2], "missing step")),
        (
            [
                "Step 1: 8+5+0=13, write 3, carry 1",
                "Step 2: 2+9+1=12, write 2, carry 1",
                "Step 3: 7+3+1=11, write 1, carry 1",
                "Step 4: 4+0+1=5, write 5, carry 0",
                "Answer: \\boxed{5124}",
            ],
            ([5], "answer mismatch"),
        ),
        (
            ["Step 1: 8+5+0=13, write 3, carry 1", "Step 2: 2+9+1=12, write 2, carry 1"],
            ([2], "incomplete solution"),
        ),
        ([], ([], "")),
    ],
)
def test_rule_error_route_finds_the_first_wrong_step(lines, expected):
    assert rule_annotate(ROW, lines, "error") == expected


def test_rule_error_route_final_carry_and_bad_route():
    row = make_prompt_row(95, 7, "q")  # Step 3 is the final carry
    lines = [
        "Step 1: 5+7+0=12, write 2, carry 1",
        "Step 2: 9+0+1=10, write 0, carry 1",
        "Answer: \\boxed{2}",
    ]
    assert rule_annotate(row, lines, "error") == ([3], "final carry dropped")
    with pytest.raises(ValueError, match="route must be one of"):
        rule_annotate(row, lines, "keys")


# --- tokenizer ----------------------------------------------------------------------------


def test_tokenizer_round_trip_digits_and_chat_template(tiny_cfg):
    tok = build_tokenizer(tiny_cfg)
    for text in [
        "Step 1: 8+5+0=13, write 3, carry 1\n",
        "  two  spaces\n\n",
        "é≈ 漢字 🙂 \\boxed{}",
    ]:
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok.tokenize("12345") == ["1", "2", "3", "4", "5"]
    user = [{"role": "user", "content": "hi"}]
    off = tok.apply_chat_template(
        user, add_generation_prompt=True, enable_thinking=False, tokenize=False
    )
    on = tok.apply_chat_template(
        user, add_generation_prompt=True, enable_thinking=True, tokenize=False
    )
    assert off == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert on == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert encode_chat_prompt(tok, "hi", False) == tok(off, add_special_tokens=False).input_ids
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for special in ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]:
        assert len(tok(special, add_special_tokens=False).input_ids) == 1


# --- build --------------------------------------------------------------------------------


def test_build_reloads_with_auto_classes_and_keeps_lm_head(tiny_cfg, tiny_build):
    tok = AutoTokenizer.from_pretrained(tiny_build)
    model = AutoModelForCausalLM.from_pretrained(tiny_build)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.tie_word_embeddings is False
    assert model.config.eos_token_id == tok.eos_token_id
    with safe_open(str(Path(tiny_build) / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()  # noqa: SIM118 (safe_open is not a dict)
    assert tok.apply_chat_template(
        [{"role": "user", "content": "x"}],
        add_generation_prompt=True,
        enable_thinking=False,
        tokenize=False,
    ).endswith("</think>\n\n")
    manifest = read_manifest(tiny_build)
    assert manifest["fingerprint"] == tiny_cfg.fingerprint()
    assert manifest["config"] == tiny_cfg.model_dump(mode="json")
    assert set(manifest["accuracy"]) == {"student", "privileged"}
    assert manifest["wall_s"] > 0


def test_build_is_cached_and_rebuilt_on_change(tiny_cfg, tiny_build, tmp_path):
    first = read_manifest(tiny_build)
    assert build_testbed(tiny_cfg, tiny_build, progress=False) == tiny_build
    assert read_manifest(tiny_build)["created_unix"] == first["created_unix"]
    assert build_testbed(tiny_cfg, tiny_build, force=True, progress=False) == tiny_build
    rebuilt = read_manifest(tiny_build)
    assert rebuilt["created_unix"] > first["created_unix"]
    # Deterministic: the forced rebuild produced the same weights.
    assert rebuilt["sft_loss_last"] == first["sft_loss_last"]
    assert rebuilt["accuracy"] == first["accuracy"]
    assert not [p for p in Path(tiny_build).parent.iterdir() if ".tmp-" in p.name]
    other = tiny_cfg.model_copy(update={"seed": 1})
    build_testbed(other, tiny_build, progress=False)
    assert read_manifest(tiny_build)["fingerprint"] == other.fingerprint()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a testbed build"):
        build_testbed(tiny_cfg, str(tmp_path / "foreign"), progress=False)
    assert (tmp_path / "foreign" / MANIFEST).exists() is False


def test_left_padded_batch_generation_matches_single(tiny_build):
    tok = AutoTokenizer.from_pretrained(tiny_build)
    model = AutoModelForCausalLM.from_pretrained(tiny_build).eval()
    msgs = ["short", "a much longer message than the other one, padded on the left"]
    batched = generate_responses(
        model, tok, msgs, temperature=0.0, n=1, max_new_tokens=8, batch_size=2, seed=0
    )
    single = [
        generate_responses(
            model, tok, [m], temperature=0.0, n=1, max_new_tokens=8, batch_size=1, seed=0
        )[0]
        for m in msgs
    ]
    assert batched == single
    rows = make_prompts(TestbedConfig(**TINY), 3, seed=0, split="heldout")
    acc = measure_accuracy(tiny_build, rows, privileged=True, max_new_tokens=8, batch_size=3)
    assert acc == measure_accuracy(
        tiny_build, rows, privileged=True, max_new_tokens=8, batch_size=3
    )
    assert 0.0 <= acc <= 1.0


def test_config_rejects_bad_values_with_a_fix():
    with pytest.raises(ValueError, match="min_digits"):
        TestbedConfig(min_digits=5, max_digits=3)
    with pytest.raises(ValueError, match="teacher_template must contain"):
        TestbedConfig(teacher_template="{problem} only")
    with pytest.raises(ValueError, match="extra"):
        TestbedConfig(hidden=3)
    assert torch.get_num_threads() >= 1
