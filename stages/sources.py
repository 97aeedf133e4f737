"""The one reader of problem sources, used by `prepare` (training prompts) and `evaluate`
(benchmarks): a local .jsonl/.json/.parquet file or a Hugging Face dataset, plus a column map
and an answer format, normalised to records `{prompt_id, problem, answer, solution, meta}`.

`CATALOG` names the public sources (docs/data.md has the table): each built-in benchmark and the
training sets resolve to a HF dataset id, config, split and, where known, a pinned revision,
loaded through `datasets.load_dataset`, so the HF cache and HF_HUB_OFFLINE apply as usual.
Nothing here prints a problem: errors name rows by id and sources by their columns.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from trace_rl.data_schemas.errors import ConfigError, StageError
from trace_rl.stages.source_answers import answer_text, last_boxed, split_gsm8k, strip_dollars

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
HUB_URL = "https://huggingface.co/datasets/"
CHOICE_LETTERS = "ABCD"
# Contract column -> source columns tried in order when the column map does not name it.
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "prompt_id": ("id", "unique_id", "prompt_id", "idx"),
    "problem": ("problem", "question", "prompt", "query"),
    "answer": ("answer", "final_answer", "gt", "ground_truth"),
    "solution": ("solution", "reference_solution", "explanation"),
}
# How the reference answer is read from a record:
#   plain   the answer column (numbers as text: 27.0 -> "27"; a list -> its first item)
#   gsm8k   "<worked solution> #### 1,000": answer "1000", solution the text before ####
#   dollar  plain, with unescaped '$' removed ("$\frac{1}{2}$" -> "\frac{1}{2}")
#   boxed   the last \boxed{} of the solution column (MATH)
#   gpqa    GPQA's CSV columns: choices = correct + 3 incorrect, shuffled with
#           random.Random(0) drawn row by row in file order; answer = the correct letter
AnswerFormat = Literal["plain", "gsm8k", "dollar", "boxed", "gpqa"]
GPQA_COLUMNS = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
GPQA_SHUFFLE_SEED = 0


def check_contract_columns(columns: dict[str, str]) -> dict[str, str]:
    """A column map names only contract columns (its values are the source's own names)."""
    unknown = sorted(set(columns) - set(DEFAULT_COLUMNS))
    if unknown:
        raise ValueError(f"unknown contract columns {unknown}; valid: {sorted(DEFAULT_COLUMNS)}")
    return columns


class SourceSpec(BaseModel):
    """Where problems come from and how their columns map onto the prompts contract."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(..., description="a .jsonl/.json/.parquet file or a HF dataset id (or a local dir in hub layout)")
    configs: tuple[str, ...] = Field((), description="HF config names; several are concatenated in order")
    split: str = "test"
    revision: str | None = Field(None, description="HF commit sha (None = the default branch)")
    columns: dict[str, str] = Field(default_factory=dict, description="contract column -> source column")
    answer_format: AnswerFormat = "plain"
    keep: dict[str, tuple[str, ...]] = Field(
        default_factory=dict, description="source column -> allowed values; other rows are left out"
    )
    drop_solution: bool = Field(False, description="answers only: never pass a solution on")
    id_prefix: str | None = Field(None, description="ids of rows without an id column: <prefix>-<row>")

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: dict[str, str]) -> dict[str, str]:
        return check_contract_columns(v)

    @property
    def is_file(self) -> bool:
        return Path(self.source).suffix in FILE_SUFFIXES

    def describe(self) -> str:
        if self.is_file:
            return self.source
        where = self.source + (f" [{', '.join(self.configs)}]" if self.configs else "")
        return f"{where} split {self.split!r}" + (f" @ {self.revision[:12]}" if self.revision else "")


GENERATED_PREFIX = "generated:"  # a source made by code shipped here: generated:<name>
_MATH_LEVELS_3_TO_5 = ("Level 3", "Level 4", "Level 5")
_MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                  "number_theory", "prealgebra", "precalculus")

# The public sources (docs/data.md). Revisions are full commit shas seen on the Hub or None where
# no full sha was confirmed; a None revision reads the dataset's default branch.
CATALOG: dict[str, SourceSpec] = {
    "math500": SourceSpec(
        source="HuggingFaceH4/MATH-500", revision="ff5b20257d8185524591543f8ff5993951537bb8",
        columns={"prompt_id": "unique_id", "problem": "problem", "answer": "answer", "solution": "solution"},
    ),
    "aime24": SourceSpec(
        source="HuggingFaceH4/aime_2024", split="train", id_prefix="aime24",
        columns={"prompt_id": "id", "problem": "problem", "answer": "answer", "solution": "solution"},
    ),
    "aime25": SourceSpec(source="math-ai/aime25", id_prefix="aime25"),
    "amc23": SourceSpec(source="math-ai/amc23", id_prefix="amc23"),
    "minerva_math": SourceSpec(source="math-ai/minervamath", id_prefix="minerva_math"),
    "olympiadbench": SourceSpec(
        source="math-ai/olympiadbench", revision="04b13155943ca238da32b3bf182826824a022811",
        answer_format="dollar", id_prefix="olympiadbench",
    ),
    "gsm8k": SourceSpec(
        source="openai/gsm8k", configs=("main",), revision="e53f048856ff4f594e959d75785d2c2d37b678ee",
        columns={"problem": "question", "answer": "answer"}, answer_format="gsm8k", id_prefix="gsm8k-test",
    ),
    "gpqa_diamond": SourceSpec(
        source="Idavidrein/gpqa", configs=("gpqa_diamond",), split="train",
        revision="633f5ee89ab8ad4522a9f850766b73f62147ffdd",
        columns={"prompt_id": "Record ID", "problem": "Question"}, answer_format="gpqa",
    ),
    "gsm8k_train": SourceSpec(
        source="openai/gsm8k", configs=("main",), split="train",
        revision="e53f048856ff4f594e959d75785d2c2d37b678ee",
        columns={"problem": "question", "answer": "answer"}, answer_format="gsm8k", id_prefix="gsm8k-train",
    ),
    # The paper configs' training set: MATH train, levels 3-5, answers only (the solution is
    # privileged context the teacher must not see unless a config asks for it).
    # Generated by stages/word_problems.py (no download): one- and two-step arithmetic word
    # problems with worked solutions, for small models (configs/smollm2-gsm8k.yaml).
    "word_problems_train": SourceSpec(source=GENERATED_PREFIX + "word_problems", split="train"),
    "word_problems_test": SourceSpec(source=GENERATED_PREFIX + "word_problems", split="test"),
    "math_train_lvl3to5": SourceSpec(
        source="EleutherAI/hendrycks_math", configs=_MATH_SUBJECTS, split="train",
        revision="0bd4da3ba883718272d0e821efdf10b63c2ed3bf",
        columns={"problem": "problem", "solution": "solution"}, answer_format="boxed",
        keep={"level": _MATH_LEVELS_3_TO_5}, id_prefix="math_train",
    ),
}


@dataclass
class SourceData:
    """Normalised records, rows left out by reason, and `data_id`: a hash of the records, so
    a change in the data (or in how it is read) is seen whatever the revision says."""

    records: list[dict[str, Any]]
    dropped: dict[str, int] = field(default_factory=dict)
    data_id: str = ""


# ---------------------------------------------------------------------------------------------
# raw rows


def read_file_rows(path: Path, split: str) -> list[dict[str, Any]]:
    """All records of a local .jsonl/.json/.parquet file (a .json dict is read by `split`)."""
    if not path.exists():
        raise ConfigError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        return list(data if isinstance(data, list) else data.get(split, []))
    rows = []
    # split("\n"), not splitlines(): a JSON string may hold U+2028 and other line breaks.
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise StageError(f"{path}:{lineno}: not valid JSON: {exc}") from None
    return rows


def generated_rows(spec: SourceSpec) -> list[dict[str, Any]]:
    """The rows of a generated source (`generated:word_problems`)."""
    from trace_rl.stages.word_problems import word_problem_rows

    name = spec.source.removeprefix(GENERATED_PREFIX)
    if name != "word_problems":
        raise ConfigError(f"unknown generated source {spec.source!r}; known: {GENERATED_PREFIX}word_problems")
    try:
        return word_problem_rows(spec.split)
    except ValueError as exc:
        raise ConfigError(f"{spec.source}: {exc}") from None


def load_hub_rows(spec: SourceSpec) -> list[dict[str, Any]]:
    """All rows of a HF dataset split (configs concatenated), through `datasets.load_dataset`:
    the only call into the Hub, so the HF cache, HF_HUB_OFFLINE and HF_TOKEN behave as usual."""
    import datasets

    rows: list[dict[str, Any]] = []
    for config in spec.configs or (None,):
        try:
            ds = datasets.load_dataset(spec.source, config, split=spec.split, revision=spec.revision)
        except Exception as exc:  # noqa: BLE001  datasets raises many types for one failure
            raise ConfigError(hub_error_message(spec, config, exc)) from None
        rows.extend(ds)
    return rows


def hub_error_message(spec: SourceSpec, config: str | None, exc: BaseException) -> str:
    """Why a HF dataset did not load, and what to do about it."""
    name = spec.source + (f" (config {config!r})" if config else "")
    page = HUB_URL + spec.source
    local = ("or use a local copy instead: a .jsonl/.parquet file as data.source, or "
             "eval.data_dir=<dir holding <benchmark>/test.jsonl> / eval.sources for benchmarks")
    text = f"{type(exc).__name__}: {exc}"
    if "gated" in str(exc).lower():
        return (f"HF dataset {name} is gated: accept its terms at {page} while logged in, then "
                f"authenticate here (`huggingface-cli login`, or set HF_TOKEN); {local} ({text})")
    if _offline() or isinstance(exc, ConnectionError):
        return (f"HF dataset {name} is not in the local HF cache and the Hub cannot be reached "
                f"(HF_HUB_OFFLINE={_offline_value()}): run once with network access (and HF_HUB_OFFLINE "
                f"unset) to fill the cache (HF_HOME), {local} ({text})")
    return f"could not load HF dataset {name}, split {spec.split!r}: {text}; {local}"


def _offline_value() -> str:
    import os

    return os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE") or "unset"


def _offline() -> bool:
    return _offline_value().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------------
# normalisation


def _pick(record: Mapping[str, Any], column: str, mapping: Mapping[str, str]) -> tuple[str | None, Any]:
    if column in mapping:
        return mapping[column], record.get(mapping[column])
    for candidate in DEFAULT_COLUMNS[column]:
        if candidate in record:
            return candidate, record[candidate]
    return None, None


def _gpqa_choices(record: Mapping[str, Any], rng: random.Random) -> tuple[list[str], int] | None:
    options = [record.get(c) for c in GPQA_COLUMNS]
    order = list(range(len(options)))
    rng.shuffle(order)  # drawn for every row, usable or not, so row k's order never depends on others
    if any(o is None or not str(o).strip() for o in options):
        return None
    return [str(options[i]).strip() for i in order], order.index(0)


def normalise(raw: Mapping[str, Any], spec: SourceSpec, rng: random.Random) -> dict[str, Any]:
    """One source row -> {prompt_id, problem, answer, solution, meta}; unset fields are None."""
    mapping = spec.columns
    used: set[str | None] = set()
    out: dict[str, Any] = {}
    for column in DEFAULT_COLUMNS:
        name, value = _pick(raw, column, mapping)
        used.add(name)
        out[column] = value
    answer, solution = answer_text(out["answer"]), out["solution"]
    meta: dict[str, Any] = {}
    if spec.answer_format == "gsm8k":
        answer, solution = split_gsm8k(out["answer"])
    elif spec.answer_format == "dollar":
        answer = strip_dollars(answer)
    elif spec.answer_format == "boxed":
        answer = last_boxed(solution)
    elif spec.answer_format == "gpqa":
        drawn = _gpqa_choices(raw, rng)
        used.update(GPQA_COLUMNS)
        answer = CHOICE_LETTERS[drawn[1]] if drawn else None
        if drawn:
            meta.update(choices=drawn[0], answer_index=drawn[1])
        if "High-level domain" in raw:
            meta["domain"] = raw["High-level domain"]
    out["answer"] = answer
    out["solution"] = None if spec.drop_solution or not solution else str(solution)
    out["problem"] = str(out["problem"]) if out["problem"] else None
    out["meta"] = {**{k: v for k, v in raw.items() if k not in used and _jsonable(v)}, **meta}
    return out


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _kept(raw: Mapping[str, Any], keep: Mapping[str, tuple[str, ...]]) -> bool:
    return all(str(raw.get(col)) in allowed for col, allowed in keep.items())


def check_columns(first: Mapping[str, Any], spec: SourceSpec, where: str) -> None:
    """A column map that names a missing column, or a source without a problem/answer column,
    is a config error listing the source's columns."""
    missing = [f"{k}->{v}" for k, v in spec.columns.items() if v not in first]
    if missing:
        raise ConfigError(f"{where}: the source has no column for {missing}; its columns: {sorted(first)}")
    needs = ["problem"] + (["answer"] if spec.answer_format in ("plain", "dollar", "gsm8k") else [])
    for need in needs:
        if _pick(first, need, spec.columns)[0] is None:
            raise ConfigError(f"{where}: cannot find the {need!r} column; map it (columns.{need}=<name>); "
                              f"its columns: {sorted(first)}")


def read_source(spec: SourceSpec, name: str, *, where: str | None = None,
                on_bad: Literal["raise", "drop"] = "raise", limit: int | None = None) -> SourceData:
    """The records of a source in source order, normalised; the first `limit` usable ones.

    Rows without an id column get `<spec.id_prefix or name>-<row index>`; `where` names the
    source in errors (default `name`). A row without a problem or an answer, or with a repeated
    id, raises (`on_bad="raise"`, naming the row by id) or is counted in `dropped` and left out.
    """
    where = where or name
    raw_rows: Iterable[dict[str, Any]] = (
        read_file_rows(Path(spec.source).expanduser(), spec.split) if spec.is_file
        else generated_rows(spec) if spec.source.startswith(GENERATED_PREFIX) else load_hub_rows(spec)
    )
    rng = random.Random(GPQA_SHUFFLE_SEED)
    records: list[dict[str, Any]] = []
    dropped: dict[str, int] = {}
    seen: set[str] = set()
    for i, raw in enumerate(raw_rows):
        if i == 0:
            check_columns(raw, spec, where)
        rec = normalise(raw, spec, rng)
        if not _kept(raw, spec.keep):
            continue
        pid = str(rec["prompt_id"]) if rec["prompt_id"] is not None else f"{spec.id_prefix or name}-{i}"
        rec["prompt_id"] = pid
        reason = ("empty_problem_or_answer" if not rec["problem"] or not rec["answer"]
                  else "duplicate_id" if pid in seen else None)
        if reason is not None:
            if on_bad == "raise":
                raise StageError(f"{where}: row {pid} ({reason.replace('_', ' ')}); fix the source or the "
                                 f"column map (source columns: {sorted(raw)})")
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        seen.add(pid)
        records.append(rec)
        if limit and len(records) >= limit:
            break
    digest = hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return SourceData(records, dropped, digest)


def resolve(source: str, *, split: str | None = None, overrides: Mapping[str, Any] | None = None) -> SourceSpec:
    """A catalog name, a local file or a HF dataset id -> its SourceSpec; `split` and the
    non-empty `overrides` (configs, revision, answer_format, columns: merged) replace the
    catalog's values."""
    extra = {k: v for k, v in (overrides or {}).items() if v not in (None, {}, (), [])}
    if split is not None:
        extra["split"] = split
    if source in CATALOG:
        base = CATALOG[source]
        if "columns" in extra:
            extra["columns"] = {**base.columns, **extra["columns"]}
        return SourceSpec.model_validate({**base.model_dump(), **extra})
    path = Path(source).expanduser()
    if path.suffix in FILE_SUFFIXES and not path.exists():
        raise ConfigError(f"data file {source!r} does not exist; named public sources: {sorted(CATALOG)}")
    return SourceSpec.model_validate({"source": source, **extra})
