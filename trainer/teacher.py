"""The privileged teacher: its prompt (shared contracts' template) and its weights (a snapshot).

The teacher is the student's own weights, re-synced every `teacher_sync_every` global optimizer
steps while its divergence is in use ([paper]): at global step s it is the policy of step
sync * floor(s / sync), counted across rounds, and it is read from a weights-only snapshot on disk.
With `teacher_sync_every: 0` it is the live student under no_grad. Once the KL weight is 0 for good
no teacher is loaded at all.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trace_rl.data_schemas import sampling_fields
from trace_rl.pipeline.chat import encode_chat_prompt
from trace_rl.trainer.checkpoint import (
    checkpoint_dtype,
    read_teacher_meta,
    save_weights,
    write_teacher,
)
from trace_rl.trainer.lean import LeanCausalLM

log = logging.getLogger("trace_rl.trainer.teacher")
from trace_rl.trainer.teacher_prompt import teacher_message


def enable_thinking_of(sampling: dict | str | None) -> bool:
    """The rollout's thinking switch, read from its `sampling` (the struct, or a version-1 run's
    JSON; default: thinking on)."""
    return bool(sampling_fields(sampling).get("enable_thinking", True))


def teacher_prompt_ids(
    tokenizer: Any,
    template: str,
    prompt_row: dict[str, Any],
    labels: list[str],
    enable_thinking: bool,
) -> list[int]:
    """Chat-templated token ids of the teacher's prompt (the response is appended by the caller)."""
    return encode_chat_prompt(tokenizer, teacher_message(template, prompt_row, labels), enable_thinking)


