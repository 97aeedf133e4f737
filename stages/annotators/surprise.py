"""The `surprise` annotator: the token windows where the privileged teacher disagrees most with
the student, found by one student and one teacher forward and no prompt, API or server.

For each routed rollout the response ids are scored twice: by the round's checkpoint as the
student (the rollout's own prompt) and by the teacher the trainer will use (the trainer's teacher
prompt, trainer/teacher.py, which shows the reference solution). That teacher is the lagged
snapshot stored with the checkpoint (trainer/checkpoint.py `read_teacher_meta`: the weights the
next round's trainer starts its teacher from) when there is one, else the checkpoint itself (round
0, or `teacher_sync_every: 0`, where the trainer's teacher is the live policy). The per-token
divergence is the one the trainer distils on that route: forward KL(teacher || student) on key
spans of correct rollouts, reverse KL(student || teacher) on error spans of incorrect ones.

Selection is by tokens, not segments: windows of `surprise.window_tokens` tokens (fewer when the
cap is smaller), highest mean divergence first, non-overlapping, while they fit the coverage cap
and their mean is above the response's mean (an unremarkable window is not chosen to fill the
budget); the best window always. Adjacent windows merge into one span. So the spans are the most
surprising tokens within the cap and are never cut down afterwards; a response with fewer tokens
than one cap-sized window (floor(cap * T) = 0) gets `too_broad`.

The reply column holds the chosen windows' and every segment's mean divergence as JSON.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

from trace_rl.stages.annotators.align import char_span_to_tokens
from trace_rl.stages.annotators.base import Job, make_row
from trace_rl.stages.annotators.config import AnnotateConfig

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


def choose_windows(kl_T: list[float], cap: float, window: int) -> list[tuple[int, int]]:
    """Token windows [t0, t1) by the rule in the module docstring, sorted by position, adjacent
    ones merged; [] when floor(cap * T) is 0."""
    n = len(kl_T)
    budget = math.floor(cap * n + 1e-9)
    if budget == 0 or n == 0:
        return []
    import numpy as np

    kl = np.asarray(kl_T, dtype=np.float64)
    prefix = np.concatenate([[0.0], np.cumsum(kl)])
    mean_all = prefix[-1] / n
    is_taken = np.zeros(n, dtype=bool)
    chosen: list[tuple[int, int]] = []
    used = 0
    size = min(window, budget)
    while used < budget and size > 0:
        scores = (prefix[size:] - prefix[:-size]) / size
        for t0 in np.argsort(-scores, kind="stable"):
            t0 = int(t0)
            if used + size > budget:
                break
            if chosen and scores[t0] <= mean_all:
                return _merge(chosen)
            if is_taken[t0:t0 + size].any():
                continue
            chosen.append((t0, t0 + size))
            is_taken[t0:t0 + size] = True
            used += size
        # a last, shorter window for what is left of the budget; none when nothing fitted
        size = budget - used if budget - used < size else 0
    return _merge(chosen)


def _merge(chosen: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for t0, t1 in sorted(chosen):
        if merged and merged[-1][1] == t0:
            merged[-1] = (merged[-1][0], t1)
        else:
            merged.append((t0, t1))
    return merged


def window_spans(job: Job, windows: list[tuple[int, int]]) -> list[dict]:
    """Annotation spans of token windows: their characters and the segments they touch."""
    offsets = job.offsets().offsets_T2
    spans = []
    for t0, t1 in windows:
        c0, c1 = int(offsets[t0][0]), int(offsets[t1 - 1][1])
        seg_ids = [s.segment_id for s in job.segments if s.char_start < c1 and c0 < s.char_end]
        spans.append({"segment_ids": seg_ids, "char_start": c0, "char_end": max(c0, c1),
                      "token_start": t0, "token_end": t1, "label": ""})
    return spans


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
    lean, tokenizer: Any, jobs: list[Job], template: str, chunk: int = 256, teacher_lean=None
) -> list[list[float]]:
    """Per-token divergence [T] of each job's response (direction by its route); the teacher
    runs `teacher_lean` (the student's `lean` when None)."""
    import torch

    from trace_rl.trainer.losses import token_kl
    from trace_rl.trainer.teacher import enable_thinking_of, teacher_prompt_ids

    teacher_lean = lean if teacher_lean is None else teacher_lean
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
        t_h = _hidden_at_responses(teacher_lean, teacher, pad_id)
        weight_VH, t_weight_VH = lean.head_weight(), teacher_lean.head_weight()
        directions = [DIRECTION[j.item["route"]] for j in jobs]
        out, start = [], 0
        for n, direction in zip(lengths, directions, strict=True):
            kl = []
            for c in range(start, start + n, chunk):
                end = min(c + chunk, start + n)
                s_logits, t_logits = s_h[c:end] @ weight_VH.t(), t_h[c:end] @ t_weight_VH.t()
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

    from trace_rl.trainer.checkpoint import read_teacher_meta
    from trace_rl.trainer.lean import LeanCausalLM

    opts = cfg.surprise

    def load(path: str) -> LeanCausalLM:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return LeanCausalLM(hf.to(opts.device).eval())

    lean = load(model_path)
    stored = read_teacher_meta(model_path)
    teacher = load(str(stored[2])) if stored is not None else lean
    teacher_note = str(stored[2]) if stored is not None else "the checkpoint itself"
    rows = []
    for b0 in range(0, len(jobs), opts.batch_size):
        batch = jobs[b0 : b0 + opts.batch_size]
        t0 = time.perf_counter()
        divergences = batch_divergence(lean, tokenizer, batch, teacher_template,
                                       teacher_lean=teacher)
        per_item = (time.perf_counter() - t0) / len(batch)
        for job, kl_T in zip(batch, divergences, strict=True):
            rows.append(_row(cfg, job, annotator, kl_T, teacher_note, per_item))
            tick()
    return rows


def _row(cfg: AnnotateConfig, job: Job, annotator: str, kl_T: list[float], teacher: str,
         latency_s: float) -> dict:
    windows = choose_windows(kl_T, cfg.coverage_cap, cfg.surprise.window_tokens)
    n = len(kl_T)
    raw = json.dumps({
        "direction": DIRECTION[job.item["route"]], "teacher": teacher,
        "mean_kl": round(sum(kl_T) / n, 5) if n else 0.0,
        "windows": [[t0, t1, round(sum(kl_T[t0:t1]) / (t1 - t0), 5)] for t0, t1 in windows],
        "segment_scores": {str(i): round(s, 5) for i, s, _ in segment_scores(job, kl_T)},
    })
    if not windows:
        status = "too_broad" if n else "no_spans"
        note = (f"too_broad: floor(coverage_cap {cfg.coverage_cap} x {n} tokens) = 0"
                if n else "the response has no tokens")
        return make_row(job.item, annotator, status, raw=raw, error=note, latency_s=latency_s)
    spans = window_spans(job, windows)
    covered = sum(t1 - t0 for t0, t1 in windows)
    return make_row(job.item, annotator, "ok", spans=spans, coverage=covered / n, raw=raw,
                    latency_s=latency_s)
