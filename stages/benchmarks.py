"""The benchmark registry: names -> problems as prompts-contract rows, plus the verifier to use.

Built-in names read `{eval.data_dir}/<name>/test.jsonl` (the files described in
shared/data/README.md): the math sets are checked by the `math` verifier, GPQA-Diamond by the
`choice` verifier, and `testbed` is the held-out split of the synthetic task. Any other
benchmark is a local .jsonl/.json/.parquet file or a HF `datasets` name, given either inline
(`file:<path>`, `hf:<name>[:<split>]`, or a bare path to an existing file) or by name through a
`BenchmarkSource` (which carries a column mapping).

Benchmark text (GPQA above all, whose authors ask that it never be published) is only ever
handed to the engine: nothing here logs or prints a problem, and errors name rows by id.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from trace_rl.stages.config import DEFAULT_INSTRUCTION, TraceConfig
from trace_rl.data_schemas.errors import ConfigError, StageError
from trace_rl.pipeline.fingerprint import fingerprint

MATH_BENCHMARKS = ("math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench", "gsm8k")
CHOICE_LETTERS = "ABCD"
GPQA_TEMPLATE = (
    "{question}\n\n{choices}\n\nPlease reason step by step, and put the letter of the correct "
    "choice ({letters}) within \\boxed{{}}."
)
# The held-out testbed set is fixed, not tied to run.seed, so runs with different seeds are
# scored on the same problems.
TESTBED_EVAL_SEED = 0
TESTBED_EVAL_PROBLEMS = 200
VerifierKind = Literal["math", "choice", "testbed"]
REPO_ROOT = Path(__file__).resolve().parent.parent
GENERIC_STEMS = ("test", "train", "validation", "val", "dev", "data", "eval")

# Contract column -> source columns tried in order when a mapping does not name it.
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "prompt_id": ("id", "unique_id", "prompt_id", "idx"),
    "problem": ("problem", "question", "prompt", "query"),
    "answer": ("answer", "final_answer", "gt", "ground_truth"),
    "solution": ("solution", "reference_solution"),
}


class BenchmarkSource(BaseModel):
    """A benchmark outside the registry: a local file or a HF dataset plus a column mapping."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(..., description="a .jsonl/.json/.parquet path or a HF datasets name")
    split: str = "test"
    columns: dict[str, str] = Field(
        default_factory=dict, description="contract column -> source column (problem, answer, ...)"
    )
    verifier: VerifierKind = "math"
    template: str = Field(DEFAULT_INSTRUCTION, description="str.format template with {problem}")

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(DEFAULT_COLUMNS))
        if unknown:
            raise ValueError(
                f"unknown contract columns {unknown}; valid: {sorted(DEFAULT_COLUMNS)}"
            )
        return v

    @field_validator("template")
    @classmethod
    def _has_problem(cls, v: str) -> str:
        if "{problem}" not in v:
            raise ValueError("must contain the field {problem} (use {{ }} for literal braces)")
        return v


@dataclass(frozen=True)
class Benchmark:
    """Loaded problems. `rows` are prompts-contract dicts (problem = the full user message);
    `fingerprint` identifies the data, template and limit, so stale samples can be detected."""

    name: str
    verifier: VerifierKind
    rows: list[dict[str, Any]]
    fingerprint: str


@dataclass(frozen=True)
class BenchmarkSpec:
    """A registered benchmark: `load(cfg)` returns (rows, data fingerprint)."""

    name: str
    verifier: VerifierKind
    load: Callable[[TraceConfig], tuple[list[dict[str, Any]], str]]


# ---------------------------------------------------------------------------------------------
# readers


def read_records(source: str, split: str = "test") -> list[dict[str, Any]]:
    """All records of a local .jsonl/.json/.parquet file, or of a HF dataset split."""
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".json", ".parquet"):
        if not path.exists():
            raise ConfigError(f"benchmark file {source!r} does not exist (check eval.data_dir)")
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
            return list(data if isinstance(data, list) else data.get(split, []))
        return [
            _json_line(line, path, i) for i, line in enumerate(text.splitlines(), 1) if line.strip()
        ]
    try:
        import datasets

        return list(datasets.load_dataset(source, split=split))
    except Exception as exc:  # noqa: BLE001  datasets raises many types for a missing dataset
        raise ConfigError(
            f"benchmark source {source!r} is neither a local .jsonl/.json/.parquet file nor a "
            f"loadable HF dataset (split {split!r}): {type(exc).__name__}: {exc}"
        ) from None


def _json_line(line: str, path: Path, lineno: int) -> dict[str, Any]:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}:{lineno}: not valid JSON: {exc}") from None


