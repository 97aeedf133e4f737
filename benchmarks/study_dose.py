"""Dose and response (issue 30): TRACE − GRPO at short and long chains, across builds and seeds.

    python benchmarks/study_dose.py --out runs/dose --regimes long short --builds 0 1 2 \
        --seeds 0 1 2 3 --methods grpo trace_rkl trace_fkl random25 [--w0 2 8] [--report-only]

A cell is (regime, build seed, seed, method): one 5-round `testbed_study` run through the whole
pipeline. Regime `short` is today's default testbed (1-3 digit operands, 1-4 steps); `long` is
the long-chain task (`TestbedConfig` LONG_CHAIN: 8-9 digit operands, 8-10 steps, each step's
written digit and carry on a line of its own, annotate.coverage_cap 0.25, longer rollouts).
Each (regime, build) is one study folder `<out>/<regime>-b<build>` sharing one testbed build
`<out>/tb-<regime>-b<build>`; `--w0` adds the secondary study: `trace_rkl` at those initial KL
weights in the long regime (folders `<out>/long-b<build>-w0_<w>`, paired with that build's GRPO).

Cells run one at a time in seed-major order, interleaving regimes (so a study cut short has both
regimes on the first seeds), and append rows to their folder's rows.jsonl; rerunning the command
skips finished cells. `--report-only` writes `<out>/table.md`: per regime and comparison, the
paired Δ pooled over builds with the two-level bootstrap interval (study_report), and the count
of finished cells.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REGIMES = ("short", "long")
# The long regime's run settings beyond the testbed build: responses of 8-10 steps are ~170
# tokens, so rollouts and eval get room; spans are a line of ~4-10 tokens, so the paper's cap.
LONG_RUN = ["rollout.max_tokens=320", "eval.max_tokens=320", "annotate.coverage_cap=0.25"]


def regime_overrides(regime: str, build: int) -> list[str]:
    from trace_rl.testbed.config import long_chain_overrides

    if regime not in REGIMES:
        raise SystemExit(f"unknown regime {regime!r}; valid: {', '.join(REGIMES)}")
    # random25's budget is the regime's coverage cap (the plan in docs/testbed_results.md)
    extra = ([*long_chain_overrides(), *LONG_RUN, "train.span_fraction=0.25"] if regime == "long"
             else ["train.span_fraction=0.4"])
    return [*extra, f"model.testbed.seed={build}"]


def cells(regimes, builds, seeds, methods, w0s) -> list[tuple[str, int, int, str, float | None]]:
    """(regime, build, seed, method, w0) in run order: seed-major, regimes interleaved."""
    out = []
    for seed in seeds:
        for build in builds:
            for method in methods:
                out += [(r, build, seed, method, None) for r in regimes]
            out += [("long", build, seed, "trace_rkl", w) for w in w0s if "long" in regimes]
    return out


def folder(out: str, regime: str, build: int, w0: float | None) -> str:
    tail = f"-w0_{w0:g}" if w0 is not None else ""
    return os.path.join(out, f"{regime}-b{build}{tail}")


# The long regime's premise (issue 30): a privileged teacher that is right, a student that is not.
TEACHER_MIN, STUDENT_RANGE = 0.90, (0.15, 0.40)


def check_premise(tb: str) -> None:
    """Refuse a long-regime build whose warm start misses the premise: its cells would measure
    a teacher that cannot teach (docs/testbed_results.md, "The long-chain testbed")."""
    from trace_rl.testbed.build import read_manifest

    acc = (read_manifest(tb) or {}).get("accuracy") or {}
    t, s = acc.get("privileged"), acc.get("student")
    if t is None or s is None or t < TEACHER_MIN or not STUDENT_RANGE[0] <= s <= STUDENT_RANGE[1]:
        raise SystemExit(f"{tb}: teacher {t}, student {s} at the warm start; the long regime needs "
                         f"a teacher >= {TEACHER_MIN:.0%} and a student in {STUDENT_RANGE}. Change "
                         "LONG_CHAIN (testbed/config.py) or run --regimes short")


def run_cell(out: str, cell, rounds: int, threads: int) -> None:
    from testbed_study import is_done, run_one
    from trace_rl.stages.config import load_config
    from trace_rl.testbed.build import build_testbed

    regime, build, seed, method, w0 = cell
    study = folder(out, regime, build, w0)
    if is_done(study, method, seed, rounds):
        return
    os.makedirs(study, exist_ok=True)
    tb = os.path.join(out, f"tb-{regime}-b{build}")
    extra = [*regime_overrides(regime, build), *([f"train.schedule.w0={w0}"] if w0 else [])]
    cfg = load_config("demo", [*extra, f"model.testbed_dir={tb}"])
    build_testbed(cfg.model.testbed, tb, progress=True)
    if regime == "long":
        check_premise(tb)
    print(f"[dose] {regime} build {build} seed {seed} {method} w0={w0}", flush=True)
    run_one(method, seed, rounds, study, tb, extra, threads, eval_rounds=[rounds])


def report(out: str, regimes, builds, methods, w0s, rounds: int) -> str:
    """Pooled paired Δ per regime (study_report.across_builds_table), cells finished."""
    import pandas as pd
    from study_report import across_builds_table
    from testbed_study import load_rows

    parts = []
    for regime in regimes:
        frames, labels = [], []
        for b in builds:
            rows = load_rows(folder(out, regime, b, None))
            if rows:
                frames.append(pd.DataFrame(rows))
                labels.append(f"build {b}")
        done = sum(len({(r["method"], r["seed"]) for r in f.to_dict("records")
                        if r["round"] == rounds and r.get("heldout_acc") is not None})
                   for f in frames)
        parts.append(f"### {regime} chains: {done} cells finished\n")
        if frames:
            parts.append(across_builds_table(frames, labels, methods))
    for w in w0s:
        frames, labels = [], []
        for b in builds:
            base = load_rows(folder(out, "long", b, None))
            var = load_rows(folder(out, "long", b, w))
            rows = [r for r in base if r["method"] == "grpo"] + [
                {**r, "method": f"trace_rkl_w0_{w:g}"} for r in var]
            if var:
                frames.append(pd.DataFrame(rows))
                labels.append(f"build {b}")
        parts.append(f"### long chains, trace_rkl at w0 = {w:g}\n")
        if frames:
            parts.append(across_builds_table(frames, labels, [f"trace_rkl_w0_{w:g}"]))
    text = "\n".join(parts)
    Path(out, "table.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/dose")
    ap.add_argument("--regimes", nargs="+", default=["long", "short"])
    ap.add_argument("--builds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--methods", nargs="+", default=["grpo", "trace_rkl", "trace_fkl", "random25"])
    ap.add_argument("--w0", type=float, nargs="*", default=[])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if not a.report_only:
        for cell in cells(a.regimes, a.builds, a.seeds, a.methods, a.w0):
            run_cell(a.out, cell, a.rounds, a.threads)
    print(report(a.out, a.regimes, a.builds, a.methods, a.w0, a.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
