"""The paper's findings in miniature: GRPO vs TRACE vs all-token self-OPD vs span ablations on the
CPU testbed, R rounds x S seeds, held-out accuracy every round.

    trace-rl testbed init demo --out /tmp/study-testbed
    python benchmarks/testbed_study.py --rounds 5 --seeds 0 1 2 --methods grpo trace_fkl self_opd \
        --out runs/study --jobs 2 --threads 1 --testbed-dir /tmp/study-testbed [section.key=value ...]

Results and the settings under which GRPO learns: docs/testbed_results.md.

Every (method, seed) is a full pipeline run through the stage functions (prepare, rollout, verify,
annotate, train, evaluate) in its own run root `<out>/<method>-s<seed>`, all sharing ONE testbed
build (model.testbed_dir). Stages skip themselves when current, so rerunning the same command
continues where it stopped (runs already complete in rows.jsonl are skipped; round 0, the warm
start, is evaluated once per seed and shared by the methods). After every round a row of measurements is appended to
`<out>/rows.jsonl` (nothing is lost when the study is cut short); at the end (and after each run)
`<out>/study.parquet`, `<out>/curves.png` and a markdown table `<out>/table.md` are written.

Measured per (method, seed, round): held-out avg@k of checkpoint round-k (round 0 = the warm
start), its mean response tokens; from round-(k-1)'s training data: train reward, entropy,
response length, KL term, λ, span-token fraction, annotation coverage of routed rollouts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Each method is the demo config plus these overrides (METHOD.md "Baselines").
METHOD_OVERRIDES: dict[str, list[str]] = {
    "grpo": ["train.method=grpo"],
    "self_opd": ["train.method=self_opd", "train.self_opd.direction=forward", "train.self_opd.mode=add"],
    "trace_fkl": ["train.method=trace", "train.route.key_forward=true", "train.route.error_reverse=false"],
    "trace_rkl": ["train.method=trace", "train.route.key_forward=false", "train.route.error_reverse=true"],
    "random25": ["train.method=trace", "train.span_source=random"],
    "inverted25": ["train.method=trace", "train.span_source=inverted"],
}
# Variants of the KL bound (docs/method.md "The bound on D_t"): `<method>@<bound>` runs <method>
# with that bound, e.g. trace_fkl@none; plain <method> runs the trainer's default bound.
KL_BOUNDS = ("none", "per_term_clip", "token_scale")
# Settings under which GRPO learns on the default testbed (see docs/testbed_results.md);
# user overrides come after these and win.
STUDY_DEFAULTS: list[str] = [
    "rollout.prompts_per_round=32",  # x rollout.n=8 = 256 rollouts per round
    "train.lr=1e-4",  # 3e-4 and above: Adam's near-sign first steps raise entropy, accuracy falls
    "train.mini_batch_size=32",  # 8 optimizer steps per round: 5 rounds = the λ schedule's 40 steps
    "train.micro_batch_size=32",
    "eval.benchmarks=[testbed]",
    "eval.k=2",
    "eval.limit=256",
    "eval.bootstrap=0",
]
TRAIN_COLUMNS = ("loss", "pg_loss", "kl_loss", "kl_weight", "entropy", "response_len_mean",
                 "span_token_frac", "clip_frac", "grad_norm")


def bound_overrides(bound: str) -> list[str]:
    """Overrides selecting a KL bound, for whichever trainer config is installed: `kl_bound`
    (+ its constant) when the trainer has it, else the older `kl_term_clip` (null = none)."""
    from trace_rl.trainer.config import TrainConfig

    if bound not in KL_BOUNDS:
        raise SystemExit(f"unknown KL bound {bound!r}; valid: {', '.join(KL_BOUNDS)}")
    if "kl_bound" in TrainConfig.model_fields:
        return [f"train.kl_bound={bound}"]
    if bound == "token_scale":
        raise SystemExit("this trainer has no direction-preserving bound (train.kl_bound)")
    return ["train.kl_term_clip=null" if bound == "none" else "train.kl_term_clip=0.05"]


def method_overrides(method: str) -> list[str]:
    """`trace_fkl` -> its overrides; `trace_fkl@none` -> the same plus the bound's."""
    base, _, bound = method.partition("@")
    if base not in METHOD_OVERRIDES:
        raise SystemExit(f"unknown method {base!r}; valid: {', '.join(METHOD_OVERRIDES)} "
                         f"(optionally @bound, bound in {', '.join(KL_BOUNDS)})")
    return [*METHOD_OVERRIDES[base], *(bound_overrides(bound) if bound else [])]


