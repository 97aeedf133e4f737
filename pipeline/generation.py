"""Sampling with transformers `generate`, recording each sampled token's log-prob: the one
generation loop, used by the `hf` rollout engine and the testbed's accuracy.

Log-probs: the warpers (temperature, top-k, top-p) run inside one logits processor of ours, the
last in the chain, so the distribution it sees is exactly the one `generate` samples from. At each
step it gathers the log-prob of the token sampled at the previous step, so memory stays one
[B, V] slice instead of the [T, B, V] stack that `output_scores` would keep.

Sampling: the same processor also draws the next token (inverse CDF: one uniform per row against
the cumulative distribution) and hands `generate`, run greedily, scores where only that token is
finite. On CPU `torch.multinomial` over [256, 4096] costs ~55 ms a step (a third of a 128-step
generation); the inverse CDF draws from exactly the same distribution in ~3 ms. Temperature 0 is
greedy decoding (log-probs then under the unwarped distribution).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def build_warpers(temperature: float, top_k: int, top_p: float) -> list[LogitsProcessor]:
    """Temperature, then top-k, then top-p: the order of both transformers and vLLM (none for
    greedy decoding, temperature 0)."""
    warpers: list[LogitsProcessor] = []
    if temperature == 0:
        return warpers
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    return warpers


def sample_inverse_cdf(logp_BV: torch.Tensor) -> torch.Tensor:
    """One token id per row [B] drawn from exp(logp_BV), by the global torch RNG.

    `right=True` returns the first index whose cumulative mass exceeds the uniform draw, so a
    token of zero probability (masked by top-k / top-p) is never chosen; float64 keeps the
    cumulative sum's rounding far below any probability that matters.
    """
    cdf_BV = logp_BV.double().exp().cumsum(-1)
    u_B1 = torch.rand(cdf_BV.shape[0], 1, dtype=torch.float64, device=cdf_BV.device)
    ids_B1 = torch.searchsorted(cdf_BV, u_B1 * cdf_BV[:, -1:], right=True)
    return ids_B1.clamp_(max=cdf_BV.shape[1] - 1).squeeze(1)


class SampledLogprobRecorder(LogitsProcessor):
    """Applies the warpers, samples the next token and records log p(sampled token) under the
    warped distribution. Returns scores that are -inf except at the sampled token, for a greedy
    `generate` to pick."""

    def __init__(self, warpers: list[LogitsProcessor], greedy: bool = False):
        self.warpers, self.greedy = warpers, greedy
        self.prev_logp_BV: torch.Tensor | None = None
        self.logps_T: list[torch.Tensor] = []

    def __call__(self, input_ids_BL: torch.LongTensor, scores_BV: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores_BV = warper(input_ids_BL, scores_BV)
        if self.prev_logp_BV is not None:
            # input_ids ends with the token drawn from the previous step's distribution.
            self.logps_T.append(self.prev_logp_BV.gather(1, input_ids_BL[:, -1:]).squeeze(1))
        self.prev_logp_BV = torch.log_softmax(scores_BV.float(), dim=-1)
        next_B = self.prev_logp_BV.argmax(-1) if self.greedy else sample_inverse_cdf(self.prev_logp_BV)
        onehot_BV = torch.full_like(scores_BV, float("-inf"))
        return onehot_BV.scatter_(1, next_B[:, None], 0.0)

    def finish(self, last_tokens_B: torch.Tensor) -> torch.Tensor:
        """Log-probs [B, T] of the generated tokens; `last_tokens_B` is the final column."""
        if self.prev_logp_BV is None:
            raise RuntimeError("generate never called the logits processor")
        self.logps_T.append(self.prev_logp_BV.gather(1, last_tokens_B[:, None]).squeeze(1))
        return torch.stack(self.logps_T, dim=1)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, P] and attention mask [B, P] (decoder-only models generate rightwards)."""
    width = max(len(p) for p in prompts)
    ids_BP = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask_BP = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids_BP[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask_BP[i, width - len(p) :] = 1
    return ids_BP, mask_BP


def cut_at_stop(
    gen_T: list[int], logp_T: list[float], stop_ids: set[int], max_tokens: int
) -> tuple[list[int], list[float], str]:
    """Keep ids up to and including the first stop token; drop the padding generate adds after it."""
    for t, tok in enumerate(gen_T):
        if tok in stop_ids:
            return gen_T[: t + 1], logp_T[: t + 1], "stop"
    if len(gen_T) < max_tokens:
        raise AssertionError(f"{len(gen_T)} tokens without a stop token and below max_tokens")
    return gen_T, logp_T, "length"


class StepHook(LogitsProcessor):
    """Calls `on_step(generated ids so far [B, t])` at every decoding step and leaves the scores
    alone: a view into one `generate` call (progress within a batch)."""

    def __init__(self, prompt_len: int, on_step: Callable[[torch.Tensor], None]):
        self.prompt_len, self.on_step = prompt_len, on_step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.on_step(input_ids[:, self.prompt_len:])
        return scores


def sample_batch(
    model: Any,
    prompts: list[list[int]],
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    seed: int,
    device: str = "cpu",
    num_threads: int | None = None,
    on_step: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated ids [B, T] and their sampling log-probs [B, T] for prompt ids (left-padded
    here); rows run on past their stop token with padding (see `cut_at_stop`). Seeded by `seed`
    alone, whatever ran before in the process. `on_step` sees the ids generated so far at every
    step (StepHook)."""
    ids_BP, mask_BP = left_pad(prompts, pad_id)
    recorder = SampledLogprobRecorder(build_warpers(temperature, top_k, top_p), greedy=temperature == 0)
    # Greedy over the recorder's one-hot scores: the recorder has already sampled.
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                               pad_token_id=pad_id)
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[] if device == "cpu" else None), torch.inference_mode():
        torch.manual_seed(seed)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        try:
            seq_BL = model.generate(
                input_ids=ids_BP.to(device),
                attention_mask=mask_BP.to(device),
                generation_config=gen_cfg,
                logits_processor=LogitsProcessorList(
                    [recorder] + ([StepHook(ids_BP.shape[1], on_step)] if on_step else [])),
            )
        finally:
            torch.set_num_threads(threads)
    gen_BT = seq_BL[:, ids_BP.shape[1] :].cpu()
    return gen_BT, recorder.finish(seq_BL[:, -1]).cpu()
