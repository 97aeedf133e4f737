"""GRPO vs TRACE on a real model: SmolLM2-135M-Instruct on the generated word problems, on CPU.

    export TRACE_VLLM_PYTHON=$PWD/.venv-vllm/bin/python
    python benchmarks/real_model_study.py --rounds 5 --seeds 0 1 2 --methods grpo trace_rkl \
        --out runs/real_study [section.key=value ...]
    python benchmarks/real_model_study.py --out runs/real_study --report-only

The sibling of benchmarks/testbed_study.py for `configs/smollm2-gsm8k.yaml`; results and the
settings in docs/real_model.md ("GRPO vs TRACE on SmolLM2").

Every (method, seed) is a pipeline run through the stage functions (prepare, rollout, verify,
annotate, train, evaluate) in `<out>/<method>-s<seed>`. Paired by seed: the methods of one seed
draw the same prompts (prepare and the prompt order depend on the seed only), share round 0's
rollouts and verdicts (the first method's datasets are copied into the others' run roots before
their round 0, where the stages find them current) and the round-0 evaluation (run once per seed,
copied into the other methods' rows). After every finished round one row is appended to
`<out>/rows.jsonl`; a rerun of the same command skips the rounds already there and continues
where it stopped. Held-out rows carry each problem's accuracy, so the report pairs checkpoints
problem by problem: the evaluation's own bootstrap (stages/eval_summary.py) over the problems
of the per-problem differences, and a t-interval over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from testbed_study import _train_row, paired_ci

CONFIG = "smollm2-gsm8k"
BENCH = "word_problems_test"
METHODS: dict[str, list[str]] = {
    "grpo": ["train.method=grpo"],
    "trace_rkl": ["train.method=trace", "train.route.key_forward=false", "train.route.error_reverse=true"],
    "trace_fkl": ["train.method=trace", "train.route.key_forward=true", "train.route.error_reverse=false"],
}
# Sized for ~1 busy core (docs/real_model.md, "Cost of a round"); user overrides come after these.
STUDY_DEFAULTS: list[str] = [
    "rollout.engine=vllm",
    "rollout.vllm.persistent=true",  # one engine per run, each round's weights loaded in place
    "rollout.prompts_per_round=8",
    "rollout.n=8",  # groups of 8: at ~10% accuracy about half the groups have mixed rewards
    "rollout.max_tokens=96",
    "train.lr=1e-5",  # 1e-4 breaks the model within 2 steps (docs/real_model.md, pilot 1)
    "train.mini_batch_size=32",  # 64 rollouts: 2 optimizer steps per round
    "train.micro_batch_size=16",
    "train.save_every=0",  # an in-round progress save writes 1.6 GB (weights + Adam) per step
    "eval.k=2",
    "eval.limit=100",
    "eval.max_tokens=96",
]
SHARED_ROUND0 = ("rollout", "verify")  # annotate depends on the method's route


def run_overrides(method: str, seed: int, out: str, extra: list[str]) -> list[str]:
    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    return [*STUDY_DEFAULTS, *extra, *METHODS[method], f"run.name={method}-s{seed}",
            f"run.root={os.path.join(out, f'{method}-s{seed}')}", f"run.seed={seed}",
            f"train.seed={seed}"]


# ---------------------------------------------------------------------------------------------
# rows: append-only, the latest row of a (method, seed, round) wins


def append_row(out: str, row: dict[str, Any]) -> None:
    """One line per row; after a torn last line (a study killed mid-write) on a line of its own."""
    path = os.path.join(out, "rows.jsonl")
    with open(path, "a+b") as f:
        torn = False
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        f.write((b"\n" if torn else b"") + json.dumps(row).encode() + b"\n")


def load_rows(out: str) -> list[dict[str, Any]]:
    """The rows of rows.jsonl; a torn last line (a study killed mid-write) is ignored."""
    path = Path(out, "rows.jsonl")
    latest: dict[tuple, dict[str, Any]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        latest[(r["method"], r["seed"], r["round"])] = r
    return [latest[k] for k in sorted(latest)]


def evaluated(rounds: int, eval_rounds: list[int] | None) -> set[int]:
    """Rounds whose checkpoint gets a held-out evaluation: 0, the last, and `eval_rounds`."""
    return {0, rounds, *(eval_rounds or [])}


def pending_rounds(rows: list[dict[str, Any]], method: str, seed: int, rounds: int,
                   eval_rounds: list[int] | None) -> list[int]:
    """Rounds 0..rounds of (method, seed) still to do: no row yet, or a row that lacks the
    held-out accuracy its round should have."""
    have = {r["round"]: r for r in rows if r["method"] == method and r["seed"] == seed}
    need_eval = evaluated(rounds, eval_rounds)
    return [k for k in range(rounds + 1)
            if k not in have or (k in need_eval and have[k].get("heldout_acc") is None)]


def shared_initial(rows: list[dict[str, Any]], seed: int) -> dict[str, Any] | None:
    """The round-0 evaluation of `seed` by whichever method ran it first."""
    return next((r for r in rows if r["seed"] == seed and r["round"] == 0
                 and r.get("heldout_acc") is not None), None)


def copy_round0(src_root: str, dst_root: str, names: list[str]) -> list[str]:
    """Copy round 0's datasets `names` (store-relative) from another method's run root of the
    same seed, where this run has none; returns what was copied."""
    copied = []
    for name in names:
        src, dst = Path(src_root, name), Path(dst_root, name)
        if src.is_dir() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst)
            copied.append(name)
    return copied


# ---------------------------------------------------------------------------------------------
# one run


def _eval_row(cfg, checkpoint: str) -> dict[str, Any]:
    from trace_rl.data_schemas import EVAL_SAMPLES
    from trace_rl.stages.common import open_store
    from trace_rl.stages.evaluate import run_eval

    summary = run_eval(cfg, checkpoint=checkpoint, progress=False)
    entry = summary["benchmarks"][BENCH]
    samples = open_store(cfg).read(entry["dataset"], EVAL_SAMPLES).select(["problem_id", "correct"])
    per: dict[str, list[bool]] = {}
    for r in samples.to_pylist():
        per.setdefault(r["problem_id"], []).append(bool(r["correct"]))
    return {"heldout_acc": entry["avg@k"], "heldout_ci95": entry["ci95"],
            "heldout_tokens": entry["mean_response_tokens"], "heldout_n": entry["n_samples"],
            "heldout_per_problem": {p: sum(v) / len(v) for p, v in sorted(per.items())}}


def run_one(method: str, seed: int, rounds: int, out: str, extra: list[str], first: str,
            eval_rounds: list[int] | None) -> None:
    from trace_rl.stages import get_stage
    from trace_rl.stages.common import dataset_name, open_store
    from trace_rl.stages.config import dump_config, load_config
    from trace_rl.stages.engines.session import engine_session
    from trace_rl.trainer.resident import trainer_session

    todo = pending_rounds(load_rows(out), method, seed, rounds, eval_rounds)
    if not todo:
        return
    cfg = load_config(CONFIG, run_overrides(method, seed, out, extra))
    store = open_store(cfg)
    store.write_text(store.path("config.yaml"), dump_config(cfg))
    get_stage("prepare")(cfg, None, progress=False)
    base = {"method": method, "seed": seed}
    if 0 in todo:
        initial = shared_initial(load_rows(out), seed)
        row0 = ({k: v for k, v in initial.items() if k.startswith("heldout_")}
                | {"heldout_from": initial.get("heldout_from", initial["method"])}
                if initial else {**_eval_row(cfg, "initial"), "heldout_from": method})
        append_row(out, {**base, "round": 0, **row0, "wall_s": 0.0})
    if method != first:
        names = [dataset_name(s, 0) for s in SHARED_ROUND0]
        copied = copy_round0(os.path.join(out, f"{first}-s{seed}"), cfg.run.root, names)
        if copied:
            print(f"[study] {method} seed {seed}: round 0 {', '.join(copied)} from {first}", flush=True)
    # The trainer and the vLLM engine stay in memory between the rounds (as in a flow): a train
    # stage that starts cold from a weights-only checkpoint would replay every round since the
    # last full state, and a cold vLLM start costs ~2 minutes on busy cores.
    with engine_session(), trainer_session():
        for k in range(rounds):
            if k + 1 in todo:
                _round(cfg, store, base, k, rounds, out, eval_rounds)


def _round(cfg, store, base: dict[str, Any], k: int, rounds: int, out: str,
           eval_rounds: list[int] | None) -> None:
    """Round k: its stages, then (on an evaluated round) the held-out evaluation; one row."""
    from trace_rl.stages import get_stage

    t0, stage_s = time.time(), {}
    for stage in ("rollout", "verify", "annotate", "train"):
        ts = time.time()
        get_stage(stage)(cfg, k, progress=False)
        stage_s[f"{stage}_s"] = round(time.time() - ts, 1)
    row = {**base, "round": k + 1, **_train_row(store, k), **stage_s}
    if k + 1 in evaluated(rounds, eval_rounds):
        ts = time.time()
        row |= _eval_row(cfg, f"round-{k + 1}")
        row["eval_s"] = round(time.time() - ts, 1)
    row["wall_s"] = round(time.time() - t0, 1)
    append_row(out, row)
    print(f"[study] {base['method']} seed {base['seed']} round {k + 1}: reward {row['train_reward']:.3f}, "
          f"held-out {row.get('heldout_acc', float('nan')):.3f}, {row['wall_s']:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------
# report


def paired_problem_ci(a: dict[str, float], b: dict[str, float], resamples: int = 2000,
                      seed: int = 0) -> tuple[float, list[float] | None]:
    """Mean of b - a over the problems both hold, with the evaluation's problem bootstrap
    (eval_summary.bootstrap_means) of the per-problem differences."""
    import numpy as np
    from trace_rl.stages.eval_summary import bootstrap_means, percentile_ci

    common = sorted(set(a) & set(b))
    d = np.array([b[p] - a[p] for p in common], dtype=float)
    return float(d.mean()), percentile_ci(bootstrap_means(d, resamples, seed))


def _pct(x: float, ci: list[float] | None) -> str:
    return f"{100 * x:+.1f}" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "")


def report(rows: list[dict[str, Any]], rounds: int) -> str:
    """Markdown: held-out accuracy and train reward by round; each method's round-`rounds` gain
    over round 0 and its difference to grpo, per seed (problem-paired bootstrap) and over seeds
    (problems pooled: per-problem differences averaged over seeds, then bootstrapped; and a
    t-interval over the seeds' differences)."""
    import numpy as np

    by = {(r["method"], r["seed"], r["round"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| method | seed | " + " | ".join(f"r{k}" for k in range(rounds + 1)) + " |",
             "|---|---|" + "---|" * (rounds + 1)]
    for m in methods:
        for s in seeds:
            cells = []
            for k in range(rounds + 1):
                r = by.get((m, s, k))
                acc = "" if r is None or r.get("heldout_acc") is None else f"**{100 * r['heldout_acc']:.1f}**"
                rew = "" if r is None or r.get("train_reward") is None else f"({100 * r['train_reward']:.0f})"
                cells.append(" ".join(x for x in (acc, rew) if x) or "-")
            lines.append(f"| {m} | {s} | " + " | ".join(cells) + " |")
    lines += ["", ("Column rk: checkpoint k. Bold: its held-out avg@k (%); in parentheses: the "
                   "reward (%) of the rollouts that trained it, sampled by checkpoint k-1."), ""]

    def compare(title: str, pairs: list[tuple[dict, dict]]) -> None:
        if not pairs:
            return
        per_seed = [paired_problem_ci(a["heldout_per_problem"], b["heldout_per_problem"], seed=i)
                    for i, (a, b) in enumerate(pairs)]
        common = sorted(set.intersection(*(set(a["heldout_per_problem"]) & set(b["heldout_per_problem"])
                                          for a, b in pairs)))
        pooled_a = {p: np.mean([a["heldout_per_problem"][p] for a, _ in pairs]) for p in common}
        pooled_b = {p: np.mean([b["heldout_per_problem"][p] for _, b in pairs]) for p in common}
        m, ci = paired_problem_ci(pooled_a, pooled_b)
        lines.append(f"| {title} | {len(pairs)} | " + "; ".join(_pct(*x) for x in per_seed)
                     + f" | {_pct(m, ci)} | {paired_ci([x[0] for x in per_seed])} |")

    lines += [("| comparison (held-out, points) | seeds | per seed [problem bootstrap 95%] | "
              "pooled over seeds [problem bootstrap 95%] | mean over seeds [t 95%] |"),
              "|---|---|---|---|---|"]
    ok = lambda r: r is not None and r.get("heldout_per_problem")
    for m in methods:
        compare(f"{m}: round {rounds} - round 0",
                [(by[(m, s, 0)], by[(m, s, rounds)]) for s in seeds
                 if ok(by.get((m, s, 0))) and ok(by.get((m, s, rounds)))])
    for m in methods:
        if m != "grpo":
            compare(f"{m} - grpo, round {rounds}",
                    [(by[("grpo", s, rounds)], by[(m, s, rounds)]) for s in seeds
                     if ok(by.get(("grpo", s, rounds))) and ok(by.get((m, s, rounds)))])
    return "\n".join(lines) + "\n"


def plot_curves(rows: list[dict[str, Any]], path: str) -> None:
    """Train reward by the checkpoint that sampled the rollouts (each seed thin, the seed mean
    thick) and held-out accuracy at the evaluated checkpoints (with the evaluation's bootstrap 95%
    CI), per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_r, ax_h) = plt.subplots(1, 2, figsize=(11, 4))
    for i, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
        color, mine = f"C{i}", [r for r in rows if r["method"] == m]
        by_round: dict[int, list[float]] = {}
        for s in sorted({r["seed"] for r in mine}):
            pts = sorted((r["round"] - 1, r["train_reward"]) for r in mine
                         if r["seed"] == s and r.get("train_reward") is not None)
            for k, v in pts:
                by_round.setdefault(k, []).append(v)
            if pts:
                ax_r.plot(*zip(*pts), color=color, alpha=0.3, lw=1)
            ev = sorted((r["round"], r["heldout_acc"], *(r.get("heldout_ci95") or [np.nan, np.nan]))
                        for r in mine if r["seed"] == s and r.get("heldout_acc") is not None)
            if ev:
                k, a, lo, hi = map(np.array, zip(*ev))
                ax_h.errorbar(k + 0.08 * (i + s / 4), a, yerr=[a - lo, hi - a], color=color, marker="o",
                              capsize=3, label=f"{m} seed {s}")
        if by_round:
            ks = sorted(by_round)
            ax_r.plot(ks, [np.mean(by_round[k]) for k in ks], color=color, lw=2.5, marker="o", label=m)
    ax_r.set(title="train reward (on-policy accuracy)", xlabel="checkpoint that sampled the rollouts",
             ylabel="reward")
    ax_h.set(title="held-out avg@k (bootstrap 95% CI)", xlabel="checkpoint round", ylabel="accuracy")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_r, ax_h):
        ax.legend(fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["grpo", "trace_rkl"], help=", ".join(METHODS))
    ap.add_argument("--out", default="runs/real_study")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the trainer")
    ap.add_argument("--eval-rounds", type=int, nargs="*", default=None,
                    help="rounds evaluated besides 0 and the last")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("overrides", nargs="*", help="section.key=value passed to every run")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    for m in a.methods:
        run_overrides(m, 0, a.out, [])  # a typo fails before any work
    if not a.report_only:
        import torch

        torch.set_num_threads(a.threads)
        # Seed-major: a study cut short has every method on its first seeds.
        for seed in a.seeds:
            for m in a.methods:
                run_one(m, seed, a.rounds, a.out, a.overrides, a.methods[0], a.eval_rounds)
    rows = load_rows(a.out)
    text = report(rows, a.rounds)
    Path(a.out, "table.md").write_text(text)
    if rows:
        plot_curves(rows, os.path.join(a.out, "curves.png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
