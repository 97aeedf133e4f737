"""Warm start: a short supervised pass on (prompt -> solution), student and privileged formats.

Student-format targets are sometimes corrupted (one arithmetic slip, later steps consistent), so
the warm-started policy makes the slip at a tunable rate and starts at a middling accuracy that
RL can raise. Privileged-format targets are always correct: with the reference solution in the
prompt the model learns to follow it, which is what makes it a useful self-teacher.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

from trace_rl.testbed.config import TestbedConfig
from trace_rl.pipeline.chat import encode_chat_prompt
from trace_rl.testbed.task import (
    ERROR_LABELS,
    KEY_LABEL,
    corrupt_steps,
    make_prompt_row,
    render_solution,
    sample_pairs,
)
from trace_rl.trainer.teacher_prompt import teacher_message

IGNORE = -100


@dataclass(frozen=True)
class SftExample:
    """Token ids of one example; the loss covers response_ids (which end with eos)."""

    prompt_ids: list[int]
    response_ids: list[int]


def make_sft_texts(cfg: TestbedConfig, n: int, seed: int) -> list[tuple[str, str]]:
    """n (user message, target solution) pairs in the configured format mixture."""
    rng = random.Random(f"sft|{seed}")
    if cfg.task == "digit_chain":
        from trace_rl.testbed.chain import chain_sft_pairs

        return chain_sft_pairs(cfg, n, seed, rng,
                               lambda row, labels: teacher_message(cfg.teacher_template, row, labels))
    pairs = sample_pairs(cfg, min(n, cfg.sft_num_problems), seed, "train")
    texts = []
    for i in range(n):
        a, b = pairs[i % len(pairs)]
        row = make_prompt_row(a, b, "", cfg.step_layout)
        if rng.random() < cfg.privileged_frac:
            labels = []
            if rng.random() < cfg.label_frac:
                labels = [rng.choice([*ERROR_LABELS, KEY_LABEL])]
            user = teacher_message(cfg.teacher_template, row, labels)
            texts.append((user, row["solution"]))
        elif rng.random() < cfg.corrupt_frac:
            steps, _, _ = corrupt_steps(a, b, rng)
            texts.append((row["problem"], render_solution(steps, cfg.step_layout)))
        else:
            texts.append((row["problem"], row["solution"]))
    return texts


def tokenize_examples(
    tokenizer: PreTrainedTokenizerFast, texts: list[tuple[str, str]], enable_thinking: bool
) -> list[SftExample]:
    """Prompt and response are encoded separately, the prompt by the rollouts' own encoder."""
    p_ids = [encode_chat_prompt(tokenizer, user, enable_thinking) for user, _ in texts]
    r_ids = tokenizer([resp for _, resp in texts], add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    return [SftExample(p, r + [eos]) for p, r in zip(p_ids, r_ids, strict=True)]


def collate_sft(batch: list[SftExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids_BT, attention_mask_BT and labels_BT (IGNORE off the response)."""
    T = max(len(ex.prompt_ids) + len(ex.response_ids) for ex in batch)
    ids_BT = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(batch), T), dtype=torch.long)
    labels_BT = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    for i, ex in enumerate(batch):
        n_p, seq = len(ex.prompt_ids), ex.prompt_ids + ex.response_ids
        ids_BT[i, : len(seq)] = torch.tensor(seq)
        mask_BT[i, : len(seq)] = 1
        labels_BT[i, n_p : len(seq)] = torch.tensor(ex.response_ids)
    return {"input_ids": ids_BT, "attention_mask": mask_BT, "labels": labels_BT}


def length_bucketed_batches(
    examples: list[SftExample], batch_size: int, rng: random.Random, window: int = 16
) -> list[list[SftExample]]:
    """Batches of similar length (less padding: teacher prompts are twice as long), in random
    order; each window of `window` batches is sorted by length before it is cut."""
    batches = []
    span = batch_size * window
    for start in range(0, len(examples), span):
        chunk = sorted(
            examples[start : start + span], key=lambda e: len(e.prompt_ids) + len(e.response_ids)
        )
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def response_nll(model: Qwen3ForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token NLL over response tokens (scalar)."""
    logits_BTV = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels_BT = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        logits_BTV[:, :-1].reshape(-1, logits_BTV.shape[-1]),
        labels_BT.reshape(-1),
        ignore_index=IGNORE,
    )


def lr_at(step: int, cfg: TestbedConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of sft_lr."""
    if step < cfg.sft_warmup_steps:
        return cfg.sft_lr * (step + 1) / cfg.sft_warmup_steps
    span = max(1, cfg.sft_steps - cfg.sft_warmup_steps)
    frac = (step - cfg.sft_warmup_steps) / span
    return cfg.sft_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def run_sft(
    model: Qwen3ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    cfg: TestbedConfig,
    *,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Train model in place for cfg.sft_steps; returns the loss of every step."""
    torch.manual_seed(cfg.seed)
    n = cfg.sft_steps * cfg.sft_batch_size
    examples = tokenize_examples(tokenizer, make_sft_texts(cfg, n, cfg.seed), cfg.enable_thinking)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.sft_lr, betas=(0.9, 0.98), weight_decay=cfg.sft_weight_decay
    )
    batches = length_bucketed_batches(examples, cfg.sft_batch_size, random.Random(cfg.seed))
    model.train()
    losses, t0 = [], time.perf_counter()
    for step, chunk in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = response_nll(model, collate_sft(chunk, tokenizer.pad_token_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log and (step % 25 == 0 or step == cfg.sft_steps - 1):
            log(
                f"sft step {step}/{cfg.sft_steps} loss {loss.item():.4f} "
                f"({time.perf_counter() - t0:.1f}s)"
            )
    model.eval()
    return losses
