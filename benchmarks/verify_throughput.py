"""Throughput of the math verifier: MATH-500 reference answers fed back as predictions.

Each row's response is ``The final answer is $\\boxed{<reference>}$.``, so every row should be
judged correct; the agreement rate shows how often the verifier fails to match an answer
with itself (parsing gaps), and rows/s what a worker pool sustains.

    python benchmarks/verify_throughput.py --workers 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "math500" / "test.jsonl"


def _items(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    return [
        {
            "rollout_id": row["id"],
            "answer": row["answer"],
            "response_text": f"The final answer is $\\boxed{{{row['answer']}}}$.",
        }
        for row in rows
    ]


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from trace_rl.stages.verifiers import VerifierPool, VerifyConfig, verify_rows

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()

    cfg = VerifyConfig(
        kind="math", workers=args.workers, timeout_s=args.timeout_s, chunk_size=args.chunk_size
    )
    items = _items(args.data, args.limit)
    t0 = time.perf_counter()
    with VerifierPool(cfg) as pool:
        t1 = time.perf_counter()
        rows = verify_rows(cfg, items, pool=pool)
        t2 = time.perf_counter()
    agree = sum(r["correct"] for r in rows)
    print(
        f"rows={len(rows)} workers={cfg.workers} chunk={cfg.chunk_size} "
        f"timeout_s={cfg.timeout_s:g} start_method={cfg.start_method}"
    )
    print(f"pool start: {t1 - t0:.2f} s")
    print(f"verify: {t2 - t1:.2f} s = {len(rows) / (t2 - t1):.1f} rows/s")
    print(f"agreement (reference vs itself): {agree}/{len(rows)} = {agree / len(rows):.1%}")
    print(f"statuses: {dict(Counter(r['status'] for r in rows))}")
    for item, row in [(i, r) for i, r in zip(items, rows, strict=True) if not r["correct"]][:15]:
        print(
            f"  {row['rollout_id']}: {row['status']} answer={item['answer']!r} "
            f"detail={row['detail']!r}"
        )


if __name__ == "__main__":
    main()
