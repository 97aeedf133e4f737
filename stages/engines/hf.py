"""The `hf` rollout engine: batched transformers `generate` (CPU, tests, the testbed), through
the one sampling loop that records log-probs (`pipeline/generation.py`).

Run-scoped like the vLLM session: inside a flow's `engine_session` the loaded model is kept in an
`HFModel` from one round to the next, and a new checkpoint of the same architecture, dtype and
device only has its weights copied in (safetensors, in place) instead of a full from_pretrained.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from trace_rl.pipeline.generation import cut_at_stop, sample_batch
from trace_rl.pipeline.progress_lines import ProgressLines, on_terminal
from trace_rl.stages.engines.protocol import (
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


def auto_batch_size(cfg: RolloutConfig, max_prompt_len: int, num_sequences: int) -> int:
    """Sequences per generate call: the configured size, else all that fit max_batch_tokens."""
    if cfg.hf.batch_size is not None:
        return min(cfg.hf.batch_size, num_sequences)
    per_sequence = max_prompt_len + cfg.max_tokens
    return max(1, min(num_sequences, cfg.hf.max_batch_tokens // per_sequence))


def _load_model(model_dir: str, cfg: RolloutConfig, stop_ids: list[int], pad_id: int) -> Any:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, cfg.hf.dtype))
    model.to(cfg.hf.device).eval()
    # The checkpoint's own generation defaults (Qwen3 ships top_k=20, temperature=0.6) would
    # otherwise fill every field we leave unset; sampling must be exactly cfg's.
    model.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=pad_id)
    return model


_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype"}


def _model_key(cfg: RolloutConfig, model_dir: str) -> str:
    """What a loaded model depends on besides its weights: architecture, dtype, device."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    arch = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    return json.dumps({"arch": arch, "dtype": cfg.hf.dtype, "device": cfg.hf.device},
                      sort_keys=True, default=str)


class HFModel:
    """The hf engine's model kept across a flow's rounds (held by the engine session)."""

    def __init__(self) -> None:
        self.model: Any = None
        self.key: str | None = None
        self.weights: str | None = None  # the checkpoint whose weights the model holds
        self.loads = 0  # full from_pretrained loads
        self.refreshes = 0  # in-place weight loads

    def get(self, cfg: RolloutConfig, model_dir: str, stop_ids: list[int], pad_id: int) -> Any:
        key = _model_key(cfg, model_dir)
        if self.model is None or key != self.key:
            self.clear()
            self.model, self.key = _load_model(model_dir, cfg, stop_ids, pad_id), key
            self.loads += 1
        elif self.weights != str(model_dir):
            from safetensors.torch import load_file

            state = {}
            for f in sorted(Path(model_dir).glob("*.safetensors")):
                state.update(load_file(str(f)))
            with torch.no_grad():
                missing, unexpected = self.model.load_state_dict(state, strict=False)
            tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
            if set(missing) - tied or unexpected:
                raise RuntimeError(f"{model_dir}'s weights do not fit the loaded model "
                                   f"(missing {sorted(missing)[:3]}, unexpected "
                                   f"{sorted(unexpected)[:3]})")
            self.model.generation_config = GenerationConfig(eos_token_id=stop_ids,
                                                            pad_token_id=pad_id)
            self.refreshes += 1
        self.weights = str(model_dir)
        return self.model

    def clear(self) -> None:
        self.model = self.key = self.weights = None


def _within_batch(lines: ProgressLines, done: int, tokens: int, stop_ids: list[int]):
    """A sample_batch `on_step` that, when a line is due, says the sequences that reached a stop
    token and the tokens sampled so far: one batch can hold a whole round (256 sequences)."""
    def on_step(gen_BT: torch.Tensor) -> None:
        if not lines.due(done):
            return
        hit = torch.isin(gen_BT, torch.tensor(stop_ids, device=gen_BT.device))
        finished = int(hit.any(1).sum())
        if done + finished < lines.total:  # the batch's end says the last line
            live = (hit.cumsum(1) - hit.int()) == 0  # up to the first stop token, inclusive
            lines.update(done + finished, tokens=tokens + int(live.sum()))
    return on_step


def generate(
    cfg: RolloutConfig, model_dir: str, prompts: list[dict], *, progress: bool = True,
    held: HFModel | None = None,
) -> list[dict]:
    """cfg.n samples per prompt with transformers; rows ordered by prompt, then sample_index.
    With `held`, the model it keeps is reused (and kept for the next call)."""
    check_prompts(prompts)
    tokenizer = load_tokenizer(model_dir)
    stop_ids = stop_token_ids(tokenizer, model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    if held is not None:
        model = held.get(cfg, model_dir, stop_ids, pad_id)
    else:
        model = _load_model(model_dir, cfg, stop_ids, pad_id)
    prompt_ids = [encode_prompt(tokenizer, p["problem"], cfg.enable_thinking) for p in prompts]
    # Sequence s is sample (s % n) of prompt (s // n).
    seqs = [prompt_ids[s // cfg.n] for s in range(len(prompts) * cfg.n)]
    batch = auto_batch_size(cfg, max((len(p) for p in prompt_ids), default=1), len(seqs))
    sampling = sampling_json(cfg)
    stop_set = set(stop_ids)
    rows: list[dict] = []
    start, n_tokens = time.perf_counter(), 0
    lines = ProgressLines("hf sampling", len(seqs), "sequences")
    for b, lo in enumerate(range(0, len(seqs), batch)):
        gen_BT, logp_BT = sample_batch(
            model, seqs[lo : lo + batch], temperature=cfg.temperature, top_k=cfg.top_k,
            top_p=cfg.top_p, max_new_tokens=cfg.max_tokens, stop_ids=stop_ids, pad_id=pad_id,
            seed=cfg.seed * 100_003 + b, device=cfg.hf.device, num_threads=cfg.hf.num_threads,
            on_step=_within_batch(lines, len(rows), n_tokens, stop_ids) if progress else None,
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
        if progress:  # log lines at a steady cadence; the per-batch line on a terminal only
            lines.update(len(rows), tokens=n_tokens)
        if progress and on_terminal():
            elapsed = time.perf_counter() - start
            print(
                f"[hf] {len(rows)}/{len(seqs)} sequences, {n_tokens} tokens, "
                f"{n_tokens / max(elapsed, 1e-9):.0f} tok/s",
                file=sys.stderr,
                flush=True,
            )
    return rows
