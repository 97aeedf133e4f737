"""A checkpoint's trainer state is checked before anything trains from it (trainer/
state_record.py): every file against its recorded size and sha256, its round and global step
against the checkpoint's weights and the round resuming from it. Truncated, changed (64 flipped
bytes) or foreign (another checkpoint's) state is refused with what to do, reported by
`status`, and counts as absent for the replay plan (the train stage replays past it)."""

import shutil

import pytest
import torch

from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint
from trace_rl.stages.status import _trainer_state_damage
from trace_rl.trainer.checkpoint import usable_trainer_state
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.round import train_round
from trace_rl.trainer.state_record import TrainerStateError, state_problems

CFG = TrainConfig(method="grpo", mini_batch_size=4, micro_batch_size=4, lr=1e-3,
                  logprob_chunk=16, tensorboard=False, report_to=[])


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Checkpoints 1 and 2 with their full trainer state, two optimizer steps a round."""
    root = tmp_path_factory.mktemp("chain")
    tables = make_round_tables(make_tokenizer(), n_prompts=2, samples=4, seed=1)
    ckpts = [save_tiny_checkpoint(root / "c0", seed=0)]
    for k in range(2):
        out = root / f"c{k + 1}"
        rows = train_round(CFG, **tables, init_checkpoint=ckpts[-1], output_checkpoint=str(out),
                           work_dir=str(root / f"w{k}"), round_index=k, progress=False)
        assert [r["step"] for r in rows] == [2 * k, 2 * k + 1]
        ckpts.append(str(out))
    return root, tables, ckpts


def _copy(chain, name: str):
    root, _, ckpts = chain
    dst = root / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(ckpts[2], dst)
    return dst


def _round2(chain, ckpt, tag: str):
    root, tables, _ = chain
    return train_round(CFG, **tables, init_checkpoint=str(ckpt),
                       output_checkpoint=str(root / f"out-{tag}"), work_dir=str(root / f"w-{tag}"),
                       round_index=2, progress=False, write_output=False)


def test_an_intact_state_resumes_at_its_step(chain):
    ckpt = _copy(chain, "intact")
    assert state_problems(ckpt) == [] and usable_trainer_state(ckpt)
    assert [r["step"] for r in _round2(chain, ckpt, "intact")] == [4, 5]


def test_truncated_state_is_refused_with_what_to_do(chain):
    ckpt = _copy(chain, "truncated")
    f = ckpt / "trainer_state" / "state.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    problems = state_problems(ckpt, deep=False)  # the size alone shows it
    assert len(problems) == 1 and "truncated" in problems[0]
    assert not usable_trainer_state(ckpt)
    assert "truncated" in _trainer_state_damage(_Manifest(ckpt), deep=False)
    with pytest.raises(TrainerStateError, match=r"truncated.*trace-rl run CONFIG"):
        _round2(chain, ckpt, "truncated")
    (ckpt / "trainer_state" / "record.json").unlink()  # a state written before records were,
    (ckpt / "trainer_step.json").unlink()  # beside weights that did not say their step either
    with pytest.raises(TrainerStateError, match=r"cannot be read .*truncated or damaged"):
        _round2(chain, ckpt, "truncated-unrecorded")


def test_flipped_bytes_are_found_by_hash_and_never_loaded(chain):
    ckpt = _copy(chain, "flipped")
    f = ckpt / "trainer_state" / "state.pt"
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    f.write_bytes(bytes(data))
    torch.load(f, weights_only=False)  # the file itself loads: only its hash tells
    assert state_problems(ckpt, deep=False) == []  # same size
    assert any("sha256" in p for p in state_problems(ckpt))
    assert "sha256" in _trainer_state_damage(_Manifest(ckpt), deep=True)
    assert not usable_trainer_state(ckpt)
    with pytest.raises(TrainerStateError, match="sha256"):
        _round2(chain, ckpt, "flipped")


def test_another_checkpoints_state_is_refused(chain):
    root, _, ckpts = chain
    ckpt = _copy(chain, "foreign")
    shutil.rmtree(ckpt / "trainer_state")
    shutil.copytree(f"{ckpts[1]}/trainer_state", ckpt / "trainer_state")  # checkpoint 1's
    problems = state_problems(ckpt, deep=False)
    assert len(problems) == 1 and "another checkpoint" in problems[0]
    assert "another checkpoint" in _trainer_state_damage(_Manifest(ckpt), deep=False)
    assert not usable_trainer_state(ckpt)
    with pytest.raises(TrainerStateError, match="another checkpoint"):
        _round2(chain, ckpt, "foreign")
    # without the checkpoint's step file (an older checkpoint) the round still knows: round 2
    # resumes round 1's state, not round 0's
    (ckpt / "trainer_step.json").unlink()
    with pytest.raises(TrainerStateError, match="round 0's state.*needs round 1's"):
        _round2(chain, ckpt, "foreign-old")


class _Manifest:
    """The fields of a train manifest that status reads for the trainer state."""

    stage = "train"

    def __init__(self, ckpt):
        self.extra = {"checkpoint": str(ckpt)}


def test_another_runs_state_at_the_same_round_and_step_is_refused(chain, tmp_path):
    """A state is bound to the weights it was saved with, not only to their round and step:
    another run's round-1 state, copied with its own (self-consistent) record, was accepted."""
    root, tables, ckpts = chain
    other = tmp_path / "other-c2"  # another run: same round and steps, other rollouts
    train_round(CFG, **make_round_tables(make_tokenizer(), n_prompts=2, samples=4, seed=5),
                init_checkpoint=ckpts[1], output_checkpoint=str(other),
                work_dir=str(tmp_path / "w"), round_index=1, progress=False)
    ckpt = _copy(chain, "other-run")
    shutil.rmtree(ckpt / "trainer_state")
    shutil.copytree(other / "trainer_state", ckpt / "trainer_state")
    problems = state_problems(ckpt, deep=True)
    assert len(problems) == 1 and "another run" in problems[0], problems
    assert "another run" in _trainer_state_damage(_Manifest(ckpt), deep=True)
    assert not usable_trainer_state(ckpt)
    with pytest.raises(TrainerStateError, match="another run"):
        _round2(chain, ckpt, "other-run")


@pytest.mark.parametrize("damage", ["deleted", "deleted-and-flipped"])
def test_a_state_without_its_record_is_refused(chain, damage):
    """Weights with a save id come from a version that records every state: a state beside them
    without record.json (half-written, or the record removed, hiding flipped bytes) is damage."""
    ckpt = _copy(chain, f"no-record-{damage}")
    (ckpt / "trainer_state" / "record.json").unlink()
    if damage == "deleted-and-flipped":
        f = ckpt / "trainer_state" / "state.pt"
        data = bytearray(f.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
        f.write_bytes(bytes(data))
    assert any("no record.json" in p for p in state_problems(ckpt))
    assert not usable_trainer_state(ckpt)
    with pytest.raises(TrainerStateError, match="no record.json"):
        _round2(chain, ckpt, f"no-record-{damage}")