def run_overrides(method: str, seed: int, out: str, testbed_dir: str, extra: list[str]) -> list[str]:
    """The full override list of one run: study defaults, user extras, the method (whose bound
    variant wins over a bound given in the extras), the seed."""
    root = os.path.join(out, f"{method}-s{seed}")
    return [*STUDY_DEFAULTS, *extra, *method_overrides(method),
            f"run.name={method}-s{seed}".replace("@", "-"), f"run.root={root}", f"run.seed={seed}",
            f"train.seed={seed}", f"model.testbed_dir={testbed_dir}"]


def _train_row(store, round_index: int) -> dict[str, Any]:
    """Round `round_index`'s training measurements: step means of metrics.parquet, reward of the
    verdicts, and the mean coverage of rollouts whose annotation routed spans."""
    import numpy as np
    from trace_rl.data_schemas import ANNOTATIONS, TRAIN_METRICS, VERDICTS
    from trace_rl.stages.common import dataset_name

    metrics = store.read(dataset_name("train", round_index), TRAIN_METRICS, allow_extra=True).to_pydict()
    row: dict[str, Any] = {}
    for col in TRAIN_COLUMNS:
        vals = [v for v in metrics.get(col, []) if v is not None]
        row[f"train_{col}"] = float(np.mean(vals)) if vals else None
    kl_cols = [c for c in metrics if c.startswith(("kl_forward", "kl_reverse", "kl_jsd"))]
    for col in kl_cols:  # the trainer's kl/<direction>, by its column name (schema version 2)
        vals = [v for v in metrics[col] if v is not None]
        row[f"train_{col}"] = float(np.mean(vals)) if vals else None
    row["train_steps"] = len(metrics.get("step", []))
    row["train_last_step"] = int(max(metrics["step"])) if metrics.get("step") else None
    verdicts = store.read(dataset_name("verify", round_index), VERDICTS).to_pydict()
    row["train_reward"] = float(np.mean(verdicts["reward"]))
    ann = store.read(dataset_name("annotate", round_index), ANNOTATIONS).to_pydict()
    cov = [c for c, s in zip(ann["coverage"], ann["status"], strict=True) if s == "ok" and c is not None]
    row["annotation_coverage"] = float(np.mean(cov)) if cov else 0.0
    row["annotated_frac"] = len(cov) / max(len(ann["status"]), 1)
    return row


def _eval_row(cfg, checkpoint: str) -> dict[str, Any]:
    from trace_rl.stages.evaluate import run_eval

    entry = run_eval(cfg, checkpoint=checkpoint, progress=False)["benchmarks"]["testbed"]
    return {"heldout_acc": entry["avg@k"], "heldout_tokens": entry["mean_response_tokens"],
            "heldout_n": entry["n_samples"]}


def run_one(method: str, seed: int, rounds: int, out: str, testbed_dir: str, extra: list[str],
            threads: int, eval_rounds: list[int] | None = None) -> list[dict[str, Any]]:
    """One full pipeline run; returns (and appends to rows.jsonl) one row per round 0..rounds.
    Held-out accuracy is measured after the rounds in `eval_rounds` (None = every round); the
    others' rows carry the training measurements only (train reward is the on-policy accuracy
    of that round's rollouts)."""
    import torch

    torch.set_num_threads(threads)
    from trace_rl.stages import get_stage
    from trace_rl.stages.common import open_store
    from trace_rl.stages.config import dump_config, load_config

    cfg = load_config("demo", run_overrides(method, seed, out, testbed_dir, extra))
    store = open_store(cfg)
    store.write_text(store.path("config.yaml"), dump_config(cfg))
    get_stage("prepare")(cfg, None, progress=False)
    base = {"method": method, "seed": seed}
    # Round 0 is the warm start itself, the same checkpoint, problems and sampling seed for every
    # method of a seed: evaluate it once per seed and copy it into the other methods' rows.
    initial = next((r for r in load_rows(out) if r["seed"] == seed and r["round"] == 0
                    and r.get("heldout_acc") is not None), None)
    initial_eval = ({k: initial[k] for k in ("heldout_acc", "heldout_tokens", "heldout_n")}
                    | {"heldout_from": initial.get("heldout_from", initial["method"])}
                    if initial else _eval_row(cfg, "initial"))
    rows = [{**base, "round": 0, **initial_eval, "wall_s": 0.0}]
    _append(out, rows[-1])
    for k in range(rounds):
        t0 = time.time()
        for stage in ("rollout", "verify", "annotate", "train"):
            get_stage(stage)(cfg, k, progress=False)
        evaluated = eval_rounds is None or k + 1 in eval_rounds or k + 1 == rounds
        row = {**base, "round": k + 1, **_train_row(store, k),
               **(_eval_row(cfg, f"round-{k + 1}") if evaluated else {}), "wall_s": time.time() - t0}
        rows.append(row)
        _append(out, row)
    return rows


