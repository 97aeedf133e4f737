"""A content-addressed reply cache on local disk, so a rerun never pays for a reply twice.

Key = sha256 of the canonical JSON of (model, messages, sampling). One JSON file per key at
<dir>/<key[:2]>/<key>.json, written to a temporary name in the same directory and renamed
(atomic on POSIX), so a crashed run never leaves a half-written entry. Only completed replies are
stored (also ones that later fail to parse: they were paid for); transport failures are not.
Nothing secret is stored: the key material is the request content, never the API key.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def cache_key(model: str, messages: list[dict], sampling: dict) -> str:
    """sha256 hex digest of the canonical request content."""
    blob = json.dumps(
        {"model": model, "messages": messages, "sampling": sampling},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ReplyCache:
    """lookup/put raw reply strings by key under one directory (None = caching off)."""

    def __init__(self, root: str | None):
        self.root = Path(root) if root else None

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    def lookup(self, key: str) -> tuple[str, float] | None:
        """(reply, the latency its request took) or None. A hit's row records the latency of the
        request that paid for it, so an annotate rerun served from the cache writes the same
        bytes as the run that made the requests (its content fingerprint, and so every later
        stage, stays current). Entries written before latencies were kept read as 0.0."""
        if self.root is None:
            return None
        try:
            with open(self._path(key), encoding="utf-8") as f:
                entry = json.load(f)
        except (OSError, json.JSONDecodeError):
            return None
        raw = entry.get("raw") if isinstance(entry, dict) else None
        if not isinstance(raw, str):
            return None
        latency = entry.get("latency_s", 0.0)
        return raw, float(latency) if isinstance(latency, (int, float)) else 0.0

    def put(self, key: str, raw: str, meta: dict | None = None) -> None:
        """Store atomically: write a temp file beside the target, then rename.

        No fsync: the rename already guarantees a crashed process leaves no partial entry, and
        an entry lost to a power cut is only a cache miss (an fsync per reply would stall the
        event loop that runs the requests).
        """
        if self.root is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"key": key, "raw": raw, **(meta or {})}, f, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
