"""Reading files of an older schema version: `read_parquet` hands a version-1 table here and gets
the version-2 table every reader expects (DESIGN.md, "Parquet contracts"), so runs written before
the change stay readable without rewriting them.

What version 2 changed, and how a version-1 table is brought up to it:
- verdicts and annotations gained `round` (int32): taken from the file's place in the run,
  `<run>/round-000k/<dataset>/<file>`;
- train_metrics' namespaced columns got SQL-safe names: `kl/forward` -> `kl_forward`
  (schemas.metric_column);
- rollouts' `checkpoint` is relative to the run when inside it: the run is the directory above
  `round-000k/`; `sampling`, JSON text, became the SAMPLING struct.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa

from .errors import SchemaError
from .schemas import SAMPLING, SCHEMA_VERSION, metric_column

UPGRADABLE = {"1"}
# <run>/round-000k/<dataset>/<file>: group 1 is the run, group 2 the round
_IN_ROUND = re.compile(r"^(.*?)/?round-(\d+)/[^/]+/[^/]+$")


def sampling_fields(value: str | dict | None) -> dict[str, Any]:
    """A rollout's `sampling` as a dict of the fields it holds: the version-2 struct (NULL fields
    left out) or version-1 JSON text."""
    if not value:
        return {}
    fields: dict[str, Any] = json.loads(value) if isinstance(value, str) else value
    return {k: v for k, v in fields.items() if v is not None}


def _place(path: str, name: str) -> tuple[str, int]:
    m = _IN_ROUND.match(path)
    if m is None:
        raise SchemaError(f"{path}: a version-1 {name} file outside <run>/round-000k/{name}/ says "
                          "nothing of its round; read it where the run put it, or rerun its stage "
                          "with --force to write version 2")
    return m.group(1), int(m.group(2))


def _with_round(table: pa.Table, path: str, name: str) -> pa.Table:
    _, round_index = _place(path, name)
    column = pa.array([round_index] * table.num_rows, pa.int32())
    return table.add_column(1, pa.field("round", pa.int32(), nullable=False), column)


def _rollouts(table: pa.Table, path: str) -> pa.Table:
    run, _ = _place(path, "rollouts")
    known = {f.name for f in SAMPLING}

    def relative(checkpoint: str) -> str:
        inside = run and checkpoint.startswith(run.rstrip("/") + "/")
        return checkpoint[len(run.rstrip("/")) + 1:] if inside else checkpoint

    checkpoints = pa.array([relative(c) for c in table.column("checkpoint").to_pylist()], pa.string())
    sampling = pa.array([{k: v for k, v in sampling_fields(s).items() if k in known}
                         for s in table.column("sampling").to_pylist()], SAMPLING)
    i, j = table.schema.get_field_index("checkpoint"), table.schema.get_field_index("sampling")
    table = table.set_column(i, pa.field("checkpoint", pa.string(), nullable=False), checkpoints)
    return table.set_column(j, pa.field("sampling", SAMPLING, nullable=False), sampling)


def upgrade(table: pa.Table, name: str, version: str | None, path: str) -> pa.Table:
    """The version-2 form of a version-1 `name` table read from `path`."""
    if version not in UPGRADABLE:
        raise SchemaError(f"{path}: no upgrade from schema_version {version!r}")
    if name in ("verdicts", "annotations") and "round" not in table.column_names:
        table = _with_round(table, path, name)
    elif name == "train_metrics":
        table = table.rename_columns([metric_column(n) for n in table.column_names])
    elif name == "rollouts":
        table = _rollouts(table, path)
    meta = dict(table.schema.metadata or {})
    meta[b"schema_version"] = SCHEMA_VERSION.encode()
    return table.replace_schema_metadata(meta)
