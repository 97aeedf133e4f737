"""Per-round curves of a run: accuracy, entropy and response length, as a PNG and as markdown.

Round k's numbers describe policy k (the checkpoint that sampled round k: the initial model for
k = 0, checkpoints/round-000k after): its eval avg@k when `eval/<ckpt>/summary.json` exists,
else the reward rate of its own rollouts; the entropy and response length the trainer logged
while training on round k's rollouts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from trace_rl.data_schemas import TRAIN_METRICS, VERDICTS

from .layout import ROUND_GLOB, checkpoint_name, dataset_name, eval_summary, parse_round, policy_index
from .store import RunStore


@dataclass
class RoundStats:
    """What one round left behind; None where the stage has not finished."""

    round: int
    rollouts: int | None = None
    reward_rate: float | None = None
    steps: int | None = None
    loss: float | None = None
    entropy: float | None = None
    response_len: float | None = None
    kl_weight: float | None = None
    span_token_frac: float | None = None


@dataclass
class RunStats:
    rounds: list[RoundStats] = field(default_factory=list)
    # policy index (0 = initial) -> {benchmark or "5-column mean": avg@k}
    evals: dict[int, dict[str, float]] = field(default_factory=dict)


def _mean(values: list[Any]) -> float | None:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(finite) / len(finite) if finite else None


def _rounds(store: RunStore) -> list[int]:
    """The rounds that have a directory in the run, ascending."""
    found = (parse_round(path) for path in store.fs.glob(store.path(ROUND_GLOB)))
    return sorted(k for k in found if k is not None)


def round_stats(store: RunStore, k: int) -> RoundStats:
    """Reward rate from round k's verdicts and step means from its train metrics."""
    stats = RoundStats(round=k)
    verdicts = dataset_name("verify", k)
    if store.manifest(verdicts) is not None:
        rewards = store.read(verdicts, VERDICTS).column("reward").to_pylist()
        stats.rollouts, stats.reward_rate = len(rewards), _mean(rewards)
    train = dataset_name("train", k)
    if store.manifest(train) is not None:
        table = store.read(train, TRAIN_METRICS, allow_extra=True)
        col = {name: table.column(name).to_pylist() for name in TRAIN_METRICS.names}
        stats.steps = table.num_rows
        stats.loss, stats.entropy = _mean(col["loss"]), _mean(col["entropy"])
        stats.response_len, stats.kl_weight = (
            _mean(col["response_len_mean"]),
            _mean(col["kl_weight"]),
        )
        stats.span_token_frac = _mean(col["span_token_frac"])
    return stats


def eval_stats(store: RunStore) -> dict[int, dict[str, float]]:
    """avg@k by policy index from eval summaries ('initial' = 0, 'round-000k' = k)."""
    out: dict[int, dict[str, float]] = {}
    for path in store.fs.glob(store.path(eval_summary("*"))):
        k = policy_index(path.rsplit("/", 2)[-2])
        if k is None:
            continue  # an external model dir has no place on the round axis
        summary = json.loads(store.read_text(path))
        accs = {b: e["avg@k"] for b, e in summary.get("benchmarks", {}).items()}
        five = (summary.get("five_column_mean") or {}).get("value")
        if five is not None:
            accs["5-column mean"] = five
        out[k] = accs
    return out


def collect_run(run_root: str) -> RunStats:
    """Every round's stats and every round checkpoint's eval of the run at `run_root`."""
    store = RunStore(run_root)
    return RunStats([round_stats(store, k) for k in _rounds(store)], eval_stats(store))


def _series(rounds: list[RoundStats], attr: str) -> tuple[list[int], list[float]]:
    pts = [(r.round, getattr(r, attr)) for r in rounds if getattr(r, attr) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_root: str, out_png: str) -> str:
    """One PNG: accuracy, entropy and response length by round. Returns `out_png`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    stats = collect_run(run_root)
    # A Figure with its own Agg canvas: no pyplot global state, no display needed.
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_acc, ax_ent, ax_len = fig.subplots(1, 3)
    if stats.evals:
        benches = sorted({b for accs in stats.evals.values() for b in accs})
        for bench in benches:
            xs = sorted(k for k, accs in stats.evals.items() if bench in accs)
            ax_acc.plot(xs, [100 * stats.evals[k][bench] for k in xs], marker="o", label=bench)
        ax_acc.set_title("eval accuracy (avg@k) of policy k")
    else:
        xs, ys = _series(stats.rounds, "reward_rate")
        ax_acc.plot(xs, [100 * y for y in ys], marker="o", label="rollout reward rate")
        ax_acc.set_title("reward rate of round k's rollouts")
    ax_acc.set_ylabel("accuracy (%)")
    for ax, attr, title in (
        (ax_ent, "entropy", "policy entropy (train, mean over steps)"),
        (ax_len, "response_len", "response length (tokens)"),
    ):
        xs, ys = _series(stats.rounds, attr)
        ax.plot(xs, ys, marker="o")
        ax.set_title(title)
    for ax in (ax_acc, ax_ent, ax_len):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(fontsize=8)
    fig.suptitle(f"run {run_root}")
    import fsspec

    with fsspec.open(out_png, "wb", auto_mkdir=True) as fh:
        fig.savefig(fh, format="png", dpi=110)
    return out_png


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def metrics_markdown(run_root: str) -> str:
    """Markdown tables (for Prefect artifacts): one row per round, then evals by checkpoint."""
    stats = collect_run(run_root)
    header = (
        "| round | rollouts | reward rate | train steps | loss | entropy | response len "
        "| kl weight | span token frac |"
    )
    lines = [header, "|---" * 9 + "|"]
    for r in stats.rounds:
        lines.append(
            f"| {r.round} | {_fmt(r.rollouts, 'd')} | {_fmt(r.reward_rate, '.3f')} | {_fmt(r.steps, 'd')} "
            f"| {_fmt(r.loss, '.4f')} | {_fmt(r.entropy, '.3f')} | {_fmt(r.response_len, '.1f')} "
            f"| {_fmt(r.kl_weight, '.3f')} | {_fmt(r.span_token_frac, '.3f')} |"
        )
    if stats.evals:
        benches = sorted({b for accs in stats.evals.values() for b in accs})
        lines += ["", "| policy | " + " | ".join(benches) + " |", "|---" * (len(benches) + 1) + "|"]
        for k in sorted(stats.evals):
            cells = [
                _fmt(None if b not in stats.evals[k] else 100 * stats.evals[k][b], ".2f")
                for b in benches
            ]
            lines.append(f"| {checkpoint_name(k)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
