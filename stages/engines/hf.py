"""The `hf` rollout engine: batched transformers `generate` (CPU, tests, the testbed).

Log-probs: the warpers (temperature, top-k, top-p) run inside one logits processor of ours, the
last in the chain, so the distribution it sees is exactly the one `generate` samples from. At each
step it gathers the log-prob of the token sampled at the previous step, so memory stays one
[B, V] slice instead of the [T, B, V] stack that `output_scores` would keep.

Sampling: the same processor also draws the next token (inverse CDF: one uniform per row against
the cumulative distribution) and hands `generate`, run greedily, scores where only that token is
finite. On CPU `torch.multinomial` over [256, 4096] costs ~55 ms a step (a third of a 128-step
generation); the inverse CDF draws from exactly the same distribution in ~3 ms.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from trace_rl.stages.engines.base import (
    check_prompts,
    decode_response,
    encode_prompt,
    load_tokenizer,
    make_row,
    sampling_json,
    stop_token_ids,
)
from trace_rl.stages.engines.config import RolloutConfig

ENGINE = "hf"


def build_warpers(temperature: float, top_k: int, top_p: float) -> list[LogitsProcessor]:
    """Temperature, then top-k, then top-p: the order of both transformers and vLLM."""
    warpers: list[LogitsProcessor] = []
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

    def __init__(self, warpers: list[LogitsProcessor]):
        self.warpers = warpers
        self.prev_logp_BV: torch.Tensor | None = None
        self.logps_T: list[torch.Tensor] = []

    def __call__(self, input_ids_BL: torch.LongTensor, scores_BV: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores_BV = warper(input_ids_BL, scores_BV)
        if self.prev_logp_BV is not None:
            # input_ids ends with the token drawn from the previous step's distribution.
            self.logps_T.append(self.prev_logp_BV.gather(1, input_ids_BL[:, -1:]).squeeze(1))
        self.prev_logp_BV = torch.log_softmax(scores_BV.float(), dim=-1)
        next_B = sample_inverse_cdf(self.prev_logp_BV)
        onehot_BV = torch.full_like(scores_BV, float("-inf"))
        return onehot_BV.scatter_(1, next_B[:, None], 0.0)

    def finish(self, last_tokens_B: torch.Tensor) -> torch.Tensor:
        """Log-probs [B, T] of the generated tokens; `last_tokens_B` is the final column."""
        if self.prev_logp_BV is None:
            raise RuntimeError("generate never called the logits processor")
        self.logps_T.append(self.prev_logp_BV.gather(1, last_tokens_B[:, None]).squeeze(1))
        return torch.stack(self.logps_T, dim=1)


def auto_batch_size(cfg: RolloutConfig, max_prompt_len: int, num_sequences: int) -> int:
    """Sequences per generate call: the configured size, else all that fit max_batch_tokens."""
    if cfg.hf.batch_size is not None:
        return min(cfg.hf.batch_size, num_sequences)
    per_sequence = max_prompt_len + cfg.max_tokens
    return max(1, min(num_sequences, cfg.hf.max_batch_tokens // per_sequence))


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


def _load_model(model_dir: str, cfg: RolloutConfig, stop_ids: list[int], pad_id: int) -> Any:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, cfg.hf.dtype))
    model.to(cfg.hf.device).eval()
    # The checkpoint's own generation defaults (Qwen3 ships top_k=20, temperature=0.6) would
    # otherwise fill every field we leave unset; sampling must be exactly cfg's.
    model.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=pad_id)
    return model


def _generate_batch(
    model: Any,
    prompts: list[list[int]],
    cfg: RolloutConfig,
    stop_ids: list[int],
    pad_id: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated ids [B, T] and their sampling log-probs [B, T] (padding not yet removed)."""
    ids_BP, mask_BP = left_pad(prompts, pad_id)
    recorder = SampledLogprobRecorder(build_warpers(cfg.temperature, cfg.top_k, cfg.top_p))
    # Greedy over the recorder's one-hot scores: the recorder has already sampled.
    gen_cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=cfg.max_tokens,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
    )
    device = cfg.hf.device
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[] if device == "cpu" else None), torch.inference_mode():
        torch.manual_seed(seed)
        if cfg.hf.num_threads is not None:
            torch.set_num_threads(cfg.hf.num_threads)
        try:
            seq_BL = model.generate(
                input_ids=ids_BP.to(device),
                attention_mask=mask_BP.to(device),
                generation_config=gen_cfg,
                logits_processor=LogitsProcessorList([recorder]),
            )
        finally:
            torch.set_num_threads(threads)
    gen_BT = seq_BL[:, ids_BP.shape[1] :].cpu()
    return gen_BT, recorder.finish(seq_BL[:, -1]).cpu()


def generate(
    cfg: RolloutConfig, model_dir: str, prompts: list[dict], *, progress: bool = True
) -> list[dict]:
    """cfg.n samples per prompt with transformers; rows ordered by prompt, then sample_index."""
    check_prompts(prompts)
    tokenizer = load_tokenizer(model_dir)
    stop_ids = stop_token_ids(tokenizer, model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    model = _load_model(model_dir, cfg, stop_ids, pad_id)
    prompt_ids = [encode_prompt(tokenizer, p["problem"], cfg.enable_thinking) for p in prompts]
    # Sequence s is sample (s % n) of prompt (s // n).
    seqs = [prompt_ids[s // cfg.n] for s in range(len(prompts) * cfg.n)]
    batch = auto_batch_size(cfg, max((len(p) for p in prompt_ids), default=1), len(seqs))
    sampling = sampling_json(cfg)
    stop_set = set(stop_ids)
    rows: list[dict] = []
    start, n_tokens = time.perf_counter(), 0
    for b, lo in enumerate(range(0, len(seqs), batch)):
        gen_BT, logp_BT = _generate_batch(
            model, seqs[lo : lo + batch], cfg, stop_ids, pad_id, seed=cfg.seed * 100_003 + b
        )
        for i in range(gen_BT.shape[0]):
            s = lo + i
            ids, logps, reason = cut_at_stop(
                gen_BT[i].tolist(), logp_BT[i].tolist(), stop_set, cfg.max_tokens
            )
            n_tokens += len(ids)
            rows.append(
                make_row(
                    prompt_id=prompts[s // cfg.n]["prompt_id"],
                    sample_index=s % cfg.n,
                    prompt_token_ids=seqs[s],
                    response_text=decode_response(tokenizer, ids),
                    response_token_ids=ids,
                    response_logprobs=logps,
                    finish_reason=reason,
                    engine=ENGINE,
                    sampling=sampling,
                )
            )
        if progress:
            elapsed = time.perf_counter() - start
            print(
                f"[hf] {len(rows)}/{len(seqs)} sequences, {n_tokens} tokens, "
                f"{n_tokens / max(elapsed, 1e-9):.0f} tok/s",
                file=sys.stderr,
                flush=True,
            )
    return rows
