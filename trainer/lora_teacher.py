"""The lagged teacher under LoRA: the shared base plus a snapshot of the adapter.

Same lag rule and the same on-disk hand-over as `TeacherHandle` (the teacher of global step s is
the policy of step sync * floor(s / sync), its snapshot linked into the round's checkpoint when the
next round still needs it); only what a snapshot holds differs: the adapter in peft's format
(megabytes) instead of the whole model, copied into the model's frozen `teacher` adapter. The
teacher's hidden states come from the student's own (wrapped) module with that adapter switched
on, so the hidden-state path and the routed KL are the full-weight code unchanged.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from trace_rl.trainer import lora
from trace_rl.trainer.teacher import TeacherHandle, eval_mode


class LoraTeacher(TeacherHandle):
    """`TeacherHandle` whose snapshots are adapters. `model` is the student itself once the
    snapshot is in its teacher adapter (None: not loaded)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._student: Any = None  # the LeanCausalLM being trained

    def ensure(self, step: int, unwrapped: nn.Module, acc: Any) -> None:
        self._student = unwrapped
        super().ensure(step, unwrapped, acc)

    def _snapshot(self, acc: Any, unwrapped: Any, path: Path) -> None:
        lora.sync_teacher(unwrapped.hf)
        tensors = lora.gathered(unwrapped.hf, lora.TEACHER)  # collective
        acc.wait_for_everyone()
        if acc.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
            lora.save_adapter(unwrapped.hf, tmp, lora.TEACHER, state_dict=tensors)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        acc.wait_for_everyone()

    def _load(self, acc: Any) -> None:
        assert self.path is not None and self._student is not None
        lora.load_adapter(self._student.hf, self.path, lora.TEACHER)
        self.model = self._student

    @torch.no_grad()
    def hidden(self, student_wrapped: nn.Module, **kw: Any) -> torch.Tensor:
        if self.sync_every == 0:  # the live teacher: the student itself
            return super().hidden(student_wrapped, **kw)
        assert self.model is not None, "ensure() loads the teacher before its first use"
        with eval_mode(student_wrapped), lora.teacher_adapter(student_wrapped):
            return student_wrapped(mode="hidden", **kw)

    def head_weight(self, student_unwrapped: Any) -> torch.Tensor:
        # lm_head is never adapted (LoraConfig refuses it): teacher and student share it
        return student_unwrapped.head_weight().detach()
