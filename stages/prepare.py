"""Stage `prepare`: ingest a training set into `prompts/` with the contract's columns.

Sources: the testbed generator, a named public source (stages/sources.py `CATALOG`, e.g.
`math_train_lvl3to5`, `gsm8k_train`), a local .jsonl/.json/.parquet file, or a HF dataset id,
all read by the one source reader (stages/sources.py) with the config's column map and answer
format. Rows without a problem or an answer, or with a repeated id, are counted and reported,
never written with empty fields.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from trace_rl.data_schemas import PROMPTS
from trace_rl.stages.config import TraceConfig
from trace_rl.data_schemas.errors import StageError
from trace_rl.pipeline.store import Manifest

from .common import decide
from .sources import CATALOG, SourceData, SourceSpec, read_source, resolve

log = logging.getLogger("trace_rl.stages.prepare")


def source_spec(cfg: TraceConfig) -> SourceSpec:
    """The data section as a SourceSpec: a catalog name with its overrides, a file or a HF id."""
    d = cfg.data
    split = d.split or (None if d.source in CATALOG else "train")
    return resolve(d.source, split=split, overrides={
        "configs": d.configs, "revision": d.revision, "answer_format": d.answer_format, "columns": d.columns,
    })


def to_prompt_rows(data: SourceData, cfg: TraceConfig, source_name: str) -> list[dict[str, Any]]:
    """Prompt rows of normalised source records: the problem wrapped in data.instruction, the
    other source columns (and the raw problem) kept in `meta`."""
    rows = []
    for rec in data.records:
        meta = {**rec["meta"], "raw_problem": rec["problem"]}
        rows.append({
            "prompt_id": rec["prompt_id"],
            "problem": cfg.data.instruction.format(problem=rec["problem"]),
            "answer": rec["answer"],
            "solution": rec["solution"],
            "source": str(rec["meta"].get("source") or source_name),
            "meta": json.dumps(meta, sort_keys=True, default=str),
        })
    return rows


def _source_name(source: str) -> str:
    return source if source in CATALOG else Path(source).stem if Path(source).suffix else source


def run(cfg: TraceConfig, round_index: int | None = None, *, force: bool = False, progress: bool = True) -> Manifest:
    p = decide(cfg, "prepare", None, [], force=force)
    if p.skip:
        return p.existing
    if cfg.data.source == "testbed":
        from trace_rl.testbed.task import make_prompts

        rows = make_prompts(cfg.model.testbed, cfg.data.testbed_prompts, seed=cfg.run.seed, split="train")
        dropped: dict[str, int] = {}
        data_id = None
    else:
        name = _source_name(cfg.data.source)
        data = read_source(source_spec(cfg), name, where=f"data.source {cfg.data.source!r}", on_bad="drop",
                           limit=cfg.data.limit)
        rows, dropped, data_id = to_prompt_rows(data, cfg, name), data.dropped, data.data_id
    if not rows:
        raise StageError(f"prepare: no usable rows in {cfg.data.source!r} (dropped: {dropped})")
    with p.writer(PROMPTS, "prepare") as w:
        for start in range(0, len(rows), 50_000):
            w.write_rows(rows[start:start + 50_000])
        w.extra = {"source": cfg.data.source, "dropped": dropped, "data_id": data_id}
    log.info("prepare: wrote %d prompts to %s (dropped %s)", len(rows), p.store.path(p.name), dropped or "none")
    return w.manifest
