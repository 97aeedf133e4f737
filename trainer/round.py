"""One on-policy training round: `train_round`.

Order of events: load checkpoint k (+ its trainer state) -> plan spans and build inputs -> old
log-probs (recomputed with the round's initial weights, or the engine's) -> one pass over the
rollouts in mini-batches of `mini_batch_size`, each ONE optimizer update accumulated over
micro-batches (sharded across processes) -> checkpoint k+1. The loss of every micro-batch is
divided by the whole mini-batch's token (or sequence) count, so the step does not depend on how it
is split. Log-probs are those of the distribution the rollouts were sampled from: softmax(logits/T)
at the rollouts' temperature T (engine log-probs under top-p / top-k truncation are refused).
"""

from __future__ import annotations

import logging
import time
import warnings
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from trace_rl.trainer.batch import Example, MicroBatch, build_examples, collate, to_bt
from trace_rl.trainer.checkpoint import (
    FULL_FQN,
    clean_tmp_dirs,
    load_trainer_state,
    restore_sharded,
    set_rng_state,
)
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.lean import LeanCausalLM, SpanGroup
from trace_rl.trainer.losses import clipped_pg_loss, grpo_advantages
from trace_rl.trainer.methods import LossInputs, Method, get_method
from trace_rl.trainer.metrics import Logger, StepStats, peak_memory_bytes, step_row
from trace_rl.trainer.old_logprobs import old_logprobs
from trace_rl.trainer.progress import progress_bar
from trace_rl.trainer.resident import Held, Resident, config_json, release
from trace_rl.trainer.round_io import Clock, load_progress, save_output, save_progress
from trace_rl.trainer.round_setup import (DTYPES, check_accelerator, continue_from, fingerprint,
                                          load_model, make_optimizer, rollout_temperature, shards)
from trace_rl.trainer.teacher import TeacherHandle
from trace_rl.trainer.lora_teacher import LoraTeacher

log = logging.getLogger("trace_rl.trainer.round")


@dataclass
class _Step:
    """What every micro-batch of the round shares."""

    cfg: TrainConfig
    method: Method
    wrapped: torch.nn.Module
    unwrapped: LeanCausalLM
    teacher: TeacherHandle
    acc: Any
    temperature: float


def _micro_step(r: _Step, mb: MicroBatch, lam: float, normaliser: float, stats: StepStats,
                boundary: bool, live_old: bool = False) -> None:
    cfg, acc, wrapped = r.cfg, r.acc, r.wrapped
    s = mb.student
    groups = []
    if mb.teacher is not None:
        t = mb.teacher
        t_hidden_SH = r.teacher.hidden(wrapped, input_ids_BL=t.input_ids_BL,
                                       attention_mask_BL=t.attention_mask_BL, pos_S=t.resp_pos_N)
        groups = [SpanGroup(d, s_idx, t_hidden_SH[t_sel]) for d, s_idx, t_sel in mb.span_dirs]
    t_weight = r.teacher.head_weight(r.unwrapped) if groups else None
    # One optimizer update per mini-batch under every backend: DDP / FSDP skip the gradient
    # all-reduce inside no_sync, and DeepSpeed (whose engine.step runs inside acc.backward when
    # sync_gradients is set) steps only at the boundary, the mini-batch's last micro-batch.
    acc.sync_gradients = boundary
    with nullcontext() if boundary else acc.no_sync(wrapped):
        out = wrapped(mode="policy", input_ids_BL=s.input_ids_BL,
                      attention_mask_BL=s.attention_mask_BL, resp_pos_N=s.resp_pos_N,
                      target_N=s.target_N, span_groups=groups, teacher_weight_VH=t_weight,
                      temperature=r.temperature)
        logp_BT = to_bt(out["logp_N"], mb.mask_BT)
        kl_BT = to_bt(out["kl_N"], mb.mask_BT)
        if live_old:
            mb.old_logp_BT = logp_BT.detach()
        inputs = LossInputs(logp_BT, mb.old_logp_BT, mb.adv_B, mb.train_mask_BT, mb.span_BT,
                            kl_BT, normaliser)
        loss, loss_metrics = r.method.loss(inputs, cfg, lam)
        # DDP averages gradients over processes; each process holds a share of one global sum
        acc.backward(loss * (mb.weight * acc.num_processes))
    acc.sync_gradients = True
    _, clipped_BT = clipped_pg_loss(logp_BT.detach(), mb.old_logp_BT, mb.adv_B,
                                    cfg.eps_low, cfg.eps_high)
    stats.add_micro(mb, loss_metrics, to_bt(out["entropy_N"], mb.mask_BT),
                    to_bt(out["kl_raw_N"], mb.mask_BT), clipped_BT, int(s.attention_mask_BL.sum()))


