"""The `surprise` annotator: the segments where the privileged teacher disagrees most with the
student, found by one teacher forward and no prompt, API or server.

For each routed rollout the round's checkpoint is run twice on the same response ids: as the
student (the rollout's own prompt) and as the privileged teacher (the trainer's teacher prompt,
trainer/teacher.py, which shows the reference solution). The per-token divergence between the
two next-token distributions is the one the trainer would distil on that route: forward
KL(teacher || student) on key spans of correct rollouts, reverse KL(student || teacher) on error
spans of incorrect ones. A segment's score is its mean divergence over its tokens; segments are
taken best first while they fit the coverage cap (the first one always, cut by the cap if it
alone is too long), then mapped to token spans like any annotator's choice (spans.py).

The reply column holds the per-segment scores as JSON, so a row shows why its spans were chosen.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

from trace_rl.stages.annotators.align import char_span_to_tokens
from trace_rl.stages.annotators.base import Job, finish
from trace_rl.stages.annotators.config import AnnotateConfig
from trace_rl.stages.annotators.parse import ParsedReply

DIRECTION = {"key": "forward", "error": "reverse"}


def segment_scores(job: Job, kl_T: list[float]) -> list[tuple[int, float, int]]:
    """(segment id, mean divergence, token count) of each segment that covers a token."""
    offsets = job.offsets()
    text = job.item["response_text"]
    out = []
    for seg in job.segments:
        tok = char_span_to_tokens(offsets.offsets_T2, text, seg.char_start, seg.char_end,
                                  offsets.index)
        if tok is None or tok[1] <= tok[0]:
            continue
        t0, t1 = tok
        out.append((seg.segment_id, sum(kl_T[t0:t1]) / (t1 - t0), t1 - t0))
    return out


def choose_segments(scores: list[tuple[int, float, int]], n_tokens: int, cap: float) -> list[int]:
    """Segment ids, highest score first, while their tokens fit floor(cap * n_tokens); the best
    segment is always chosen (spans.py cuts it to the cap when it alone is too long)."""
    budget = math.floor(cap * n_tokens + 1e-9)
    chosen, used = [], 0
    for seg_id, _, n in sorted(scores, key=lambda s: (-s[1], s[0])):
        if not chosen or used + n <= budget:
            chosen.append(seg_id)
            used += n
    return chosen


def _prompt_ids(item: dict, tokenizer: Any) -> list[int]:
    """The rollout's own prompt ids (as sampled); rebuilt with the shared encoder when absent."""
    if item.get("prompt_token_ids") is not None:
        return list(item["prompt_token_ids"])
    from trace_rl.pipeline.chat import encode_chat_prompt
    from trace_rl.trainer.teacher import enable_thinking_of

    return encode_chat_prompt(tokenizer, item["problem"], enable_thinking_of(item.get("sampling")))


def _hidden_at_responses(lean, seqs: list[tuple[list[int], int]], pad_id: int):
    """Final hidden states [sum T, H] at the positions predicting each response token, for
    right-padded sequences given as (ids, prompt length)."""
    import torch

    width = max(len(ids) for ids, _ in seqs)
    ids_BL = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask_BL = torch.zeros((len(seqs), width), dtype=torch.long)
    pos = []
    for b, (ids, p) in enumerate(seqs):
        ids_BL[b, : len(ids)] = torch.tensor(ids)
        mask_BL[b, : len(ids)] = 1
        # Hidden state at position j predicts token j + 1.
        pos.extend(b * width + j for j in range(p - 1, len(ids) - 1))
    dev = lean.head_weight().device
    return lean(mode="hidden", input_ids_BL=ids_BL.to(dev), attention_mask_BL=mask_BL.to(dev),
                pos_S=torch.tensor(pos, dtype=torch.long, device=dev))


def batch_divergence(
    lean, tokenizer: Any, jobs: list[Job], template: str, chunk: int = 256
) -> list[list[float]]:
    """Per-token divergence [T] of each job's response (direction by its route)."""
    import torch

    from trace_rl.trainer.losses import token_kl
    from trace_rl.trainer.teacher import enable_thinking_of, teacher_prompt_ids

    pad_id = tokenizer.pad_token_id
    pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
    student, teacher, lengths = [], [], []
    for job in jobs:
        resp = list(job.item["response_token_ids"])
        s_prompt = _prompt_ids(job.item, tokenizer)
        prompt_row = job.item.get("prompt") or job.item
        t_prompt = teacher_prompt_ids(tokenizer, template, prompt_row, [],
                                      enable_thinking_of(job.item.get("sampling")))
        student.append((s_prompt + resp, len(s_prompt)))
        teacher.append((t_prompt + resp, len(t_prompt)))
        lengths.append(len(resp))
    with torch.no_grad():
        s_h = _hidden_at_responses(lean, student, pad_id)
        t_h = _hidden_at_responses(lean, teacher, pad_id)
        weight_VH = lean.head_weight()
        directions = [DIRECTION[j.item["route"]] for j in jobs]
        out, start = [], 0
        for n, direction in zip(lengths, directions, strict=True):
            kl = []
            for c in range(start, start + n, chunk):
                end = min(c + chunk, start + n)
                s_logits, t_logits = s_h[c:end] @ weight_VH.t(), t_h[c:end] @ weight_VH.t()
                kl.append(token_kl(s_logits, t_logits, direction))
            out.append(torch.cat(kl).float().cpu().tolist() if kl else [])
            start += n
    return out


def surprise_rows(
    cfg: AnnotateConfig,
    jobs: list[Job],
    annotator: str,
    tokenizer: Any,
    model_path: str,
    teacher_template: str,
    tick: Callable[[], None],
) -> list[dict]:
    """Rows of prepared jobs (key or error route) scored by the checkpoint at `model_path`."""
    import torch
    from transformers import AutoModelForCausalLM

    from trace_rl.trainer.lean import LeanCausalLM

    opts = cfg.surprise
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    hf = hf.to(opts.device).eval()
    lean = LeanCausalLM(hf)
    rows = []
    for b0 in range(0, len(jobs), opts.batch_size):
        batch = jobs[b0 : b0 + opts.batch_size]
        t0 = time.perf_counter()
        divergences = batch_divergence(lean, tokenizer, batch, teacher_template)
        per_item = (time.perf_counter() - t0) / len(batch)
        for job, kl_T in zip(batch, divergences, strict=True):
            scores = segment_scores(job, kl_T)
            ids = choose_segments(scores, len(kl_T), cfg.coverage_cap)
            parsed = ParsedReply(ids, "", "ok" if ids else "no_spans",
                                 None if ids else "no segment covers a response token")
            raw = json.dumps({"direction": DIRECTION[job.item["route"]],
                              "segment_scores": {str(i): round(s, 5) for i, s, _ in scores}})
            rows.append(finish(cfg, job, annotator, parsed, raw, per_item))
            tick()
    return rows
