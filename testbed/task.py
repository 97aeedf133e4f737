"""The synthetic task: column addition with carries, written as one numbered step per line.

A reference solution for 4728 + 395 reads::

    Step 1: 8+5+0=13, write 3, carry 1
    Step 2: 2+9+1=12, write 2, carry 1
    Step 3: 7+3+1=11, write 1, carry 1
    Step 4: 4+0+1=5, write 5, carry 0
    Answer: \\boxed{5123}

Step j adds the j-th digits from the right (a missing digit is 0) and the carry in; a final
carry gets its own step ("0+0+1=1"), so every step line has the same shape.

The long-chain task (`TestbedConfig.long_chain()`: 8- and 9-digit operands, 8-10 steps) writes
each step on two lines, the column sum, then the digit and carry written (layout "split")::

    Step 1: 8+5+0=13
    write 3, carry 1

so that a segment (one line) holds exactly the tokens that decide a step: the rule annotator's
spans fall on them and stay far under the coverage cap.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Literal

from trace_rl.testbed.answers import last_boxed, normalize_integer
from trace_rl.testbed.config import TestbedConfig

Split = Literal["train", "heldout"]
Layout = Literal["line", "split"]
LAYOUTS = ("line", "split")
INSTRUCTION = "Add column by column from the right, one step per line; answer in \\boxed{}."
ERROR_LABELS = ("carry dropped", "digit sum wrong")
KEY_LABEL = "carry propagation"


@dataclass(frozen=True)
class Step:
    """One column: digits x and y, carry in c, sum s, written digit w, carry out k."""

    x: int
    y: int
    c: int
    s: int
    w: int
    k: int

    def render(self, number: int, layout: Layout = "line") -> str:
        if layout == "split":
            return f"Step {number}: {self.x}+{self.y}+{self.c}={self.s}\nwrite {self.w}, carry {self.k}"
        return f"Step {number}: {self.x}+{self.y}+{self.c}={self.s}, write {self.w}, carry {self.k}"


def reference_steps(a: int, b: int) -> list[Step]:
    """The correct column steps of a + b (a, b >= 0), least significant column first."""
    xs, ys = _digits_lsb(a), _digits_lsb(b)
    steps, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        x = xs[i] if i < len(xs) else 0
        y = ys[i] if i < len(ys) else 0
        s = x + y + carry
        steps.append(Step(x, y, carry, s, s % 10, s // 10))
        carry = s // 10
    if carry:
        steps.append(Step(0, 0, 1, 1, 1, 0))
    return steps


def render_solution(steps: list[Step], layout: Layout = "line") -> str:
    """Solution text whose answer is the number the written digits spell (right or wrong)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    lines = [st.render(i + 1, layout) for i, st in enumerate(steps)]
    answer = "".join(str(st.w) for st in reversed(steps)).lstrip("0") or "0"
    lines.append(f"Answer: \\boxed{{{answer}}}")
    return "\n".join(lines)


def corrupt_steps(a: int, b: int, rng: random.Random) -> tuple[list[Step], int, str]:
    """A plausible wrong solution of a + b with exactly one injected error, later steps consistent.

    Returns (steps, 0-based index of the wrong step, error label from ERROR_LABELS). A carry is
    dropped when one exists (a typical slip), otherwise a column sum is off by one.
    """
    ref = reference_steps(a, b)
    xs, ys = _digits_lsb(a), _digits_lsb(b)
    n_cols = max(len(xs), len(ys))
    xs, ys = xs + [0] * (n_cols - len(xs)), ys + [0] * (n_cols - len(ys))
    carry_cols = [i for i in range(n_cols) if ref[i].k == 1]
    if carry_cols and rng.random() < 0.5:
        bad, label = rng.choice(carry_cols), ERROR_LABELS[0]
    else:
        bad, label = rng.randrange(n_cols), ERROR_LABELS[1]
    steps, carry = [], 0
    for i in range(n_cols):
        s = xs[i] + ys[i] + carry
        if i == bad and label == ERROR_LABELS[1]:
            s = s + 1 if (s % 10 == 0 or rng.random() < 0.5) else s - 1
        k = 0 if (i == bad and label == ERROR_LABELS[0]) else s // 10
        steps.append(Step(xs[i], ys[i], carry, s, s % 10, k))
        carry = k
    if carry:
        steps.append(Step(0, 0, 1, 1, 1, 0))
    return steps, bad, label


