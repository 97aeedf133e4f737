"""Checkpoints between rounds and atomic progress saves within a round.

Layout of a round's output checkpoint:
    <ckpt>/config.json, model*.safetensors, tokenizer files    HF save_pretrained
    <ckpt>/trainer_state/state.pt                             optimizer, scheduler, global step, RNG
    <ckpt>/trainer_state/state.json                           the human-readable part
    <ckpt>/trainer_state/teacher/                             teacher weights for the next round
                                                              (only when it does not re-sync)
    <ckpt>/trainer_state/record.json                          size + sha256 of each file above,
                                                              round, global step (written last)
    <ckpt>/trainer_step.json                                  round and global step of the weights
A trainer state is checked against both before it is loaded (trainer/state_record.py).
Under FSDP the parameters and the optimizer moments are sharded across processes: saves gather
them into full, CPU, name-keyed dicts (torch.distributed.checkpoint's state_dict API; the save
records `state_layout: full_fqn`) and a resume scatters them back into the shards after
`accelerate.prepare`. Other backends save the plain (id-keyed) state dicts, restored before it.
In-round progress lives in <work_dir>/progress.pt (and the teacher snapshot in
<work_dir>/progress-teacher-step<k>/), written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trace_rl.trainer.state_record import (
    REMEDY,
    TrainerStateError,
    check_loaded,
    drop_record,
    state_problems,
    write_record,
)

log = logging.getLogger("trace_rl.trainer.checkpoint")

STATE_DIR = "trainer_state"
PROGRESS_FILE = "progress.pt"


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same directory, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _materialise_tied_head(ckpt: Path, head_weight: torch.Tensor) -> None:
    """Write lm_head.weight explicitly: save_pretrained drops it when embeddings are tied, and
    some loaders (older vLLM code paths, other frameworks) expect it."""
    index = ckpt / "model.safetensors.index.json"
    head = {"lm_head.weight": head_weight.detach().cpu().contiguous().clone()}
    if index.exists():
        meta = json.loads(index.read_text())
        if "lm_head.weight" in meta["weight_map"]:
            return
        save_file(head, ckpt / "model-lm_head.safetensors", metadata={"format": "pt"})
        meta["weight_map"]["lm_head.weight"] = "model-lm_head.safetensors"
        index.write_text(json.dumps(meta, indent=2))
        return
    single = ckpt / "model.safetensors"
    tensors = load_file(single)
    if "lm_head.weight" not in tensors:
        tensors.update(head)
        save_file(tensors, single, metadata={"format": "pt"})


@contextlib.contextmanager
def _inference_config(hf_model: Any):
    """Save the config a checkpoint is used with: the trainer turns the KV cache off for its own
    forwards, but a checkpoint's readers (rollout engines, evaluation) generate with it, and a
    run-scoped engine compares configs to decide whether new weights can load in place."""
    config = hf_model.config
    saved = getattr(config, "use_cache", None)
    config.use_cache = True
    try:
        yield
    finally:
        config.use_cache = saved


def _cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict:
    if dtype is None:
        return state_dict
    return {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in state_dict.items()}


def save_hf_checkpoint(hf_model: Any, tokenizer: Any, path: str | Path,
                       state_dict: dict | None = None, dtype: torch.dtype | None = None) -> None:
    """save_pretrained of model and tokenizer, with lm_head.weight always present on disk.
    `dtype` (e.g. bfloat16): the weights are written in it, and config.json says so, whatever
    dtype the model's (float32 master) parameters have: what the rollout engines read."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if dtype is not None and state_dict is None:
        state_dict = hf_model.state_dict()
    with _inference_config(hf_model):
        hf_model.save_pretrained(path, state_dict=_cast(state_dict, dtype) if state_dict else None,
                                 safe_serialization=True)
    tokenizer.save_pretrained(path)
    if dtype is not None:
        config_file = path / "config.json"
        config = json.loads(config_file.read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(hf_model.config, "tie_word_embeddings", False):
        head = hf_model.get_output_embeddings().weight
        _materialise_tied_head(path, head if dtype is None else head.to(dtype))


FULL_FQN = "full_fqn"  # state_layout of saves gathered from FSDP shards


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` was prepared for FSDP: FSDP2 turns parameters into DTensors, FSDP1 wraps
    modules. Read off the model, since accelerate's distributed_type can say MULTI_CPU for a
    model it sharded."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        return True
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules())


def train_state_dicts(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """{"model", "optimizer", "state_layout"} to save. Collective under FSDP (every process must
    call it): the shards are gathered, and only the main process receives the full dicts.

    Under FSDP an optimizer that has not stepped yet (every mini-batch so far trained nothing:
    `train.overlong: mask`) is saved as None: torch's `get_state_dict` would first fill its
    state by a step at lr 0, which counts as an AdamW step, so that a run's bias correction
    would depend on whether a save fell there. Every process skips the same steps, so all agree."""
    if not is_sharded(model):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "state_layout": None}
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if not optimizer.state:
        return {"model": get_model_state_dict(model, options=opts), "optimizer": None,
                "state_layout": FULL_FQN}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    return {"model": model_sd, "optimizer": optim_sd, "state_layout": FULL_FQN}


def restore_sharded(model: torch.nn.Module, optimizer: Any, state: dict[str, Any],
                    with_model: bool) -> None:
    """Scatter a `full_fqn` save (model weights too when `with_model`) into the prepared,
    sharded model and optimizer. Collective; the main process's copy is broadcast."""
    if not is_sharded(model):
        raise RuntimeError("this trainer state was gathered from FSDP shards (state_layout "
                           "full_fqn) and can only be resumed under FSDP; resume with the same "
                           "accelerate config")
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # only rank 0's dicts are read (the others may pass empty ones: load_trainer_state's
    # receives_shards); each tensor is broadcast and every process keeps its own shard
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    if with_model:
        set_model_state_dict(model, state["model"], options=opts)
    if state["optimizer"] is not None:  # None: saved before its first step (train_state_dicts)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)


def save_trainer_state(path: str | Path, state: dict[str, Any]) -> None:
    """`state`: optimizer, scheduler, global_step, round, rng (torch objects allowed). Its
    record (trainer/state_record.py: every file's hash, round and step) is written last."""
    d = Path(path) / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    drop_record(d)
    atomic_torch_save(state, d / "state.pt")
    summary = {k: state[k] for k in ("global_step", "round") if k in state}
    (d / "state.json").write_text(json.dumps(summary, indent=2))
    write_record(d, state["round"], state["global_step"])


def write_full_state(acc: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                     path: str | Path, global_step: int, round_index: int) -> None:
    """The full trainer state of `model` (optimizer, scheduler, step, RNG) into checkpoint
    `path`. Collective: every process calls it (FSDP gathers its shards). Under mixed precision
    (the checkpoint's weights are in the compute dtype) it also holds the float32 master
    weights ("master"), which a cold start resumes from."""
    optim = train_state_dicts(model, optimizer)
    if acc.is_main_process:
        state = {
            "optimizer": optim["optimizer"], "state_layout": optim["state_layout"],
            "scheduler": scheduler.state_dict(),
            "global_step": global_step, "round": round_index, "rng": rng_state(),
        }
        if checkpoint_dtype(model) is not None:
            state["master"] = optim["model"]
        save_trainer_state(path, state)
    acc.wait_for_everyone()


def checkpoint_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype a checkpoint's weights are written in when it is not the parameters' own: the
    compute dtype of a mixed-precision LeanCausalLM (None otherwise)."""
    dtype = getattr(model, "compute_dtype", None)
    if dtype is None or dtype == next(model.parameters()).dtype:
        return None
    return dtype


def has_trainer_state(path: str | Path) -> bool:
    return (Path(path) / STATE_DIR / "state.pt").exists()


def load_save(f: Path, receives_shards: bool, large: tuple[str, ...]) -> dict[str, Any]:
    """A trainer-state or progress save as this process needs it. `receives_shards` (an FSDP
    process other than the main one): a `full_fqn` save is memory-mapped and its `large` parts
    (moments, master or weights) are dropped untouched, so their pages are never read;
    `restore_sharded` broadcasts the main process's. Else each of 8 processes on a host would
    hold the whole ~12 B/param. An unsharded save is read whole: every process needs it all."""
    state = torch.load(f, map_location="cpu", weights_only=False, mmap=receives_shards)
    if receives_shards:
        if state.get("state_layout") != FULL_FQN:
            return torch.load(f, map_location="cpu", weights_only=False)
        # None stays None: an optimizer saved before its first step (train_state_dicts)
        state.update({k: {} if state[k] is not None else None for k in large if k in state})
    return state


def load_trainer_state(path: str | Path, expect_round: int | None = None,
                       deep: bool = True, receives_shards: bool = False) -> dict[str, Any] | None:
    """The trainer state of checkpoint `path` (None: it has none), verified first against its
    record (sizes; `deep`: sha256) and the checkpoint's round and step, then against the round
    `expect_round` that resumes from it. Anything wrong raises TrainerStateError saying what to
    do; a damaged state is never loaded.

    `receives_shards`: of a `full_fqn` state only the small parts are read (`load_save`)."""
    f = Path(path) / STATE_DIR / "state.pt"
    if not f.exists():
        return None
    problems = state_problems(path, deep=deep)
    if problems:
        raise TrainerStateError(f"the trainer state in {f.parent} is damaged: "
                                f"{'; '.join(problems)}. {REMEDY}")
    try:
        state = load_save(f, receives_shards, large=("optimizer", "master"))
    except Exception as e:  # a raw zip / unpickling error says nothing about what to do
        raise TrainerStateError(f"the trainer state {f} cannot be read ({type(e).__name__}: "
                                f"{e}); it is truncated or damaged. {REMEDY}") from e
    check_loaded(path, state, expect_round)
    return state


def usable_trainer_state(path: str | Path) -> bool:
    """Whether checkpoint `path` holds a trainer state that verifies (every byte hashed); a
    damaged or foreign one is reported and counts as absent, so that it is replayed past."""
    if not has_trainer_state(path):
        return False
    problems = state_problems(path, deep=True)
    if problems:
        log.warning("the trainer state in %s is not used: %s", path, "; ".join(problems))
    return not problems


TEACHER_DIR = "teacher"  # under STATE_DIR: weights of the teacher the next round starts with


def _replace_dir(tmp: Path, path: Path) -> None:
    """Put the finished directory `tmp` at `path`: the old one is renamed aside first, so `path`
    is at every moment either the old or the new directory, or absent with the new one complete
    at `tmp` (a `.tmp` leftover that `clean_tmp_dirs` removes)."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-old-", dir=path.parent))
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def commit_dir(path: str | Path) -> Path:
    """The temporary directory a checkpoint `path` is written into before `commit_checkpoint`
    renames it into place; the same name on every process."""
    path = Path(path)
    return path.with_name(path.name + ".tmp-commit")


def commit_checkpoint(path: str | Path) -> None:
    _replace_dir(commit_dir(path), Path(path))


def clean_tmp_dirs(path: str | Path) -> list[Path]:
    """Remove what an interrupted save of checkpoint `path` left beside it (`<name>.tmp*`)."""
    path = Path(path)
    gone = []
    if path.parent.is_dir():
        for leftover in path.parent.glob(path.name + ".tmp*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            gone.append(leftover)
    return gone


def save_weights(acc: Any, hf_model: Any, path: str | Path,
                 dtype: torch.dtype | None = None, only: set[str] | None = None) -> None:
    """Weights-only save_pretrained (config + safetensors, no tokenizer) of the policy (in
    `dtype` when given; with `only`, just those tensors are cast, the rest keep their own),
    written to a temporary directory and renamed. Collective: every process must call it (FSDP
    gathers the full state dict); the main process writes."""
    path = Path(path)
    acc.wait_for_everyone()
    state_dict = acc.get_state_dict(hf_model) if acc.num_processes > 1 else None
    if dtype is not None:
        full = state_dict if state_dict is not None else hf_model.state_dict()
        state_dict = _cast(full, dtype) if only is None else {
            **full, **_cast({k: v for k, v in full.items() if k in only}, dtype)}
    if acc.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
        with _inference_config(hf_model):
            hf_model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        _replace_dir(tmp, path)
    acc.wait_for_everyone()


def _link_or_copy(src: str, dst: str) -> None:
    # a hard link costs nothing when the scratch and the checkpoint share a file system
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_teacher(ckpt: str | Path, step: int, source_step: int | None, weights: Path) -> None:
    """Store teacher weights (a save_weights directory) and the step they stand for in a
    checkpoint's trainer state."""
    d = Path(ckpt) / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TEACHER_DIR + ".tmp-", dir=d))
    shutil.rmtree(tmp)
    # teacher.json is left out: a hard-linked copy written in place would change the source's too
    shutil.copytree(weights, tmp, copy_function=_link_or_copy,
                    ignore=shutil.ignore_patterns("teacher.json", "*.tmp-*"))
    (tmp / "teacher.json").write_text(json.dumps({"step": step, "source_step": source_step}))
    _replace_dir(tmp, d / TEACHER_DIR)


def read_teacher_meta(ckpt: str | Path) -> tuple[int, int | None, Path] | None:
    """(step, source_step, weights dir) of the teacher stored with a checkpoint, if any."""
    d = Path(ckpt) / STATE_DIR / TEACHER_DIR
    meta = d / "teacher.json"
    if not meta.exists():
        return None
    info = json.loads(meta.read_text())
    return int(info["step"]), info.get("source_step"), d
