"""False positives and negatives of the math verifier on prose answer statements (issue 26).

Reads tests/fixtures/stated_answer_cases.jsonl (text, gold, expected verdict, class) and prints,
per class and in all, how many wrong answers were rewarded (false positives: the verdict is
correct where the case expects ``wrong`` or ``no_answer``) and how many right ones were not
(false negatives). With ``--peer`` it also prints the agreement on the peer verifier cases
($TRACE_SHARED_DATA/verifier_cases/cases.jsonl, the 298 unflagged ones), as
tests/test_verifiers.py measures it. With ``--solutions N`` it grades the reference solutions
of the first N rows of gsm8k/test and math500/test (from $TRACE_SHARED_DATA) against their own
answers, and prints how many are not rewarded: right solutions the verifier misses.

    .venv/bin/python benchmarks/stated_answers.py [--review] [--peer] [--solutions N] [--show]

To measure another version of the verifier, put its package first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "fixtures" / "stated_answer_cases.jsonl"
# The reviewer's independent cases; ``known_limit`` marks a documented miss.
REVIEW_CASES = ROOT / "tests" / "fixtures" / "stated_answer_review_cases.jsonl"
SHARED = Path(os.environ.get("TRACE_SHARED_DATA") or ROOT.parent / "shared" / "data")


def prose(show: bool, path: Path = CASES) -> None:
    from trace_rl.stages.verifiers import VerifyConfig
    from trace_rl.stages.verifiers.math_verifier import MathChecker

    checker = MathChecker(VerifyConfig(kind="math", workers=1))
    cases = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    fp, fn, exact, n_pos = Counter(), Counter(), 0, 0
    for c in cases:
        v = checker(c["text"], c["gold"], {})
        got = "correct" if v.status == "ok" and v.correct else (
            "wrong" if v.status == "ok" else v.status)
        exact += got == c["expect"]
        if c["expect"] == "correct":
            n_pos += 1
            if got != "correct":
                fn[c["class"]] += 1
        elif got == "correct":
            fp[c["class"]] += 1
        if show and (got == "correct") != (c["expect"] == "correct"):
            print(f"  [{c['class']}] gold={c['gold']!r} expect={c['expect']} got={got} "
                  f"({v.extracted_answer!r}): {c['text']!r} {c.get('known_limit') or ''}")
    print(f"{path.name}: {len(cases)} ({n_pos} to reward, {len(cases) - n_pos} not)")
    print(f"false positives: {sum(fp.values())} {dict(sorted(fp.items()))}")
    print(f"false negatives: {sum(fn.values())} {dict(sorted(fn.items()))}")
    print(f"verdict exactly as expected: {exact}/{len(cases)}")


def peer() -> None:
    from trace_rl.stages.verifiers import VerifyConfig, verify_rows

    path = SHARED / "verifier_cases" / "cases.jsonl"
    cases = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cases = [c for c in cases if not c["flags"]]
    items = [{"rollout_id": c["id"], "answer": c["gold"],
              "response_text": c["pred"] if c["needs_extraction"]
              else f"The final answer is $\\boxed{{{c['pred']}}}$."} for c in cases]
    rows = verify_rows(VerifyConfig(kind="math", workers=2, timeout_s=30.0), items)
    wrong = [c["id"] for c, r in zip(cases, rows, strict=True) if r["correct"] != c["equal"]]
    print(f"peer cases agreement: {len(cases) - len(wrong)}/{len(cases)}; disagree: {wrong}")


def solutions(n: int, show: bool) -> None:
    from trace_rl.stages.verifiers import VerifyConfig, verify_rows

    for name, text in (("gsm8k", lambda r: f"{r['solution']}\n#### {r['answer']}"),
                       ("math500", lambda r: r["solution"])):
        path = SHARED / name / "test.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
        items = [{"rollout_id": str(i), "answer": r["answer"], "response_text": text(r)}
                 for i, r in enumerate(rows)]
        got = verify_rows(VerifyConfig(kind="math", workers=2, timeout_s=30.0), items)
        missed = [(r, v) for r, v in zip(rows, got, strict=True) if not v["correct"]]
        print(f"{name} reference solutions not rewarded: {len(missed)}/{len(rows)}")
        for r, v in missed if show else []:
            print(f"  {r['id']}: {v['status']} {v['detail']!r}"[:200])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", action="store_true", help="also the peer verifier cases")
    ap.add_argument("--solutions", type=int, default=0, metavar="N",
                    help="also the first N reference solutions of gsm8k and math500")
    ap.add_argument("--review", action="store_true", help=f"also {REVIEW_CASES.name}")
    ap.add_argument("--show", action="store_true", help="print every case not as expected")
    args = ap.parse_args()
    prose(args.show)
    if args.review:
        prose(args.show, REVIEW_CASES)
    if args.peer:
        peer()
    if args.solutions:
        solutions(args.solutions, args.show)
