"""Explicit pyarrow schemas for every dataset of a run, and checked Parquet I/O."""

from .io import check_schema, conform, read_parquet, rows_to_table, write_parquet
from .schemas import (
    ANNOTATIONS,
    EVAL_SAMPLES,
    PROMPTS,
    ROLLOUTS,
    SCHEMA_VERSION,
    SCHEMAS,
    SPAN,
    TRAIN_METRICS,
    VERDICTS,
    extend_metrics,
    get_schema,
)

__all__ = [
    "ANNOTATIONS", "EVAL_SAMPLES", "PROMPTS", "ROLLOUTS", "SCHEMA_VERSION", "SCHEMAS", "SPAN",
    "TRAIN_METRICS", "VERDICTS", "check_schema", "conform", "extend_metrics", "get_schema",
    "read_parquet", "rows_to_table", "write_parquet",
]
