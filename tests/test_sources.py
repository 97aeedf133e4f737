"""The one source reader: every catalog source read through `datasets.load_dataset` from synthetic
rows in its real Hub format (tests/fixtures/hub_sources.py), the answer formats, local files, and
the errors for offline, gated and malformed sources."""

from __future__ import annotations

import json
import random

import pytest
from conftest import SHARED_DATA, needs_shared_data

from fixtures.hub_sources import HUB
from trace_rl.data_schemas.errors import ConfigError, StageError
from trace_rl.stages.sources import (
    GENERATED_PREFIX,
    CATALOG,
    GPQA_COLUMNS,
    SourceSpec,
    answer_text,
    hub_error_message,
    last_boxed,
    load_hub_rows,
    read_source,
    resolve,
    split_gsm8k,
    strip_dollars,
)

EXPECTED = {  # catalog name -> (rows, first id, first answer) from the synthetic rows
    "math500": (4, "test/algebra/100.json", "0"),
    "aime24": (3, "61", "001"),
    "aime25": (3, "0", "0"),
    "amc23": (3, "0", "27"),
    "minerva_math": (3, "minerva_math-0", "0\\times 10^{3}"),
    "olympiadbench": (3, "1600", "\\frac{1}{2}"),
    "gsm8k": (2, "gsm8k-test-0", "72"),
    "gsm8k_train": (5, "gsm8k-train-0", "0"),
    "gpqa_diamond": (6, "recSYNTH0", None),
    "math_train_lvl3to5": (21, "math_train-1", "\\frac{2}{1}"),
}


GENERATED = {name for name, spec in CATALOG.items() if spec.source.startswith(GENERATED_PREFIX)}


def test_every_catalog_entry_is_pinned_or_says_it_is_not():
    assert GENERATED == {"word_problems_train", "word_problems_test"}  # made here, no hub
    assert set(EXPECTED) == set(CATALOG) - GENERATED
    for name, spec in CATALOG.items():
        if name in GENERATED:
            continue
        assert spec.revision is None or (len(spec.revision) == 40 and int(spec.revision, 16) >= 0), name
        assert not spec.is_file and spec.source in HUB, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_catalog_sources_load_through_datasets_in_their_hub_format(hub_mirror, name):
    data = read_source(CATALOG[name], name)
    rows, first_id, first_answer = EXPECTED[name]
    assert len(data.records) == rows
    assert data.records[0]["prompt_id"] == first_id
    if first_answer is not None:
        assert data.records[0]["answer"] == first_answer
    assert len({r["prompt_id"] for r in data.records}) == rows
    assert all(isinstance(r["answer"], str) and r["answer"] and r["problem"] for r in data.records)
    assert read_source(CATALOG[name], name).data_id == data.data_id  # deterministic identity


def test_gsm8k_splits_the_worked_solution_from_the_number_without_commas(hub_mirror):
    recs = read_source(CATALOG["gsm8k"], "gsm8k").records
    assert [r["answer"] for r in recs] == ["72", "1250"]
    assert recs[1]["solution"] == "1000+250=<<1000+250=1250>>1250"
    assert recs[0]["problem"] == HUB["openai/gsm8k"]["main"]["test"][0]["question"]
    assert split_gsm8k("a\n#### 12,345,678") == ("12345678", "a")
    assert split_gsm8k("no marker") == (None, None)


def test_math_train_keeps_levels_3_to_5_with_their_solutions(hub_mirror):
    recs = read_source(CATALOG["math_train_lvl3to5"], "math_train").records
    assert {r["meta"]["level"] for r in recs} == {"Level 3", "Level 4", "Level 5"}
    # The worked solution is the privileged teacher's context (METHOD.md), so it is kept.
    assert all(r["solution"] and "\\boxed" in r["solution"] for r in recs)
    # The answer is the LAST box of the solution, braces matched.
    assert [r["answer"] for r in recs[:3]] == ["\\frac{2}{1}", "\\frac{4}{1}", "\\frac{6}{1}"]
    assert last_boxed("x \\boxed{1} then \\boxed{\\{a, b\\}}") == "\\{a, b\\}"
    assert last_boxed("no box") is None


