"""train.keep_checkpoints (stages/prune.py): pruning never removes what a resume, a replay, the
teacher's lag or an evaluation of the latest policy reads; a run killed after pruning resumes
to the weights of a run that kept everything."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_runs import cli, finish, in_stage
from trace_rl.pipeline.integrity import pruned_marker
from trace_rl.pipeline.store import RunStore
from trace_rl.stages.damage import invalidate_damaged
from trace_rl.stages.prune import plan, require_weights
from trace_rl.data_schemas.errors import StageError


def _resumable(latest: int, state: list[bool]) -> int:
    """What a cold start at checkpoint `latest` reads, from what is left: the latest full state
    S (or the initial model) and every checkpoint S..latest whole (stages/train.py replay_plan
    walks back from `latest` to the first checkpoint with a state)."""
    s = latest
    while s > 0 and not state[s]:
        s -= 1
    return s


def test_plan_keeps_what_resume_needs_and_the_last_n_for_every_history():
    """Every history of up to 7 checkpoints (each with or without a full trainer state) and
    every keep_checkpoints 1..4."""
    for latest in range(1, 8):
        for bits in itertools.product([False, True], repeat=latest):
            has_state = [False, *bits]
            for keep in range(1, 5):
                remove, drop_state = plan(latest, has_state, keep)
                left = [j not in remove for j in range(latest + 1)]
                state_left = [has_state[j] and left[j] and j not in drop_state
                              for j in range(latest + 1)]
                s = _resumable(latest, state_left)
                assert s == _resumable(latest, has_state), "resume would replay from elsewhere"
                assert all(left[j] and j not in drop_state for j in range(max(s, 1), latest + 1))
                assert all(left[j] for j in range(max(1, latest - keep + 1), latest + 1))
                assert not remove & drop_state and latest not in remove
                # nothing kept beyond that: the pruning is as tight as it claims
                assert remove == set(range(1, latest + 1)) - set(range(max(s, 1), latest + 1)) \
                    - set(range(latest - keep + 1, latest + 1))


def test_a_pruned_checkpoint_is_refused_with_the_way_out(tmp_path):
    gone = tmp_path / "checkpoints" / "round-0001"
    gone.parent.mkdir()
    pruned_marker(gone).write_text(json.dumps({"by": "train.keep_checkpoints=1"}))
    with pytest.raises(StageError, match="keep_checkpoints"):
        require_weights(str(gone))
    gone.mkdir()
    require_weights(str(gone))  # a checkpoint recomputed after pruning is used again


def _weights(root: Path, k: int) -> dict[str, torch.Tensor]:
    return load_file(str(root / "checkpoints" / f"round-{k:04d}" / "model.safetensors"))


ARGS = ["run.rounds=4", "train.state_every=2", "train.teacher_sync_every=3"]


@pytest.mark.slow
def test_sigkill_after_pruning_then_resume_equals_a_run_that_kept_everything(tmp_path,
                                                                             tiny_testbed_dir):
    reference, pruned = tmp_path / "reference", tmp_path / "pruned"
    out = finish(cli(reference, tiny_testbed_dir, tmp_path / "home-ref", *ARGS,
                     "train.keep_checkpoints=null"))
    assert (reference / "checkpoints" / "round-0004").is_dir(), out[-3000:]
    assert (reference / "checkpoints" / "round-0002" / "trainer_state" / "teacher").is_dir(), \
        "the teacher lags across rounds: round 2 must read a teacher copy"

    proc = cli(pruned, tiny_testbed_dir, tmp_path / "home", *ARGS, "train.keep_checkpoints=1")
    deadline = time.time() + 900
    while proc.poll() is None and not in_stage(pruned, "train", 3) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, finish(proc)[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # round 3 trains; rounds 0-2 are committed and pruned
    proc.wait(timeout=60)
    ckpts = pruned / "checkpoints"
    # latest 3 holds weights only: a cold start replays round 2 from checkpoint 2's full state
    # and its teacher copy; checkpoint 1 is needed by nothing.
    assert not (ckpts / "round-0001").exists() and pruned_marker(ckpts / "round-0001").exists()
    assert (ckpts / "round-0002" / "trainer_state" / "state.pt").exists()
    assert (ckpts / "round-0002" / "trainer_state" / "teacher").is_dir()
    assert (ckpts / "round-0003" / "model.safetensors").exists()
    assert invalidate_damaged(RunStore(str(pruned)), deep=False) == [], "pruned is not damaged"

    out = finish(cli(pruned, tiny_testbed_dir, tmp_path / "home", *ARGS, "train.keep_checkpoints=1"))
    train3 = json.loads((pruned / "round-0003" / "train" / ".manifest.json").read_text())
    assert train3["extra"]["replayed_rounds"] == 1, out[-3000:]  # round 2, from checkpoint 2
    ref, got = _weights(reference, 4), _weights(pruned, 4)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), f"{name} differs from the run that kept all"
    # the last round saved the full state: nothing before it is needed any more
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["round-0004"]
    assert invalidate_damaged(RunStore(str(pruned)), deep=False) == []


def test_a_prune_killed_mid_delete_leaves_a_pruned_checkpoint_not_a_damaged_one(tmp_path,
                                                                                monkeypatch):
    """A kill inside the delete (here: rmtree dies after one file) must not leave a half
    checkpoint under its own name: the damage check would call round 0's train stage damaged
    and `run` would retrain it and every round after. The next prune finishes the delete."""
    from trace_rl.stages import prune

    store = RunStore(str(tmp_path))
    ckpts = tmp_path / "checkpoints"
    for k in (1, 2, 3):
        (ckpts / f"round-{k:04d}").mkdir(parents=True)
        for name in ("model.safetensors", "config.json"):
            (ckpts / f"round-{k:04d}" / name).write_bytes(b"x" * 100)
    real_rmtree = shutil.rmtree

    def killed(path, *a, **kw):
        next(Path(path).iterdir()).unlink()
        raise KeyboardInterrupt("killed mid-delete")

    monkeypatch.setattr(prune.shutil, "rmtree", killed)
    assert prune.prune_checkpoints(store, 3, 1)["removed"] == []  # no state: 1..3 replay
    assert all((ckpts / f"round-{k:04d}").is_dir() for k in (1, 2, 3))
    (ckpts / "round-0003" / "trainer_state").mkdir()  # a full state at 3: 1 and 2 may go
    (ckpts / "round-0003" / "trainer_state" / "state.pt").write_bytes(b"s")
    monkeypatch.setattr(prune, "usable_trainer_state", lambda d: (Path(d) / "trainer_state").is_dir())
    with pytest.raises(KeyboardInterrupt):
        prune.prune_checkpoints(store, 3, 1)
    gone = ckpts / "round-0001"
    assert not gone.exists() and pruned_marker(gone).exists()
    require_weights(str(ckpts / "round-0002"))  # not reached yet: whole
    monkeypatch.setattr(prune.shutil, "rmtree", real_rmtree)
    out = prune.prune_checkpoints(store, 3, 1)
    assert out["removed"] == [1, 2] and out["freed_bytes"] > 0
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "round-0001.pruned.json", "round-0002.pruned.json", "round-0003"]
