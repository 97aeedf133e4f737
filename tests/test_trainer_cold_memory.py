"""A cold round (trainer state read from disk) holds one float32 master, not two: the master
loaded from `trainer_state/state.pt` replaces the model's weights and is dropped, and so is the
file's copy of the optimizer moments (issue 26, item 8). Counted at the round's first optimizer
step over every live tensor the garbage collector can reach."""

import gc

import pytest
import torch

from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint
from trace_rl.trainer import round as round_mod
from trace_rl.trainer.checkpoint import PROGRESS_FILE
from trace_rl.trainer.config import TrainConfig


def _stray_fp32_bytes(r, optimizer) -> tuple[int, int]:
    """(bytes of float32 tensors shaped like a parameter that are not the model's parameters,
    gradients or optimizer moments; the parameters' own bytes)."""
    params = list(r.unwrapped.parameters())
    owned = {p.untyped_storage().data_ptr() for p in params}
    owned |= {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
    for st in optimizer.state.values():
        owned |= {v.untyped_storage().data_ptr() for v in st.values() if torch.is_tensor(v)}
    shapes = {tuple(p.shape) for p in params if p.dim() > 0}
    seen, stray = set(), 0
    for obj in gc.get_objects():
        if not torch.is_tensor(obj) or obj.dtype != torch.float32 or tuple(obj.shape) not in shapes:
            continue
        ptr = obj.untyped_storage().data_ptr()
        if ptr in owned or ptr in seen:
            continue
        seen.add(ptr)
        stray += obj.untyped_storage().nbytes()
    return stray, sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                       for p in params}.values())


def _first_step_stray(monkeypatch, run) -> tuple[int, int]:
    """`run()` under a probe that counts the stray float32 bytes at its first optimizer step
    (the peak: weights, grads, moments all live)."""
    seen = []
    original = round_mod._apply_update

    def at_first_step(r, optimizer, scheduler, **kw):
        if not seen:
            gc.collect()
            seen.append(_stray_fp32_bytes(r, optimizer))
        return original(r, optimizer, scheduler, **kw)

    monkeypatch.setattr(round_mod, "_apply_update", at_first_step)
    run()
    monkeypatch.setattr(round_mod, "_apply_update", original)
    return seen[0]


def test_cold_round_holds_one_float32_master(tmp_path, monkeypatch):
    init = save_tiny_checkpoint(tmp_path / "init", seed=0)
    tables = make_round_tables(make_tokenizer(), n_prompts=1, samples=4, seed=1)
    cfg = TrainConfig(method="grpo", mini_batch_size=4, micro_batch_size=2, lr=1e-3,
                      logprob_chunk=16, dtype="bfloat16", tensorboard=False, report_to=[])
    round_mod.train_round(cfg, **tables, init_checkpoint=init, output_checkpoint=str(tmp_path / "c1"),
                          work_dir=str(tmp_path / "w0"), round_index=0, progress=False)
    assert "master" in torch.load(tmp_path / "c1" / "trainer_state" / "state.pt",
                                  weights_only=False)  # a mixed-precision state: it has one
    stray, master = _first_step_stray(monkeypatch, lambda: round_mod.train_round(
        cfg, **tables, init_checkpoint=str(tmp_path / "c1"), output_checkpoint=str(tmp_path / "c2"),
        work_dir=str(tmp_path / "w1"), round_index=1, progress=False))
    print(f"cold round: {stray} stray float32 bytes beside a {master}-byte master")
    assert master > 0
    assert stray == 0


def test_a_round_resumed_from_its_progress_save_holds_one_float32_master(tmp_path, monkeypatch):
    """The progress save's weights (and, under FSDP, every rank's copy of them) were kept alive
    for the rest of a resumed round: one more float32 master."""
    init = save_tiny_checkpoint(tmp_path / "init", seed=0)
    tables = make_round_tables(make_tokenizer(), n_prompts=1, samples=4, seed=1)
    cfg = TrainConfig(method="grpo", mini_batch_size=1, micro_batch_size=1, lr=1e-3,
                      logprob_chunk=16, dtype="bfloat16", save_every=1, tensorboard=False,
                      report_to=[])
    kw = {"init_checkpoint": init, "output_checkpoint": str(tmp_path / "c1"),
          "work_dir": str(tmp_path / "w0"), "round_index": 0, "progress": False}
    original, calls = round_mod._apply_update, []

    def crash_in_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(round_mod, "_apply_update", crash_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        round_mod.train_round(cfg, **tables, **kw)
    monkeypatch.setattr(round_mod, "_apply_update", original)
    assert (tmp_path / "w0" / PROGRESS_FILE).exists()
    rows: list = []
    stray, master = _first_step_stray(
        monkeypatch, lambda: rows.extend(round_mod.train_round(cfg, **tables, **kw)))
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # resumed after step 1's save
    print(f"resumed round: {stray} stray float32 bytes beside a {master}-byte master")
    assert master > 0 and stray == 0


def test_a_rejected_resident_state_is_freed_before_the_round_trains(tmp_path, monkeypatch):
    """A held state that `take` rejects (here: another start checkpoint) lived on through the
    round beside the new model: its weights and both AdamW moments, 3 float32 masters."""
    from trace_rl.trainer.resident import Resident

    init = save_tiny_checkpoint(tmp_path / "init", seed=0)
    tables = make_round_tables(make_tokenizer(), n_prompts=1, samples=4, seed=1)
    cfg = TrainConfig(method="grpo", mini_batch_size=4, micro_batch_size=2, lr=1e-3,
                      logprob_chunk=16, dtype="bfloat16", tensorboard=False, report_to=[])
    res = Resident()
    round_mod.train_round(cfg, **tables, init_checkpoint=init, output_checkpoint=str(tmp_path / "c1"),
                          work_dir=str(tmp_path / "w0"), round_index=0, progress=False,
                          resident=res)
    assert res.held is not None
    stray, master = _first_step_stray(monkeypatch, lambda: round_mod.train_round(
        cfg, **tables, init_checkpoint=init, output_checkpoint=str(tmp_path / "c1-again"),
        work_dir=str(tmp_path / "w1"), round_index=0, progress=False, resident=res))
    print(f"after a rejected resident state: {stray} stray float32 bytes ({master}-byte master)")
    assert master > 0 and stray == 0
