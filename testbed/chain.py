"""The long-chain task (issue 30): a digit chain of 8-11 dependent steps, each one local.

A problem "Start at 7. Each step: multiply by 3, add 4, keep the last digit. Do 9 steps ..." is
solved as::

    Step 1: 7*3+4=25
    keep 5
    Step 2: 5*3+4=19
    keep 9
    ...
    Answer: \\boxed{59...}

Every step reads only the digit kept on the line before and the two constants of the prompt, so
a tiny model can compute it reliably (no lookup of the j-th digit of a long operand, which the
column-addition task at 8-9 digits needs and a 2-layer model does not learn in minutes: measured
0% in docs/testbed_results.md). The answer is every kept digit in order, so one slip anywhere
fails it. Each step's deciding tokens, the digit kept, sit on a line (segment) of their own: the
rule annotator's spans are those tokens. Student-format warm-start targets carry one injected slip
at `corrupt_frac`; privileged (teacher-format) targets never do.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass

from trace_rl.testbed.answers import last_boxed, normalize_integer
from trace_rl.testbed.config import TestbedConfig

TASK = "digit_chain"
MULS = (2, 3, 4, 6, 7, 8, 9)  # 5 would collapse the chain onto two digits
ADDS = tuple(range(10))
LENGTHS = (8, 9, 10, 11)
SLIPS = ("product wrong", "wrong digit kept")
KEY_LABEL = "tens digit dropped"
_HEAD_RE = re.compile(r"Step\s*(\d+)\s*:\s*(\d+)\s*\*\s*(\d+)\s*\+\s*(\d+)\s*=\s*(\d+)\s*$")
_TAIL_RE = re.compile(r"^\s*keep\s*(\d+)\s*$")
_STEP_START_RE = re.compile(r"^\s*(Step|keep)\b", re.MULTILINE)
_BOXED_RE = re.compile(r"\\boxed\{")

Problem = tuple[int, int, int, int]  # start, mul, add, steps


@dataclass(frozen=True)
class ChainStep:
    """x * m + a = s, keep k (= s % 10 when right)."""

    x: int
    m: int
    a: int
    s: int
    k: int

    def render(self, number: int) -> str:
        return f"Step {number}: {self.x}*{self.m}+{self.a}={self.s}\nkeep {self.k}"


def chain_steps(start: int, mul: int, add: int, n: int) -> list[ChainStep]:
    steps, x = [], start
    for _ in range(n):
        s = x * mul + add
        steps.append(ChainStep(x, mul, add, s, s % 10))
        x = s % 10
    return steps


def answer_of(steps: list[ChainStep]) -> str:
    return "".join(str(st.k) for st in steps)


def render_chain(steps: list[ChainStep]) -> str:
    lines = [st.render(i + 1) for i, st in enumerate(steps)]
    return "\n".join([*lines, f"Answer: \\boxed{{{answer_of(steps)}}}"])


def corrupt_chain(problem: Problem, rng: random.Random) -> tuple[list[ChainStep], int, str]:
    """One injected slip at a random step (later steps consistent with it): the product off by
    one, or a wrong digit kept (the tens digit when there is one)."""
    start, mul, add, n = problem
    bad, label = rng.randrange(n), rng.choice(SLIPS)
    steps, x = [], start
    for i in range(n):
        s = x * mul + add
        if i == bad and label == SLIPS[0]:
            s = s + 1 if (s == 0 or rng.random() < 0.5) else s - 1
        k = s % 10
        if i == bad and label == SLIPS[1]:
            k = (s // 10) % 10 if (s // 10) % 10 != k else (k + 1) % 10
        steps.append(ChainStep(x, mul, add, s, k))
        x = k
    return steps, bad, label


def problem_text(problem: Problem) -> str:
    start, mul, add, n = problem
    return (f"Start at {start}. Each step: multiply by {mul}, add {add}, keep the last digit. "
            f"Do {n} steps, one per line; answer with the kept digits in \\boxed{{}}.")


def _is_heldout(problem: Problem, mod: int) -> bool:
    key = "chain|" + ",".join(map(str, problem))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % mod == 0


def all_problems(cfg: TestbedConfig, split: str) -> list[Problem]:
    """Every problem of a split, in a fixed order (the task has 2,800 in all)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    want = split == "heldout"
    return [p for p in ((s, m, a, n) for s in range(10) for m in MULS for a in ADDS for n in LENGTHS)
            if _is_heldout(p, cfg.heldout_mod) == want]


def sample_problems(cfg: TestbedConfig, n: int, seed: int, split: str) -> list[Problem]:
    """n distinct problems of a split (deterministic in seed); all of them, shuffled, when the
    split has fewer than n is an error saying how many there are."""
    pool = all_problems(cfg, split)
    if n > len(pool):
        raise ValueError(f"the digit chain has {len(pool)} {split} problems; ask for at most that")
    return random.Random(f"chain|{split}|{seed}").sample(pool, n)


