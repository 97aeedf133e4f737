"""The benchmark registry: built-in names read their public HF datasets (synthetic rows in the
real formats here), eval.data_dir reads local copies (the real files in shared/data when present),
and every benchmark becomes the prompts we sample.

GPQA text must never reach logs: these tests assert on letters, ids and counts only, and never
print or compare question text.
"""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA, needs_shared_data
from fixtures.hub_sources import write_local_layout

from trace_rl.stages.config import DEFAULT_INSTRUCTION, TraceConfig
from trace_rl.data_schemas.errors import ConfigError, StageError
from trace_rl.stages.benchmarks import (
    CHOICE_LETTERS,
    MATH_BENCHMARKS,
    BenchmarkSource,
    benchmark_names,
    format_choices,
    gpqa_rows,
    inline_file_name,
    load_benchmark,
)

ROW_COUNTS = {
    "math500": 500,
    "aime24": 30,
    "aime25": 30,
    "amc23": 40,
    "gpqa_diamond": 198,
    "minerva_math": 272,
    "olympiadbench": 675,
    "gsm8k": 1319,
}
MATH_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."


def _cfg(**eval_over) -> TraceConfig:
    return TraceConfig.model_validate({"eval": {"data_dir": str(SHARED_DATA), **eval_over}})


def _hub_cfg(**eval_over) -> TraceConfig:
    return TraceConfig.model_validate({"eval": eval_over})


def test_default_config_reads_public_datasets_not_a_folder_outside_the_repo():
    assert TraceConfig().eval.data_dir is None


@pytest.mark.parametrize("name, rows", [
    ("math500", 4), ("aime24", 3), ("aime25", 3), ("amc23", 3), ("minerva_math", 3), ("olympiadbench", 3),
    ("gsm8k", 2), ("gpqa_diamond", 6),
])
def test_builtin_names_read_their_hub_dataset(hub_mirror, name, rows):
    bench = load_benchmark(_hub_cfg(), name)
    assert len(bench.rows) == rows and bench.verifier == ("choice" if name == "gpqa_diamond" else "math")
    assert all(r["source"] == name and r["answer"] for r in bench.rows)
    if name != "gpqa_diamond":
        assert all(r["problem"].endswith(MATH_SUFFIX) for r in bench.rows)
    assert load_benchmark(_hub_cfg(limit=2), name).rows == bench.rows[:2]


def test_gsm8k_prompts_from_the_hub_format(hub_mirror):
    bench = load_benchmark(_hub_cfg(), "gsm8k")
    assert [(r["prompt_id"], r["answer"]) for r in bench.rows] == [("gsm8k-test-0", "72"), ("gsm8k-test-1", "1250")]
    assert bench.rows[0]["problem"] == "Ana has 3 boxes of 24 pens. How many pens?" + MATH_SUFFIX
    assert bench.rows[0]["solution"] == "3*24=<<3*24=72>>72"


def test_data_dir_overrides_the_hub_with_local_files(tmp_path):
    cfg = _hub_cfg(data_dir=str(write_local_layout(tmp_path / "data")))
    math = load_benchmark(cfg, "math500")
    assert [(r["prompt_id"], r["answer"]) for r in math.rows] == [("m0", "0"), ("m1", "1"), ("m2", "2")]
    gpqa = load_benchmark(cfg, "gpqa_diamond")
    assert [r["answer"] for r in gpqa.rows] == ["A", "B", "C"] and gpqa.verifier == "choice"
    assert "(A) w\n(B) x\n(C) y\n(D) z" in gpqa.rows[0]["problem"]
    with pytest.raises(ConfigError, match="unset eval.data_dir"):
        load_benchmark(cfg, "aime24")
    # eval.sources may replace a registered name; it keeps that name's verifier.
    own = BenchmarkSource(source=str(tmp_path / "data" / "gpqa_diamond" / "test.jsonl"),
                          columns={"problem": "question", "answer": "answer_letter"})
    replaced = load_benchmark(_hub_cfg(), "gpqa_diamond", {"gpqa_diamond": own})
    assert replaced.verifier == "choice" and [r["answer"] for r in replaced.rows] == ["A", "B", "C"]


