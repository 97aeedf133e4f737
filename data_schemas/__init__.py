"""Explicit pyarrow schemas for every dataset of a run, and checked Parquet I/O."""

from .io import check_schema, conform, read_parquet, rows_to_table, write_parquet
from .upgrade import sampling_fields
from .schemas import (
    ANNOTATIONS,
    EVAL_SAMPLES,
    PROMPTS,
    ROLLOUTS,
    SAMPLING,
    SCHEMA_VERSION,
    SCHEMAS,
    SPAN,
    TRAIN_METRICS,
    VERDICTS,
    extend_metrics,
    get_schema,
    metric_column,
)

__all__ = [
    "ANNOTATIONS", "EVAL_SAMPLES", "PROMPTS", "ROLLOUTS", "SAMPLING", "SCHEMAS", "SCHEMA_VERSION",
    "SPAN", "TRAIN_METRICS", "VERDICTS", "check_schema", "conform", "extend_metrics", "get_schema",
    "metric_column", "read_parquet", "rows_to_table", "sampling_fields", "write_parquet",
]
