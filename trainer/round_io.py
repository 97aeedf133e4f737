"""What a round writes and reads besides its training: the checkpoint it ends with, in-round
progress saves, the check of a replayed round against its checkpoint, and timings of those
fixed costs."""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from trace_rl.trainer import lora
from trace_rl.trainer.checkpoint import (
    PROGRESS_FILE,
    atomic_torch_save,
    checkpoint_dtype,
    commit_checkpoint,
    commit_dir,
    rng_state,
    save_hf_checkpoint,
    train_state_dicts,
    write_full_state,
)
from trace_rl.trainer.resident import Resident
from trace_rl.trainer.teacher import TeacherHandle

log = logging.getLogger("trace_rl.trainer.round")


class Clock:
    """Adds the wall time of `with clock(key):` blocks to a dict (or does nothing without one)."""

    def __init__(self, into: dict[str, float] | None):
        self.into = into

    @contextmanager
    def __call__(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.into is not None:
                self.into[key] = self.into.get(key, 0.0) + time.perf_counter() - t0


def save_progress(acc, unwrapped, optimizer, scheduler, teacher, work, fp, global_step,
                   cursor, rows) -> None:
    acc.wait_for_everyone()
    model_and_optimizer = train_state_dicts(unwrapped, optimizer)  # collective under FSDP
    if acc.is_main_process:
        atomic_torch_save({
            "fingerprint": fp, **model_and_optimizer, "scheduler": scheduler.state_dict(),
            "global_step": global_step, "cursor": cursor, "rows": rows,
            "teacher": teacher.state(), "rng": rng_state(),
        }, work / PROGRESS_FILE)
    acc.wait_for_everyone()


def save_output(acc, unwrapped, tokenizer, optimizer, scheduler, path, global_step,
                 round_index, teacher: TeacherHandle | None, save_state: bool = True,
                 clock: Clock | None = None) -> None:
    """The next round's start checkpoint: weights (+ the teacher it inherits) always, the full
    trainer state (optimizer, scheduler, step, RNG) when `save_state`. Everything is written into
    `<path>.tmp-commit` and renamed into place at the end, so `path` never holds a mix of two
    updates or a half-written save (a leftover `.tmp*` is removed when a round next starts)."""
    clock = clock or Clock(None)
    tmp = commit_dir(path)
    acc.wait_for_everyone()
    adapted = lora.is_lora(unwrapped.hf)  # LoRA: the adapter alone, in peft's format
    state_dict: dict[str, Any] | None
    if adapted:
        state_dict = lora.gathered(unwrapped.hf)  # collective under FSDP
    else:
        state_dict = acc.get_state_dict(unwrapped.hf) if acc.num_processes > 1 else None
    if acc.is_main_process:
        with clock("checkpoint_save_s"):
            shutil.rmtree(tmp, ignore_errors=True)
            if adapted:
                assert state_dict is not None
                lora.save_checkpoint(unwrapped.hf, tokenizer, tmp, state_dict)
            else:
                save_hf_checkpoint(unwrapped.hf, tokenizer, tmp, state_dict=state_dict,
                                   dtype=checkpoint_dtype(unwrapped))
            if teacher is not None:
                teacher.hand_over(global_step, tmp)
    acc.wait_for_everyone()
    if save_state:
        with clock("state_save_s"):
            write_full_state(acc, unwrapped, optimizer, scheduler, tmp, global_step, round_index)
    if acc.is_main_process:
        commit_checkpoint(path)
    acc.wait_for_everyone()


REPLAY_TOLERANCE = 1e-2  # max |Δ| between replayed and checkpointed weights a replay may show


def check_replayed(resident: Resident, tolerance: float = REPLAY_TOLERANCE) -> float:
    """After a replayed round: compare the resident's weights, on every process, with the
    checkpoint that round wrote when it first ran (at the checkpoint's dtype: a mixed-precision
    checkpoint holds the float32 master rounded to the compute dtype). Replay is deterministic on
    the same hardware and kernels, so they should agree. A difference up to `tolerance` (absolute,
    about one bf16 ulp at 1.0) is logged and the checkpoint's weights (those the next rollouts
    came from) are copied into the model; beyond it the replay is refused. Collective under
    several processes (sharded parameters are compared whole). Returns the max |difference|."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, distribute_tensor

    held = resident.held
    assert held is not None
    acc = held.accelerator
    hf: Any = held.unwrapped.hf
    params = lora.disk_named_parameters(hf)  # the names the checkpoint stores them by
    worst, disk_names = 0.0, {}
    for f in sorted(Path(held.checkpoint).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            disk_names.update({name: f for name in st.keys()})  # noqa: SIM118
    fixes = []
    with torch.no_grad():
        for name in sorted(n for n in params if n in disk_names):  # the same order everywhere
            live = params[name]
            whole = live.full_tensor() if isinstance(live, DTensor) else live
            with safe_open(str(disk_names[name]), framework="pt") as st:
                disk = st.get_tensor(name)
            if not torch.equal(disk, whole.detach().cpu().to(disk.dtype)):
                worst = max(worst, float((disk.float() - whole.detach().float().cpu()).abs().max()))
                fixes.append((name, disk))
    if acc.num_processes > 1:
        worst = float(acc.gather(torch.tensor([worst], device=acc.device)).max())
    if worst > tolerance:
        raise RuntimeError(
            f"the replayed round's weights differ from {held.checkpoint} by up to {worst:.3g} "
            f"(tolerance {tolerance:g}): the replay is not the update that wrote the checkpoint "
            "(other hardware, kernels or inputs?), so the optimizer state it rebuilt cannot be "
            "trusted. Rerun the rounds from the last checkpoint with a full trainer state "
            "(`trace-rl stage train CONFIG --round K --force`), or set train.state_every: 1")
    if worst > 0:
        with torch.no_grad():
            for name, disk in fixes:
                live = params[name]
                value = disk.to(live.device, live.dtype)
                if isinstance(live, DTensor):
                    value = distribute_tensor(value, live.device_mesh, live.placements)
                live.copy_(value)
        log.warning(
            "replayed weights differ from %s by up to %.3g (within the tolerance %g: "
            "non-deterministic kernels?); continuing from the checkpoint's weights with the "
            "replayed optimizer state", held.checkpoint, worst, tolerance)
    return worst