def _digits_lsb(n: int) -> list[int]:
    return [int(ch) for ch in reversed(str(n))]


def problem_text(a: int, b: int) -> str:
    """The student's full user message."""
    return f"{INSTRUCTION}\n{a} + {b}"


def _is_heldout(a: int, b: int, mod: int) -> bool:
    # Order-free key, so a + b and b + a always fall in the same split.
    key = f"{min(a, b)}+{max(a, b)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % mod == 0


def _sample_operand(rng: random.Random, cfg: TestbedConfig) -> int:
    n_digits = rng.randint(cfg.min_digits, cfg.max_digits)
    low = 0 if n_digits == 1 else 10 ** (n_digits - 1)
    return rng.randint(low, 10**n_digits - 1)


def sample_pairs(cfg: TestbedConfig, n: int, seed: int, split: Split) -> list[tuple[int, int]]:
    """n distinct operand pairs of one split, deterministic in (cfg task fields, seed, split)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"testbed|{split}|{seed}")
    want_heldout = split == "heldout"
    seen: set[tuple[int, int]] = set()
    pairs: list[tuple[int, int]] = []
    tries = 0
    while len(pairs) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(
                f"could not draw {n} distinct {split} problems with digits "
                f"{cfg.min_digits}..{cfg.max_digits}; ask for fewer or widen max_digits"
            )
        a, b = _sample_operand(rng, cfg), _sample_operand(rng, cfg)
        if (a, b) in seen or _is_heldout(a, b, cfg.heldout_mod) != want_heldout:
            continue
        seen.add((a, b))
        pairs.append((a, b))
    return pairs


def make_prompt_row(a: int, b: int, prompt_id: str, layout: Layout = "line") -> dict:
    """One prompts-contract row for the problem a + b (the solution in `layout`; the meta names
    a non-default layout, which the rule annotator reads)."""
    steps = reference_steps(a, b)
    meta: dict = {
        "task": "column_addition",
        "a": a,
        "b": b,
        "carry_steps": [i + 1 for i, st in enumerate(steps) if st.k == 1],
        "num_steps": len(steps),
    }
    if layout != "line":
        meta["layout"] = layout
    return {
        "prompt_id": prompt_id,
        "problem": problem_text(a, b),
        "answer": str(a + b),
        "solution": render_solution(steps, layout),
        "source": "testbed",
        "meta": json.dumps(meta, sort_keys=True),
    }


def make_prompts(cfg: TestbedConfig, n: int, seed: int, split: Split = "train") -> list[dict]:
    """n prompts rows (prompt_id "tb-<split>-<seed>-<index>"); train and heldout never overlap."""
    if cfg.task == "digit_chain":
        from trace_rl.testbed.chain import make_chain_prompts

        return make_chain_prompts(cfg, n, seed, split)
    pairs = sample_pairs(cfg, n, seed, split)
    return [make_prompt_row(a, b, f"tb-{split}-{seed}-{i:06d}", cfg.step_layout)
            for i, (a, b) in enumerate(pairs)]


@dataclass(frozen=True)
class Grade:
    """The testbed's verdict on one response: `status` is ok, no_answer or error (a reference
    that is not an integer); `correct` only ever with ok."""

    status: str
    correct: bool
    extracted: str | None
    detail: str | None = None


def grade(response_text: str, answer: str) -> Grade:
    """The testbed's reward: the last boxed integer equals the reference. The `testbed`
    verifier and the build's accuracy both call this, so what the build reports is the reward."""
    ref = normalize_integer(answer)
    if ref is None:
        return Grade("error", False, None, f"reference {answer!r} is not an integer")
    content = last_boxed(response_text)
    if content is None:
        return Grade("no_answer", False, None, "no \\boxed{} answer")
    value = normalize_integer(content)
    if value is None:
        return Grade("ok", False, content, "boxed answer is not an integer")
    return Grade("ok", value == ref, str(value))


def extract_answer(text: str) -> str | None:
    """The last boxed answer as an integer string, or None."""
    content = last_boxed(text)
    value = None if content is None else normalize_integer(content)
    return None if value is None else str(value)


def is_correct(response_text: str, answer: str) -> bool:
    return grade(response_text, answer).correct