@needs_shared_data
@pytest.mark.parametrize("name", sorted(ROW_COUNTS))
def test_real_files_load_with_their_row_counts(name: str) -> None:
    bench = load_benchmark(_cfg(), name)
    assert len(bench.rows) == ROW_COUNTS[name]
    assert bench.verifier == ("choice" if name == "gpqa_diamond" else "math")
    assert len({r["prompt_id"] for r in bench.rows}) == len(bench.rows)
    assert all(r["answer"].strip() for r in bench.rows)


@needs_shared_data
def test_math_prompts_wrap_the_raw_problem_and_keep_the_reference() -> None:
    bench = load_benchmark(_cfg(limit=3), "math500")
    raw = [
        json.loads(line)
        for line in (SHARED_DATA / "math500" / "test.jsonl").read_text().splitlines()[:3]
    ]
    assert [r["prompt_id"] for r in bench.rows] == [r["id"] for r in raw]
    for row, rec in zip(bench.rows, raw):
        assert row["problem"] == rec["problem"] + MATH_SUFFIX
        assert row["problem"] == DEFAULT_INSTRUCTION.format(problem=rec["problem"])
        assert row["answer"] == rec["answer"]
        assert row["solution"] == rec["solution"]
    assert raw[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"


@needs_shared_data
def test_gpqa_prompts_list_lettered_choices_and_reference_is_the_answer_letter() -> None:
    bench = load_benchmark(_cfg(), "gpqa_diamond")
    raw = [
        json.loads(line)
        for line in (SHARED_DATA / "gpqa_diamond" / "test.jsonl").read_text().splitlines()
    ]
    letters_seen: dict[str, int] = {}
    instruction = "Please reason step by step, and put the letter of the correct choice (A, B, C, D) within \\boxed{}."
    for row, rec in zip(bench.rows, raw, strict=True):
        # Booleans only: a failing comparison of strings would print benchmark text.
        ok_letter = row["answer"] == CHOICE_LETTERS[rec["answer_index"]] == rec["answer_letter"]
        assert ok_letter, f"row {rec['id']}: reference letter does not match answer_index"
        choices = [str(c).strip() for c in rec["choices"]]
        tail = (
            "\n\n" + "\n".join(f"({x}) {c}" for x, c in zip("ABCD", choices)) + "\n\n" + instruction
        )
        ok_format = row["problem"].endswith(tail) and row["problem"].startswith(
            str(rec["question"]).strip()
        )
        assert ok_format, f"row {rec['id']}: prompt is not question + (A)-(D) choices + instruction"
        # The line at the reference letter is the choice the file marks correct.
        marked = f"\n({row['answer']}) {choices[rec['answer_index']]}\n"
        ok_marked = marked in tail
        assert ok_marked, f"row {rec['id']}: the answer letter points elsewhere"
        assert row["solution"] is None
        letters_seen[row["answer"]] = letters_seen.get(row["answer"], 0) + 1
    assert letters_seen == {"A": 42, "B": 47, "C": 46, "D": 63}  # the README's distribution


def test_gpqa_mismatched_answer_letter_is_an_error_naming_the_row_only() -> None:
    rec = {
        "prompt_id": "rec-x",
        "problem": "SECRET-QUESTION-TEXT",
        "answer": "B",
        "meta": {"choices": ["w", "x", "y", "z"], "answer_index": 2},
    }
    with pytest.raises(StageError) as err:
        gpqa_rows([rec])
    assert "rec-x" in str(err.value) and "SECRET" not in str(err.value)
    assert format_choices(["w", " x "]) == "(A) w\n(B) x"


@needs_shared_data
def test_limit_takes_a_stable_prefix_and_changes_the_fingerprint() -> None:
    full, part = load_benchmark(_cfg(), "aime24"), load_benchmark(_cfg(limit=5), "aime24")
    assert part.rows == full.rows[:5]
    assert part.fingerprint != full.fingerprint
    assert load_benchmark(_cfg(limit=5), "aime24").fingerprint == part.fingerprint


def test_local_file_with_a_column_mapping(tmp_path) -> None:
    path = tmp_path / "mine.jsonl"
    recs = [{"qid": f"q{i}", "text": f"What is {i}+{i}?", "gold": str(2 * i)} for i in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    src = BenchmarkSource(
        source=str(path),
        columns={"prompt_id": "qid", "problem": "text", "answer": "gold"},
        template="Q: {problem}",
    )
    bench = load_benchmark(_cfg(), "mine", {"mine": src})
    assert bench.name == "mine" and bench.verifier == "math"
    assert [(r["prompt_id"], r["problem"], r["answer"]) for r in bench.rows] == [
        (f"q{i}", f"Q: What is {i}+{i}?", str(2 * i)) for i in range(4)
    ]
    # Inline spec: default columns (id/problem/answer) and the math template.
    path2 = tmp_path / "plain.jsonl"
    path2.write_text(json.dumps({"id": "a", "problem": "1+1?", "answer": "2"}) + "\n")
    inline = load_benchmark(_cfg(), f"file:{path2}")
    assert inline.name == "plain" and inline.rows[0]["problem"] == "1+1?" + MATH_SUFFIX
    # Split-named files take their folder's name; a registered name is never taken over.
    assert inline_file_name(SHARED_DATA / "amc23" / "test.jsonl") == "amc23_test"
    assert inline_file_name(SHARED_DATA / "x" / "math500.jsonl") == "math500_file"
    bad = BenchmarkSource(source=str(path), columns={"problem": "nope"})
    with pytest.raises(ConfigError, match="nope"):
        load_benchmark(_cfg(), "bad", {"bad": bad})


def test_a_problem_repeated_under_two_ids_is_refused(tmp_path) -> None:
    """It would count twice in avg@k and its CI (a local copy merged from two exports, say)."""
    path = tmp_path / "merged.jsonl"
    recs = [{"id": "a", "problem": "What is 2+2?", "answer": "4"},
            {"id": "b", "problem": "What is 3+3?", "answer": "6"},
            {"id": "c", "problem": "What is  2+2? ", "answer": "4"}]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    with pytest.raises(StageError, match="rows a and c hold the same problem") as err:
        load_benchmark(_cfg(), f"file:{path}")
    assert "2+2" not in str(err.value)  # rows are named by id, never by text
    assert len(load_benchmark(_cfg(limit=2), f"file:{path}").rows) == 2


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        load_benchmark(_cfg(), "math5000")
    for name in (*MATH_BENCHMARKS, "gpqa_diamond", "testbed"):
        assert name in str(err.value)
    assert set(benchmark_names()) == {*MATH_BENCHMARKS, "gpqa_diamond", "testbed"}
    with pytest.raises(ValueError, match="unknown contract columns"):
        BenchmarkSource(source="x.jsonl", columns={"question": "q"})


def test_testbed_is_the_heldout_split() -> None:
    from trace_rl.testbed.task import make_prompts

    cfg = _cfg(limit=12)
    bench = load_benchmark(cfg, "testbed")
    assert bench.verifier == "testbed" and len(bench.rows) == 12
    assert all(r["prompt_id"].startswith("tb-heldout-") for r in bench.rows)
    train_ids = {r["problem"] for r in make_prompts(cfg.model.testbed, 500, 0, split="train")}
    assert not train_ids & {r["problem"] for r in bench.rows}
    assert load_benchmark(cfg, "testbed").rows == bench.rows  # deterministic
