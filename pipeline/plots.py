"""What a run has left behind, as plots and markdown: `plot_run(run_root)` writes `<run>/plots/`.

    plots/curves.png     per optimizer step: rollout reward (a round mean, drawn across the
                         round's steps), loss parts, the KL weight λ, KL per direction, span token
                         fraction with annotation coverage, clip fraction, entropy, response
                         length and grad norm; dotted lines mark where a round starts
    plots/accuracy.png   per policy k: held-out avg@k of each benchmark with its bootstrap 95% CI
                         band (only once some checkpoint has an eval summary)
    plots/summary.md     the same numbers as tables (`metrics_markdown`)

Round k's numbers describe policy k (the checkpoint that sampled round k: the initial model for
k = 0, checkpoints/round-000k after). A metric a run does not have (GRPO has no KL term, an older
run no grad norm) leaves its panel out rather than drawing a flat line.
"""

from __future__ import annotations

import io
from typing import Any

from trace_rl.data_schemas.errors import StageError

from .layout import checkpoint_name
from .plots_data import (
    FIVE_COLUMN_MEAN,
    PLOTS_DIR,
    SUMMARY_MD,
    Accuracy,
    RoundStats,
    RunStats,
    collect_run,
)
from .plots_figures import build_figures
from .store import RunStore

__all__ = ["Accuracy", "RoundStats", "RunStats", "collect_run", "metrics_markdown", "plot_run", "save_figures"]


def plot_run(run_root: str) -> list[str]:
    """Write `<run>/plots/` (curves.png, accuracy.png once evals exist, summary.md) and return
    the paths written, PNGs first. An empty run raises StageError saying what is missing."""
    store = RunStore(run_root)
    stats = collect_run(run_root)
    if stats.empty:
        raise StageError(
            f"nothing to plot in {run_root}: no round has verdicts or train metrics and no "
            "checkpoint has an eval summary yet (run a round, or check the run directory)"
        )
    paths = save_figures(store, build_figures(stats, title=f"run {run_root.rstrip('/').rsplit('/', 1)[-1]}"))
    summary = store.path(PLOTS_DIR, SUMMARY_MD)
    store.write_text(summary, metrics_markdown(run_root, stats))
    return paths + [summary]


def save_figures(store: RunStore, figures: dict[str, Any]) -> list[str]:
    """Each Figure as `<run>/plots/<name>`, written whole then renamed into place."""
    store.fs.makedirs(store.path(PLOTS_DIR), exist_ok=True)
    paths = []
    for name, fig in figures.items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        path = store.path(PLOTS_DIR, name)
        tmp = f"{path}.tmp"
        with store.fs.open(tmp, "wb") as fh:
            fh.write(buf.getvalue())
        store.fs.mv(tmp, path)
        paths.append(path)
    return paths


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _fmt_acc(acc: Accuracy | None) -> str:
    if acc is None:
        return "–"
    ci = f" [{100 * acc.ci95[0]:.1f}, {100 * acc.ci95[1]:.1f}]" if acc.ci95 else ""
    return f"{100 * acc.value:.2f}{ci}"


_ROUND_COLUMNS = (  # (header, RoundStats attribute, format)
    ("rollouts", "rollouts", "d"), ("reward rate", "reward_rate", ".3f"), ("coverage (rows with spans)", "coverage", ".3f"),
    ("train steps", "steps", "d"), ("loss", "loss", ".4f"), ("kl weight", "kl_weight", ".3f"),
    ("span token frac", "span_token_frac", ".3f"), ("clip frac", "clip_frac", ".4f"),
    ("entropy", "entropy", ".3f"), ("response len", "response_len", ".1f"),
    ("grad norm", "grad_norm", ".3f"),
)


def metrics_markdown(run_root: str, stats: RunStats | None = None) -> str:
    """Markdown tables (plots/summary.md, Prefect artifacts): one row per round (step metrics
    are means over the round's steps), then avg@k (%) [95% CI] by policy."""
    stats = collect_run(run_root) if stats is None else stats
    lines = ["| round | " + " | ".join(h for h, _, _ in _ROUND_COLUMNS) + " |",
             "|---" * (len(_ROUND_COLUMNS) + 1) + "|"]
    for r in stats.rounds:
        cells = [_fmt(getattr(r, attr), spec) for _, attr, spec in _ROUND_COLUMNS]
        lines.append(f"| {r.round} | " + " | ".join(cells) + " |")
    if stats.evals:
        benches = sorted({b for accs in stats.evals.values() for b in accs}, key=lambda b: (b == FIVE_COLUMN_MEAN, b))
        lines += ["", "avg@k (%) [95% CI] of policy k", "",
                  "| policy | " + " | ".join(benches) + " |", "|---" * (len(benches) + 1) + "|"]
        for k in sorted(stats.evals):
            cells = [_fmt_acc(stats.evals[k].get(b)) for b in benches]
            lines.append(f"| {checkpoint_name(k)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
