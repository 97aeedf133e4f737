"""Answer fields of public sources as plain reference text: numbers, GSM8K's `#### N`, math
delimiters, the last box of a worked solution (stages/sources.py applies them per answer format)."""

from __future__ import annotations

import re
from typing import Any

from trace_rl.stages.verifiers.extract import find_boxed


def answer_text(value: Any) -> str | None:
    """A reference answer as text: integral numbers lose their '.0' (27.0 -> '27'), a list
    gives its first item, empty values give None."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None or isinstance(value, bool):
        return None if value is None else str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


def split_gsm8k(text: Any) -> tuple[str | None, str | None]:
    """GSM8K's answer field -> (answer without commas, worked solution); (None, None) without ####."""
    if not isinstance(text, str) or "####" not in text:
        return None, None
    solution, _, final = text.rpartition("####")
    return final.strip().replace(",", "") or None, solution.strip() or None


def strip_dollars(text: str | None) -> str | None:
    """Remove unescaped '$' (math delimiters) and the spaces they leave at the ends."""
    return re.sub(r"(?<!\\)\$", "", text).strip() or None if text is not None else None


def last_boxed(text: Any) -> str | None:
    """The content of the last \\boxed{} (or \\fbox{}) in `text`, braces matched."""
    boxes = find_boxed(text) if isinstance(text, str) else []
    return boxes[-1].content.strip() or None if boxes else None
