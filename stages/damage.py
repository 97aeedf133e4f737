"""Damage as `trace-rl status` reports it: a complete dataset (or the checkpoint a train stage
recorded) whose files no longer match their sizes and hashes (pipeline/integrity.py), with what
to do about it. `trace-rl run` recomputes such a stage instead of skipping it (RunStore.is_current).
"""

from __future__ import annotations

from trace_rl.pipeline.integrity import recorded, verify_dataset
from trace_rl.pipeline.layout import STAGES, parse_round
from trace_rl.pipeline.store import Manifest, RunStore


def damage_reason(store: RunStore, name: str, m: Manifest, deep: bool = False) -> str | None:
    """Why the complete dataset `name` is damaged (with the remedy), or None when its files
    match their record; `deep` hashes every byte instead of comparing sizes."""
    found = verify_dataset(store, name, m, deep=deep)
    if not found:
        return None
    shown = "; ".join(map(str, found[:3])) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
    return f"{shown}. {remedy(name, m)}"


def remedy(name: str, m: Manifest) -> str:
    k = parse_round(name.split("/", 1)[0])
    stage = m.stage if m.stage in STAGES else None
    one = (f"`trace-rl stage {stage} CONFIG{'' if k is None else f' --round {k}'} --force`"
           if stage and STAGES[stage].dataset else "the stage that wrote it with --force")
    return f"Recompute it: `trace-rl run CONFIG` redoes it and what depends on it, or {one}"


def unrecorded(store: RunStore, name: str) -> bool:
    """A complete dataset written before sizes and hashes were recorded (cannot be verified)."""
    m = store.manifest(name)
    return m is not None and not recorded(m)


def invalidate_damaged(store: RunStore, deep: bool = True) -> list[str]:
    """`trace-rl run --verify`: check every complete dataset of the run (`deep`: every byte's
    hash, which also finds a same-size corruption the size check misses) and mark each damaged
    one incomplete, so the run recomputes it. Returns what was found, one line per dataset."""
    from trace_rl.pipeline.store import LEGACY_MANIFEST, MANIFEST

    found = []
    root = store.path("").rstrip("/")
    names = {path[len(root) + 1:].rsplit("/", 1)[0] for path in store.fs.find(root)
             if path.rsplit("/", 1)[-1] in (MANIFEST, LEGACY_MANIFEST)}
    for name in sorted(names):
        reason = damage_reason(store, name, store.manifest(name), deep)
        if reason:
            store.invalidate(name)
            found.append(f"{name}: {reason}")
    return found
