"""Memory-lean policy forward: never materialises [B, T, V] logits for whole sequences.

The transformer body gives final hidden states [B, L, H]. Sampled-token log-probs and entropy go
through lm_head in chunks of `chunk` tokens, each chunk under activation checkpointing so that its
[chunk, V] logits are freed after the forward and recomputed in the backward: peak extra memory is
one chunk's logits, whatever the sequence length. Full-vocabulary KL is computed the same way, but
only at the distilled (span) positions, from student and teacher hidden states gathered there.

`LeanCausalLM` wraps a Hugging Face causal LM so that DDP / FSDP (accelerate) wrap one module whose
forward does all of this; `dense_policy_outputs` is the naive full-logits reference used by tests
and the memory benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trace_rl.trainer.losses import token_kl_and_raw

Tensor = torch.Tensor


@dataclass
class KLSpec:
    """How the divergence is computed at span positions: `bound` with its constant `c` (the
    per-token cap of token_scale, the per-term clip of per_term_clip; see trainer/losses.py)."""

    bound: str = "token_scale"
    c: float = 1.0
    support: str = "full"
    topk: int = 20
    beta: float = 0.5

    @classmethod
    def of(cls, cfg) -> KLSpec:
        """From a TrainConfig."""
        c = cfg.kl_term_clip if cfg.kl_bound == "per_term_clip" else cfg.kl_token_cap
        return cls(cfg.kl_bound, c, cfg.kl_support, cfg.topk, cfg.self_opd.jsd_beta)


@dataclass
class SpanGroup:
    """Span tokens sharing one divergence: indices into the flat response tokens [S] and the
    teacher's final hidden states there [S, H] (no grad)."""

    direction: str
    index_S: Tensor
    teacher_hidden_SH: Tensor


def _logp_entropy_chunk(h_CH: Tensor, weight_VH: Tensor, target_C: Tensor,
                        temperature: float) -> tuple[Tensor, Tensor]:
    logp_CV = ((h_CH @ weight_VH.t()).float() / temperature).log_softmax(-1)
    logp_C = logp_CV.gather(-1, target_C[:, None]).squeeze(-1)
    with torch.no_grad():  # entropy is a diagnostic: no gradient through it
        entropy_C = -(logp_CV.exp() * logp_CV).sum(-1)
    return logp_C, entropy_C


