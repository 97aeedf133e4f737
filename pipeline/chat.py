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
    return encode_chat_messages(tokenizer, [{"role": "user", "content": content}], enable_thinking)


def encode_chat_messages(tokenizer: Any, messages: list[dict], enable_thinking: bool) -> list[int]:
    """Token ids of a whole conversation (e.g. system + user: the self annotator's prompt) with
    the generation prompt appended, by the same template-then-encode rule."""
    text = tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
        tokenize=False,
    )
    return list(tokenizer.encode(text, add_special_tokens=False))
