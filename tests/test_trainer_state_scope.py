"""Trainer state has one writer and one source: only a committed round writes it, and a run never
takes it from elsewhere.

- A round that raises inside a trainer session leaves its start checkpoint byte-identical, and
  its rerun (replaying the weights-only round before it) equals the uninterrupted run bitwise.
- Round 0 starts a fresh optimizer at global step 0, λ at its schedule start, with the configured
  lr, whatever model.path holds; `train.continue_trainer_state` continues it and says so.
- A round > 0 with neither trainer state nor a resident refuses; a rejected resident is logged.
- No prepared model or optimizer outlives its round in the Accelerator.
- A checkpoint save that fails leaves the previous directory intact; the next start removes the
  leftover `.tmp*` directory.
"""

import hashlib
import logging
from pathlib import Path

import pytest
import torch
import trace_rl.trainer.round as round_mod
from safetensors.torch import load_file
from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint
from trace_rl.trainer import round_io
from trace_rl.trainer.checkpoint import has_trainer_state
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.resident import Resident, trainer_session
from trace_rl.trainer.round import train_round


def _cfg(**kw):
    base = {"method": "trace", "route": {"key_forward": True, "error_reverse": True},
            "mini_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "logprob_chunk": 8,
            "tensorboard": False, "report_to": [], "teacher_sync_every": 3}
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tables():
    return make_round_tables(make_tokenizer(), n_prompts=3, samples=4, seed=1)  # 3 steps a round