def file_fingerprint(path: str | Path) -> str:
    """sha256 (first 16 hex) of a file's bytes: the data identity of a file benchmark."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _limited(records: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    # The first `limit` in file order, so a limited eval is a stable prefix of the full one.
    return records[:limit] if limit else records


# ---------------------------------------------------------------------------------------------
# row builders


def _pick(record: Mapping[str, Any], column: str, mapping: Mapping[str, str]) -> Any:
    if column in mapping:
        return record.get(mapping[column])
    for candidate in DEFAULT_COLUMNS[column]:
        if candidate in record:
            return record[candidate]
    return None


def math_rows(
    records: Iterable[Mapping[str, Any]],
    bench: str,
    *,
    template: str = DEFAULT_INSTRUCTION,
    columns: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Prompts rows of a math benchmark: the problem wrapped in `template`, answer as a string."""
    mapping = dict(columns or {})
    rows: list[dict[str, Any]] = []
    for i, rec in enumerate(records):
        problem, answer = _pick(rec, "problem", mapping), _pick(rec, "answer", mapping)
        pid = _pick(rec, "prompt_id", mapping)
        pid = str(pid) if pid is not None else f"{bench}-{i}"
        if not problem or answer is None or str(answer).strip() == "":
            raise StageError(
                f"benchmark {bench!r}: row {pid} has no problem or no answer; fix the file or the "
                f"column mapping (source columns: {sorted(rec)})"
            )
        solution = _pick(rec, "solution", mapping)
        rows.append(
            {
                "prompt_id": pid,
                "problem": template.format(problem=problem),
                "answer": str(answer).strip(),
                "solution": str(solution) if solution else None,
                "source": bench,
                "meta": json.dumps({"benchmark": bench}),
            }
        )
    return _unique_ids(rows, bench)


def format_choices(choices: list[str], letters: str = CHOICE_LETTERS) -> str:
    """'(A) first\\n(B) second ...': one lettered line per choice."""
    return "\n".join(f"({letter}) {str(text).strip()}" for letter, text in zip(letters, choices))


def gpqa_rows(
    records: Iterable[Mapping[str, Any]], bench: str = "gpqa_diamond"
) -> list[dict[str, Any]]:
    """Prompts rows of GPQA: question + choices (A)-(D); the reference is the answer letter."""
    rows: list[dict[str, Any]] = []
    letters = CHOICE_LETTERS
    for i, rec in enumerate(records):
        pid = str(rec.get("id", f"{bench}-{i}"))
        choices, index, letter = (
            rec.get("choices"),
            rec.get("answer_index"),
            rec.get("answer_letter"),
        )
        if not isinstance(choices, list) or len(choices) != len(letters):
            raise StageError(f"benchmark {bench!r}: row {pid} needs exactly {len(letters)} choices")
        if not isinstance(index, int) or not 0 <= index < len(letters) or letters[index] != letter:
            raise StageError(
                f"benchmark {bench!r}: row {pid}: answer_letter {letter!r} does not match "
                f"answer_index {index!r} (expected letters {letters!r} by index)"
            )
        problem = GPQA_TEMPLATE.format(
            question=str(rec["question"]).strip(),
            choices=format_choices(choices, letters),
            letters=", ".join(letters),
        )
        rows.append(
            {
                "prompt_id": pid,
                "problem": problem,
                "answer": letter,
                "solution": None,
                "source": bench,
                "meta": json.dumps({"benchmark": bench, "domain": rec.get("domain")}),
            }
        )
    return _unique_ids(rows, bench)


def _unique_ids(rows: list[dict[str, Any]], bench: str) -> list[dict[str, Any]]:
    seen: set[str] = set()
    for row in rows:
        if row["prompt_id"] in seen:
            raise StageError(
                f"benchmark {bench!r}: duplicate problem id {row['prompt_id']!r}; ids must be unique "
                "(map another column with columns.prompt_id)"
            )
        seen.add(row["prompt_id"])
    return rows


# ---------------------------------------------------------------------------------------------
# loaders of the registered names


def data_file(cfg: TraceConfig, name: str) -> Path:
    """`{eval.data_dir}/<name>/test.jsonl`; a relative data_dir missing from the working
    directory is looked up from the repository root (the default "../shared/data" assumes
    commands run from the repo root)."""
    base = Path(cfg.eval.data_dir).expanduser()
    if not base.is_absolute() and not base.exists() and (REPO_ROOT / base).exists():
        base = REPO_ROOT / base
    return base / name / "test.jsonl"


def _math_loader(name: str) -> Callable[[TraceConfig], tuple[list[dict[str, Any]], str]]:
    def load(cfg: TraceConfig) -> tuple[list[dict[str, Any]], str]:
        path = data_file(cfg, name)
        rows = math_rows(_limited(read_records(str(path)), cfg.eval.limit), name)
        return rows, fingerprint([file_fingerprint(path), DEFAULT_INSTRUCTION, cfg.eval.limit])

    return load


