"""The benchmark registry: names -> problems as prompts-contract rows, plus the verifier to use.

Built-in names read their public Hugging Face dataset (stages/sources.py `CATALOG`, the table in
docs/data.md): the math sets are checked by the `math` verifier, GPQA-Diamond by the `choice`
verifier, and `testbed` is the held-out split of the synthetic task. `eval.data_dir` switches the
built-in names to local files (`<data_dir>/<name>/test.jsonl`, fields id/problem/answer/solution;
GPQA: id/question/choices/answer_index/answer_letter). Any other benchmark is a local
.jsonl/.json/.parquet file or a HF dataset, given inline (`file:<path>`, `hf:<name>[:<split>]`,
or a bare path to an existing file) or by name through a `BenchmarkSource` in `eval.sources`
(which may also replace a built-in name). Every source is read by stages/sources.py.

Benchmark text (GPQA above all, whose authors ask that it never be published) is only ever
handed to the engine: nothing here logs or prints a problem, and errors name rows by id.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from trace_rl.stages.config import DEFAULT_INSTRUCTION, TraceConfig
from trace_rl.data_schemas.errors import ConfigError, StageError
from trace_rl.pipeline.fingerprint import fingerprint

from .sources import CATALOG, CHOICE_LETTERS, FILE_SUFFIXES, AnswerFormat, SourceSpec
from .sources import check_contract_columns, read_source, resolve

MATH_BENCHMARKS = ("math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench", "gsm8k")
GPQA_TEMPLATE = (
    "{question}\n\n{choices}\n\nPlease reason step by step, and put the letter of the correct "
    "choice ({letters}) within \\boxed{{}}."
)
# The held-out testbed set is fixed, not tied to run.seed, so runs with different seeds are
# scored on the same problems.
TESTBED_EVAL_SEED = 0
TESTBED_EVAL_PROBLEMS = 200
VerifierKind = Literal["math", "choice", "testbed"]
GENERIC_STEMS = ("test", "train", "validation", "val", "dev", "data", "eval")
# The local-file layout of GPQA (eval.data_dir): choices already shuffled, the letter stored.
LOCAL_GPQA_COLUMNS = {"problem": "question", "answer": "answer_letter"}

__all__ = ["CHOICE_LETTERS", "MATH_BENCHMARKS", "Benchmark", "BenchmarkSource", "load_benchmark"]


class BenchmarkSource(BaseModel):
    """A benchmark outside the registry (or replacing a registered name): a local file, a HF
    dataset or a name from the source catalog, plus a column map and answer format."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(..., description="a .jsonl/.json/.parquet path, a HF dataset id or a catalog name")
    split: str | None = Field(None, description="default: the catalog's split, else 'test'")
    configs: tuple[str, ...] = ()
    revision: str | None = None
    columns: dict[str, str] = Field(
        default_factory=dict, description="contract column -> source column (problem, answer, ...)"
    )
    answer_format: AnswerFormat | None = None
    verifier: VerifierKind | None = Field(None, description="default: the registered name's, else math")
    template: str | None = Field(None, description="str.format template with {problem}")

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: dict[str, str]) -> dict[str, str]:
        return check_contract_columns(v)

    @field_validator("template")
    @classmethod
    def _has_problem(cls, v: str | None) -> str | None:
        if v is not None and "{problem}" not in v:
            raise ValueError("must contain the field {problem} (use {{ }} for literal braces)")
        return v

    def spec(self) -> SourceSpec:
        overrides = {"configs": self.configs, "revision": self.revision, "columns": self.columns,
                     "answer_format": self.answer_format}
        split = self.split or (None if self.source in CATALOG else "test")
        return resolve(self.source, split=split, overrides=overrides)


@dataclass(frozen=True)
class Benchmark:
    """Loaded problems. `rows` are prompts-contract dicts (problem = the full user message);
    `fingerprint` identifies the data, template and limit, so stale samples can be detected."""

    name: str
    verifier: VerifierKind
    rows: list[dict[str, Any]]
    fingerprint: str


# ---------------------------------------------------------------------------------------------
# row builders (records are sources.read_source's: prompt_id, problem, answer, solution, meta)


def math_rows(records: Iterable[Mapping[str, Any]], bench: str, *,
              template: str = DEFAULT_INSTRUCTION) -> list[dict[str, Any]]:
    """Prompts rows of a math benchmark: the problem wrapped in `template`, answer as a string."""
    return [
        {
            "prompt_id": rec["prompt_id"],
            "problem": template.format(problem=rec["problem"]),
            "answer": rec["answer"],
            "solution": rec["solution"],
            "source": bench,
            "meta": json.dumps({"benchmark": bench}),
        }
        for rec in records
    ]


def format_choices(choices: list[str], letters: str = CHOICE_LETTERS) -> str:
    """'(A) first\\n(B) second ...': one lettered line per choice."""
    return "\n".join(f"({letter}) {str(text).strip()}" for letter, text in zip(letters, choices))


