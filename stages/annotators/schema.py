"""Structured outputs: the annotator's reply constrained by a JSON schema where the endpoint can.

The schema of one request admits only replies `parse.parse_reply` accepts as ok or no_spans:
an object with `segment_ids` (integers in 1..n_segments, at most n of them) and a `label` of at
most MAX_LABEL_CHARS characters. Repeated ids are not excluded (`uniqueItems` is not widely
supported by constrained decoders); the parser keeps one of each. It goes out as OpenAI's
`response_format={"type": "json_schema", ...}` (vLLM's OpenAI server accepts the same field), or
as vLLM's own field `structured_outputs={"json": ..., "disable_any_whitespace": true}` (vLLM >=
0.10; it also forbids the free whitespace a JSON grammar otherwise allows between tokens).

A constrained reply cannot wander, so its token budget is capped at what the longest valid reply
needs (`reply_token_cap`), far below `api.max_tokens`: a small model that would otherwise echo
the segments until max_tokens stops as soon as the object is closed.
"""

from __future__ import annotations

from typing import Any

from trace_rl.stages.annotators.parse import MAX_LABEL_CHARS

SCHEMA_NAME = "critical_segments"
# Tokens per id (", 123" is up to 5 tokens where digits are split one by one) and for the
# braces, keys and quotes: enough for a byte-level tokenizer that merges nothing of them.
_TOKENS_PER_ID = 5
_FIXED_TOKENS = 48


def reply_schema(n_segments: int) -> dict[str, Any]:
    """JSON schema of a valid reply for a response of `n_segments` segments."""
    return {
        "type": "object",
        "properties": {
            "segment_ids": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1, "maximum": max(1, n_segments)},
                "maxItems": max(1, n_segments),
            },
            "label": {"type": "string", "maxLength": MAX_LABEL_CHARS},
        },
        "required": ["segment_ids", "label"],
        "additionalProperties": False,
    }


def reply_token_cap(n_segments: int) -> int:
    """Tokens enough for the longest reply the schema admits (each label char one token)."""
    return _FIXED_TOKENS + _TOKENS_PER_ID * max(1, n_segments) + MAX_LABEL_CHARS


def uses_schema(mode: str, *, thinking: bool = False) -> bool:
    """Whether requests carry a schema: `auto` sends one unless the annotator is asked to think
    first (a schema from the first token would forbid the reasoning block)."""
    if mode == "auto":
        return not thinking
    return mode in ("json_schema", "vllm")


def schema_fields(
    mode: str, n_segments: int, max_tokens: int, max_tokens_param: str
) -> dict[str, Any]:
    """Request fields that constrain one reply (modes `auto` and `json_schema` send
    response_format, `vllm` vLLM's structured_outputs), with the capped token budget."""
    schema = reply_schema(n_segments)
    if mode == "vllm":
        fields: dict[str, Any] = {
            "structured_outputs": {"json": schema, "disable_any_whitespace": True}
        }
    else:
        fields = {"response_format": {"type": "json_schema", "json_schema": {
            "name": SCHEMA_NAME, "schema": schema, "strict": True}}}
    fields[max_tokens_param] = min(max_tokens, reply_token_cap(n_segments))
    return fields


def schema_rejected(err: BaseException) -> bool:
    """Whether a failed request says the endpoint does not take the structured-output field
    (HTTP 400/422 naming it), as opposed to any other bad request."""
    status = getattr(err, "status_code", None)
    text = str(err).lower()
    return status in (400, 422) and any(
        word in text for word in ("response_format", "json_schema", "structured_outputs", "schema")
    )
