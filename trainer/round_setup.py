"""What a round sets up before its first step (trainer/round.py): the tokenizer and policy with
its float32 master weights, the optimizer and schedule, the rollouts' sampling temperature, each
process's micro-batches, the round's fingerprint, and the checks on the accelerator."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from typing import Any

import numpy as np
import torch
from trace_rl.trainer import lora
from trace_rl.trainer.batch import Example
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.lean import KLSpec, LeanCausalLM

log = logging.getLogger("trace_rl.trainer.round")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fingerprint(cfg: TrainConfig, init_checkpoint: str, round_index: int, ids: list[str]) -> str:
    blob = json.dumps([cfg.model_dump(mode="json"), str(init_checkpoint), round_index, ids])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_model(cfg: TrainConfig, path: str):
    """Tokenizer and policy. The weights are loaded in float32 whatever `train.dtype` says: they
    are the master copy AdamW steps (its moments are float32 too); `train.dtype` is the compute
    dtype of the forwards (autocast, LeanCausalLM). Stepping bf16 weights directly loses every
    update below half a bf16 ulp: at lr 1e-6 most weights never move (benchmarks/bf16_update.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if cfg.lora is not None:  # frozen base in the compute dtype, float32 adapters (trainer/lora.py)
        hf = lora.load_policy(cfg.lora, path, DTYPES[cfg.dtype])
    else:
        lora.refuse_adapter_without_lora(path)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if cfg.gradient_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.config.use_cache = False
    # from_pretrained returns eval mode, and transformers checkpoints layers only while training
    hf.train()
    return tokenizer, LeanCausalLM(hf, chunk=cfg.logprob_chunk, kl_spec=KLSpec.of(cfg),
                                   compute_dtype=DTYPES[cfg.dtype])


def rollout_temperature(cfg: TrainConfig, examples: list[Example]) -> float:
    """The one sampling temperature of the round's rollouts (1.0 when none is recorded).

    The trainer scores log-probs at this temperature so that π_old and π_θ are the distribution
    the engine sampled from. Engine log-probs of truncated sampling (top-p / top-k) are of a
    renormalised distribution the trainer does not compute, so that combination is refused."""
    temps = sorted({e.temperature for e in examples})
    if len(temps) > 1:
        raise ValueError(f"the round's rollouts were sampled at several temperatures {temps}; "
                         "train on rollouts of one sampling temperature")
    if cfg.old_logprobs == "engine" and any(e.truncated for e in examples):
        raise ValueError("old_logprobs: engine needs rollouts sampled without top-p / top-k "
                         "truncation (the engine's log-probs are of the truncated distribution, "
                         "the trainer's of the full one); set train.old_logprobs: recompute, or "
                         "rollout.top_p: 1.0 and rollout.top_k: -1")
    return temps[0] if temps else 1.0


def shards(cfg: TrainConfig, order: np.ndarray, rank: int, world: int) -> list[list[list[int]]]:
    """Per optimizer step, this process's micro-batches (lists of example indices). Every process
    gets the same number of micro-batches; an empty one is marked by [] and padded by the caller."""
    steps = []
    for start in range(0, len(order), cfg.mini_batch_size):
        mini = order[start : start + cfg.mini_batch_size].tolist()
        mine = mini[rank::world]
        n_micro = math.ceil(math.ceil(len(mini) / world) / cfg.micro_batch_size)
        steps.append([mine[i * cfg.micro_batch_size : (i + 1) * cfg.micro_batch_size]
                      for i in range(n_micro)])
    return steps


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module):
    # the trainable parameters only: all of them, or the LoRA adapters over a frozen base
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]),
                            weight_decay=cfg.weight_decay)
    warm = cfg.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 1.0 if warm == 0 else min(1.0, (k + 1) / warm))
    return opt, sched


def continue_from(cfg: TrainConfig, optimizer, scheduler, path: str, global_step: int) -> None:
    """Round 0 under `train.continue_trainer_state`: keep the restored moments, scheduler position
    and global step, but train with this config's lr, betas and weight decay; say what it did."""
    warm = cfg.warmup_steps
    factor = 1.0 if warm == 0 else min(1.0, (scheduler.last_epoch + 1) / warm)
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group.update(initial_lr=cfg.lr, lr=cfg.lr * factor, betas=tuple(cfg.betas),
                     weight_decay=cfg.weight_decay)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    log.warning("train.continue_trainer_state: round 0 continues the trainer state in %s: "
                "global step %d (λ schedule and teacher syncs from there), AdamW moments, "
                "scheduler position, teacher snapshot if any; lr %.3g, betas and weight decay "
                "are this config's", path, global_step, cfg.lr)


def check_accelerator(acc: Any) -> None:
    if acc.gradient_accumulation_steps != 1:
        raise ValueError(
            f"the accelerator has gradient_accumulation_steps={acc.gradient_accumulation_steps}; "
            "train_round accumulates a mini-batch's micro-batches itself (train.mini_batch_size / "
            "micro_batch_size): set gradient_accumulation_steps: 1 in the accelerate config")
