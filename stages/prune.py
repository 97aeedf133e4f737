"""Checkpoint pruning (`train.keep_checkpoints`): what a run keeps on disk after each round.

Every round writes a checkpoint (SmolLM2: 650 MB of weights), sometimes a full trainer state
(1.1 GB) and a teacher copy (514 MB). After round k's train stage commits, with L = k+1 the
latest checkpoint and S the latest one that holds a full trainer state (0: the initial model,
which lives outside the run), the run needs:

  - checkpoints S..L whole, trainer state and teacher copies included: a cold start resumes
    from S's state and replays rounds S..L-1, each from its start checkpoint's teacher copy and
    checked against the next checkpoint's weights (stages/train.py `replay_plan`); round L
    starts from L and reads its teacher copy; evaluation reads L;
  - the last `keep_checkpoints` checkpoints' weights, for evaluating them later.

Everything else goes: older checkpoints, whole. A kept checkpoint keeps its trainer state and
teacher copy, since a damaged later checkpoint is recomputed from it. A removed checkpoint leaves a
`<dir>.pruned.json` beside it, so that `status` and the damage checks see a pruned checkpoint,
not a damaged one, and a stage that would need it says so (`require_weights`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from trace_rl.data_schemas.errors import StageError
from trace_rl.pipeline.integrity import pruned_marker
from trace_rl.pipeline.layout import start_checkpoint_dir
from trace_rl.trainer.checkpoint import STATE_DIR, usable_trainer_state

log = logging.getLogger("trace_rl.stages.prune")


def plan(latest: int, has_state: list[bool], keep_last: int) -> tuple[set[int], set[int]]:
    """(checkpoints to remove whole, checkpoints whose trainer state and teacher copy to remove)
    among checkpoints 1..latest, where has_state[j] says whether checkpoint j holds a full
    trainer state (index 0 unused). Pure, for the property test."""
    full = max((j for j in range(1, latest + 1) if has_state[j]), default=0)
    needed = set(range(max(full, 1), latest + 1))
    kept = needed | set(range(max(1, latest - keep_last + 1), latest + 1))
    # A kept checkpoint keeps its trainer state and teacher copy: if a later checkpoint is
    # damaged, its round is recomputed from this one and reads this teacher copy (dropping it
    # made the recompute take the live policy as teacher, and its weights differ from the run's).
    return set(range(1, latest + 1)) - kept, set()


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


PRUNING = ".pruning"  # suffix of a checkpoint being deleted


def _sweep(checkpoints: Path) -> int:
    """Finish deletions a kill interrupted (their markers are written); bytes freed."""
    freed = 0
    for doomed in checkpoints.glob("*" + PRUNING):
        freed += _size(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return freed


def prune_checkpoints(store, latest: int, keep_last: int | None) -> dict:
    """Apply `plan` to the run's checkpoints after checkpoint `latest` was committed; returns
    {"removed": [...], "states_removed": [...], "freed_bytes": n} for the train manifest."""
    if keep_last is None or latest < 1:
        return {"removed": [], "states_removed": [], "freed_bytes": 0}
    dirs = {j: Path(store.local_path(start_checkpoint_dir(j))) for j in range(1, latest + 1)}
    # S as a resume finds it (stages/train.py replay_plan): the latest state that verifies.
    full = next((j for j in range(latest, 0, -1) if usable_trainer_state(dirs[j])), 0)
    remove, drop_state = plan(latest, [j == full > 0 for j in range(latest + 1)], keep_last)
    freed = _sweep(dirs[latest].parent)
    for j in sorted(remove):
        if not dirs[j].is_dir():
            continue  # pruned before
        freed += _size(dirs[j])
        marker = pruned_marker(dirs[j])
        marker.write_text(json.dumps({"pruned_at": time.time(), "latest": latest,
                                      "by": f"train.keep_checkpoints={keep_last}"}))
        # Out of its name first (atomic), then deleted: a kill inside rmtree used to leave a
        # half-deleted checkpoint under its own name, which the damage check reads as a
        # damaged train stage (and `run` retrains that round and everything after it).
        doomed = dirs[j].with_name(dirs[j].name + PRUNING)
        os.replace(dirs[j], doomed)
        shutil.rmtree(doomed)
    drop_state = {j for j in drop_state if (dirs[j] / STATE_DIR).is_dir()}
    for j in sorted(drop_state):
        freed += _size(dirs[j] / STATE_DIR)
        shutil.rmtree(dirs[j] / STATE_DIR)
    if remove or drop_state:
        log.info("pruned checkpoints %s and the trainer state of %s (%.2f GB freed; "
                 "train.keep_checkpoints=%d)", sorted(remove), sorted(drop_state), freed / 1e9,
                 keep_last)
    return {"removed": sorted(remove), "states_removed": sorted(drop_state), "freed_bytes": freed}


def require_weights(model_dir: str) -> None:
    """Refuse, with the way out, to sample or train from a checkpoint that pruning removed."""
    marker = pruned_marker(Path(model_dir))
    if marker.exists() and not Path(model_dir).is_dir():
        raise StageError(f"{model_dir} was pruned ({json.loads(marker.read_text())['by']}): only "
                         "the last checkpoints and what a resume needs are kept. Raise "
                         "train.keep_checkpoints (null keeps all) and recompute it from the "
                         "last kept round with `trace-rl stage train CONFIG --round K --force`")
