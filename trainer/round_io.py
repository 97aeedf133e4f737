"""What a round writes and reads besides its training: the checkpoint it ends with, in-round
progress saves, the check of a replayed round against its checkpoint, and timings of those
fixed costs."""

from __future__ import annotations

import logging
import math
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
    load_save,
    rng_state,
    save_hf_checkpoint,
    train_state_dicts,
    write_full_state,
)
from trace_rl.trainer.resident import Resident
from trace_rl.trainer.state_record import write_step
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


def load_progress(work_dir: str | Path, fingerprint: str,
                  receives_shards: bool = False) -> dict[str, Any] | None:
    """The last in-round progress save, if it belongs to the same round and config.
    `receives_shards`: of a `full_fqn` save the weights and moments are not read (`load_save`)."""
    f = Path(work_dir) / PROGRESS_FILE
    if not f.exists():
        return None
    state = load_save(f, receives_shards, large=("model", "optimizer"))
    if state.get("fingerprint") != fingerprint:
        raise RuntimeError(
            f"{f} was saved by a different round or config (fingerprint mismatch); "
            "delete it or use a fresh work_dir to start the round over"
        )
    return state


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
            write_step(tmp, round_index, global_step)  # whose trainer state fits these weights
            if teacher is not None:
                teacher.hand_over(global_step, tmp)
    acc.wait_for_everyone()
    if save_state:
        with clock("state_save_s"):
            write_full_state(acc, unwrapped, optimizer, scheduler, tmp, global_step, round_index)
    if acc.is_main_process:
        commit_checkpoint(path)
    acc.wait_for_everyone()


# A replay is refused when, in any tensor, it differs from the checkpoint by more than this share
# of the round's own update: ‖replayed − checkpoint‖₁ / ‖checkpoint − start‖₁ (issue 26). Replays
# on the same hardware and kernels give 0; non-deterministic kernels change a few low bits; a
# replay of other rollouts, or of another config, differs by about the update itself (ratio ~1),
# whatever the learning rate. An absolute bound cannot tell these apart: at lr 1e-6 a whole round
# moves a weight by ~1e-6. The L1 norm, not L2: a bf16 checkpoint quantises both differences to
# whole ulps, and an update (or noise) of size u < 1 ulp then shows as a 1-ulp step in a share
# u/ulp of the elements: its mean |·| is still u, but its root-mean-square is √(u·ulp). An L2
# ratio thus reads √(noise/update) (GPU-like noise at 1e-3 of the gradient: 0.10 at bf16 against
# 0.01 in float32, refused), the L1 ratio reads noise/update at either dtype.
REPLAY_MAX_RELATIVE = 0.1


def _safetensors_index(directory: str | Path) -> dict[str, Path]:
    from safetensors import safe_open

    names: dict[str, Path] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            names.update({name: f for name in st.keys()})  # noqa: SIM118
    return names


def _read(index: dict[str, Path], name: str) -> torch.Tensor | None:
    from safetensors import safe_open

    if name not in index:
        return None
    with safe_open(str(index[name]), framework="pt") as st:
        return st.get_tensor(name)


def _gaps(params: dict[str, Any], ckpt: dict[str, Path], start: dict[str, Path]
          ) -> tuple[float, list[tuple[str, float, float, int]]]:
    """(max |Δ|, [(name, ‖replayed − ckpt‖₁, ‖ckpt − start‖₁, numel)]) over the checkpoint's
    tensors, compared at the checkpoint's dtype (a mixed-precision checkpoint holds the float32
    master rounded to the compute dtype, the start is rounded the same way). Collective under
    FSDP."""
    from torch.distributed.tensor import DTensor

    worst, gaps = 0.0, []
    for name in sorted(n for n in params if n in ckpt):  # the same order on every process
        live = params[name]
        whole = (live.full_tensor() if isinstance(live, DTensor) else live).detach().cpu()
        disk = _read(ckpt, name)
        assert disk is not None
        before = _read(start, name)
        disk32 = disk.float()
        diff = whole.to(disk.dtype).float() - disk32
        moved = disk32 - (before.to(disk.dtype).float() if before is not None else disk32)
        worst = max(worst, float(diff.abs().max()) if diff.numel() else 0.0)
        gaps.append((name, float(diff.double().abs().sum()), float(moved.double().abs().sum()),
                     diff.numel()))
    return worst, gaps


def _worst_ratio(gaps: list[tuple[str, float, float, int]]) -> tuple[float, str]:
    """The largest ‖replayed − ckpt‖₁ / ‖ckpt − start‖₁ and its tensor. A tensor the round did
    not move (at the checkpoint's dtype: e.g. updates below half a bf16 ulp) is measured against
    the round's mean update per element over all tensors, times its size; with no update at all
    any difference is infinite."""
    total = sum(moved for _, _, moved, _ in gaps)
    per_element = total / max(1, sum(n for *_, n in gaps))
    worst, where = 0.0, ""
    for name, diff, moved, numel in gaps:
        if diff == 0.0:
            continue
        den = moved if moved > 0 else per_element * numel
        ratio = diff / den if den > 0 else math.inf
        if ratio > worst:
            worst, where = ratio, name
    return worst, where


def check_replayed(resident: Resident, bound: float = REPLAY_MAX_RELATIVE) -> float:
    """After a replayed round: compare the resident's weights, on every process, with the
    checkpoint that round wrote when it first ran, relative to that round's own update (see
    REPLAY_MAX_RELATIVE), and refuse beyond `bound`. Within it the model keeps its replayed
    float32 master: copying the checkpoint's weights in would round a mixed-precision master to
    bf16. Collective under several processes (sharded parameters are compared whole). Returns
    the max |difference| (at the checkpoint's dtype), which the train manifest records."""
    held = resident.held
    assert held is not None
    acc = held.accelerator
    hf: Any = held.unwrapped.hf
    params = lora.disk_named_parameters(hf)  # the names the checkpoint stores them by
    start = _safetensors_index(held.start) if held.start else {}
    with torch.no_grad():
        worst, gaps = _gaps(params, _safetensors_index(held.checkpoint), start)
    ratio, where = _worst_ratio(gaps)
    if acc.num_processes > 1:
        both = acc.gather(torch.tensor([[worst, ratio]], dtype=torch.float64, device=acc.device))
        worst, ratio = (float(x) for x in both.max(0).values)
    if ratio > bound:
        raise RuntimeError(
            f"the replayed round's weights differ from {held.checkpoint} by {ratio:.3g} of the "
            f"round's own update ({where or 'on another process'}; max |Δ| {worst:.3g}, bound "
            f"{bound:g} = REPLAY_MAX_RELATIVE): the replay is not the update that wrote the "
            "checkpoint (other rollouts, config, hardware or kernels?), so the optimizer state "
            "it rebuilt cannot be trusted. Rerun the rounds from the last checkpoint with a full "
            "trainer state (`trace-rl stage train CONFIG --round K --force`), or set "
            "train.state_every: 1")
    if worst > 0:
        log.warning(
            "replayed weights differ from %s by %.3g of the round's update (max |Δ| %.3g; bound "
            "%g: non-deterministic kernels?); continuing with the replayed float32 master and "
            "optimizer state", held.checkpoint, ratio, worst, bound)
    return worst