def _normaliser(cfg: TrainConfig, examples: list[Example], mini: np.ndarray) -> float:
    """The whole mini-batch's token (token_mean) or sequence count, whatever the micro-batch.
    Rollouts masked by `train.overlong: mask` are not counted: counting them would shrink every
    step by its own (varying) truncated share. At least 1, so an all-masked step adds zeros
    (and `_apply_update` then leaves the weights alone)."""
    kept = [examples[i] for i in mini if not examples[i].masked]
    if cfg.loss_agg == "token_mean":
        return float(max(1, sum(len(e.response_ids) for e in kept)))
    return float(max(1, len(kept)))


def _collate_micro(r: _Step, examples, idx: list[int], mini, old_logp, adv_all, pad_id,
                   with_teacher: bool) -> MicroBatch:
    weight = 1.0 if idx else 0.0
    idx = idx or [int(mini[0])]  # keeps DDP in step; contributes nothing
    return collate([examples[i] for i in idx],
                   [old_logp.get(i, torch.zeros(len(examples[i].response_ids))) for i in idx],
                   [adv_all[i] for i in idx], pad_id, with_teacher, weight, r.acc.device)


def _apply_update(r: _Step, optimizer, scheduler, trains: bool = True) -> tuple[float, float]:
    """Clip, step, zero; returns (pre-clip gradient norm, the learning rate used).

    A mini-batch that trains no token (`trains` False: every rollout in it masked by
    `train.overlong: mask`) does not step the optimizer: AdamW would still move every weight by
    its moments (about 2/3 of a real step) on no data. The step still counts (scheduler, global
    step, λ and teacher syncs go on as planned)."""
    max_norm = r.cfg.grad_clip if r.cfg.grad_clip else float("inf")
    grad_norm = float(r.acc.clip_grad_norm_(r.wrapped.parameters(), max_norm))
    lr = scheduler.get_last_lr()[0]
    if trains:
        optimizer.step()
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def train_round(
    cfg: TrainConfig,
    *,
    prompts: pa.Table,
    rollouts: pa.Table,
    verdicts: pa.Table,
    annotations: pa.Table | None,
    init_checkpoint: str,
    output_checkpoint: str,
    work_dir: str,
    round_index: int,
    accelerator: Any = None,
    progress: bool = True,
    resident: Resident | None = None,
    write_output: bool = True,
    save_state: bool = True,
    timings: dict[str, float] | None = None,
) -> list[dict]:
    """Train one round on the given tables; returns one metrics dict per optimizer step.

    With a `resident`, the round starts from the model and optimizer it holds when they are the
    state at `init_checkpoint` (else from disk), and leaves its own end state there for the next
    round. `write_output=False` (a replay) writes no checkpoint: the resident then stands for
    `output_checkpoint` as it already is on disk. `save_state=False` writes weights only.
    `timings`, when given, receives seconds spent on fixed costs: `model_load_s` (model and
    tokenizer from disk), `state_load_s`, `teacher_s` (teacher snapshots written and loaded),
    `checkpoint_save_s` (weights), `state_save_s` (optimizer state)."""
    from accelerate import Accelerator

    if accelerator is None and resident is not None and resident.held is not None:
        accelerator = resident.held.accelerator  # the process group the held state lives in
    acc = accelerator or Accelerator()
    check_accelerator(acc)
    if acc.is_main_process:
        for leftover in clean_tmp_dirs(output_checkpoint):
            log.warning("removed %s, left by an interrupted checkpoint save", leftover)
    # Weak references only: a held state that `take` rejects must be freed at once, not live on
    # beside this round's model (its master and both moments: 3 float32 copies).
    before = [weakref.ref(x) for x in (*acc._models, *acc._optimizers)]
    prior = [weakref.ref(x) for x in (resident.held.wrapped, resident.held.optimizer)] \
        if resident is not None and resident.held is not None else []
    try:
        return _train_round(cfg, prompts=prompts, rollouts=rollouts, verdicts=verdicts,
                            annotations=annotations, init_checkpoint=init_checkpoint,
                            output_checkpoint=output_checkpoint, work_dir=work_dir,
                            round_index=round_index, acc=acc, progress=progress,
                            resident=resident, write_output=write_output,
                            save_state=save_state, timings=timings)
    finally:
        # No model or optimizer outlives its round in the accelerator: what the round prepared
        # or took from the resident is released unless the resident holds it now.
        held = resident.held if resident is not None else None
        keep = (held.wrapped, held.optimizer) if held is not None else ()
        drop = [x for x in (*acc._models, *acc._optimizers) if not any(x is b() for b in before)]
        drop += [x for x in (ref() for ref in prior) if x is not None]
        release(acc, *[x for x in drop if not any(x is k for k in keep)])


