"""Damage detection: every committed file's size and content hash, and checks against them.

A dataset manifest lists its part files with `size` and `sha256`, and carries a `digest` of its
own content; the train stage's manifest lists the files of the checkpoint it wrote the same way
(`extra["checkpoint_files"]`). `verify_dataset` compares the disk against that record: fast
(sizes only: a truncated, replaced or deleted file) or deep (`deep=True`: every byte hashed).
Manifests written before this record existed verify as "unrecorded", never as damaged; a
manifest whose files carry sizes but whose digest is gone is damaged (`records_digests`), and
so is one stripped of its whole record when an input of the run records one (`stripped_record`). A
visible file in a dataset directory that the manifest does not list is damage too: directory
readers (pandas, duckdb, datasets) would read it although the store does not.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
# Written after the checkpoint's manifest entry (the full trainer state at the end of a flow), so
# not part of the record: a damaged trainer state shows when a cold start loads it.
CHECKPOINT_UNRECORDED = ("trainer_state",)


def file_digest(fs, path: str) -> dict[str, Any]:
    """{"size", "sha256"} of one file on an fsspec filesystem."""
    h = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def manifest_digest(record: dict[str, Any]) -> str:
    """The hash of a manifest's content (all fields but `digest` and the `fingerprint` derived
    from them): an edited row count or file list no longer matches it."""
    body = {k: v for k, v in record.items() if k not in ("digest",)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def checkpoint_record(store, relative: str) -> dict[str, Any]:
    """{"dir": relative, "files": [...]}: what a train manifest records of the checkpoint it wrote
    at `relative` inside the run (a path relative to the run, so a moved run still verifies)."""
    return {"dir": relative, "files": checkpoint_files(store.local_path(relative))}


def checkpoint_files(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Name, size and sha256 of every file of a local checkpoint directory (relative names,
    sorted), except the trainer state written later (CHECKPOINT_UNRECORDED)."""
    from fsspec.implementations.local import LocalFileSystem

    root = Path(directory)
    fs = LocalFileSystem()
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel.split("/", 1)[0] not in CHECKPOINT_UNRECORDED and not rel.endswith(".tmp"):
            out.append({"name": rel, **file_digest(fs, str(p))})
    return out


@dataclass(frozen=True)
class Damage:
    """One finding: `what` is the file (or the manifest), `problem` what is wrong with it."""

    what: str
    problem: str

    def __str__(self) -> str:
        return f"{self.what}: {self.problem}"


def check_files(fs, directory: str, files: list[dict[str, Any]], deep: bool) -> list[Damage]:
    """The listed files against their record: missing, another size, or (`deep`) other bytes."""
    found = []
    for f in files:
        path = f"{directory.rstrip('/')}/{f['name']}"
        if not fs.exists(path):  # a listed file must exist, recorded size or not
            found.append(Damage(f["name"], "missing"))
            continue
        if "size" not in f:
            continue  # recorded before sizes were: nothing to compare against
        size = fs.size(path)
        if size != f["size"]:
            found.append(Damage(f["name"], f"{size} bytes, the manifest recorded {f['size']}"))
        elif deep and f.get("sha256") and file_digest(fs, path)["sha256"] != f["sha256"]:
            found.append(Damage(f["name"], "content differs from the recorded sha256"))
    return found


def records_digests(record: dict[str, Any]) -> bool:
    """Whether a manifest was written by a version that records digests. The manifest `digest`
    and the per-file `size`/`sha256` came in the same change (issue 23; the package version and
    SCHEMA_VERSION did not move), so a file entry with a size or hash marks such a manifest,
    and so does a train manifest's checkpoint record. Only a manifest without any of these (an
    older run, or a dataset of no files) is "unrecorded"."""
    files = record.get("files") or []
    return (any("size" in f or "sha256" in f for f in files)
            or bool((record.get("extra") or {}).get("checkpoint_files")))


