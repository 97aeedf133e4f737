"""From the round's Parquet tables to padded micro-batch tensors.

Student input = prompt_token_ids + response_token_ids exactly as sampled; teacher input = the
privileged chat prompt + the same response ids. Hidden state at position p predicts token p + 1,
so response token j of a sequence whose prompt has P tokens is scored at position P + j - 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import pyarrow as pa
import torch

from trace_rl.data_schemas import sampling_fields
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.methods import Plan, RolloutView, get_method
from trace_rl.trainer.teacher import enable_thinking_of, teacher_prompt_ids

Tensor = torch.Tensor


@dataclass
class Example:
    """One rollout ready for training."""

    rollout_id: str
    group: str  # prompt_id: the GRPO group
    prompt_ids: list[int]
    response_ids: list[int]
    reward: float
    plan: Plan
    teacher_prompt_ids: list[int] | None  # only for rollouts with distilled tokens
    engine_logprobs: list[float] = field(default_factory=list)
    temperature: float = 1.0  # the rollout's sampling temperature
    truncated: bool = False  # sampled with top-p < 1 or top-k > 0
    masked: bool = False  # cut by the token limit under `train.overlong: mask`: not trained on


def sampling_of(sampling: dict | str | None) -> tuple[float, bool]:
    """(temperature, truncated by top-p / top-k) from a rollout's `sampling` (the struct, or a
    version-1 run's JSON)."""
    s = sampling_fields(sampling)
    top_k = s.get("top_k")
    top_p = s.get("top_p")
    truncated = (top_k is not None and top_k > 0) or (top_p is not None and top_p < 1.0)
    return float(s.get("temperature", 1.0)), truncated


def _rows_by(table: pa.Table | None, key: str) -> dict[str, dict[str, Any]]:
    if table is None:
        return {}
    return {row[key]: row for row in table.to_pylist()}


def _view(rollout: dict, verdict: dict | None, annotation: dict | None) -> RolloutView:
    ok = annotation is not None and annotation.get("status") == "ok"
    spans = []
    if annotation is not None and ok:
        spans = [(s["token_start"], s["token_end"], s.get("label")) for s in annotation["spans"] or []]
    return RolloutView(
        rollout_id=rollout["rollout_id"],
        response_len=len(rollout["response_token_ids"]),
        correct=bool(verdict and verdict.get("correct")),
        annotation_ok=ok,
        annotation_route=(annotation or {}).get("route") or "none",
        spans=spans,
    )


def overlong_rule(
    cfg: TrainConfig, rollout: dict, reward: float, group: str, plan: Plan
) -> tuple[float, str, Plan]:
    """(reward, GRPO group, plan) of a rollout under `train.overlong` (trainer/config.py). A
    masked rollout gets a group of its own: a group of one has advantage 0 and stays out of
    its prompt's baseline; with nothing distilled either, it adds no gradient."""
    if cfg.overlong == "none" or rollout.get("finish_reason") != "length":
        return reward, group, plan
    empty = Plan.empty(len(plan.mask_R))
    if cfg.overlong == "penalize":
        return reward - cfg.overlong_penalty, group, empty
    return reward, f"{group}#overlong:{rollout['rollout_id']}", empty


def build_examples(
    cfg: TrainConfig,
    tokenizer: Any,
    prompts: pa.Table,
    rollouts: pa.Table,
    verdicts: pa.Table,
    annotations: pa.Table | None,
) -> list[Example]:
    """One Example per rollout, in the rollouts table's order. A rollout without a verdict row is
    an error (the verify stage writes one row per rollout); a missing or non-ok annotation simply
    means no spans."""
    prompt_rows = _rows_by(prompts, "prompt_id")
    verdict_rows = _rows_by(verdicts, "rollout_id")
    annotation_rows = _rows_by(annotations, "rollout_id")
    method = get_method(cfg.method)
    examples = []
    for rollout in rollouts.to_pylist():
        rid = rollout["rollout_id"]
        if rid not in verdict_rows:
            raise KeyError(f"rollout {rid!r} has no verdict row; rerun the verify stage")
        verdict = verdict_rows[rid]
        view = _view(rollout, verdict, annotation_rows.get(rid))
        plan = method.plan(cfg, view)
        t_ids = None
        if plan.direction is not None:
            prompt = prompt_rows.get(rollout["prompt_id"])
            if prompt is None:
                raise KeyError(f"prompt {rollout['prompt_id']!r} of rollout {rid!r} is missing")
            labels = [label for _, _, label in view.spans if label]
            thinking = enable_thinking_of(rollout.get("sampling"))
            t_ids = teacher_prompt_ids(tokenizer, cfg.teacher_template, prompt, labels, thinking)
        temperature, truncated = sampling_of(rollout.get("sampling"))
        reward, group, plan = overlong_rule(cfg, rollout, float(verdict["reward"]),
                                            rollout["prompt_id"], plan)
        if plan.direction is None:
            t_ids = None
        examples.append(Example(
            rollout_id=rid,
            group=group,
            prompt_ids=list(rollout["prompt_token_ids"]),
            response_ids=list(rollout["response_token_ids"]),
            reward=reward,
            plan=plan,
            teacher_prompt_ids=t_ids,
            engine_logprobs=list(rollout.get("response_logprobs") or []),
            temperature=temperature,
            truncated=truncated,
            masked=cfg.overlong == "mask" and rollout.get("finish_reason") == "length",
        ))
    return examples


