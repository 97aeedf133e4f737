"""The Parquet contracts of every dataset the pipeline writes (DESIGN.md, "Parquet contracts").

Schemas are explicit: a table is never written with an inferred schema, because a column that
happens to be all-null in one shard would otherwise change type between shards and break
`datasets.load_dataset("parquet", ...)` on the whole directory.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

# 2: `round` in verdicts and annotations, SQL-safe metric names (`kl_forward`), rollouts'
# `checkpoint` relative to the run and `sampling` a struct. Version-1 files are still read
# (data_schemas/upgrade.py turns them into version-2 tables).
SCHEMA_VERSION = "2"

SPAN = pa.struct(
    [
        pa.field("segment_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("char_start", pa.int32(), nullable=False),
        pa.field("char_end", pa.int32(), nullable=False),
        pa.field("token_start", pa.int32(), nullable=False),
        pa.field("token_end", pa.int32(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
    ]
)


# The sampling settings every rollout records (RolloutConfig.sampling_dict); fields a writer
# leaves out are NULL.
SAMPLING = pa.struct(
    [
        pa.field("n", pa.int32()),
        pa.field("temperature", pa.float64()),
        pa.field("top_p", pa.float64()),
        pa.field("top_k", pa.int32()),
        pa.field("max_tokens", pa.int32()),
        pa.field("enable_thinking", pa.bool_()),
        pa.field("seed", pa.int64()),
    ]
)


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={b"schema_name": name.encode(), b"schema_version": SCHEMA_VERSION.encode()})


def _f(name: str, typ: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, typ, nullable=nullable)


PROMPTS = _schema(
    "prompts",
    [
        _f("prompt_id", pa.string()),
        _f("problem", pa.string()),
        _f("answer", pa.string()),
        _f("solution", pa.string(), nullable=True),
        _f("source", pa.string()),
        _f("meta", pa.string()),
    ],
)

ROLLOUTS = _schema(
    "rollouts",
    [
        _f("rollout_id", pa.string()),
        _f("round", pa.int32()),
        _f("prompt_id", pa.string()),
        _f("sample_index", pa.int32()),
        # the checkpoint that sampled the row, relative to the run directory when inside it
        # (checkpoints/round-000k); the initial model, outside the run, as given
        _f("checkpoint", pa.string()),
        _f("prompt_token_ids", pa.list_(pa.int32())),
        _f("response_text", pa.string()),
        _f("response_token_ids", pa.list_(pa.int32())),
        _f("response_logprobs", pa.list_(pa.float32())),
        _f("finish_reason", pa.string()),
        _f("engine", pa.string()),
        _f("sampling", SAMPLING),
    ],
)

VERDICTS = _schema(
    "verdicts",
    [
        _f("rollout_id", pa.string()),
        _f("round", pa.int32()),
        _f("reward", pa.float32()),
        _f("correct", pa.bool_()),
        _f("extracted_answer", pa.string(), nullable=True),
        _f("status", pa.string()),
        _f("detail", pa.string(), nullable=True),
    ],
)

ANNOTATIONS = _schema(
    "annotations",
    [
        _f("rollout_id", pa.string()),
        _f("round", pa.int32()),
        _f("route", pa.string()),
        _f("annotator", pa.string()),
        _f("spans", pa.list_(SPAN)),
        # fraction of response tokens in spans; NULL where nothing was distilled from the row
        _f("coverage", pa.float32(), nullable=True),
        _f("status", pa.string()),
        _f("raw_response", pa.string(), nullable=True),
        _f("error", pa.string(), nullable=True),
        _f("latency_s", pa.float32()),
    ],
)

# One row per optimizer step. The fixed columns are the ones every method reports; methods may
# add namespaced float columns, which `extend_metrics` admits under SQL-safe names: the trainer's
# `kl/forward` is the column `kl_forward` (metric_column; version-1 files used the trainer's name,
# and reading one renames its columns so).
TRAIN_METRICS = _schema(
    "train_metrics",
    [
        _f("step", pa.int64()),
        _f("round", pa.int32()),
        _f("loss", pa.float64()),
        _f("pg_loss", pa.float64()),
        _f("kl_loss", pa.float64()),
        _f("kl_weight", pa.float64()),
        _f("entropy", pa.float64()),
        _f("response_len_mean", pa.float64()),
        _f("span_token_frac", pa.float64()),
        _f("clip_frac", pa.float64()),
        _f("grad_norm", pa.float64()),
        _f("lr", pa.float64()),
        _f("tokens_per_s", pa.float64()),
        _f("peak_mem_bytes", pa.int64()),
    ],
)

EVAL_SAMPLES = _schema(
    "eval_samples",
    [
        _f("benchmark", pa.string()),
        _f("problem_id", pa.string()),
        _f("sample_index", pa.int32()),
        _f("response_text", pa.string()),
        _f("extracted_answer", pa.string(), nullable=True),
        _f("correct", pa.bool_()),
        _f("num_tokens", pa.int32()),
    ],
)

SCHEMAS: dict[str, pa.Schema] = {
    "prompts": PROMPTS,
    "rollouts": ROLLOUTS,
    "verdicts": VERDICTS,
    "annotations": ANNOTATIONS,
    "train_metrics": TRAIN_METRICS,
    "eval_samples": EVAL_SAMPLES,
}

# Datasets whose rows carry a `status` column; the manifest counts rows by it.
STATUS_COLUMN = "status"

# Keys unique by contract: one row per rollout in each of these datasets. A repeated rollout_id
# would give one copy the other's reward and spans (and double its GRPO group), so the store
# refuses to write it (refuse_repeated_keys).
UNIQUE_KEYS: dict[str, str] = {"rollouts": "rollout_id", "verdicts": "rollout_id",
                               "annotations": "rollout_id"}


def refuse_repeated_keys(table: pa.Table, schema: pa.Schema, seen: set[Any]) -> None:
    """Raise SchemaError when `table` repeats a unique key of its schema, within itself or
    against `seen` (the keys of the dataset's earlier parts, updated in place)."""
    from trace_rl.data_schemas.errors import SchemaError

    name = (schema.metadata or {}).get(b"schema_name", b"").decode()
    key = UNIQUE_KEYS.get(name)
    if key is None or key not in table.column_names:
        return
    for value in table.column(key).to_pylist():
        if value in seen:
            raise SchemaError(f"{name}: repeated {key} {value!r}; {key}s are unique by contract "
                              "(a round must not draw a prompt twice)")
        seen.add(value)


def get_schema(name: str) -> pa.Schema:
    """Look a schema up by name; an unknown name lists the valid ones."""
    try:
        return SCHEMAS[name]
    except KeyError:
        raise KeyError(f"unknown schema {name!r}; valid: {sorted(SCHEMAS)}") from None


def metric_column(name: str) -> str:
    """The column of a trainer metric: `kl/forward` -> `kl_forward`, `teacher/step` ->
    `teacher_step` (a name SQL reads unquoted)."""
    return name.replace("/", "_")


def extend_metrics(extra_columns: list[str]) -> pa.Schema:
    """TRAIN_METRICS plus float64 columns for namespaced extras (by `metric_column`), in a
    stable (sorted) order."""
    known = set(TRAIN_METRICS.names)
    names = {metric_column(c) for c in extra_columns} - known
    extra = [pa.field(c, pa.float64(), nullable=True) for c in sorted(names)]
    return pa.schema(list(TRAIN_METRICS) + extra, metadata=TRAIN_METRICS.metadata)
