"""The one way a user message becomes prompt token ids (the shared chat contract).

Rollout engines, the trainer's teacher prompts and evaluation all go through here, so the ids a
policy was sampled with and the ids the trainer rebuilds can never drift apart: template to text,
then encode without special tokens (no second BOS, no tokenizer-side truncation).
"""

from __future__ import annotations

from typing import Any


def encode_chat_prompt(tokenizer: Any, content: str, enable_thinking: bool) -> list[int]:
    """Token ids of a one-turn user prompt with the generation prompt appended (Qwen3 style:
    `enable_thinking=False` closes an empty think block)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
        tokenize=False,
    )
    return list(tokenizer.encode(text, add_special_tokens=False))