def _load_gpqa(cfg: TraceConfig) -> tuple[list[dict[str, Any]], str]:
    path = data_file(cfg, "gpqa_diamond")
    rows = gpqa_rows(_limited(read_records(str(path)), cfg.eval.limit))
    return rows, fingerprint([file_fingerprint(path), GPQA_TEMPLATE, cfg.eval.limit])


def _load_testbed(cfg: TraceConfig) -> tuple[list[dict[str, Any]], str]:
    from trace_rl.testbed.task import make_prompts

    n = cfg.eval.limit or TESTBED_EVAL_PROBLEMS
    rows = make_prompts(cfg.model.testbed, n, TESTBED_EVAL_SEED, split="heldout")
    task_fp = cfg.model.testbed.model_dump(mode="json")
    return rows, fingerprint(["testbed", task_fp, n, TESTBED_EVAL_SEED])


REGISTRY: dict[str, BenchmarkSpec] = {
    **{name: BenchmarkSpec(name, "math", _math_loader(name)) for name in MATH_BENCHMARKS},
    "gpqa_diamond": BenchmarkSpec("gpqa_diamond", "choice", _load_gpqa),
    "testbed": BenchmarkSpec("testbed", "testbed", _load_testbed),
}


def benchmark_names() -> list[str]:
    """The registered benchmark names."""
    return sorted(REGISTRY)


# ---------------------------------------------------------------------------------------------
# resolution


def slug(text: str) -> str:
    """A directory-safe name: runs of other characters become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.") or "benchmark"


def parse_inline(name: str) -> tuple[str, BenchmarkSource] | None:
    """`file:<path>`, `hf:<name>[:<split>]` or an existing data file -> (slug, source); else None."""
    if name.startswith("hf:"):
        ds, _, split = name[3:].partition(":")
        return slug(f"{ds}_{split or 'test'}"), BenchmarkSource(source=ds, split=split or "test")
    path = Path(name.removeprefix("file:"))
    if name.startswith("file:") or (path.suffix in (".jsonl", ".json", ".parquet") and path.exists()):
        return inline_file_name(path), BenchmarkSource(source=str(path))
    return None


def inline_file_name(path: Path) -> str:
    """The benchmark name of a data file: its stem, or `<folder>_<stem>` for split-named files
    (`aime/test.jsonl` -> `aime_test`). A registered name gets a `_file` suffix, so a custom
    file is never counted as a registered benchmark (in the 5-column mean, say)."""
    stem = path.stem
    if stem.lower() in GENERIC_STEMS and path.parent.name:
        stem = f"{path.parent.name}_{stem}"
    name = slug(stem)
    return f"{name}_file" if name in REGISTRY else name


def load_source(cfg: TraceConfig, name: str, src: BenchmarkSource) -> Benchmark:
    """A benchmark from a BenchmarkSource (file or HF dataset) and its column mapping."""
    records = _limited(read_records(src.source, src.split), cfg.eval.limit)
    if not records:
        raise StageError(f"benchmark {name!r}: {src.source!r} (split {src.split!r}) has no rows")
    missing = [f"{k}->{v}" for k, v in src.columns.items() if v not in records[0]]
    if missing:
        raise ConfigError(
            f"benchmark {name!r}: the source has no column for {missing}; "
            f"its columns: {sorted(records[0])}"
        )
    if src.verifier == "choice":
        rows = gpqa_rows(records, name)
    else:
        rows = math_rows(records, name, template=src.template, columns=src.columns)
    path = Path(src.source).expanduser()
    data_id = file_fingerprint(path) if path.is_file() else [src.source, src.split]
    return Benchmark(
        name,
        src.verifier,
        rows,
        fingerprint([data_id, src.model_dump(mode="json"), cfg.eval.limit]),
    )


def load_benchmark(
    cfg: TraceConfig, name: str, sources: Mapping[str, BenchmarkSource] | None = None
) -> Benchmark:
    """Resolve `name`: a registered name, a key of `sources`, or an inline file/HF spec."""
    if name in REGISTRY:
        spec = REGISTRY[name]
        rows, fp = spec.load(cfg)
        return Benchmark(name, spec.verifier, rows, fp)
    if sources and name in sources:
        return load_source(cfg, slug(name), sources[name])
    inline = parse_inline(name)
    if inline is not None:
        return load_source(cfg, *inline)
    raise ConfigError(
        f"unknown benchmark {name!r}; valid names: {benchmark_names()}"
        + (f", configured sources: {sorted(sources)}" if sources else "")
        + "; or a data file (file:<path.jsonl|.parquet>) or a HF dataset (hf:<name>[:<split>])"
    )