def chain_prompt_row(problem: Problem, prompt_id: str) -> dict:
    start, mul, add, n = problem
    steps = chain_steps(*problem)
    meta = {"task": TASK, "start": start, "mul": mul, "add": add, "num_steps": n,
            "key_steps": [i + 1 for i, st in enumerate(steps) if st.s >= 10]}
    return {"prompt_id": prompt_id, "problem": problem_text(problem), "answer": answer_of(steps),
            "solution": render_chain(steps), "source": "testbed", "meta": json.dumps(meta, sort_keys=True)}


def make_chain_prompts(cfg: TestbedConfig, n: int, seed: int, split: str) -> list[dict]:
    return [chain_prompt_row(p, f"tb-{split}-{seed}-{i:06d}")
            for i, p in enumerate(sample_problems(cfg, n, seed, split))]


def chain_sft_pairs(cfg: TestbedConfig, n: int, seed: int, rng: random.Random,
                    teacher_user) -> list[tuple[str, str]]:
    """n (user message, target) pairs in the configured mixture (testbed.sft); `teacher_user`
    renders a prompt row's privileged message with optional labels."""
    pool = sample_problems(cfg, min(cfg.sft_num_problems, len(all_problems(cfg, "train"))), seed, "train")
    texts = []
    for i in range(n):
        p = pool[i % len(pool)]
        row = chain_prompt_row(p, "")
        if rng.random() < cfg.privileged_frac:
            labels = [rng.choice([*SLIPS, KEY_LABEL])] if rng.random() < cfg.label_frac else []
            texts.append((teacher_user(row, labels), row["solution"]))
        elif rng.random() < cfg.corrupt_frac:
            texts.append((row["problem"], render_chain(corrupt_chain(p, rng)[0])))
        else:
            texts.append((row["problem"], row["solution"]))
    return texts


def parse_chain(segments: list[str]) -> list[tuple[str, int, ChainStep | None]]:
    """(kind, segment id, step) in reading order; kind is step | malformed | answer. A step's
    segment id is its head ("Step j: ..."); its kept digit is the next segment."""
    events: list[tuple[str, int, ChainStep | None]] = []
    i = 0
    while i < len(segments):
        head = _HEAD_RE.search(segments[i])
        tail = _TAIL_RE.match(segments[i + 1]) if head and i + 1 < len(segments) else None
        if head and tail:
            x, m, a, s = (int(g) for g in head.groups()[1:])
            events.append(("step", i + 1, ChainStep(x, m, a, s, int(tail.group(1)))))
            i += 2
            continue
        if _STEP_START_RE.search(segments[i]):
            events.append(("malformed", i + 1, None))
        if _BOXED_RE.search(segments[i]):
            events.append(("answer", i + 1, None))
        i += 1
    return events


def _slip(got: ChainStep, want: ChainStep) -> tuple[str, bool]:
    """(label, in the head line) of a step that differs from the reference one."""
    if (got.x, got.m, got.a) != (want.x, want.m, want.a):
        return "wrong digit carried over", True
    if got.s != got.x * got.m + got.a:
        return SLIPS[0], True
    return SLIPS[1], False


def rule_annotate_chain(meta: dict, segments: list[str], route: str) -> tuple[list[int], str]:
    """key: the "keep k" segments of correct steps whose product has a tens digit (the digit
    dropped there is the step's decision); error: the segment of the first deviation (the head
    for a wrong product or input, the "keep" line for a wrong digit kept)."""
    ref = chain_steps(int(meta["start"]), int(meta["mul"]), int(meta["add"]), int(meta["num_steps"]))
    events = parse_chain(segments)
    steps = [(seg, st) for kind, seg, st in events if kind == "step"]
    if route == "key":
        ids = []
        for (seg, st), want in zip(steps, ref):
            if st != want:
                break
            if want.s >= 10:
                ids.append(seg + 1)
        return (ids, KEY_LABEL) if ids else ([], "")
    j = 0
    for kind, seg, st in events:
        if kind == "malformed":
            return [seg], "malformed step"
        if kind == "step" and st is not None:
            if j >= len(ref):
                return [seg], "extra step"
            if st != ref[j]:
                label, head = _slip(st, ref[j])
                return [seg if head else seg + 1], label
            j += 1
        elif j < len(ref):
            return [seg], "missing step"
        elif normalize_integer(last_boxed(segments[seg - 1]) or "") != int(answer_of(ref)):
            return [seg], "answer mismatch"
        else:
            return [], ""
    return ([events[-1][1]], "incomplete solution") if events else ([], "")
