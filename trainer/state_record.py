"""The trainer state's record: what `trainer_state/` must hold, and whose state it is.

A checkpoint's trainer state (optimizer moments, scheduler, global step, RNG, the float32 master)
decides how every later round trains, yet it may be written after the train stage recorded the
checkpoint's files (the full state goes in when a flow exits), so it carries a record of its own:
- `trainer_state/record.json`: round, global step, and the size and sha256 of every file under
  `trainer_state/` (state.pt, state.json, the teacher snapshot), written last;
- `<ckpt>/trainer_step.json`: round and global step of the weights, written with them (so the
  train manifest's checkpoint record covers it).
`state_problems` compares the disk with both: a truncated or changed file, or the state of another
checkpoint (its round and step are not the weights'), is never loaded (`TrainerStateError`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

RECORD = "record.json"
STEP_FILE = "trainer_step.json"
_CHUNK = 1 << 20


class TrainerStateError(RuntimeError):
    """A checkpoint's trainer state is damaged, unreadable or belongs to another checkpoint."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _state_files(state_dir: Path) -> list[Path]:
    return sorted(p for p in state_dir.rglob("*") if p.is_file() and p.name != RECORD
                  and ".tmp-" not in p.relative_to(state_dir).as_posix())


def write_step(ckpt: str | Path, round_index: int, global_step: int) -> None:
    """Say which round and global step the checkpoint's weights are the result of, with an id of
    the weights' content: a state binds to it, so another run's state at the same round and step
    (copied with its own record) is foreign. A content id, not a random one: a forced train
    stage that rewrites the same weights rewrites the same bytes here too, so content staleness
    leaves later rounds current (a random id made every forced retrain invalidate the run)."""
    d = Path(ckpt)
    weights = sorted(p for p in d.iterdir() if p.is_file() and p.suffix == ".safetensors")
    digest = hashlib.sha256()
    for p in weights:
        digest.update(p.name.encode() + b"\0" + _sha256(p).encode() + b"\0")
    Path(ckpt, STEP_FILE).write_text(json.dumps({"round": round_index, "global_step": global_step,
                                                 "id": digest.hexdigest()[:32]}) + "\n")


def read_step(ckpt: str | Path) -> dict[str, Any] | None:
    f = Path(ckpt, STEP_FILE)
    return json.loads(f.read_text()) if f.exists() else None


def write_record(state_dir: str | Path, round_index: int, global_step: int) -> None:
    """Hash every file of the trainer state into its record (the last file written)."""
    d = Path(state_dir)
    files = [{"name": p.relative_to(d).as_posix(), "size": p.stat().st_size, "sha256": _sha256(p)}
             for p in _state_files(d)]
    tmp = d / (RECORD + ".tmp-write")
    step = read_step(d.parent) or {}  # the weights this state belongs to (d = <ckpt>/trainer_state)
    tmp.write_text(json.dumps({"round": round_index, "global_step": global_step,
                               "weights_id": step.get("id"), "files": files}, indent=1) + "\n")
    os.replace(tmp, d / RECORD)


def drop_record(state_dir: str | Path) -> None:
    """Before a trainer state is rewritten: until its new record is written it has none."""
    Path(state_dir, RECORD).unlink(missing_ok=True)


def read_record(state_dir: str | Path) -> dict[str, Any] | None:
    f = Path(state_dir, RECORD)
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise TrainerStateError(f"{f} is not readable JSON ({e})") from e


# Hashing a paper-scale state takes minutes; a file that verified is not hashed again in this
# process while its size and mtime stay the same.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def _file_problem(state_dir: Path, entry: dict[str, Any], deep: bool) -> str | None:
    p = state_dir / entry["name"]
    if not p.is_file():
        return f"{entry['name']} is missing"
    st = p.stat()
    if st.st_size != entry["size"]:
        return f"{entry['name']} has {st.st_size} bytes, its record says {entry['size']} (truncated?)"
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, entry["sha256"])
    if deep and key not in _VERIFIED:
        if _sha256(p) != entry["sha256"]:
            return f"{entry['name']}'s content differs from its recorded sha256"
        _VERIFIED.add(key)
    return None


def state_problems(ckpt: str | Path, deep: bool = True) -> list[str]:
    """What is wrong with checkpoint `ckpt`'s trainer state (empty: nothing, or no state, or a
    state written before records were). `deep=False` compares sizes only (a same-size change of
    content needs `deep`)."""
    d = Path(ckpt) / "trainer_state"
    record = read_record(d) if (d / "state.pt").exists() else None
    step = read_step(ckpt)
    if record is None:
        # weights with a save id were written by a version that records every state: a state
        # beside them without a record is half-written, or its record was deleted
        return (["state.pt has no record.json (half-written, or its record was removed)"]
                if (d / "state.pt").exists() and step is not None and "id" in step else [])
    found = [p for e in record["files"] if (p := _file_problem(d, e, deep))]
    listed = {e["name"] for e in record["files"]}
    found += [f"{p.relative_to(d).as_posix()} is not in its record"
              for p in _state_files(d) if p.relative_to(d).as_posix() not in listed]
    mine = (record.get("round"), record.get("global_step"))
    if step is not None and mine != (step["round"], step["global_step"]):
        found.append(f"it is the state of round {mine[0]} (global step {mine[1]}), but the "
                     f"checkpoint's weights are round {step['round']}'s (global step "
                     f"{step['global_step']}): the trainer state of another checkpoint")
    elif step is not None and step.get("id") not in (None, record.get("weights_id")):
        found.append(f"it was saved with weights {record.get('weights_id')}, but the "
                     f"checkpoint's weights are {step['id']}: the trainer state of another run "
                     "or checkpoint")
    return found


def check_loaded(ckpt: str | Path, state: dict[str, Any], expect_round: int | None) -> None:
    """The loaded state against its record, its checkpoint, and the round that resumes from it."""
    record = read_record(Path(ckpt) / "trainer_state")
    step = read_step(ckpt)
    mine = (state.get("round"), state.get("global_step"))
    for what, other in (("its record", record), ("the checkpoint's weights", step)):
        if other is not None and mine != (other.get("round"), other.get("global_step")):
            raise TrainerStateError(
                f"{ckpt}/trainer_state holds round {mine[0]}, global step {mine[1]}, but "
                f"{what} say round {other.get('round')}, global step {other.get('global_step')}: "
                f"the trainer state of another checkpoint. {REMEDY}")
    if expect_round is not None and mine[0] != expect_round:
        raise TrainerStateError(
            f"{ckpt}/trainer_state is round {mine[0]}'s state, but the round resuming from it "
            f"needs round {expect_round}'s. {REMEDY}")


REMEDY = ("It is not used: `trace-rl run CONFIG` (or `trace-rl stage train CONFIG --round K`) "
          "replays the rounds since the last good trainer state from their recorded datasets "
          "instead; if those are gone, rerun the rounds from that state with --force")
