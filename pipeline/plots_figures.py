"""The Figures of `plot_run`, built from RunStats without touching disk (so tests can read them).

Figures get their own Agg canvas: no pyplot global state, no display needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .plots_data import ACCURACY_PNG, CURVES_PNG, FIVE_COLUMN_MEAN, RunStats

KL_DIRECTIONS = ("kl_forward", "kl_reverse", "kl_jsd")  # the trainer's kl/<direction> (metric_column)


@dataclass(frozen=True)
class Panel:
    title: str
    draw: Callable[[Any, RunStats], None]
    ylabel: str = ""
    legend: bool = False


def _has(stats: RunStats, col: str) -> bool:
    return any(not math.isnan(v) for v in stats.steps.get(col, []))


def _nonzero(stats: RunStats, col: str) -> bool:
    return any(not math.isnan(v) and v != 0.0 for v in stats.steps.get(col, []))


def has_kl(stats: RunStats) -> bool:
    """Whether the run has a KL term at all: GRPO logs λ = 0 and kl_loss = 0 on every step."""
    return _nonzero(stats, "kl_weight") or _nonzero(stats, "kl_loss") or any(_has(stats, c) for c in KL_DIRECTIONS)


def _step_lines(*cols: str) -> Callable[[Any, RunStats], None]:
    def draw(ax: Any, stats: RunStats) -> None:
        for col in cols:
            if _has(stats, col):
                ax.plot(stats.steps["step"], stats.steps[col], label=col, lw=1.2)
    return draw


def _round_segments(ax: Any, stats: RunStats, attr: str, label: str, **style: Any) -> None:
    """A per-round value drawn flat across the steps that trained on that round."""
    labelled = False
    for r in stats.rounds:
        value = getattr(r, attr)
        if value is None or r.first_step is None:
            continue
        ax.plot([r.first_step, r.last_step], [value, value], marker="o", ms=3,
                label=None if labelled else label, **style)
        labelled = True


def _draw_reward(ax: Any, stats: RunStats) -> None:
    _round_segments(ax, stats, "reward_rate", "round mean reward", color="tab:green", lw=2)


def _draw_span(ax: Any, stats: RunStats) -> None:
    _step_lines("span_token_frac")(ax, stats)
    _round_segments(ax, stats, "coverage", "annotation coverage (mean over rows with spans)", color="tab:orange", lw=2, ls="--")


def curve_panels(stats: RunStats) -> list[Panel]:
    """The per-step panels this run has data for, in reading order."""
    candidates = [
        (any(r.reward_rate is not None and r.first_step is not None for r in stats.rounds),
         Panel("train reward (rollouts of the round)", _draw_reward, "reward")),
        (_has(stats, "loss"), Panel("loss parts", _step_lines("loss", "pg_loss", *(["kl_loss"] if has_kl(stats) else [])),
                                     legend=True)),
        (has_kl(stats) and _has(stats, "kl_weight"), Panel("KL weight λ", _step_lines("kl_weight"), "λ")),
        (any(_has(stats, c) for c in KL_DIRECTIONS), Panel("KL on routed spans", _step_lines(*KL_DIRECTIONS), legend=True)),
        (_nonzero(stats, "span_token_frac") or any(r.coverage is not None for r in stats.rounds),
         Panel("span token fraction / coverage", _draw_span, "fraction", legend=True)),
        (_has(stats, "clip_frac"), Panel("clip fraction", _step_lines("clip_frac"))),
        (_has(stats, "entropy"), Panel("policy entropy", _step_lines("entropy"), "nats / token")),
        (_has(stats, "response_len_mean"), Panel("response length", _step_lines("response_len_mean"), "tokens")),
        (_has(stats, "grad_norm"), Panel("grad norm", _step_lines("grad_norm"))),
    ]
    return [panel for ok, panel in candidates if ok]


def _new_figure(n_panels: int, ncols: int, panel_size: tuple[float, float]) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    # At least 7 inches wide, so the title of a one-panel figure is not cut off.
    fig = Figure(figsize=(max(7.0, panel_size[0] * ncols), panel_size[1] * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def curves_figure(stats: RunStats, title: str) -> Any | None:
    """Per-step training curves, one panel per metric family; None when nothing was trained."""
    from matplotlib.ticker import MaxNLocator

    panels = curve_panels(stats)
    if not panels:
        return None
    fig, axes = _new_figure(len(panels), 3, (4.6, 3.0))
    starts = [r.first_step for r in stats.rounds if r.first_step is not None][1:]
    span = (min(stats.steps["step"]) - 0.5, max(stats.steps["step"]) + 0.5) if stats.steps else None
    for ax, panel in zip(axes, panels):
        panel.draw(ax, stats)
        for x in starts:  # where a new round's rollouts start
            ax.axvline(x - 0.5, color="0.6", ls=":", lw=0.8)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if span is not None:  # one step axis for all panels, even where a column starts late
            ax.set_xlim(*span)
        if panel.legend:
            ax.legend(fontsize=7)
    fig.suptitle(f"{title}: per optimizer step (dotted lines: a new round starts)", fontsize=11)
    return fig


def _draw_accuracy(ax: Any, stats: RunStats, bench: str) -> None:
    """A line with a CI band only where every policy 0..last was evaluated: a line across
    policies that were never evaluated would draw values nobody measured. Otherwise each
    evaluated policy is a point with its CI as an error bar."""
    xs = sorted(k for k, accs in stats.evals.items() if bench in accs)
    accs = [stats.evals[k][bench] for k in xs]
    ys = [100 * a.value for a in accs]
    if xs != list(range(xs[-1] + 1)):
        lo = [y - 100 * a.ci95[0] if a.ci95 else 0.0 for y, a in zip(ys, accs)]
        hi = [100 * a.ci95[1] - y if a.ci95 else 0.0 for y, a in zip(ys, accs)]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color="tab:blue", capsize=4,
                    label="avg@k, 95% CI (evaluated policies only)")
        return
    ax.plot(xs, ys, marker="o", color="tab:blue", label="avg@k")
    with_ci = [(x, a.ci95) for x, a in zip(xs, accs) if a.ci95 is not None]
    if with_ci:
        ax.fill_between([x for x, _ in with_ci], [100 * c[0] for _, c in with_ci],
                        [100 * c[1] for _, c in with_ci], color="tab:blue", alpha=0.2, label="95% CI")
        if len(with_ci) == 1:  # a band over one point has no width: show it as an error bar too
            (x, (lo_, hi_)), = with_ci
            ax.plot([x, x], [100 * lo_, 100 * hi_], color="tab:blue", alpha=0.5, lw=6)


def accuracy_figure(stats: RunStats, title: str) -> Any | None:
    """Held-out avg@k (%) per benchmark by policy, with 95% CI bands; None without evals."""
    from matplotlib.ticker import MaxNLocator

    from .layout import checkpoint_name

    benches = sorted({b for accs in stats.evals.values() for b in accs}, key=lambda b: (b == FIVE_COLUMN_MEAN, b))
    if not benches:
        return None
    fig, axes = _new_figure(len(benches), 3, (4.2, 3.0))
    for ax, bench in zip(axes, benches):
        _draw_accuracy(ax, stats, bench)
        ax.set_title(bench, fontsize=10)
        ax.set_xlabel("policy k (checkpoint round-000k; 0 = the initial model)", fontsize=8)
        ax.set_ylabel("avg@k (%)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    last = max(stats.evals)
    # Two short lines: one long line was wider than a one-benchmark figure and lost both ends.
    fig.suptitle(f"{title}: held-out accuracy by policy\npolicy k samples round k, whose train "
                 f"writes policy k+1 (last: policy {last}, {checkpoint_name(last)})", fontsize=10)
    return fig


def build_figures(stats: RunStats, title: str) -> dict[str, Any]:
    """{file name: Figure} for the families the run has data for."""
    figures = {CURVES_PNG: curves_figure(stats, title), ACCURACY_PNG: accuracy_figure(stats, title)}
    return {name: fig for name, fig in figures.items() if fig is not None}
