"""How the `equations` annotator reads the cases in tests/fixtures/equation_cases.jsonl (issue 26):
for each response, the first equation it finds wrong must be the one the case names (or none).

    .venv/bin/python benchmarks/equation_cases.py [--review] [--solutions] [--show]

Prints, per class and in all, the cases read right, the false errors (a right equation marked,
or a wrong one marked in place of an earlier real one) and the missed errors. To measure another
version of the annotator, put its package first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

CASES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "equation_cases.jsonl"
REVIEW_CASES = CASES.with_name("equation_review_cases.jsonl")  # the reviewer's own cases


def first_error(text: str) -> str | None:
    from trace_rl.stages.annotators.equations import find_equations

    wrong = [e for e in find_equations(text) if e.wrong_at is not None]
    return text[wrong[0].start:wrong[0].end] if wrong else None


def solutions() -> None:
    """gsm8k reference solutions (test + train, calculator notes "<<...>>" removed): how many
    have an equation marked wrong. Their arithmetic is right except for a few typos of the
    data set, so most marks are false errors of this reader."""
    import os
    import re

    shared = Path(os.environ.get("TRACE_SHARED_DATA") or CASES.parents[3] / "shared" / "data")
    from trace_rl.stages.annotators.equations import find_equations

    n = marked = n_eq = 0
    for name in ("test", "train"):
        for line in (shared / "gsm8k" / f"{name}.jsonl").read_text().split("\n"):
            if not line.strip():
                continue
            text = re.sub(r"<<[^>]*>>", "", json.loads(line)["solution"])
            eqs = find_equations(text)
            n, n_eq = n + 1, n_eq + len(eqs)
            marked += any(e.wrong_at is not None for e in eqs)
    print(f"gsm8k reference solutions: {n}, equations read {n_eq}, solutions with one marked "
          f"wrong {marked}")


def main(show: bool, path: Path = CASES) -> None:
    print(path.name)
    cases = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    right, false_err, missed = Counter(), Counter(), Counter()
    for c in cases:
        got, want = first_error(c["text"]), c["first_error"]
        if got == want:
            right[c["class"]] += 1
            continue
        (missed if got is None else false_err)[c["class"]] += 1
        if show:
            print(f"  [{c['class']}] want {want!r} got {got!r}: {c['text']!r}")
    total = Counter(c["class"] for c in cases)
    for cls in total:
        print(f"{cls:16s} {right[cls]}/{total[cls]} right, {false_err[cls]} false or misplaced "
              f"errors, {missed[cls]} missed")
    print(f"all: {sum(right.values())}/{len(cases)} right, {sum(false_err.values())} false or "
          f"misplaced errors, {sum(missed.values())} missed")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--show", action="store_true", help="print every case read wrong")
    ap.add_argument("--review", action="store_true", help=f"also {REVIEW_CASES.name}")
    ap.add_argument("--solutions", action="store_true", help="also gsm8k reference solutions")
    args = ap.parse_args()
    main(args.show)
    if args.review:
        main(args.show, REVIEW_CASES)
    if args.solutions:
        solutions()
