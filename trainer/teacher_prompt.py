"""The privileged teacher's user message: the one definition (torch-free, so configs and the
testbed's tokenizer and warm start import it cheaply).

The testbed warm-starts its model on exactly these messages and the trainer distils from them;
tests/test_contracts.py checks the two stay one.
"""

from __future__ import annotations

from typing import Any

DEFAULT_TEACHER_TEMPLATE = "{problem}\n\nHere is a reference solution:\n{context}"


def teacher_context(prompt_row: dict[str, Any], labels: list[str]) -> str:
    """Reference solution (else the boxed answer) plus the annotator's type label(s)."""
    solution = prompt_row.get("solution")
    if solution:
        context = solution
    else:
        context = "The final answer is \\boxed{" + str(prompt_row["answer"]) + "}."
    unique = [label for label in dict.fromkeys(labels) if label]
    if unique:
        context += "\n\nWatch out for: " + "; ".join(unique)
    return context


def teacher_message(template: str, prompt_row: dict[str, Any], labels: list[str]) -> str:
    """The teacher's user message for one prompts row (`problem`, `answer`, `solution`)."""
    return template.format(problem=prompt_row["problem"], context=teacher_context(prompt_row, labels))
