"""Stable fingerprints of configs and code, so a finished stage can tell whether it is current."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any


def fingerprint(obj: Any) -> str:
    """sha256 (first 16 hex chars) of the canonical JSON of `obj`."""
    data = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def result_fields(section: dict[str, Any], runtime_only: Iterable[str], where: str) -> dict[str, Any]:
    """`section` (a config's JSON dump) without the dotted paths of `runtime_only`: what a
    stage's output depends on. A path that names no field raises, so a renamed field cannot
    silently slip back into (or out of) a fingerprint."""
    out = json.loads(json.dumps(section))
    for dotted in runtime_only:
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise KeyError(f"{where}: runtime-only field {dotted!r} is not a field of this config; "
                           "update the runtime-only list next to it")
        del node[leaf]
    return out


def model_dir_fingerprint(model_dir: str) -> str:
    """Cheap identity of a model: the names, sizes and mtimes of a checkpoint directory's files
    (hashing gigabytes of weights would cost more than the work it guards), or the name itself
    for a hub model."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        return fingerprint(["model", model_dir])
    entries = []
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            st = os.stat(os.path.join(root, f))
            entries.append([os.path.relpath(os.path.join(root, f), path), st.st_size, st.st_mtime_ns])
    return fingerprint(["model-dir", entries])


@lru_cache(maxsize=1)
def code_version() -> str:
    """The package version plus the git commit of the source tree when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("trace-rl")
    except PackageNotFoundError:
        ver = "0+unknown"
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"{ver}+g{sha}" if sha else ver
    except (OSError, subprocess.SubprocessError):
        return ver
