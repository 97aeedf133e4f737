"""The privileged teacher: its prompt (shared contracts' template) and its weights (a snapshot).

The teacher is the student's own weights, re-synced every `teacher_sync_every` global steps while
its divergence is in use ([paper]); with `teacher_sync_every: 0` it is the live student under
no_grad. [choice] A round starts with a fresh snapshot of the round's initial weights; the snapshot
is saved with in-round progress so that a resumed round uses exactly the same teacher.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from torch import nn

from trace_rl.pipeline.chat import encode_chat_prompt
from trace_rl.trainer.teacher_prompt import teacher_message


def enable_thinking_of(sampling_json: str | None) -> bool:
    """The rollout's thinking switch, read from its `sampling` JSON (default: thinking on)."""
    if not sampling_json:
        return True
    return bool(json.loads(sampling_json).get("enable_thinking", True))


def teacher_prompt_ids(
    tokenizer: Any,
    template: str,
    prompt_row: dict[str, Any],
    labels: list[str],
    enable_thinking: bool,
) -> list[int]:
    """Chat-templated token ids of the teacher's prompt (the response is appended by the caller)."""
    return encode_chat_prompt(tokenizer, teacher_message(template, prompt_row, labels), enable_thinking)


class TeacherHandle:
    """Holds the teacher weights and decides when to refresh them from the student."""

    def __init__(self, sync_every: int):
        self.sync_every = sync_every
        self.model: nn.Module | None = None  # None with sync_every == 0 (live student)
        self.synced_at: int | None = None

    def maybe_sync(self, student: nn.Module, step: int) -> None:
        """Snapshot `student` (an unwrapped LeanCausalLM) when due at global step `step`."""
        if self.sync_every == 0:
            return
        due = self.synced_at is None or step - self.synced_at >= self.sync_every
        if not due:
            return
        if self.model is None:
            self.model = copy.deepcopy(student).requires_grad_(False)
        else:
            self.model.load_state_dict(student.state_dict())
        self.synced_at = step

    def state(self) -> dict[str, Any] | None:
        if self.model is None:
            return None
        return {"synced_at": self.synced_at, "weights": self.model.state_dict()}

    def load(self, student: nn.Module, state: dict[str, Any] | None) -> None:
        if state is None or self.sync_every == 0:
            return
        self.model = copy.deepcopy(student).requires_grad_(False)
        self.model.load_state_dict(state["weights"])
        self.synced_at = state["synced_at"]

    @torch.no_grad()
    def hidden(self, student_wrapped: nn.Module, **kw) -> torch.Tensor:
        """Teacher final hidden states at the given positions [S, H]."""
        model = student_wrapped if self.model is None else self.model
        return model(mode="hidden", **kw)

    def head_weight(self, student_unwrapped: nn.Module) -> torch.Tensor:
        model = student_unwrapped if self.model is None else self.model
        return model.head_weight().detach()
