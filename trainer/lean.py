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

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trace_rl.trainer.losses import token_kl

Tensor = torch.Tensor


@dataclass
class KLSpec:
    """How the divergence is computed at span positions."""

    term_clip: float | None = 0.05
    support: str = "full"
    topk: int = 20
    beta: float = 0.5


@dataclass
class SpanGroup:
    """Span tokens sharing one divergence: indices into the flat response tokens [S] and the
    teacher's final hidden states there [S, H] (no grad)."""

    direction: str
    index_S: Tensor
    teacher_hidden_SH: Tensor


def _logp_entropy_chunk(h_CH: Tensor, weight_VH: Tensor, target_C: Tensor) -> tuple[Tensor, Tensor]:
    logp_CV = (h_CH @ weight_VH.t()).float().log_softmax(-1)
    logp_C = logp_CV.gather(-1, target_C[:, None]).squeeze(-1)
    with torch.no_grad():  # entropy is a diagnostic: no gradient through it
        entropy_C = -(logp_CV.exp() * logp_CV).sum(-1)
    return logp_C, entropy_C


def chunked_token_logprobs(
    hidden_NH: Tensor, weight_VH: Tensor, target_N: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """Log-prob of each target token [N] (with grad) and entropy [N] (no grad), chunk by chunk."""
    logps, entropies = [], []
    use_ckpt = torch.is_grad_enabled() and (hidden_NH.requires_grad or weight_VH.requires_grad)
    for start in range(0, hidden_NH.shape[0], chunk):
        args = (hidden_NH[start : start + chunk], weight_VH, target_N[start : start + chunk])
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
) -> Tensor:
    s_logits_CV = s_h_CH @ s_w_VH.t()
    with torch.no_grad():
        t_logits_CV = t_h_CH @ t_w_VH.t()
    return token_kl(
        s_logits_CV, t_logits_CV, direction, spec.term_clip,
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
) -> Tensor:
    """Full-vocabulary divergence [S] at span positions, chunked and checkpointed."""
    out = []
    t_weight_VH = t_weight_VH.detach()
    for start in range(0, s_hidden_SH.shape[0], chunk):
        sl = slice(start, start + chunk)
        args = (s_hidden_SH[sl], s_weight_VH, t_hidden_SH[sl].detach(), t_weight_VH, direction, spec)
        if torch.is_grad_enabled():
            out.append(checkpoint(_kl_chunk, *args, use_reentrant=False))
        else:
            out.append(_kl_chunk(*args))
    return torch.cat(out) if out else s_hidden_SH.new_zeros(0, dtype=torch.float32)


def _body_and_head(hf_model: nn.Module) -> tuple[nn.Module, nn.Module]:
    body = getattr(hf_model, hf_model.base_model_prefix)
    return body, hf_model.get_output_embeddings()


class LeanCausalLM(nn.Module):
    """A causal LM whose forward returns per-token quantities instead of logits.

    mode="policy": input_ids_BL, attention_mask_BL, resp_pos_N (flat positions into B*L whose
    hidden state predicts a response token), target_N, span_groups, teacher_weight_VH ->
    {"logp_N", "entropy_N", "kl_N"} (kl_N is 0 off spans).
    mode="hidden": input_ids_BL, attention_mask_BL, pos_S -> final hidden states [S, H].
    """

    def __init__(self, hf_model: nn.Module, chunk: int = 1024, kl_spec: KLSpec | None = None):
        super().__init__()
        self.hf = hf_model
        self.chunk = chunk
        self.kl_spec = kl_spec or KLSpec()

    def head_weight(self) -> Tensor:
        return _body_and_head(self.hf)[1].weight

    def hidden(self, input_ids_BL: Tensor, attention_mask_BL: Tensor) -> Tensor:
        body, _ = _body_and_head(self.hf)
        out = body(input_ids=input_ids_BL, attention_mask=attention_mask_BL, use_cache=False)
        return out.last_hidden_state

    def forward(self, mode: str = "policy", **kw) -> dict[str, Tensor] | Tensor:
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
        span_groups: list[SpanGroup] = (),
        teacher_weight_VH: Tensor | None = None,
    ) -> dict[str, Tensor]:
        h_NH = self.hidden(input_ids_BL, attention_mask_BL).flatten(0, 1)[resp_pos_N]
        weight_VH = self.head_weight()
        logp_N, entropy_N = chunked_token_logprobs(h_NH, weight_VH, target_N, self.chunk)
        kl_N = torch.zeros_like(logp_N)
        for group in span_groups:
            if group.index_S.numel() == 0:
                continue
            kl_S = chunked_span_kl(
                h_NH[group.index_S], weight_VH, group.teacher_hidden_SH, teacher_weight_VH,
                group.direction, self.kl_spec, self.chunk,
            )
            kl_N = kl_N.index_put((group.index_S,), kl_S)
        return {"logp_N": logp_N, "entropy_N": entropy_N, "kl_N": kl_N}


def dense_policy_outputs(
    hf_model: nn.Module,
    teacher_model: nn.Module | None,
    batch: dict,
    spec: KLSpec,
) -> dict[str, Tensor]:
    """Naive reference: full [B, L, V] logits of student (and teacher), then gather.

    `batch` holds the same keys as the lean policy forward plus, for each span group,
    teacher_input_ids_BL / teacher_attention_mask_BL and teacher_pos_S (flat teacher positions).
    """
    logits_NV = hf_model(
        input_ids=batch["input_ids_BL"], attention_mask=batch["attention_mask_BL"], use_cache=False
    ).logits.flatten(0, 1)[batch["resp_pos_N"]].float()
    logp_NV = logits_NV.log_softmax(-1)
    logp_N = logp_NV.gather(-1, batch["target_N"][:, None]).squeeze(-1)
    entropy_N = -(logp_NV.exp() * logp_NV).sum(-1).detach()
    kl_N = torch.zeros_like(logp_N)
    for direction, index_S, t_ids, t_mask, t_pos in batch.get("dense_span_groups", []):
        with torch.no_grad():
            t_logits = teacher_model(input_ids=t_ids, attention_mask=t_mask, use_cache=False).logits
            t_logits_SV = t_logits.flatten(0, 1)[t_pos].float()
        kl_S = token_kl(
            logits_NV[index_S], t_logits_SV, direction, spec.term_clip,
            beta=spec.beta, support=spec.support, topk=spec.topk,
        )
        kl_N = kl_N.index_put((index_S,), kl_S)
    return {"logp_N": logp_N, "entropy_N": entropy_N, "kl_N": kl_N}