def teacher_step_for(step: int, sync_every: int) -> int:
    """The policy step whose weights serve as teacher at global step `step`."""
    return sync_every * (step // sync_every)


@contextmanager
def eval_mode(module: nn.Module):
    """Forward passes that only score (teacher, old log-probs) run in eval mode, so that dropout
    and activation checkpointing (which transformers applies only while training) stay off."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _matmul_weights(hf: nn.Module) -> set[str]:
    """The names of the Linear weights that autocast casts to the compute dtype (a head tied to
    the embeddings is the embedding table, which autocast leaves in float32)."""
    embeddings = {id(m.weight) for m in hf.modules() if isinstance(m, nn.Embedding)}
    return {f"{name}.weight" for name, m in hf.named_modules()
            if isinstance(m, nn.Linear) and id(m.weight) not in embeddings}


def _as_student_computes(hf: nn.Module, snapshot: Path) -> None:
    """Give the teacher the student's numerics. The student holds float32 weights and computes
    under autocast (trainer/round_setup.py `load_model`): matmuls in the compute dtype, everything else
    (embedding lookup, norms, the residual stream) in float32. A teacher of bf16 weights without
    autocast ran all of it in bf16, so at a sync step, with the student's own weights, its KL to
    the student was ~1e-6 nats/token instead of 0. `hf` is loaded in the compute dtype: its Linear
    weights stay so (autocast casts the student's to it anyway: same values, same kernels); the
    other parameters (embeddings, norms; a few percent of the model) are read again from the
    snapshot, which holds them as the student's float32 master (see `_snapshot`), so that host
    memory never holds a float32 copy of the matmul weights."""
    from safetensors import safe_open

    matmul = _matmul_weights(hf)
    rest = {name: p for name, p in hf.named_parameters() if name not in matmul}
    for f in sorted(snapshot.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in rest.keys() & set(st.keys()):
                rest[name].data = st.get_tensor(name).float()
    for p in rest.values():  # a tied head is the embedding: already float32 through it
        p.data = p.data.float()


class TeacherHandle:
    """The teacher's weights: the policy at step sync * floor(s / sync), read from a weights-only
    snapshot on disk (never a copy of the live model), so that a resumed round, or the next
    round, uses exactly the same teacher. With `sync_every == 0` the teacher is the live student.

    Snapshots: `<work_dir>/progress-teacher-step<k>/` inside a round (cleared with the round's
    other progress files once it is committed); the one still in use when a round ends is linked
    into `<output checkpoint>/trainer_state/teacher/` for the next round.
    """

    def __init__(self, sync_every: int, work_dir: Path, init_checkpoint: str, dtype: torch.dtype,
                 chunk: int, inherit: bool = True):
        self.sync_every = sync_every
        self.work_dir = Path(work_dir)
        self.dtype, self.chunk = dtype, chunk
        self.model: nn.Module | None = None  # a LeanCausalLM in eval mode, without grad
        self.step: int | None = None  # the sync step this teacher stands for
        self.source_step: int | None = None  # the policy step its weights were taken at
        self.path: Path | None = None
        # a run's round 0 takes no teacher from its initial model (state from another run)
        self._inherited = read_teacher_meta(init_checkpoint) if inherit else None

    def ensure(self, step: int, unwrapped: nn.Module, acc: Any) -> None:
        """Make the teacher the one global step `step` needs (called only while it is needed)."""
        if self.sync_every == 0:
            self.source_step = step
            return
        want = teacher_step_for(step, self.sync_every)
        if self.step == want:
            if self.model is None:  # restored from a progress save: load lazily
                self._load(acc)
            return
        source = step
        if step != want:
            inherited = self._inherited
            if inherited is not None and inherited[0] == want:
                self.step, self.source_step, self.path = want, inherited[1], inherited[2]
                self._load(acc)
                return
            log.warning("no teacher snapshot of step %d on disk (checkpoint written before "
                        "teacher snapshots?): using the policy of step %d", want, step)
        self.path = self.work_dir / f"progress-teacher-step{want:08d}"
        self._snapshot(acc, unwrapped, self.path)
        self._drop_older(keep=self.path)
        self.step, self.source_step = want, source
        self._load(acc)

    def _snapshot(self, acc: Any, unwrapped: Any, path: Path) -> None:
        """Write the live policy's weights as the teacher's snapshot (collective)."""
        # only the matmul weights in the compute dtype: embeddings and norms rounded to bf16 made
        # the teacher differ from a float32 master the optimizer has moved (KL ~5e-7/token at a
        # sync step); bf16 held exactly only an untrained model's weights
        save_weights(acc, unwrapped.hf, path, dtype=checkpoint_dtype(unwrapped),
                     only=_matmul_weights(unwrapped.hf))

    def _load(self, acc: Any) -> None:
        from transformers import AutoModelForCausalLM

        assert self.path is not None
        hf = AutoModelForCausalLM.from_pretrained(self.path, dtype=self.dtype)
        hf.config.use_cache = False
        _as_student_computes(hf, self.path)
        self.model = LeanCausalLM(hf, chunk=self.chunk, compute_dtype=self.dtype)
        self.model.to(acc.device).eval().requires_grad_(False)

    def _drop_older(self, keep: Path) -> None:
        for old in self.work_dir.glob("progress-teacher-step*"):
            if old != keep and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)

    def state(self) -> dict[str, Any] | None:
        if self.step is None:
            return None
        return {"step": self.step, "source_step": self.source_step, "path": str(self.path)}

    def restore(self, state: dict[str, Any] | None) -> None:
        if state is None or self.sync_every == 0:
            return
        self.step, self.source_step, self.path = state["step"], state["source_step"], Path(state["path"])

    def hand_over(self, next_step: int, output_checkpoint: str | Path) -> None:
        """Store the teacher the next round starts with, unless that round re-syncs anyway."""
        if self.sync_every == 0 or next_step % self.sync_every == 0:
            return
        want = teacher_step_for(next_step, self.sync_every)
        if self.step == want and self.path is not None:
            write_teacher(output_checkpoint, want, self.source_step, self.path)
        elif self._inherited is not None and self._inherited[0] == want:
            write_teacher(output_checkpoint, want, self._inherited[1], self._inherited[2])

    @torch.no_grad()
    def hidden(self, student_wrapped: nn.Module, **kw) -> torch.Tensor:
        """Teacher final hidden states at the given positions [S, H]."""
        if self.model is not None:
            return self.model(mode="hidden", **kw)
        with eval_mode(student_wrapped):
            return student_wrapped(mode="hidden", **kw)

    def head_weight(self, student_unwrapped: Any) -> torch.Tensor:
        model: Any = student_unwrapped if self.model is None else self.model
        return model.head_weight().detach()

    def release(self) -> None:
        """Free the teacher's memory once the KL weight has reached 0."""
        self.model = None