def chunked_token_logprobs(
    hidden_NH: Tensor, weight_VH: Tensor, target_N: Tensor, chunk: int, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Log-prob of each target token [N] (with grad) and entropy [N] (no grad), chunk by chunk,
    under softmax(logits / temperature): the distribution the rollout engine sampled from."""
    logps, entropies = [], []
    use_ckpt = torch.is_grad_enabled() and (hidden_NH.requires_grad or weight_VH.requires_grad)
    for start in range(0, hidden_NH.shape[0], chunk):
        args = (hidden_NH[start : start + chunk], weight_VH, target_N[start : start + chunk],
                temperature)
        if use_ckpt:
            logp_C, ent_C = checkpoint(_logp_entropy_chunk, *args, use_reentrant=False)
        else:
            logp_C, ent_C = _logp_entropy_chunk(*args)
        logps.append(logp_C)
        entropies.append(ent_C)
    if not logps:
        empty = hidden_NH.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(entropies)


def _kl_chunk(
    s_h_CH: Tensor, s_w_VH: Tensor, t_h_CH: Tensor, t_w_VH: Tensor, direction: str, spec: KLSpec
) -> tuple[Tensor, Tensor]:
    s_logits_CV = s_h_CH @ s_w_VH.t()
    with torch.no_grad():
        t_logits_CV = t_h_CH @ t_w_VH.t()
    return token_kl_and_raw(
        s_logits_CV, t_logits_CV, direction, bound=spec.bound, c=spec.c,
        beta=spec.beta, support=spec.support, topk=spec.topk,
    )


def chunked_span_kl(
    s_hidden_SH: Tensor,
    s_weight_VH: Tensor,
    t_hidden_SH: Tensor,
    t_weight_VH: Tensor,
    direction: str,
    spec: KLSpec,
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """Bounded divergence [S] (with grad) and the unbounded one [S] (detached, for metrics) at
    span positions, chunked and checkpointed. The bound acts per token, so chunking is exact."""
    out, raw = [], []
    t_weight_VH = t_weight_VH.detach()
    for start in range(0, s_hidden_SH.shape[0], chunk):
        sl = slice(start, start + chunk)
        args = (s_hidden_SH[sl], s_weight_VH, t_hidden_SH[sl].detach(), t_weight_VH, direction, spec)
        if torch.is_grad_enabled():
            kl_C, raw_C = checkpoint(_kl_chunk, *args, use_reentrant=False)
        else:
            kl_C, raw_C = _kl_chunk(*args)
        out.append(kl_C)
        raw.append(raw_C)
    if not out:
        empty = s_hidden_SH.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(out), torch.cat(raw)


def _body_and_head(hf_model: Any) -> tuple[Any, Any]:  # a transformers PreTrainedModel
    body = getattr(hf_model, hf_model.base_model_prefix)
    return body, hf_model.get_output_embeddings()


class LeanCausalLM(nn.Module):
    """A causal LM whose forward returns per-token quantities instead of logits.

    mode="policy": input_ids_BL, attention_mask_BL, resp_pos_N (flat positions into B*L whose
    hidden state predicts a response token), target_N, span_groups, teacher_weight_VH,
    temperature (the rollout's; log-probs and entropy are of softmax(logits / T), the divergence
    of the untempered distributions) -> {"logp_N", "entropy_N", "kl_N", "kl_raw_N"} (kl_N: the
    bounded divergence for the loss, kl_raw_N: unbounded and detached; both 0 off spans).
    mode="hidden": input_ids_BL, attention_mask_BL, pos_S -> final hidden states [S, H].
    """

    def __init__(self, hf_model: nn.Module, chunk: int = 1024, kl_spec: KLSpec | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.hf = hf_model
        self.chunk = chunk
        self.kl_spec = kl_spec or KLSpec()
        # Mixed precision: parameters (the master weights the optimizer steps) stay in their own
        # dtype, float32 in the trainer; forwards run under autocast in `compute_dtype` (bf16 /
        # fp16), so matmuls are low-precision while small updates still land on fp32 weights.
        self.compute_dtype = compute_dtype

    def head_weight(self) -> Tensor:
        return _body_and_head(self.hf)[1].weight

    def hidden(self, input_ids_BL: Tensor, attention_mask_BL: Tensor) -> Tensor:
        body, _ = _body_and_head(self.hf)
        out = body(input_ids=input_ids_BL, attention_mask=attention_mask_BL, use_cache=False)
        return out.last_hidden_state

    def forward(self, mode: str = "policy", **kw) -> dict[str, Tensor] | Tensor:
        dtype = self.compute_dtype
        if dtype is None or dtype == torch.float32:
            return self._forward(mode, **kw)
        with torch.autocast(kw["input_ids_BL"].device.type, dtype=dtype):
            return self._forward(mode, **kw)

    def _forward(self, mode: str, **kw) -> dict[str, Tensor] | Tensor:
        if mode == "hidden":
            h_BLH = self.hidden(kw["input_ids_BL"], kw["attention_mask_BL"])
            return h_BLH.flatten(0, 1)[kw["pos_S"]]
        if mode != "policy":
            raise ValueError(f"unknown LeanCausalLM mode {mode!r}; valid: policy, hidden")
        return self._policy(**kw)

    def _policy(
        self,
        input_ids_BL: Tensor,
        attention_mask_BL: Tensor,
        resp_pos_N: Tensor,
        target_N: Tensor,
        span_groups: Sequence[SpanGroup] = (),
        teacher_weight_VH: Tensor | None = None,
        temperature: float = 1.0,
    ) -> dict[str, Tensor]:
        h_NH = self.hidden(input_ids_BL, attention_mask_BL).flatten(0, 1)[resp_pos_N]
        weight_VH = self.head_weight()
        logp_N, entropy_N = chunked_token_logprobs(h_NH, weight_VH, target_N, self.chunk,
                                                   temperature)
        kl_N = torch.zeros_like(logp_N)
        kl_raw_N = torch.zeros_like(logp_N).detach()
        for group in span_groups:
            if group.index_S.numel() == 0:
                continue
            assert teacher_weight_VH is not None, "span groups need the teacher's head weight"
            kl_S, raw_S = chunked_span_kl(
                h_NH[group.index_S], weight_VH, group.teacher_hidden_SH, teacher_weight_VH,
                group.direction, self.kl_spec, self.chunk,
            )
            kl_N = kl_N.index_put((group.index_S,), kl_S)
            kl_raw_N = kl_raw_N.index_put((group.index_S,), raw_S)
        return {"logp_N": logp_N, "entropy_N": entropy_N, "kl_N": kl_N, "kl_raw_N": kl_raw_N}


def dense_policy_outputs(
    hf_model: Any,
    teacher_model: Any,
    batch: dict,
    spec: KLSpec,
    temperature: float = 1.0,
) -> dict[str, Tensor]:
    """Naive reference: full [B, L, V] logits of student (and teacher), then gather.

    `batch` holds the same keys as the lean policy forward plus, for each span group,
    teacher_input_ids_BL / teacher_attention_mask_BL and teacher_pos_S (flat teacher positions).
    """
    logits_NV = hf_model(
        input_ids=batch["input_ids_BL"], attention_mask=batch["attention_mask_BL"], use_cache=False
    ).logits.flatten(0, 1)[batch["resp_pos_N"]].float()
    logp_NV = (logits_NV / temperature).log_softmax(-1)
    logp_N = logp_NV.gather(-1, batch["target_N"][:, None]).squeeze(-1)
    entropy_N = -(logp_NV.exp() * logp_NV).sum(-1).detach()
    kl_N = torch.zeros_like(logp_N)
    kl_raw_N = torch.zeros_like(logp_N).detach()
    for direction, index_S, t_ids, t_mask, t_pos in batch.get("dense_span_groups", []):
        with torch.no_grad():
            t_logits = teacher_model(input_ids=t_ids, attention_mask=t_mask, use_cache=False).logits
            t_logits_SV = t_logits.flatten(0, 1)[t_pos].float()
        kl_S, raw_S = token_kl_and_raw(
            logits_NV[index_S], t_logits_SV, direction, bound=spec.bound, c=spec.c,
            beta=spec.beta, support=spec.support, topk=spec.topk,
        )
        kl_N = kl_N.index_put((index_S,), kl_S)
        kl_raw_N = kl_raw_N.index_put((index_S,), raw_S)
    return {"logp_N": logp_N, "entropy_N": entropy_N, "kl_N": kl_N, "kl_raw_N": kl_raw_N}
