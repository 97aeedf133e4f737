"""The rollout-engine protocol and what every engine shares: prompt encoding, stop tokens, row layout.

An engine is a function `generate(cfg, model_dir, prompts, *, progress=True) -> list[dict]`.
Its rows are the engine part of DESIGN.md's rollouts contract (the stage adds rollout_id, round
and checkpoint): one row per (prompt, sample_index), in prompt order then sample order.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from trace_rl.pipeline.chat import encode_chat_prompt
from trace_rl.stages.engines.config import ENGINE_NAMES, RolloutConfig

ROW_KEYS = (
    "prompt_id",
    "sample_index",
    "prompt_token_ids",
    "response_text",
    "response_token_ids",
    "response_logprobs",
    "finish_reason",
    "engine",
    "sampling",
)
FINISH_REASONS = ("stop", "length")


class Engine(Protocol):
    def __call__(
        self, cfg: RolloutConfig, model_dir: str, prompts: list[dict], *, progress: bool = True
    ) -> list[dict]: ...


def load_tokenizer(model_dir: str) -> Any:
    """The checkpoint's tokenizer (offline: a checkpoint directory carries its own)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def encode_prompt(tokenizer: Any, problem: str, enable_thinking: bool) -> list[int]:
    """Chat-templated prompt ids, exactly as the shared contract fixes them."""
    return encode_chat_prompt(tokenizer, problem, enable_thinking)


def decode_response(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """Response text: special tokens (eos, pad) dropped, everything else kept verbatim.

    `<think>`/`</think>` are ordinary added tokens in Qwen3 tokenizers, so they stay in the text,
    and no whitespace clean-up is applied, so character offsets map back onto the ids.
    """
    return tokenizer.decode(
        list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
    )


def stop_token_ids(tokenizer: Any, model_dir: str) -> list[int]:
    """Ids that end a response: the tokenizer's eos plus the checkpoint's generation eos list.

    Qwen3 stops on `<|im_end|>` *and* `<|endoftext|>`; the union makes hf and vLLM agree.
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(gen_path):
        with open(gen_path) as f:
            eos = json.load(f).get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(i) for i in eos)
    if not ids:
        raise ValueError(
            f"no eos token in {model_dir}: set eos_token in the tokenizer config or "
            "eos_token_id in generation_config.json so generation can stop"
        )
    return sorted(ids)


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A per-prompt seed that does not depend on batch composition or data-parallel sharding."""
    digest = hashlib.blake2b(f"{seed}:{prompt_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


def sampling_json(cfg: RolloutConfig) -> str:
    return json.dumps(cfg.sampling_dict(), sort_keys=True)


def make_row(
    *,
    prompt_id: str,
    sample_index: int,
    prompt_token_ids: Sequence[int],
    response_text: str,
    response_token_ids: Sequence[int],
    response_logprobs: Sequence[float],
    finish_reason: str,
    engine: str,
    sampling: str,
) -> dict:
    """One engine row; checks the invariants every consumer relies on."""
    if len(response_token_ids) != len(response_logprobs):
        raise AssertionError(
            f"{engine}: {len(response_token_ids)} response ids but {len(response_logprobs)} "
            f"log-probs for prompt {prompt_id} sample {sample_index}"
        )
    if finish_reason not in FINISH_REASONS:
        raise AssertionError(f"{engine}: finish_reason {finish_reason!r} not in {FINISH_REASONS}")
    return {
        "prompt_id": str(prompt_id),
        "sample_index": int(sample_index),
        "prompt_token_ids": [int(i) for i in prompt_token_ids],
        "response_text": response_text,
        "response_token_ids": [int(i) for i in response_token_ids],
        "response_logprobs": [float(x) for x in response_logprobs],
        "finish_reason": finish_reason,
        "engine": engine,
        "sampling": sampling,
    }


def check_prompts(prompts: list[dict]) -> None:
    """Rows need prompt_id and problem; duplicate ids would make rollouts ambiguous."""
    seen: set[str] = set()
    for i, p in enumerate(prompts):
        missing = [k for k in ("prompt_id", "problem") if k not in p]
        if missing:
            raise ValueError(f"prompt row {i} lacks {missing}; rows need prompt_id and problem")
        if p["prompt_id"] in seen:
            raise ValueError(f"duplicate prompt_id {p['prompt_id']!r}: prompt ids must be unique")
        seen.add(p["prompt_id"])