def _train_round(cfg: TrainConfig, *, prompts, rollouts, verdicts, annotations, init_checkpoint,
                 output_checkpoint, work_dir, round_index, acc, progress, resident, write_output,
                 save_state, timings) -> list[dict]:
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + round_index)
    cfg_json = config_json(cfg)
    clock = Clock(timings)
    held = resident.take(init_checkpoint, cfg_json, acc) if resident is not None else None
    if held is not None:
        tokenizer, model = held.tokenizer, held.unwrapped
    else:
        with clock("model_load_s"):
            tokenizer, model = load_model(cfg, init_checkpoint)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = build_examples(cfg, tokenizer, prompts, rollouts, verdicts, annotations)
    temperature = rollout_temperature(cfg, examples)
    adv_all = grpo_advantages(torch.tensor([e.reward for e in examples], dtype=torch.float32), [e.group for e in examples],
                              cfg.adv_norm_std).tolist()
    fp = fingerprint(cfg, init_checkpoint, round_index, [e.rollout_id for e in examples])
    order = np.random.default_rng([cfg.seed, round_index]).permutation(len(examples))
    plan = shards(cfg, order, acc.process_index, acc.num_processes)

    # under FSDP only the main process reads the progress save's weights and moments
    saved = load_progress(work, fp, receives_shards=not acc.is_main_process)
    inherit = round_index > 0 or cfg.continue_trainer_state
    if held is not None:
        optimizer, scheduler, state, global_step = held.optimizer, held.scheduler, None, held.global_step
    else:
        optimizer, scheduler = make_optimizer(cfg, model)
        with clock("state_load_s"):
            # round k resumes round k-1's state (a continued run's round 0: any round's)
            expect = round_index - 1 if round_index > 0 else None
            # under FSDP only the main process reads the moments and master from the file
            # a progress save of this round holds all of it, newer: the state is not loaded
            state = load_trainer_state(init_checkpoint, expect, deep=acc.is_main_process,
                                       receives_shards=not acc.is_main_process) \
                if inherit and saved is None else None
            global_step = 0
        if state is None and saved is None and round_index > 0:
            raise RuntimeError(
                f"round {round_index} would start from {init_checkpoint}, which holds weights "
                "only: no trainer state (optimizer, scheduler, global step) there and none in "
                "memory, and training on would silently restart at step 0 (fresh Adam, the λ "
                "schedule back at its start). Run the train stage, which first replays the "
                "rounds since the last full trainer state, or rerun from that round")
    if state is not None:
        if state.get("state_layout") != FULL_FQN:  # FSDP saves are restored after prepare
            # popped, not read: the file's copies (a second float32 master, and the moments
            # once they move to the device) must not live on beside the model's for the round
            optimizer.load_state_dict(state.pop("optimizer"))
            if "master" in state:  # float32 master weights (the checkpoint's are rounded)
                model.load_state_dict(state.pop("master"))
        scheduler.load_state_dict(state["scheduler"])
        global_step = state["global_step"]
    model.to(acc.device)
    my_idx = sorted({i for step in plan for micro in step for i in micro})
    # The first step of a fresh round runs on the round's initial weights, so its old log-probs
    # are its own forward's, detached: recomputing them would cost a whole extra forward pass
    # (with one step per round, the only recomputation there is).
    live_first = cfg.old_logprobs == "recompute" and saved is None and bool(plan)
    live = {i for micro in plan[0] for i in micro} if live_first else set()
    handle = LoraTeacher if cfg.lora is not None else TeacherHandle  # LoRA: adapter snapshots
    teacher = handle(cfg.teacher_sync_every, work, init_checkpoint, DTYPES[cfg.dtype],
                            cfg.logprob_chunk, inherit=inherit)
    if held is not None:
        wrapped = held.wrapped
    else:
        wrapped, optimizer = acc.prepare(model, optimizer)
    # sharded states can only be scattered into the prepared (sharded) model and optimizer
    if state is not None and state.get("state_layout") == FULL_FQN:
        with_model = "master" in state
        restore_sharded(wrapped, optimizer, {"optimizer": state.pop("optimizer"),
                                             "model": state.pop("master", None)},
                        with_model=with_model)
    # Old log-probs come from the prepared model (under FSDP the only place where every process
    # holds real weights) at the round's initial weights: before a progress save is restored.
    old_logp = old_logprobs(cfg, wrapped, examples, my_idx, pad_id, acc, work, fp, temperature,
                             live)
    cursor, rows = 0, []
    if saved is not None:
        # popped: the save's float32 weights must not live on beside the model's for the round
        weights, moments = saved.pop("model"), saved.pop("optimizer")
        if saved.get("state_layout") == FULL_FQN:
            restore_sharded(wrapped, optimizer, {"model": weights, "optimizer": moments},
                            with_model=True)
        else:
            acc.unwrap_model(wrapped).load_state_dict(weights)
            optimizer.load_state_dict(moments)
        del weights, moments
        scheduler.load_state_dict(saved["scheduler"])
        global_step, cursor, rows = saved["global_step"], saved["cursor"], saved["rows"]
        teacher.restore(saved["teacher"])
        set_rng_state(saved["rng"])
    elif state is not None and round_index == 0:
        continue_from(cfg, optimizer, scheduler, init_checkpoint, global_step)
    r = _Step(cfg, get_method(cfg.method), wrapped, acc.unwrap_model(wrapped), teacher, acc,
              temperature)
    logger = Logger(acc, str(work), cfg.trackers, f"round-{round_index:04d}")
    bar = progress_bar(len(plan), cursor, enabled=progress and acc.is_main_process,
                       round_index=round_index)

    try:
        for step_i in range(cursor, len(plan)):
            t0 = time.perf_counter()
            lam = r.method.kl_weight(cfg, global_step)
            with_teacher = r.method.needs_teacher(cfg, lam)
            if with_teacher:
                with clock("teacher_s"):
                    teacher.ensure(global_step, r.unwrapped, acc)
            else:
                teacher.release()  # λ only decreases: from here on this round needs none
            mini = order[step_i * cfg.mini_batch_size : (step_i + 1) * cfg.mini_batch_size]
            stats = StepStats()
            for j, idx in enumerate(plan[step_i]):
                mb = _collate_micro(r, examples, idx, mini, old_logp, adv_all, pad_id, with_teacher)
                _micro_step(r, mb, lam, _normaliser(cfg, examples, mini), stats,
                            j == len(plan[step_i]) - 1, live_old=live_first and step_i == 0)
            grad_norm, lr = _apply_update(r, optimizer, scheduler,
                                          trains=not all(examples[i].masked for i in mini))
            sums = stats.reduce(acc)
            elapsed = time.perf_counter() - t0
            row = step_row(sums, {"step": global_step, "round": round_index, "kl_weight": lam,
                                  "grad_norm": grad_norm, "lr": lr,
                                  "tokens_per_s": sums["all_tokens"] / max(elapsed, 1e-9),
                                  "peak_mem_bytes": peak_memory_bytes(),
                                  "teacher/step": teacher.source_step if with_teacher else None})
            rows.append(row)
            logger.log(row, global_step)
            global_step += 1
            # the progress line's reward: the mean reward of this step's rollouts
            bar.update({**row, "tokens": sums["all_tokens"],
                        "reward": float(np.mean([examples[i].reward for i in mini]))})
            if cfg.save_every and (step_i + 1) % cfg.save_every == 0 and step_i + 1 < len(plan):
                save_progress(acc, r.unwrapped, optimizer, scheduler, teacher, work, fp,
                               global_step, step_i + 1, rows)
    finally:
        # a failed step too: the trackers end their run here (a trainer process ends by
        # os._exit, so their own atexit hooks never run)
        bar.close()
        logger.close()
    keep_teacher = r.method.needs_teacher(cfg, r.method.kl_weight(cfg, global_step))
    teacher.release()
    if write_output:
        save_output(acc, r.unwrapped, tokenizer, optimizer, scheduler, output_checkpoint,
                     global_step, round_index, teacher if keep_teacher else None, save_state, clock)
    if resident is not None:
        resident.keep(Held(tokenizer, wrapped, r.unwrapped, optimizer, scheduler, global_step,
                           str(output_checkpoint), round_index, cfg_json, acc,
                           state_on_disk=write_output and save_state,
                           start=str(init_checkpoint)))
    return rows
