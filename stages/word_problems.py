"""A generated source of one- and two-step arithmetic word problems with worked solutions.

For small real models (SmolLM2-135M gets almost no GSM8K problem right on CPU-sized budgets) a
task they solve some of the time is what makes a TRACE round informative: GRPO needs groups
with mixed rewards, and the teacher needs a reference to lean on. Everything is generated here
(no download), deterministically per split, and the splits never share a problem.

Rows look like a GSM8K file after reading: `{id, problem, answer, solution, kind, steps}`, the
solution one line per step ending with "The answer is N.". `stages/sources.py` serves them as
the catalog names `word_problems_train` and `word_problems_test`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

NAMES = ("Tom", "Anna", "Ben", "Maria", "Sam", "Lily", "Jack", "Emma", "Omar", "Yuki")
ITEMS = ("apples", "pencils", "stickers", "cookies", "marbles", "books", "cards", "shells")
SPLIT_SIZES = {"train": 5000, "test": 500}
# One-step problems are what the smallest models solve; two-step ones leave room to improve.
KIND_WEIGHTS = {"add": 3, "sub": 3, "mul": 2, "add_sub": 1, "mul_add": 1, "sub_mul": 1}
HELDOUT_MOD = 10  # a problem belongs to the test split iff hash(problem) % HELDOUT_MOD == 0

Problem = tuple[str, list[str], int]  # problem text, solution steps, answer


def _add(rng: random.Random, nm: str, it: str) -> Problem:
    a, b = rng.randint(2, 30), rng.randint(2, 20)
    return (f"{nm} has {a} {it}. {nm} gets {b} more {it}. How many {it} does {nm} have now?",
            [f"{nm} has {a} + {b} = {a + b} {it}."], a + b)


def _sub(rng: random.Random, nm: str, it: str) -> Problem:
    a = rng.randint(8, 40)
    b = rng.randint(2, a - 2)
    return (f"{nm} has {a} {it} and gives {b} of them to a friend. "
            f"How many {it} does {nm} have left?",
            [f"{nm} has {a} - {b} = {a - b} {it} left."], a - b)


def _mul(rng: random.Random, nm: str, it: str) -> Problem:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return (f"{nm} buys {a} bags of {it}. Each bag has {b} {it}. How many {it} does {nm} buy?",
            [f"{nm} buys {a} * {b} = {a * b} {it}."], a * b)


def _add_sub(rng: random.Random, nm: str, it: str) -> Problem:
    a, b = rng.randint(5, 40), rng.randint(2, 20)
    c = rng.randint(2, a + b - 1)
    return (f"{nm} has {a} {it}. {nm} gets {b} more {it} and then gives away {c} {it}. "
            f"How many {it} does {nm} have now?",
            [f"After getting more, {nm} has {a} + {b} = {a + b} {it}.",
             f"After giving {c} away, {nm} has {a + b} - {c} = {a + b - c} {it}."], a + b - c)


def _mul_add(rng: random.Random, nm: str, it: str) -> Problem:
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 20)
    return (f"{nm} buys {a} boxes of {it}. Each box has {b} {it}. {nm} already had {c} {it}. "
            f"How many {it} does {nm} have in total?",
            [f"The boxes hold {a} * {b} = {a * b} {it}.",
             f"In total {nm} has {a * b} + {c} = {a * b + c} {it}."], a * b + c)


def _sub_mul(rng: random.Random, nm: str, it: str) -> Problem:
    a = rng.randint(6, 20)
    b, c = rng.randint(1, a - 2), rng.randint(2, 5)
    return (f"{nm} had {a} {it} and lost {b} of them. {nm}'s friend has {c} times as many {it} "
            f"as {nm} has left. How many {it} does the friend have?",
            [f"{nm} has {a} - {b} = {a - b} {it} left.",
             f"The friend has {a - b} * {c} = {(a - b) * c} {it}."], (a - b) * c)


KINDS: dict[str, Callable[[random.Random, str, str], Problem]] = {
    "add": _add, "sub": _sub, "mul": _mul, "add_sub": _add_sub, "mul_add": _mul_add,
    "sub_mul": _sub_mul,
}


def _heldout(problem: str) -> bool:
    return int(hashlib.sha256(problem.encode()).hexdigest()[:8], 16) % HELDOUT_MOD == 0


def word_problem_rows(split: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """`n` (default SPLIT_SIZES[split]) distinct problems of `split` ('train' or 'test')."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"word problems have the splits {sorted(SPLIT_SIZES)}; got {split!r}")
    n = SPLIT_SIZES[split] if n is None else n
    rng = random.Random(f"word-problems-{seed}")
    kinds, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())
    rows: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise RuntimeError(f"could not generate {n} distinct {split} word problems")
        kind = rng.choices(kinds, weights)[0]
        problem, steps, answer = KINDS[kind](rng, rng.choice(NAMES), rng.choice(ITEMS))
        if problem in seen or _heldout(problem) != (split == "test"):
            continue
        seen.add(problem)
        rows.append({
            "id": f"wp-{split}-{len(rows):05d}", "problem": problem, "answer": str(answer),
            "solution": "\n".join(steps + [f"The answer is {answer}."]), "kind": kind,
            "steps": len(steps),
        })
    return rows