def gpqa_rows(records: Iterable[Mapping[str, Any]], bench: str = "gpqa_diamond") -> list[dict[str, Any]]:
    """Prompts rows of GPQA: question + choices (A)-(D); the reference is the answer letter."""
    rows: list[dict[str, Any]] = []
    letters = CHOICE_LETTERS
    for rec in records:
        pid, meta, letter = rec["prompt_id"], rec.get("meta") or {}, rec["answer"]
        choices, index = meta.get("choices"), meta.get("answer_index")
        if not isinstance(choices, list) or len(choices) != len(letters):
            raise StageError(f"benchmark {bench!r}: row {pid} needs exactly {len(letters)} choices")
        if not isinstance(index, int) or not 0 <= index < len(letters) or letters[index] != letter:
            raise StageError(
                f"benchmark {bench!r}: row {pid}: answer letter {letter!r} does not match "
                f"answer_index {index!r} (expected letters {letters!r} by index)"
            )
        problem = GPQA_TEMPLATE.format(
            question=str(rec["problem"]).strip(),
            choices=format_choices(choices, letters),
            letters=", ".join(letters),
        )
        rows.append({
            "prompt_id": pid, "problem": problem, "answer": letter, "solution": None, "source": bench,
            "meta": json.dumps({"benchmark": bench, "domain": meta.get("domain")}),
        })
    return rows


def file_fingerprint(path: str | Path) -> str:
    """sha256 (first 16 hex) of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# the registered names


def data_file(cfg: TraceConfig, name: str) -> Path:
    """`{eval.data_dir}/<name>/test.jsonl` (a relative data_dir is relative to the working dir)."""
    if cfg.eval.data_dir is None:
        raise ConfigError("eval.data_dir is not set: built-in benchmarks read their HF datasets")
    return Path(cfg.eval.data_dir).expanduser() / name / "test.jsonl"


def registered_spec(cfg: TraceConfig, name: str) -> SourceSpec:
    """The source of a registered benchmark: its local file under eval.data_dir when that is
    set, else its public HF dataset."""
    if cfg.eval.data_dir is None:
        return CATALOG[name]
    path = data_file(cfg, name)
    if not path.exists():
        raise ConfigError(f"benchmark {name!r}: {path} does not exist (eval.data_dir={cfg.eval.data_dir!r}); "
                          "unset eval.data_dir to read the public HF dataset")
    columns = LOCAL_GPQA_COLUMNS if name == "gpqa_diamond" else {}
    return SourceSpec(source=str(path), columns=columns, id_prefix=name)


def _verifier_of(name: str) -> VerifierKind:
    return "choice" if name == "gpqa_diamond" else "math"


def _load_testbed(cfg: TraceConfig) -> Benchmark:
    from trace_rl.testbed.task import make_prompts

    n = cfg.eval.limit or TESTBED_EVAL_PROBLEMS
    rows = make_prompts(cfg.model.testbed, n, TESTBED_EVAL_SEED, split="heldout")
    task_fp = cfg.model.testbed.model_dump(mode="json")
    return Benchmark("testbed", "testbed", rows, fingerprint(["testbed", task_fp, n, TESTBED_EVAL_SEED]))


REGISTRY: dict[str, VerifierKind] = {
    **{name: "math" for name in MATH_BENCHMARKS}, "gpqa_diamond": "choice", "testbed": "testbed",
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
    if name.startswith("file:") or (path.suffix in FILE_SUFFIXES and path.exists()):
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


def _load(cfg: TraceConfig, name: str, spec: SourceSpec, verifier: VerifierKind, template: str,
          identity: Any) -> Benchmark:
    data = read_source(spec, name, where=f"benchmark {name!r}", on_bad="raise", limit=cfg.eval.limit)
    if not data.records:
        raise StageError(f"benchmark {name!r}: {spec.describe()} has no rows")
    if verifier == "choice":
        rows, template = gpqa_rows(data.records, name), GPQA_TEMPLATE
    else:
        rows = math_rows(data.records, name, template=template)
    refuse_repeated_problems(rows, name)
    return Benchmark(name, verifier, rows, fingerprint([data.data_id, identity, template, cfg.eval.limit]))


def refuse_repeated_problems(rows: list[dict[str, Any]], bench: str) -> None:
    """A problem that appears twice under two ids would count twice in avg@k and its CI; the
    error names the rows by id (the text is never shown: GPQA must not be published)."""
    first: dict[str, str] = {}
    for row in rows:
        key = " ".join(row["problem"].split())
        if key in first:
            raise StageError(f"benchmark {bench!r}: rows {first[key]} and {row['prompt_id']} hold the same "
                             "problem; remove one of them from the source")
        first[key] = row["prompt_id"]


def load_source(cfg: TraceConfig, name: str, src: BenchmarkSource) -> Benchmark:
    """A benchmark from a BenchmarkSource (file, HF dataset or catalog name) and its column map."""
    verifier = src.verifier or (REGISTRY.get(name) if name != "testbed" else None) or "math"
    return _load(cfg, name, src.spec(), verifier, src.template or DEFAULT_INSTRUCTION,
                 src.model_dump(mode="json"))


def load_benchmark(
    cfg: TraceConfig, name: str, sources: Mapping[str, BenchmarkSource] | None = None
) -> Benchmark:
    """Resolve `name`: a key of `sources`, a registered name, or an inline file/HF spec."""
    if sources and name in sources:
        return load_source(cfg, slug(name), sources[name])
    if name == "testbed":
        return _load_testbed(cfg)
    if name in REGISTRY:
        return _load(cfg, name, registered_spec(cfg, name), _verifier_of(name), DEFAULT_INSTRUCTION, name)
    inline = parse_inline(name)
    if inline is not None:
        return load_source(cfg, *inline)
    raise ConfigError(
        f"unknown benchmark {name!r}; valid names: {benchmark_names()}"
        + (f", configured sources: {sorted(sources)}" if sources else "")
        + "; or a data file (file:<path.jsonl|.parquet>) or a HF dataset (hf:<name>[:<split>])"
    )
