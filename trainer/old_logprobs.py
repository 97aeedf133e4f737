"""Old log-probs of a round's rollouts (π_old in the clipped ratio): the engine's, or recomputed by
the trainer's prepared model at the round's initial weights and cached per process in the round's
work dir (a resumed round reads them back instead of scoring again)."""

from __future__ import annotations

from pathlib import Path

import torch
from trace_rl.trainer.batch import Example, collate
from trace_rl.trainer.checkpoint import atomic_torch_save
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.teacher import eval_mode


@torch.no_grad()
def _recompute_old_logprobs(model, examples: list[Example], idx: list[int], cfg: TrainConfig,
                            pad_id: int, acc, temperature: float) -> dict[int, torch.Tensor]:
    """Scoring forwards of the prepared (possibly sharded) model. Under several processes every
    process runs as many forwards as the busiest one (padding with a repeat of one of its
    examples whose output is dropped): sharded and DDP forwards are collective."""
    chunks = [idx[s : s + cfg.micro_batch_size] for s in range(0, len(idx), cfg.micro_batch_size)]
    n = len(chunks)
    if acc.num_processes > 1:
        n = int(acc.gather(torch.tensor([n], device=acc.device)).max())
    filler = [idx[0] if idx else 0]
    out = {}
    with eval_mode(model):
        for j in range(n):
            chunk = chunks[j] if j < len(chunks) else filler
            sub = [examples[i] for i in chunk]
            mb = collate(sub, [torch.zeros(len(e.response_ids)) for e in sub], [0.0] * len(sub),
                         pad_id, with_teacher=False, device=acc.device)
            s = mb.student
            logp_N = model(mode="policy", input_ids_BL=s.input_ids_BL,
                           attention_mask_BL=s.attention_mask_BL, resp_pos_N=s.resp_pos_N,
                           target_N=s.target_N, temperature=temperature)["logp_N"].float().cpu()
            if j >= len(chunks):
                continue
            for i, piece in zip(chunk, logp_N.split([len(e.response_ids) for e in sub])):
                out[i] = piece
    return out


def old_logprobs(cfg, model, examples, my_idx, pad_id, acc, work_dir: Path, fp: str,
                  temperature: float, live: frozenset[int] | set[int] = frozenset()):
    """Old log-probs of this process's examples, from the prepared model at the round's initial
    weights; those in `live` are left out (the caller uses the detached log-probs of the step's
    own forward for them). Collective when recomputed: every process calls it."""
    if cfg.old_logprobs == "engine":
        for i in my_idx:
            if len(examples[i].engine_logprobs) != len(examples[i].response_ids):
                raise ValueError(f"rollout {examples[i].rollout_id} lacks engine log-probs; "
                                 "set old_logprobs: recompute")
        return {i: torch.tensor(examples[i].engine_logprobs, dtype=torch.float32) for i in my_idx}
    f = work_dir / f"old_logprobs-rank{acc.process_index}.pt"
    cached = torch.load(f, weights_only=False) if f.exists() else None
    hit = cached is not None and cached["fingerprint"] == fp
    if acc.num_processes > 1:  # recompute on every process unless every process has its own
        hit = bool(acc.gather(torch.tensor([int(hit)], device=acc.device)).min())
    if hit:
        assert cached is not None
        return cached["logp"]
    logp = _recompute_old_logprobs(model, examples, [i for i in my_idx if i not in live], cfg,
                                   pad_id, acc, temperature)
    atomic_torch_save({"fingerprint": fp, "logp": logp}, f)
    return logp
