"""Damage detection: every committed file's size and content hash, and checks against them.

A dataset manifest lists its part files with `size` and `sha256`, and carries a `digest` of its
own content; the train stage's manifest lists the files of the checkpoint it wrote the same way
(`extra["checkpoint_files"]`). `verify_dataset` compares the disk against that record: fast
(sizes only: a truncated, replaced or deleted file) or deep (`deep=True`: every byte hashed).
Manifests written before this record existed verify as "unrecorded", never as damaged.
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


def _check_files(fs, directory: str, files: list[dict[str, Any]], deep: bool) -> list[Damage]:
    found = []
    for f in files:
        path = f"{directory.rstrip('/')}/{f['name']}"
        if "size" not in f:
            continue  # recorded before sizes were: nothing to compare against
        if not fs.exists(path):
            found.append(Damage(f["name"], "missing"))
            continue
        size = fs.size(path)
        if size != f["size"]:
            found.append(Damage(f["name"], f"{size} bytes, the manifest recorded {f['size']}"))
        elif deep and f.get("sha256") and file_digest(fs, path)["sha256"] != f["sha256"]:
            found.append(Damage(f["name"], "content differs from the recorded sha256"))
    return found


def verify_manifest(manifest) -> list[Damage]:
    """An edited manifest: its content no longer matches the digest it was written with."""
    from dataclasses import asdict

    record = asdict(manifest)
    if not record.get("digest"):
        return []
    if manifest_digest(record) != record["digest"]:
        return [Damage(".manifest.json", "edited after it was written (its digest does not match)")]
    rows = sum(int(f.get("rows", 0)) for f in record["files"])
    if rows != record["rows"]:
        return [Damage(".manifest.json", f"says {record['rows']} rows, its files {rows}")]
    return []


def verify_dataset(store, name: str, manifest=None, *, deep: bool = False) -> list[Damage]:
    """What is wrong with the complete dataset `name` (empty when nothing): an edited manifest,
    part files missing or of another size (or, `deep`, other content), and for a train stage the
    checkpoint files it recorded."""
    m = manifest if manifest is not None else store.manifest(name)
    if m is None:
        return []
    found = verify_manifest(m)
    found += _check_files(store.fs, store.path(name), m.files, deep)
    ckpt = (m.extra or {}).get("checkpoint_files")
    if ckpt:
        directory = store.path(ckpt["dir"])
        if not store.fs.isdir(directory):
            found.append(Damage(ckpt["dir"], "checkpoint directory missing"))
        else:
            found += [Damage(f"{ckpt['dir']}/{d.what}", d.problem)
                      for d in _check_files(store.fs, directory, ckpt["files"], deep)]
    return found


def recorded(manifest) -> bool:
    """Whether a manifest carries sizes and hashes to verify against."""
    return bool(getattr(manifest, "digest", "")) and all("size" in f for f in manifest.files)