@dataclass
class SeqBatch:
    """Padded sequences and the flat positions of their response tokens."""

    input_ids_BL: Tensor
    attention_mask_BL: Tensor
    resp_pos_N: Tensor  # flat index into B*L of the state predicting each response token
    target_N: Tensor


def pad_sequences(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int, device=None
) -> SeqBatch:
    """Right-pad prompt+response sequences; response tokens are listed in (row, position) order."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    L = max(lengths) if lengths else 1
    ids_BL = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask_BL = torch.zeros((len(prompts), L), dtype=torch.long)
    pos: list[int] = []
    tgt: list[int] = []
    for b, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise ValueError("a rollout has an empty prompt_token_ids; the first response token "
                             "cannot be scored without a prompt")
        ids_BL[b, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        mask_BL[b, : len(p) + len(r)] = 1
        pos.extend(b * L + len(p) - 1 + j for j in range(len(r)))
        tgt.extend(r)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    return SeqBatch(ids_BL.to(device), mask_BL.to(device), as_long(pos), as_long(tgt))


def response_mask(lengths: list[int], device=None) -> Tensor:
    """Bool [B, T] with T = max length."""
    T = max(lengths, default=0)
    return torch.arange(T, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


@dataclass
class MicroBatch:
    """Everything one forward/backward needs. Flat response tokens N follow mask_BT's order."""

    student: SeqBatch
    mask_BT: Tensor
    span_BT: Tensor
    old_logp_BT: Tensor
    adv_B: Tensor
    weight: float  # 0 for padding micro-batches that only keep DDP in step
    teacher: SeqBatch | None  # only rows with spans; targets unused
    span_dirs: list[tuple[str, Tensor, Tensor]]  # (direction, index into N, index into teacher S)
    n_tokens: int
    # the rows trained on: False for rollouts masked by `train.overlong: mask`, whose tokens are
    # then in no loss term, no denominator and no metric (mask_BT still lays out the flat tokens)
    keep_B: Tensor | None = None

    @property
    def train_mask_BT(self) -> Tensor:
        """The response tokens the loss and the metrics count: mask_BT without masked rows."""
        return self.mask_BT if self.keep_B is None else self.mask_BT & self.keep_B[:, None]


def to_bt(values_N: Tensor, mask_BT: Tensor) -> Tensor:
    """Scatter flat per-token values [N] into [B, T] (0 at padding), keeping autograd."""
    out_BT = values_N.new_zeros(mask_BT.shape)
    return out_BT.masked_scatter(mask_BT, values_N)


def collate(
    examples: list[Example],
    old_logp: list[Tensor],
    adv: list[float],
    pad_id: int,
    with_teacher: bool,
    weight: float = 1.0,
    device=None,
) -> MicroBatch:
    lengths = [len(e.response_ids) for e in examples]
    mask_BT = response_mask(lengths, device)
    span_BT = torch.zeros_like(mask_BT)
    old_BT = torch.zeros(mask_BT.shape, dtype=torch.float32, device=device)
    for b, e in enumerate(examples):
        span_BT[b, : lengths[b]] = torch.from_numpy(e.plan.mask_R)
        old_BT[b, : lengths[b]] = old_logp[b].to(torch.float32)
    student = pad_sequences([e.prompt_ids for e in examples], [e.response_ids for e in examples],
                            pad_id, device)
    teacher, span_dirs = None, []
    rows = [b for b, e in enumerate(examples) if e.plan.direction is not None]
    if with_teacher and rows:
        sub = [examples[b] for b in rows]
        teacher = pad_sequences([cast(list[int], e.teacher_prompt_ids) for e in sub], [e.response_ids for e in sub],
                                pad_id, device)
        # flat index of each response token in the student order, restricted to span tokens
        flat_index_BT = torch.full(mask_BT.shape, -1, dtype=torch.long, device=device)
        flat_index_BT[mask_BT] = torch.arange(int(mask_BT.sum()), device=device)
        t_index, s_index, dirs = [], [], cast(list[str], [])
        t_offset = 0
        for b, e in zip(rows, sub):
            span_pos = torch.from_numpy(np.flatnonzero(e.plan.mask_R)).to(device)
            s_index.append(flat_index_BT[b, span_pos])
            t_index.append(teacher.resp_pos_N[t_offset + span_pos])
            assert e.plan.direction is not None  # rows holds the distilled rollouts only
            dirs.extend([e.plan.direction] * len(span_pos))
            t_offset += len(e.response_ids)
        s_index_S, t_pos_S = torch.cat(s_index), torch.cat(t_index)
        teacher.resp_pos_N = t_pos_S  # positions whose teacher hidden states are needed
        for direction in dict.fromkeys(dirs):
            sel_S = torch.tensor([d == direction for d in dirs], device=device)
            span_dirs.append((direction, s_index_S[sel_S], torch.nonzero(sel_S).squeeze(-1)))
    elif not with_teacher:
        span_BT = torch.zeros_like(span_BT)
    return MicroBatch(
        student=student, mask_BT=mask_BT, span_BT=span_BT, old_logp_BT=old_BT,
        adv_B=torch.tensor(adv, dtype=torch.float32, device=device), weight=weight,
        teacher=teacher, span_dirs=span_dirs, n_tokens=sum(lengths),
        keep_B=torch.tensor([not e.masked for e in examples], dtype=torch.bool, device=device),
    )


def sampling_json(enable_thinking: bool, **extra: Any) -> str:
    """Helper for tests and benchmarks: a `sampling` JSON as the rollout stage writes it."""
    return json.dumps({"enable_thinking": enable_thinking, **extra})
