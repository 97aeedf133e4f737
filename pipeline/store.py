"""The run store: every dataset of a run, on a local path or any fsspec URL.

A dataset is a directory of `part-NNNNN.parquet` files plus `.manifest.json`. The manifest is
written last (through a temporary name and a rename where the filesystem has one), so its
presence means the dataset is complete; readers trust only the parts the manifest lists, so a
process killed mid-write can never leave a dataset that looks complete or mixes old and new parts.
A visible file the manifest does not list (a part added afterwards, which pandas or duckdb on the
directory would read) makes `read` refuse the dataset and `status` report it damaged.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import fsspec
import pyarrow as pa

from trace_rl.data_schemas import SCHEMA_VERSION, metric_column, read_parquet, rows_to_table, write_parquet
from trace_rl.data_schemas.errors import StageError
from trace_rl.data_schemas.schemas import STATUS_COLUMN, refuse_repeated_keys

from .fingerprint import code_version, fingerprint
from .integrity import (check_files, file_digest, manifest_digest, stripped_record, unlisted_files,
                        verify_dataset, verify_manifest)

# A hidden name: tools that read a directory of Parquet files (datasets' `data_dir`, pyarrow
# datasets, duckdb globs) skip it, so every dataset directory reads as plain Parquet.
MANIFEST = ".manifest.json"
LEGACY_MANIFEST = "_manifest.json"  # runs written before the rename; read, never written


@dataclass
class Manifest:
    """What a finished stage output holds and what it was made from."""

    dataset: str
    stage: str
    schema: str
    schema_version: str
    config_fingerprint: str
    inputs: dict[str, str]
    rows: int
    counts: dict[str, int]
    files: list[dict[str, Any]]
    code_version: str
    started_at: float
    finished_at: float
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # sha256 of the other fields (pipeline/integrity.py): an edited manifest is detected.
    digest: str = ""

    @property
    def seconds(self) -> float:
        return self.finished_at - self.started_at

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        return cls(**json.loads(text))


def content_fingerprint(m: Manifest) -> str:
    """What downstream stages record of this dataset: a hash of what it holds and what it was
    made from (config, inputs, each file's name, size and sha256, and `extra`, where a train
    stage lists its checkpoint's files by hash), never of when it was written. A forced rerun
    that writes byte-identical output keeps the fingerprint, so nothing downstream goes stale
    (a content-addressed build); any changed byte changes it."""
    extra = m.extra or {}
    if "checkpoint_files" in extra:
        # A train stage: what later stages read of it is its checkpoint, by content. Its metrics
        # file carries tokens/s and its extra how the round ran (replayed or not), so hashing them
        # made a forced retrain that wrote bitwise-identical weights invalidate every later round.
        return fingerprint([m.config_fingerprint, m.inputs, extra["checkpoint_files"]])
    files = [{k: f.get(k) for k in ("name", "rows", "size", "sha256")} for f in m.files]
    held = {k: v for k, v in extra.items() if k not in RUN_FACTS}
    return fingerprint([m.config_fingerprint, m.inputs, files, held])


# `extra` keys that say how a write went, not what it holds: a rollout's engine record (cold or
# resident, seconds to generate) differs on every run, so hashing it made a forced rollout that
# sampled byte-identical rows invalidate everything after it.
RUN_FACTS = frozenset({"engine"})


def read_manifest(fs, directory: str) -> Manifest | None:
    """The manifest of the dataset in `directory` on `fs`, or None while it is missing (the
    dataset is incomplete). The one reader of `.manifest.json`: the store and `inspect` use it."""
    path = f"{directory.rstrip('/')}/{MANIFEST}"
    if not fs.exists(path):
        path = f"{directory.rstrip('/')}/{LEGACY_MANIFEST}"
        if not fs.exists(path):
            return None
    with fs.open(path, "r") as fh:
        return Manifest.from_json(fh.read())


_ROUND_DIR = re.compile(r"(?:^|/)round-(\d+)/[^/]+$")  # <round-000k>/<dataset>


def stamp_round(rows: Iterable[dict[str, Any]], name: str, schema: pa.Schema) -> list[dict[str, Any]]:
    """Rows of a round's dataset carry `round` (schema version 2): the store stamps the round of
    the directory they go to on rows that leave it out (the stages set it themselves)."""
    rows = list(rows)
    m = _ROUND_DIR.search(name)
    if m is None or "round" not in schema.names:
        return rows
    return [{"round": int(m.group(1)), **r} for r in rows]


class DatasetWriter:
    """Writes the parts of one dataset; `close()` writes the manifest. Use as a context manager:
    an exception inside the block leaves the dataset incomplete (no manifest)."""

    def __init__(self, store: "RunStore", name: str, schema: pa.Schema, *, stage: str,
                 config_fingerprint: str, inputs: dict[str, str], allow_extra: bool = False):
        self.store, self.name, self.schema = store, name, schema
        self.stage, self.config_fingerprint, self.inputs = stage, config_fingerprint, inputs
        self.allow_extra = allow_extra
        self.files: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.started_at = time.time()
        self.extra: dict[str, Any] = {}
        self.manifest: Manifest | None = None
        store._begin_rewrite(name)

    def write_rows(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = stamp_round(rows, self.name, self.schema)
        if self.allow_extra:  # the trainer's `kl/forward` is the column `kl_forward`
            rows = [{metric_column(k): v for k, v in r.items()} for r in rows]
        self.write_table(rows_to_table(rows, self.schema, where=f"{self.name} (rows)"))

    def write_table(self, table: pa.Table, part: str | None = None) -> None:
        """Write one part; `part` names it (default `part-NNNNN.parquet`)."""
        refuse_repeated_keys(table, self.schema, self.__dict__.setdefault("_keys_seen", set()))
        part = part or f"part-{len(self.files):05d}.parquet"
        final = self.store.path(self.name, part)
        tmp = self.store.path(self.name, f".{part}.{uuid.uuid4().hex[:8]}.tmp")
        write_parquet(table, tmp, self.schema, filesystem=self.store.fs, allow_extra=self.allow_extra)
        self.store.fs.mv(tmp, final)
        # Size and content hash of the committed bytes: `status` and `run` verify against them.
        self.files.append({"name": part, "rows": table.num_rows, **file_digest(self.store.fs, final)})
        if STATUS_COLUMN in table.column_names:
            self.counts.update(table.column(STATUS_COLUMN).to_pylist())

    def close(self) -> Manifest:
        rows = sum(f["rows"] for f in self.files)
        manifest = Manifest(
            dataset=self.name, stage=self.stage, schema=self.schema.metadata[b"schema_name"].decode(),
            schema_version=SCHEMA_VERSION, config_fingerprint=self.config_fingerprint,
            inputs=dict(self.inputs), rows=rows, counts=dict(self.counts) or {"all": rows},
            files=self.files, code_version=code_version(), started_at=self.started_at,
            finished_at=time.time(), extra=self.extra,
        )
        manifest.fingerprint = content_fingerprint(manifest)
        manifest.digest = manifest_digest(asdict(manifest))
        self.store.write_text(self.store.path(self.name, MANIFEST), manifest.to_json())
        self.manifest = manifest
        return manifest

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


class RunStore:
    """One run's directory: `RunStore("runs/demo")` or `RunStore("s3://bucket/runs/demo")`."""

    def __init__(self, root: str):
        self.root = str(root)
        self.fs, self._root = fsspec.core.url_to_fs(self.root)
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    # paths -------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self._root.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def local_path(self, *parts: str) -> Path:
        """A local directory inside the run (checkpoints, scratch). Only local runs have one."""
        if not self.is_local:
            raise StageError(
                f"{self.root} is not a local path; checkpoints and trainer scratch need a local "
                "run directory (set run.root to a local or network-mounted path)"
            )
        return Path(self.path(*parts))

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def write_text(self, path: str, text: str) -> None:
        """Write a small text file atomically (temporary name, then rename)."""
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open(tmp, "w") as fh:
            fh.write(text)
        self.fs.mv(tmp, path)

    def read_text(self, path: str) -> str:
        with self.fs.open(path, "r") as fh:
            return fh.read()

    # datasets ----------------------------------------------------------------------------
    def manifest(self, name: str) -> Manifest | None:
        """The manifest of a complete dataset, or None while it is missing or incomplete."""
        return read_manifest(self.fs, self.path(name))

    def is_current(self, name: str, config_fingerprint: str, inputs: dict[str, str]) -> bool:
        """True when `name` is complete and was made from this config and these inputs."""
        m = self.manifest(name)
        if m is None or m.config_fingerprint != config_fingerprint or m.inputs != inputs:
            return False
        # A complete dataset whose files no longer match their record is never skipped as current
        # (sizes only: cheap on every stage; `trace-rl status --verify` hashes every byte).
        damage = verify_dataset(self, name, m)
        if damage:
            logging.getLogger("trace_rl.store").warning(
                "%s is damaged (%s); recomputing it", self.path(name), "; ".join(map(str, damage)))
        return not damage

    def _begin_rewrite(self, name: str) -> None:
        # Manifest first: from this moment the dataset reads as incomplete, whatever happens.
        directory = self.path(name)
        for manifest in (MANIFEST, LEGACY_MANIFEST):
            if self.fs.exists(self.path(name, manifest)):
                self.fs.rm(self.path(name, manifest))
        if self.fs.exists(directory):
            for entry in self.fs.ls(directory, detail=False):
                self.fs.rm(entry, recursive=True)
        self.fs.makedirs(directory, exist_ok=True)

    def writer(self, name: str, schema: pa.Schema, *, stage: str, config_fingerprint: str,
               inputs: dict[str, str] | None = None, allow_extra: bool = False) -> DatasetWriter:
        return DatasetWriter(self, name, schema, stage=stage, config_fingerprint=config_fingerprint,
                             inputs=inputs or {}, allow_extra=allow_extra)

    def read(self, name: str, schema: pa.Schema, allow_extra: bool = False) -> pa.Table:
        """All rows of a complete dataset, parts in order, checked against `schema`."""
        m = self.manifest(name)
        if m is None:
            raise StageError(
                f"dataset {self.path(name)} is missing or incomplete (no {MANIFEST}); "
                "run the stage that writes it first"
            )
        self._refuse_damaged_listing(name, m)
        tables = [read_parquet(self.path(name, f["name"]), schema, self.fs, allow_extra)
                  for f in m.files]
        if not tables:
            return schema.empty_table()
        table = pa.concat_tables(tables, promote_options="default") if allow_extra else pa.concat_tables(tables)
        if table.num_rows != m.rows:
            raise StageError(f"{self.path(name)}: manifest says {m.rows} rows, parts hold {table.num_rows}")
        return table

    def _refuse_damaged_listing(self, name: str, m: Manifest) -> None:
        """A reader refuses a dataset whose manifest was edited or whose directory holds files
        the manifest does not list: directory readers would see other rows than the store."""
        found = verify_manifest(m) + stripped_record(self, m)
        # sizes too (one stat a part): a part replaced by other valid Parquet of the same rows
        # was read as if nothing had happened while `status` called it damaged
        found += check_files(self.fs, self.path(name), m.files, deep=False)
        found += unlisted_files(self.fs, self.path(name), m.files)
        if found:
            raise StageError(
                f"dataset {self.path(name)} is damaged: {'; '.join(map(str, found[:3]))}. Remove "
                "the files it does not list, or recompute it (`trace-rl run CONFIG`, or the stage "
                "that wrote it with --force); `trace-rl status` shows every damaged dataset"
            )

    def invalidate(self, name: str) -> bool:
        """Remove a dataset's manifest so it reads as incomplete; True if there was one."""
        found = False
        for manifest in (MANIFEST, LEGACY_MANIFEST):
            if self.fs.exists(self.path(name, manifest)):
                self.fs.rm(self.path(name, manifest))
                found = True
        return found