def _tree_sha(path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _round(cfg, tables, src, dst, k, resident=None, **kw):
    return train_round(cfg, **tables, init_checkpoint=str(src), output_checkpoint=str(dst),
                       work_dir=str(Path(dst).parent / f"work-{Path(dst).name}"), round_index=k,
                       progress=False, resident=resident, **kw)


def test_failed_round_leaves_its_start_checkpoint_and_the_rerun_is_bitwise(tmp_path, tables,
                                                                          monkeypatch):
    cfg, init = _cfg(), save_tiny_checkpoint(tmp_path / "init", seed=0)
    ref = tmp_path / "ref"
    ref.mkdir()
    with trainer_session() as res:  # the uninterrupted run, resident across both rounds
        _round(cfg, tables, init, ref / "c1", 0, res, save_state=False)
        res.tag = "round-0-committed"
        _round(cfg, tables, ref / "c1", ref / "c2", 1, res)
        res.tag = "round-1-committed"

    run = tmp_path / "run"
    run.mkdir()
    real_update, calls = round_mod._apply_update, []

    def interrupted(*a, **kw):  # Ctrl-C after the round's first optimizer step
        calls.append(1)
        out = real_update(*a, **kw)
        if len(calls) == 5:  # round 0 takes 3 steps, so the 2nd step of round 1
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(round_mod, "_apply_update", interrupted)
    with pytest.raises(KeyboardInterrupt), trainer_session() as res:
        _round(cfg, tables, init, run / "c1", 0, res, save_state=False)
        res.tag = "round-0-committed"
        start = _tree_sha(run / "c1")
        _round(cfg, tables, run / "c1", run / "c2", 1, res)
    assert _tree_sha(run / "c1") == start, "the failed round wrote into its start checkpoint"
    assert not has_trainer_state(run / "c1") and not (run / "c2").exists()
    monkeypatch.setattr(round_mod, "_apply_update", real_update)

    # The rerun: c1 holds weights only, so round 0 is replayed in memory first.
    res = Resident()
    _round(cfg, tables, init, run / "c1", 0, res, write_output=False)
    _round(cfg, tables, run / "c1", run / "c2", 1, res)
    a, b = load_file(str(ref / "c2" / "model.safetensors")), load_file(str(run / "c2" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    sa = torch.load(ref / "c2/trainer_state/state.pt", weights_only=False)
    sb = torch.load(run / "c2/trainer_state/state.pt", weights_only=False)
    assert sa["global_step"] == sb["global_step"] == 6
    for i, st in sa["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg_sq"], sb["optimizer"]["state"][i]["exp_avg_sq"])


def test_round_zero_starts_fresh_whatever_model_path_holds(tmp_path, tables, caplog):
    sched = {"w0": 0.5, "hold_steps": 0, "zero_step": 3}
    old = _cfg(lr=1e-3, schedule=sched)
    init = save_tiny_checkpoint(tmp_path / "init", seed=0)
    _round(old, tables, init, tmp_path / "final", 0)  # another run's final checkpoint: step 3
    assert has_trainer_state(tmp_path / "final")
    new = _cfg(lr=5e-5, schedule=sched)
    rows = _round(new, tables, tmp_path / "final", tmp_path / "new1", 0)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["kl_weight"] == 0.5 and rows[0]["lr"] == pytest.approx(5e-5)
    # continuing is explicit, and says what it restored
    with caplog.at_level(logging.WARNING, logger="trace_rl.trainer.round"):
        rows = _round(new.model_copy(update={"continue_trainer_state": True}), tables,
                      tmp_path / "final", tmp_path / "cont1", 0)
    assert [r["step"] for r in rows] == [3, 4, 5] and rows[0]["kl_weight"] == 0.0
    assert rows[0]["lr"] == pytest.approx(5e-5)  # the moments continue, the lr is this config's
    assert "continues the trainer state" in caplog.text and "global step 3" in caplog.text


def test_round_after_zero_without_state_refuses(tmp_path, tables):
    cfg, init = _cfg(), save_tiny_checkpoint(tmp_path / "init", seed=0)
    _round(cfg, tables, init, tmp_path / "c1", 0, save_state=False)
    with pytest.raises(RuntimeError, match="weights only.*replays"):
        _round(cfg, tables, tmp_path / "c1", tmp_path / "c2", 1)
    assert not (tmp_path / "c2").exists()


def test_no_model_outlives_its_round_and_a_rejected_resident_is_logged(tmp_path, tables, caplog):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    init = save_tiny_checkpoint(tmp_path / "init", seed=0)
    res, src, live = Resident(), init, []
    with caplog.at_level(logging.WARNING, logger="trace_rl.trainer.resident"):
        for k in range(4):  # each round under another lr: the held state is rejected every time
            dst = tmp_path / f"c{k + 1}"
            train_round(_cfg(lr=1e-3 * (k + 1)), **tables, init_checkpoint=str(src),
                        output_checkpoint=str(dst), work_dir=str(tmp_path / f"w{k}"),
                        round_index=k, accelerator=acc, progress=False, resident=res)
            live.append((len(acc._models), len(acc._optimizers)))
            src = dst
    assert live == [(1, 1)] * 4, live  # only the resident's, not one more per round
    assert caplog.text.count("resident trainer state rejected (the train config changed)") == 3
    train_round(_cfg(), **tables, init_checkpoint=str(init), output_checkpoint=str(tmp_path / "x"),
                work_dir=str(tmp_path / "wx"), round_index=0, accelerator=acc, progress=False)
    assert (len(acc._models), len(acc._optimizers)) == (1, 1)  # still only the resident's
    res.clear()
    assert (len(acc._models), len(acc._optimizers)) == (0, 0)


def test_failed_save_leaves_the_old_checkpoint_and_the_next_start_cleans_up(tmp_path, tables,
                                                                          monkeypatch):
    cfg, init = _cfg(), save_tiny_checkpoint(tmp_path / "init", seed=0)
    out = tmp_path / "c1"
    _round(cfg, tables, init, out, 0)
    before = _tree_sha(out)

    def fail(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(round_io, "write_full_state", fail)
    with pytest.raises(OSError, match="disk full"):
        _round(cfg.model_copy(update={"lr": 2e-3}), tables, init, out, 0)
    assert _tree_sha(out) == before
    assert [p.name for p in tmp_path.glob("c1.tmp*")] == ["c1.tmp-commit"]
    monkeypatch.undo()
    _round(cfg.model_copy(update={"lr": 2e-3}), tables, init, out, 0)
    assert not list(tmp_path.glob("c1.tmp*")) and _tree_sha(out) != before
    assert has_trainer_state(out)