def verify_manifest(manifest) -> list[Damage]:
    """An edited manifest: its content no longer matches the digest it was written with, or the
    digest (or a file's size or hash) was removed from a manifest that recorded them."""
    from dataclasses import asdict

    record = asdict(manifest)
    if not record.get("digest"):
        if records_digests(record):  # emptied or deleted: else any edit would pass as unrecorded
            return [Damage(".manifest.json", "its digest is missing, although its files carry "
                                             "sizes and hashes (edited after it was written)")]
        return []
    unhashed = [f.get("name", "?") for f in record["files"] if "size" not in f or "sha256" not in f]
    if unhashed:
        return [Damage(".manifest.json", f"the size or sha256 of {', '.join(unhashed[:3])} was removed")]
    if manifest_digest(record) != record["digest"]:
        return [Damage(".manifest.json", "edited after it was written (its digest does not match)")]
    rows = sum(int(f.get("rows", 0)) for f in record["files"])
    if rows != record["rows"]:
        return [Damage(".manifest.json", f"says {record['rows']} rows, its files {rows}")]
    return []


def visible(entry: str) -> bool:
    """Whether a directory reader sees the entry: pyarrow, datasets and duckdb skip names that
    start with "." or "_" (the manifest, a part being written)."""
    return not entry.rstrip("/").rsplit("/", 1)[-1].startswith((".", "_"))


def unlisted_files(fs, directory: str, files: list[dict[str, Any]]) -> list[Damage]:
    """Visible entries of a dataset directory its manifest does not list: the store would read
    the listed parts only while pandas, duckdb or `load_dataset(data_dir=...)` read them all."""
    listed = {f["name"] for f in files}
    try:
        entries = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return []
    names = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if visible(e))
    return [Damage(n, "not listed in the manifest (added after the dataset was written)")
            for n in names if n not in listed]


def pruned_marker(checkpoint_dir: str | os.PathLike) -> Path:
    """The file `train.keep_checkpoints` leaves beside a checkpoint it removed (stages/prune.py):
    a pruned checkpoint is not a damaged one."""
    path = Path(checkpoint_dir)
    return path.with_name(path.name + ".pruned.json")


def stripped_record(store, m) -> list[Damage]:
    """A manifest with no record at all (digest, sizes and hashes all removed) reads like one of
    a version before records; it cannot be, when one of its inputs in this run has a record: that
    input was written first, so the version that wrote this manifest recorded them too. (A run
    resumed with an older trace-rl after a newer one is the one false alarm.)"""
    from dataclasses import asdict

    if m.digest or records_digests(asdict(m)):
        return []  # verify_manifest judges it
    for input_name, fp in sorted((m.inputs or {}).items()):
        try:
            upstream = store.manifest(input_name)
        except (OSError, ValueError, TypeError):
            continue  # not a dataset name, or a damaged manifest reported on its own
        if upstream is not None and upstream.fingerprint == fp and upstream.digest:
            return [Damage(".manifest.json", f"its digest, sizes and hashes are missing, although "
                                             f"its input {input_name}, written before it, records "
                                             "them (edited after it was written)")]
    return []


def verify_dataset(store, name: str, manifest=None, *, deep: bool = False) -> list[Damage]:
    """What is wrong with the complete dataset `name` (empty when nothing): an edited manifest,
    part files missing or of another size (or, `deep`, other content), files it does not list,
    and for a train stage the checkpoint files it recorded."""
    m = manifest if manifest is not None else store.manifest(name)
    if m is None:
        return []
    found = verify_manifest(m) + stripped_record(store, m)
    found += check_files(store.fs, store.path(name), m.files, deep)
    found += unlisted_files(store.fs, store.path(name), m.files)
    ckpt = (m.extra or {}).get("checkpoint_files")
    if ckpt:
        directory = store.path(ckpt["dir"])
        if not store.fs.isdir(directory):
            if not store.fs.exists(str(pruned_marker(directory))):
                found.append(Damage(ckpt["dir"], "checkpoint directory missing"))
        else:
            found += [Damage(f"{ckpt['dir']}/{d.what}", d.problem)
                      for d in check_files(store.fs, directory, ckpt["files"], deep)]
    return found


def recorded(manifest) -> bool:
    """Whether a manifest carries sizes and hashes to verify against."""
    return bool(getattr(manifest, "digest", "")) and all("size" in f for f in manifest.files)