def test_gpqa_choices_are_shuffled_row_by_row_and_the_letter_marks_the_correct_one(hub_mirror):
    recs = read_source(CATALOG["gpqa_diamond"], "gpqa_diamond").records
    raw = HUB["Idavidrein/gpqa"]["gpqa_diamond"]["train"]
    rng = random.Random(0)
    for rec, row in zip(recs, raw, strict=True):
        order = list(range(4))
        rng.shuffle(order)
        choices, index = rec["meta"]["choices"], rec["meta"]["answer_index"]
        assert choices == [row[GPQA_COLUMNS[i]] for i in order]
        assert choices[index] == row["Correct Answer"] and rec["answer"] == "ABCD"[index]
        assert sorted(choices) == sorted(row[c] for c in GPQA_COLUMNS)
    # The letter distribution of 198 rows under this rule is the local file's (shared/data README).
    rng, counts = random.Random(0), {}
    for _ in range(198):
        order = list(range(4))
        rng.shuffle(order)
        counts["ABCD"[order.index(0)]] = counts.get("ABCD"[order.index(0)], 0) + 1
    assert counts == {"A": 42, "B": 47, "C": 46, "D": 63}


@pytest.mark.parametrize("value, text", [
    (27.0, "27"), (0.5, "0.5"), (3, "3"), (" 7 ", "7"), (["$x$", "y"], "$x$"), ([], None), ("", None), (None, None),
])
def test_answer_text_normalises_numbers_lists_and_blanks(value, text):
    assert answer_text(value) == text


def test_strip_dollars_keeps_escaped_ones():
    assert strip_dollars("$\\frac{1}{2}$") == "\\frac{1}{2}"
    assert strip_dollars("\\$5") == "\\$5"
    assert strip_dollars("$ $") is None


def test_local_files_limit_drop_and_raise(tmp_path):
    path = tmp_path / "mine.jsonl"
    recs = [{"qid": "a", "text": "1+1?\u2028(one line)", "gold": 2}, {"qid": "b", "text": "", "gold": 1},
            {"qid": "a", "text": "again?", "gold": 3}, {"qid": "c", "text": "2+2?", "gold": 4.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    spec = SourceSpec(source=str(path), columns={"prompt_id": "qid", "problem": "text", "answer": "gold"})
    data = read_source(spec, "mine", on_bad="drop")
    assert [(r["prompt_id"], r["answer"]) for r in data.records] == [("a", "2"), ("c", "4")]
    assert data.records[0]["problem"] == "1+1?\u2028(one line)"  # U+2028 does not split a JSONL row
    assert data.dropped == {"empty_problem_or_answer": 1, "duplicate_id": 1}
    assert [r["prompt_id"] for r in read_source(spec, "mine", on_bad="drop", limit=1).records] == ["a"]
    with pytest.raises(StageError, match=r"row b \(empty problem or answer\)"):
        read_source(spec, "mine")
    with pytest.raises(ConfigError, match="no column for"):
        read_source(SourceSpec(source=str(path), columns={"problem": "nope"}), "mine")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(str(tmp_path / "missing.parquet"))


def test_resolve_applies_overrides_to_catalog_entries():
    spec = resolve("gsm8k", split="train", overrides={"columns": {"prompt_id": "qid"}, "revision": None})
    assert spec.split == "train" and spec.revision == CATALOG["gsm8k"].revision
    assert spec.columns == {**CATALOG["gsm8k"].columns, "prompt_id": "qid"}
    plain = resolve("someone/dataset", split="validation")
    assert (plain.source, plain.split, plain.answer_format) == ("someone/dataset", "validation", "plain")


def test_offline_and_not_cached_says_how_to_get_the_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder shadows the repo id
    with pytest.raises(ConfigError) as err:
        load_hub_rows(CATALOG["gsm8k"])
    message = str(err.value)
    assert "HF_HUB_OFFLINE=1" in message and "not in the local HF cache" in message
    assert "data.source" in message and "eval.data_dir" in message


def test_gated_dataset_error_says_how_to_get_access():
    from datasets.exceptions import DatasetNotFoundError

    exc = DatasetNotFoundError("Dataset 'Idavidrein/gpqa' is a gated dataset on the Hub. You must be "
                               "authenticated to access it.")
    message = hub_error_message(CATALOG["gpqa_diamond"], "gpqa_diamond", exc)
    assert "https://huggingface.co/datasets/Idavidrein/gpqa" in message
    assert "huggingface-cli login" in message and "HF_TOKEN" in message and "eval.data_dir" in message


@needs_shared_data
def test_the_shared_local_files_read_with_the_same_reader():
    spec = SourceSpec(source=str(SHARED_DATA / "gsm8k" / "train.jsonl"), split="train")
    data = read_source(spec, "gsm8k_train")
    assert len(data.records) == 7473 and data.records[0]["prompt_id"] == "gsm8k-train-0"
