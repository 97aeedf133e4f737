"""Tables and curves for docs/testbed_results.md from one or more study folders.

    python benchmarks/study_report.py runs/study-a runs/study-b --labels "old testbed" "new testbed" \
        --png docs/testbed_curves.png > /tmp/tables.md

The figure: per folder, on-policy train reward by round and the final paired Δ vs grpo.
With --across-builds (the folders are one study on several testbed builds): first the paired Δ vs
grpo pooled over builds with a two-level bootstrap interval (builds, then seeds within them) and a
table of the builds. Per folder: the summary table of benchmarks/testbed_study.py (round-R accuracy, paired Δ vs grpo
with a 95% t-interval) and, when `<folder>/diagnostics.jsonl` exists (benchmarks/study_diagnostics.py),
a per-method, per-round table of the diagnostics (means over the seeds measured).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (column in diagnostics.jsonl, header, format)
DIAG_COLUMNS = [
    ("train_entropy", "entropy (train)", "{:.4f}"),
    ("heldout_tokens", "eval len", "{:.1f}"),
    ("fkl_key", "FKL key", "{:.4f}"),
    ("fkl_off_correct", "FKL off-span (correct)", "{:.4f}"),
    ("rkl_error", "RKL error", "{:.3f}"),
    ("rkl_off_incorrect", "RKL off-span (incorrect)", "{:.4f}"),
    ("under_alloc_key", "key tokens q−p>0.1", "{:.3f}"),
    ("entropy_key", "student entropy, key", "{:.3f}"),
    ("grad_ratio", "‖∇D‖/‖∇ℓ‖ on S", "{:.2f}"),
    ("kl_share", "KL share of span grad at λ", "{:.2f}"),
    ("teacher_acc", "teacher acc", "{:.1%}"),
]


def load_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    latest = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            latest[(r["method"], r["seed"], r["round"])] = r
    return list(latest.values())


def reward_table(df) -> str:
    """On-policy train reward by round (row k+1 = the rollouts of policy k; 256 per run), mean
    over seeds, with the paired Δ vs grpo averaged over rounds 1-R."""
    import numpy as np

    last = df.groupby(["method", "seed"])["round"].transform("max")
    df = df[last == df["round"].max()]  # complete runs only
    piv = df.pivot_table(index="method", columns="round", values="train_reward", aggfunc="mean")
    piv = piv.reindex([m for m in dict.fromkeys(df["method"]) if m in piv.index])
    base = df[df["method"] == "grpo"].groupby("seed")["train_reward"].mean()
    lines = [("Train reward by round (on-policy accuracy of that round's 256 rollouts; round k+1 = "
             "policy k; %, mean over seeds) and its all-round mean, paired Δ vs grpo [95% CI]:"), "",
             "| method | " + " | ".join(f"r{c}" for c in piv.columns) + " | Δ vs grpo, all rounds |",
             "|---|" + "---|" * (len(piv.columns) + 1)]
    from testbed_study import paired_ci

    for method, row in piv.iterrows():
        mine = df[df["method"] == method].groupby("seed")["train_reward"].mean()
        diffs = [float(mine[s] - base[s]) for s in mine.index if s in base.index]
        ci = paired_ci(diffs) if method != "grpo" and diffs else "-"
        lines.append(f"| {method} | " + " | ".join("-" if np.isnan(v) else f"{100 * v:.1f}"
                                                   for v in row) + f" | {ci} |")
    return "\n".join(lines) + "\n"


def diagnostics_table(folder: Path, methods: list[str] | None = None) -> str:
    """Mean over seeds of each diagnostic, per method and round; λ from rows.jsonl."""
    import pandas as pd

    diag = load_jsonl(folder / "diagnostics.jsonl")
    if not diag:
        return ""
    d = pd.DataFrame(diag)
    rows = pd.DataFrame(load_jsonl(folder / "rows.jsonl"))
    # rows.jsonl's round k+1 holds round k's training (its mean λ); diagnostics' round k is policy k
    lam = rows.assign(round=rows["round"] - 1)[["method", "seed", "round", "train_kl_weight",
                                                 "train_entropy"]]
    d = d.merge(lam, on=["method", "seed", "round"], how="left")
    acc = rows[["method", "seed", "round", "heldout_acc", "heldout_tokens"]]
    d = d.merge(acc, on=["method", "seed", "round"], how="left")
    w0 = 0.5
    d["grad_ratio"] = d["grad_kl"] / d["grad_pg"].where(d["grad_pg"] > 0)
    lam_ = d["train_kl_weight"].fillna(0.0)
    num = lam_ * d["grad_kl"]
    d["kl_share"] = num / (num + (1 - lam_ / w0) * d["grad_pg"])
    cols = [c for c in DIAG_COLUMNS if c[0] in d.columns]
    head = "| method | round | seeds | student acc | λ | " + " | ".join(h for _, h, _ in cols) + " |"
    lines = [head, "|" + "---|" * (5 + len(cols))]
    order = methods or list(dict.fromkeys(d["method"]))
    for method in order:
        g = d[d["method"] == method]
        for k, gk in g.groupby("round"):
            cells = []
            for col, _, fmt in cols:
                v = gk[col].mean()
                cells.append("-" if pd.isna(v) else fmt.format(v))
            acc_k = gk["heldout_acc"].mean()
            lam_k = gk["train_kl_weight"].mean()
            lines.append(f"| {method} | {k} | {gk['seed'].nunique()} | "
                         f"{'-' if pd.isna(acc_k) else f'{acc_k:.1%}'} | "
                         f"{'-' if pd.isna(lam_k) else f'{lam_k:.2f}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_studies(folders: list[Path], labels: list[str], path: str, methods: list[str] | None) -> None:
    """Per study: held-out accuracy (or, when not every round was evaluated, the on-policy train
    reward) by policy (mean over seeds, min-max band) on top, and
    each method's paired Δ vs grpo in final-round held-out accuracy (mean, 95% t-interval, and
    every seed's difference as a dot) below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    from testbed_study import t95

    fig, axes = plt.subplots(2, len(folders), figsize=(6.5 * len(folders), 8), squeeze=False)
    for j, (folder, label) in enumerate(zip(folders, labels, strict=True)):
        df = pd.DataFrame(load_jsonl(folder / "rows.jsonl"))
        last = df.groupby(["method", "seed"])["round"].transform("max")
        df = df[last == df["round"].max()]  # complete runs only
        order = [m for m in (methods or list(dict.fromkeys(df["method"]))) if m in set(df["method"])]
        final = df[df["round"] == df["round"].max()].set_index(["method", "seed"])["heldout_acc"]
        # Held-out accuracy of every policy when every round was evaluated, else the on-policy
        # train reward (row k+1 holds the rollouts of policy k).
        heldout = bool(df.groupby("round")["heldout_acc"].count().min() > 0)
        for i, method in enumerate(order):
            g = df[(df["method"] == method) & (df["round"] >= (0 if heldout else 1))]
            st = g.groupby("round")["heldout_acc" if heldout else "train_reward"].agg(
                ["mean", "min", "max"])
            x = st.index if heldout else st.index - 1
            line, = axes[0, j].plot(x, 100 * st["mean"], marker="o", ms=3,
                                    label=f"{method} ({g['seed'].nunique()} seeds)")
            axes[0, j].fill_between(x, 100 * st["min"], 100 * st["max"], alpha=0.12,
                                    color=line.get_color())
            if method == "grpo":
                continue
            d = [100 * float(final[(method, s)] - final[("grpo", s)])
                 for s in sorted(g["seed"].unique()) if ("grpo", s) in final.index]
            if not d:
                continue
            half = t95(len(d) - 1) * float(np.std(d, ddof=1)) / np.sqrt(len(d)) if len(d) > 1 else 0
            axes[1, j].errorbar([i], [np.mean(d)], yerr=[half], fmt="o", capsize=4,
                                color=line.get_color())
            axes[1, j].scatter([i + 0.12] * len(d), d, s=10, color=line.get_color(), alpha=0.6)
        axes[0, j].set_title(f"{label}: " + ("held-out accuracy (%)" if heldout
                                             else "on-policy train reward (%)"))
        axes[0, j].set_xlabel("policy (round)")
        axes[0, j].legend(fontsize=7)
        axes[1, j].axhline(0, color="k", lw=0.8)
        axes[1, j].set_xticks(range(len(order)), order, rotation=20, fontsize=7)
        axes[1, j].set_title(f"{label}: final held-out acc, Δ vs grpo (points; mean, 95% CI, seeds)",
                            fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def two_level_bootstrap(groups: list[list[float]], resamples: int = 10_000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float, float]:
    """(estimate, lo, hi): the mean over groups (builds) of each group's mean (seeds), and the
    central `level` percentile interval of a two-level bootstrap: draw as many groups as there
    are with replacement, then, independently for every drawn group, its values with replacement.
    The interval so carries the spread between groups as well as within them."""
    import numpy as np

    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("every group needs at least one value")
    rng = np.random.default_rng(seed)
    n_groups = len(groups)
    pick = rng.integers(0, n_groups, size=(resamples, n_groups))  # which group fills each slot
    # inner[g][r, j]: a resampled mean of group g, for draw r and slot j (used where pick == g)
    inner = [np.asarray(g, dtype=float)[rng.integers(0, len(g), size=(resamples, n_groups, len(g)))]
             .mean(axis=2) for g in groups]
    slot_means = np.choose(pick, inner)
    means = slot_means.mean(axis=1)
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    estimate = float(np.mean([np.mean(g) for g in groups]))
    return estimate, float(lo), float(hi)


def paired_final(df, method: str, base: str = "grpo") -> list[float]:
    """Per seed, `method` − `base` in held-out accuracy at the folder's last round (seeds where
    both reached it)."""
    final = df[df["round"] == df["round"].max()].dropna(subset=["heldout_acc"])
    acc = final.set_index(["method", "seed"])["heldout_acc"]
    return [float(acc[(method, s)] - acc[(base, s)]) for s in sorted(set(final["seed"]))
            if (method, s) in acc.index and (base, s) in acc.index]


def across_builds_table(frames: list, labels: list[str], methods: list[str]) -> str:
    """Markdown: per method, the paired Δ vs grpo pooled over builds (equal weight per build)
    with its two-level bootstrap interval, the between-build and within-build spread, and
    each build's own paired mean."""
    import numpy as np
    from testbed_study import paired_ci

    head = ("| comparison | builds × seeds | Δ (points), two-level bootstrap 95% CI | pairs > 0 | "
            "sd of build means | sd within build | " + " | ".join(labels) + " |")
    lines = [head, "|" + "---|" * (6 + len(labels))]
    for method in methods:
        if method == "grpo":
            continue
        groups = [paired_final(df, method) for df in frames]
        if any(not g for g in groups):
            continue
        est, lo, hi = two_level_bootstrap(groups)
        pairs = [d for g in groups for d in g]
        between = float(np.std([np.mean(g) for g in groups], ddof=1)) if len(groups) > 1 else 0.0
        within = float(np.sqrt(np.mean([np.var(g, ddof=1) for g in groups if len(g) > 1] or [0])))
        per_build = [paired_ci(g) for g in groups]
        lines.append(f"| {method} − grpo | {len(groups)} × {'/'.join(str(len(g)) for g in groups)} | "
                     f"**{100 * est:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]** | "
                     f"{sum(d > 0 for d in pairs)} / {len(pairs)} | {100 * between:.1f} | "
                     f"{100 * within:.1f} | " + " | ".join(per_build) + " |")
    return "\n".join(lines) + "\n"


def build_table(frames: list, labels: list[str], folders: list[Path]) -> str:
    """Markdown: each build's fingerprint and its own accuracies (manifest), and the study's
    round-0 eval, found through a run's config.yaml (model.testbed_dir)."""
    import yaml

    lines = ["| build | build seed | fingerprint | student | privileged teacher | study eval, round 0 |",
             "|---|---|---|---|---|---|"]
    for df, label, folder in zip(frames, labels, folders, strict=True):
        cfgs = sorted(folder.glob("*/config.yaml"))
        if not cfgs:
            continue
        tb = yaml.safe_load(cfgs[0].read_text())["model"]["testbed_dir"]
        m = json.loads((Path(tb) / "testbed_manifest.json").read_text())
        r0 = df[df["round"] == 0]["heldout_acc"].mean()
        lines.append(f"| {label} | {m['config']['seed']} | `{m['fingerprint']}` | "
                     f"{m['accuracy']['student']:.1%} | {m['accuracy']['privileged']:.1%} | "
                     f"{r0:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import pandas as pd
    from testbed_study import summary_table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--labels", nargs="+", default=None)
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--png", default=None)
    ap.add_argument("--across-builds", action="store_true",
                    help="the folders are one study on several testbed builds: first the paired "
                         "Δ vs grpo pooled over builds with a two-level bootstrap interval")
    a = ap.parse_args(argv)
    folders = [Path(f) for f in a.folders]
    labels = a.labels or [f.name for f in folders]
    if a.across_builds:
        frames = [pd.DataFrame(load_jsonl(f / "rows.jsonl")) for f in folders]
        methods = a.methods or list(dict.fromkeys(frames[0]["method"]))
        print(f"### Across builds\n\n{across_builds_table(frames, labels, methods)}\n"
              f"{build_table(frames, labels, folders)}")
    for folder, label in zip(folders, labels, strict=True):
        rows = load_jsonl(folder / "rows.jsonl")
        if not rows:
            continue
        df = pd.DataFrame(rows)
        if a.methods:
            df = df[df["method"].isin(a.methods)]
        # keep the seeds every run of the folder reached, and methods in the order asked
        order = a.methods or list(dict.fromkeys(df["method"]))
        df = df.assign(_o=df["method"].map({m: i for i, m in enumerate(order)})).sort_values(
            ["_o", "seed", "round"]).drop(columns="_o")
        print(f"### {label}\n\n{summary_table(df)}\n{reward_table(df)}")
        diag = diagnostics_table(folder, order)
        if diag:
            print(f"Diagnostics ({label}; policy k = the checkpoint that sampled round k):\n\n{diag}")
    if a.png:
        plot_studies(folders, labels, a.png, a.methods)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
