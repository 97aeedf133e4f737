"""Stage `prepare`: ingest a training set into `prompts/` with the contract's columns.

Sources: the testbed generator, a local .jsonl/.json/.parquet file, or a HF `datasets` name
(loaded with `datasets.load_dataset`, so a local cache or a hub mirror works where one is
reachable). A column mapping names the source columns; rows without a problem or an answer are
counted and reported, never written with empty fields.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable

from trace_rl.data_schemas import PROMPTS
from trace_rl.stages.config import TraceConfig
from trace_rl.data_schemas.errors import ConfigError, StageError
from trace_rl.pipeline.store import Manifest

from .common import plan

log = logging.getLogger("trace_rl.stages.prepare")

# Contract column -> source columns tried in order when the config does not map it.
DEFAULT_COLUMNS = {
    "prompt_id": ("id", "unique_id", "prompt_id", "idx"),
    "problem": ("problem", "question", "prompt", "query"),
    "answer": ("answer", "final_answer", "gt", "ground_truth"),
    "solution": ("solution", "reference_solution", "explanation"),
}


def _load_records(source: str, split: str) -> Iterable[dict[str, Any]]:
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".json") and path.exists():
        with path.open() as fh:
            if path.suffix == ".json":
                data = json.load(fh)
                yield from (data if isinstance(data, list) else data.get(split, []))
                return
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise StageError(f"{path}:{lineno}: not valid JSON: {exc}") from None
        return
    if path.suffix == ".parquet" and path.exists():
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
        return
    if path.suffix in (".jsonl", ".json", ".parquet"):
        raise ConfigError(f"data.source: file {source!r} does not exist")
    try:
        import datasets

        ds = datasets.load_dataset(source, split=split)
    except Exception as exc:  # datasets raises many types for a missing dataset
        raise ConfigError(
            f"data.source: {source!r} is neither a local .jsonl/.parquet file nor a loadable "
            f"HF dataset (split {split!r}): {type(exc).__name__}: {exc}"
        ) from None
    yield from ds


def _pick(record: dict[str, Any], column: str, mapping: dict[str, str]) -> Any:
    if column in mapping:
        return record.get(mapping[column])
    for candidate in DEFAULT_COLUMNS.get(column, ()):
        if candidate in record:
            return record[candidate]
    return None


def _check_mapping(first: dict[str, Any], mapping: dict[str, str]) -> None:
    unknown = [c for c in mapping if c not in DEFAULT_COLUMNS]
    if unknown:
        raise ConfigError(f"data.columns: unknown contract columns {unknown}; valid: {sorted(DEFAULT_COLUMNS)}")
    missing = [f"{k}->{v}" for k, v in mapping.items() if v not in first]
    if missing:
        raise ConfigError(f"data.columns: source has no column for {missing}; source columns: {sorted(first)}")
    for need in ("problem", "answer"):
        if _pick(first, need, mapping) is None and need not in mapping:
            raise ConfigError(
                f"data.columns: cannot find the {need!r} column; map it, e.g. data.columns.{need}=<name>; "
                f"source columns: {sorted(first)}"
            )


def to_prompt_rows(records: Iterable[dict[str, Any]], cfg: TraceConfig, source_name: str):
    """Map source records to prompt rows; returns (rows, counts of dropped rows by reason)."""
    mapping = cfg.data.columns
    rows: list[dict[str, Any]] = []
    dropped: dict[str, int] = {}
    seen: set[str] = set()
    for i, rec in enumerate(records):
        if i == 0:
            _check_mapping(rec, mapping)
        problem, answer = _pick(rec, "problem", mapping), _pick(rec, "answer", mapping)
        if not problem or answer is None or str(answer).strip() == "":
            dropped["empty_problem_or_answer"] = dropped.get("empty_problem_or_answer", 0) + 1
            continue
        pid = _pick(rec, "prompt_id", mapping)
        pid = str(pid) if pid is not None else hashlib.sha1(str(problem).encode()).hexdigest()[:12]
        if pid in seen:
            dropped["duplicate_id"] = dropped.get("duplicate_id", 0) + 1
            continue
        seen.add(pid)
        solution = _pick(rec, "solution", mapping)
        known = {mapping.get(c, c) for c in DEFAULT_COLUMNS} | {"id", "problem", "answer", "solution"}
        meta = {k: v for k, v in rec.items() if k not in known and _jsonable(v)}
        meta["raw_problem"] = str(problem)
        rows.append({
            "prompt_id": pid,
            "problem": cfg.data.instruction.format(problem=problem),
            "answer": str(answer).strip(),
            "solution": str(solution) if solution else None,
            "source": str(rec.get("source") or source_name),
            "meta": json.dumps(meta, sort_keys=True, default=str),
        })
        if cfg.data.limit and len(rows) >= cfg.data.limit:
            break
    return rows, dropped


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def run(cfg: TraceConfig, round_index: int | None = None, *, force: bool = False, progress: bool = True) -> Manifest:
    parts = {"data": cfg.section("data")}
    if cfg.data.source == "testbed":
        parts["testbed"] = cfg.model.testbed.model_dump(mode="json")
    p = plan(cfg, "prepare", None, parts, [], force=force)
    if p.skip:
        return p.existing
    if cfg.data.source == "testbed":
        from trace_rl.testbed.task import make_prompts

        rows = make_prompts(cfg.model.testbed, cfg.data.testbed_prompts, seed=cfg.run.seed, split="train")
        dropped: dict[str, int] = {}
    else:
        rows, dropped = to_prompt_rows(_load_records(cfg.data.source, cfg.data.split), cfg, Path(cfg.data.source).stem)
    if not rows:
        raise StageError(f"prepare: no usable rows in {cfg.data.source!r} (dropped: {dropped})")
    with p.writer(PROMPTS, "prepare") as w:
        for start in range(0, len(rows), 50_000):
            w.write_rows(rows[start:start + 50_000])
        w.extra = {"source": cfg.data.source, "dropped": dropped}
    log.info("prepare: wrote %d prompts to %s (dropped %s)", len(rows), p.store.path(p.name), dropped or "none")
    return w.manifest