def is_done(out: str, method: str, seed: int, rounds: int) -> bool:
    """True when rows.jsonl holds the run's last round with its held-out accuracy."""
    return any(r["method"] == method and r["seed"] == seed and r["round"] == rounds
               and r.get("heldout_acc") is not None for r in load_rows(out))


def _append(out: str, row: dict[str, Any]) -> None:
    # One line per write, opened in append mode: safe enough across 2 worker processes.
    with open(os.path.join(out, "rows.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def load_rows(out: str) -> list[dict[str, Any]]:
    """All rows in rows.jsonl, the latest one winning for a repeated (method, seed, round)."""
    path = os.path.join(out, "rows.jsonl")
    if not os.path.exists(path):
        return []
    latest: dict[tuple, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            latest[(r["method"], r["seed"], r["round"])] = r
    return [latest[k] for k in sorted(latest)]


def write_outputs(out: str, methods: list[str] | None = None) -> None:
    """study.parquet, table.md and curves.png from rows.jsonl (only `methods`, when given)."""
    import pandas as pd

    rows = [r for r in load_rows(out) if methods is None or r["method"] in methods]
    if not rows:
        return
    df = pd.DataFrame(rows)
    df.to_parquet(os.path.join(out, "study.parquet"), index=False)
    Path(out, "table.md").write_text(summary_table(df))
    plot_curves(df, os.path.join(out, "curves.png"))


def summary_table(df) -> str:
    """Markdown: per method, held-out accuracy at the last round every seed reached (mean ± sd over
    seeds, and each seed), gain over the warm start, the paired difference to grpo on the same
    seeds (same prompts and warm start), and training diagnostics averaged over rounds."""
    import numpy as np

    # The last round of the study; runs still short of it (an interrupted study) are left out
    # of the accuracy columns rather than compared at an earlier round.
    r_final = int(df["round"].max())
    acc = df[df["round"] == r_final].set_index(["method", "seed"])["heldout_acc"]
    acc0 = df[df["round"] == 0].set_index(["method", "seed"])["heldout_acc"]
    header = (f"| method | seeds | held-out acc, round {r_final} | gain vs warm start | "
              "Δ vs grpo, paired mean [95% CI] | "
              "per-seed | entropy | train len | eval len | KL term | span frac |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, g in df.groupby("method", sort=False):
        seeds = sorted(s for s in g["seed"].unique() if (method, s) in acc.index)
        if not seeds:
            continue
        finals = [float(acc[(method, s)]) for s in seeds]
        gains = [f - float(acc0[(method, s)]) for f, s in zip(finals, seeds, strict=True)]
        paired = [float(acc[(method, s)] - acc[("grpo", s)]) for s in seeds if ("grpo", s) in acc.index]
        wins = sum(d > 0 for d in paired)
        tr = g[(g["round"] > 0) & (g["round"] <= r_final)]
        lines.append(
            f"| {method} | {len(seeds)} | {_ms(finals, 100)} | {_ms(gains, 100, sign=True)} | "
            f"{paired_ci(paired) + f' ({wins}/{len(paired)} seeds >0)' if paired and method != 'grpo' else '-'} | "
            f"{', '.join(f'{100 * f:.1f}' for f in finals)} | "
            f"{tr['train_entropy'].mean():.4f} | {tr['train_response_len_mean'].mean():.1f} | "
            f"{tr['heldout_tokens'].mean():.1f} | {tr['train_kl_loss'].mean():.2e} | "
            f"{tr['train_span_token_frac'].mean():.3f} |")
    by_round = df.pivot_table(index="method", columns="round", values="heldout_acc", aggfunc="mean")
    lines += ["", "Held-out accuracy by round (%, mean over seeds):", "",
              "| method | " + " | ".join(str(c) for c in by_round.columns) + " |",
              "|---|" + "---|" * len(by_round.columns)]
    for method, row in by_round.iterrows():
        lines.append(f"| {method} | " + " | ".join("-" if np.isnan(v) else f"{100 * v:.1f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


# Two-sided 95% Student-t quantiles by degrees of freedom (no scipy in the venv).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093,
        24: 2.064, 29: 2.045}


def t95(df: int) -> float:
    """The 97.5% quantile of Student's t with df degrees of freedom (conservative between rows)."""
    if df < 1:
        raise ValueError(f"a t-interval needs >= 2 values (df >= 1); got df={df}")
    return _T95[max(k for k in _T95 if k <= df)] if df <= 29 else 1.96


def paired_ci(diffs: list[float], scale: float = 100.0) -> str:
    """'+1.2 [-0.5, +2.9]': the mean paired difference with its 95% t-interval over seeds."""
    import numpy as np

    m = scale * float(np.mean(diffs))
    if len(diffs) < 2:
        return f"{m:+.1f} (1 seed)"
    half = t95(len(diffs) - 1) * scale * float(np.std(diffs, ddof=1)) / np.sqrt(len(diffs))
    return f"{m:+.1f} [{m - half:+.1f}, {m + half:+.1f}]"


def _ms(values: list[float], scale: float = 1.0, sign: bool = False) -> str:
    import numpy as np

    m = scale * float(np.mean(values))
    text = f"{m:+.1f}" if sign else f"{m:.1f}"
    # one seed has no spread; say so rather than print "± nan"
    return text + (f" ± {scale * float(np.std(values, ddof=1)):.1f}" if len(values) > 1 else " (1 seed)")


def plot_curves(df, path: str) -> None:
    """Held-out accuracy, entropy, response length and KL term by round: seed mean with a
    min-max band per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [("heldout_acc", "held-out accuracy (avg@k)"), ("train_entropy", "entropy (nats/token)"),
              ("train_response_len_mean", "train response length (tokens)"),
              ("heldout_tokens", "held-out response length (tokens)"),
              ("train_kl_loss", "KL term (per token)"), ("train_reward", "train reward")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (col, title) in zip(axes.flat, panels, strict=True):
        for method, g in df.groupby("method", sort=False):
            if col not in g or g[col].isna().all():
                continue
            stats = g.groupby("round")[col].agg(["mean", "min", "max"]).dropna()
            line, = ax.plot(stats.index, stats["mean"], marker="o", ms=3, label=method)
            ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.2, color=line.get_color())
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _worker(args: tuple) -> tuple[str, int, str | None]:
    method, seed = args[0], args[1]
    try:
        run_one(*args)
        return method, seed, None
    except Exception:  # noqa: BLE001 -- one failed run must not lose the others
        return method, seed, traceback.format_exc()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHOD_OVERRIDES),
                    help=f"{', '.join(METHOD_OVERRIDES)}, each optionally @bound ({', '.join(KL_BOUNDS)})")
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (each gets cores/jobs threads)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = cores / jobs)")
    ap.add_argument("--testbed-dir", default="/tmp/study-testbed", help="ONE shared testbed build")
    ap.add_argument("--report-only", action="store_true", help="only rebuild parquet/table/plot")
    ap.add_argument("--eval-rounds", type=int, nargs="+", default=None,
                    help="rounds after which held-out accuracy is measured (default: all; round 0 "
                         "and the last are always measured)")
    ap.add_argument("overrides", nargs="*", help="section.key=value passed to every run")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.report_only:
        write_outputs(a.out, a.methods)
        return 0
    from trace_rl.stages.config import load_config
    from trace_rl.testbed.build import build_testbed, read_manifest

    for method in a.methods:  # a typo (or an override swallowed by --methods) fails here
        method_overrides(method)
    # Build (or reuse) the testbed once, before any worker starts, so none of them races to it.
    cfg0 = load_config("demo", run_overrides(a.methods[0], a.seeds[0], a.out, a.testbed_dir, a.overrides))
    manifest = read_manifest(a.testbed_dir)
    if manifest is not None and manifest.get("fingerprint") != cfg0.model.testbed.fingerprint():
        # build_testbed would silently replace it: a study must never overwrite another's build
        raise SystemExit(f"{a.testbed_dir} holds a testbed built with other model.testbed settings "
                         f"({manifest.get('config')}); pass the same model.testbed.* overrides "
                         "(after `--`) or another --testbed-dir")
    build_testbed(cfg0.model.testbed, a.testbed_dir, progress=True)
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.jobs)
    # Seed-major order: a study cut short still has every method on the first seeds.
    # A rerun of the same command continues: runs whose last round is in rows.jsonl are skipped.
    jobs = [(m, s, a.rounds, a.out, a.testbed_dir, a.overrides, threads, a.eval_rounds)
            for s in a.seeds for m in a.methods if not is_done(a.out, m, s, a.rounds)]
    print(f"[study] {len(jobs)} runs to do, {len(a.seeds) * len(a.methods) - len(jobs)} done",
          flush=True)
    failures = 0
    with ProcessPoolExecutor(max_workers=a.jobs) as pool:
        futs = [pool.submit(_worker, j) for j in jobs]
        for fut in as_completed(futs):
            method, seed, err = fut.result()
            print(f"[study] {method} seed {seed}: {'FAILED' if err else 'done'}", flush=True)
            if err:
                failures += 1
                print(err, file=sys.stderr)
            write_outputs(a.out, a.methods)
    write_outputs(a.out, a.methods)
    print(Path(a.out, "table.md").read_text())
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
