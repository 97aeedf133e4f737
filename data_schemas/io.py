"""Reading and writing tables against their declared schemas.

Checks happen at the boundary so a bad shard fails with the file, the column, the expected and
the actual type, instead of a traceback from deep inside pyarrow or the trainer.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import SchemaError

from .schemas import SCHEMA_VERSION
from .upgrade import UPGRADABLE, upgrade

# A column name SQL reads unquoted: what a namespaced metric column must be named.
_SQL_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def _type_str(t: pa.DataType) -> str:
    return str(t)


def check_schema(
    actual: pa.Schema, expected: pa.Schema, where: str, allow_extra: bool = False
) -> None:
    """Raise SchemaError when `actual` lacks a column of `expected` or has it with another type.

    Extra columns are an error too (a contract that silently grows is no contract), except
    metric columns with SQL-safe names (`kl_forward`) when `allow_extra` is set.
    """
    for field in expected:
        idx = actual.get_field_index(field.name)
        if idx < 0:
            raise SchemaError(
                f"{where}: missing column {field.name!r} (expected type {_type_str(field.type)}); "
                f"columns present: {actual.names}"
            )
        got = actual.field(idx).type
        if not got.equals(field.type):
            raise SchemaError(
                f"{where}: column {field.name!r} has type {_type_str(got)}, "
                f"expected {_type_str(field.type)}"
            )
    extra = [n for n in actual.names if expected.get_field_index(n) < 0]
    if allow_extra:
        extra = [n for n in extra if not _SQL_NAME.fullmatch(n)]
    if extra:
        raise SchemaError(f"{where}: unexpected columns {extra}; the contract has {expected.names}")


def _struct_value(value: Any, typ: pa.DataType) -> Any:
    """A struct column takes a dict, or its JSON text (what version-1 rows carried, and what
    the engines still hand over as `sampling`)."""
    if isinstance(value, str) and pa.types.is_struct(typ):
        return json.loads(value)
    return value


def rows_to_table(rows: Iterable[dict[str, Any]], schema: pa.Schema, where: str = "rows") -> pa.Table:
    """Build a table with exactly `schema` from dicts; a missing key or a wrong value type is a
    SchemaError naming the column."""
    rows = list(rows)
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    for i, row in enumerate(rows):
        missing = [n for n in schema.names if n not in row and not schema.field(n).nullable]
        if missing:
            raise SchemaError(f"{where}: row {i} lacks columns {missing}")
        extra = [k for k in row if k not in columns]
        if extra:
            raise SchemaError(f"{where}: row {i} has columns outside the contract: {extra}")
        for name in schema.names:
            columns[name].append(_struct_value(row.get(name), schema.field(name).type))
    arrays = []
    for field in schema:
        try:
            arrays.append(pa.array(columns[field.name], type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as exc:
            raise SchemaError(
                f"{where}: column {field.name!r} cannot be stored as {field.type}: {exc}"
            ) from None
        if not field.nullable and arrays[-1].null_count:
            raise SchemaError(f"{where}: column {field.name!r} has nulls but is not nullable")
    return pa.Table.from_arrays(arrays, schema=schema)


# ASCII control characters (NUL, newline, escape, ...): an id holding one prints as something
# else, splits a log line, or ends a C string early in a downstream tool.
_CONTROL_RE = r"[\x00-\x1f\x7f]"


def check_ids(table: pa.Table, where: str) -> None:
    """Raise SchemaError when a string `*_id` column holds a control character, naming the row."""
    import pyarrow.compute as pc

    for name in table.column_names:
        col = table.column(name)
        if not name.endswith("_id") or not pa.types.is_string(col.type):
            continue
        bad = pc.match_substring_regex(col, _CONTROL_RE)
        if pc.any(bad).as_py():
            i = pc.index(bad, True).as_py()
            raise SchemaError(f"{where}: column {name!r} row {i} holds a control character "
                              f"({col[i].as_py()!r}); ids must be printable text")


def conform(table: pa.Table, schema: pa.Schema, where: str, allow_extra: bool = False) -> pa.Table:
    """Check `table` against `schema` and return it carrying the schema's metadata, columns in
    contract order (namespaced extras, when allowed, after them)."""
    check_schema(table.schema, schema, where, allow_extra)
    check_ids(table, where)
    if allow_extra:
        names = schema.names + sorted(n for n in table.schema.names if n not in schema.names)
        fields = [table.schema.field(n) for n in names]
        return table.select(names).cast(pa.schema(fields, metadata=schema.metadata))
    return table.select(schema.names).cast(schema)


def write_parquet(
    table: pa.Table, path: str, schema: pa.Schema, filesystem=None, allow_extra: bool = False
) -> None:
    """Write `table` (checked against `schema`) with `schema_version` in the file metadata."""
    table = conform(table, schema, path, allow_extra)
    pq.write_table(table, path, filesystem=filesystem, compression="zstd")


def read_parquet(
    path: str, schema: pa.Schema, filesystem=None, allow_extra: bool = False
) -> pa.Table:
    """Read one Parquet file and check it against `schema` (columns, types, schema version)."""
    try:
        table = pq.read_table(path, filesystem=filesystem)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(f"{path}: not a readable Parquet file (truncated or corrupt?): {exc}") from None
    meta = table.schema.metadata or {}
    holds = meta.get(b"schema_name", b"").decode() or None
    expected = (schema.metadata or {}).get(b"schema_name", b"").decode() or None
    if expected and holds != expected:
        found = f"{holds} rows" if holds else "rows of no trace-rl schema"
        raise SchemaError(
            f"{path}: this file holds {found} where {expected} rows belong (copied or moved into "
            "the wrong dataset?); rerun the stage that writes this dataset with --force"
        )
    version = meta.get(b"schema_version", b"").decode() or None
    if version in UPGRADABLE and expected:
        table = upgrade(table, expected, version, path)
    elif version != SCHEMA_VERSION:
        raise SchemaError(
            f"{path}: schema_version {version!r} in the file metadata, expected {SCHEMA_VERSION!r} "
            "(written by another version of trace-rl? rerun the stage with --force)"
        )
    check_schema(table.schema, schema, path, allow_extra)
    if allow_extra:
        return table
    return table.select(schema.names)


def json_column(values: Iterable[Any]) -> list[str]:
    """JSON-encode values for a `str` column (meta, sampling): stable key order."""
    return [json.dumps(v, sort_keys=True) for v in values]
