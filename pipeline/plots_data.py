"""A run's numbers for the plots and the markdown summary (pipeline/plots.py writes them).

Round k's numbers describe policy k (the checkpoint that sampled round k: the initial model for
k = 0, checkpoints/round-000k after): the reward of its rollouts, the coverage of their
annotations, and the metrics the trainer logged at each optimizer step while training on them;
its eval avg@k with the bootstrap 95% CI from `eval/<ckpt>/summary.json`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from trace_rl.data_schemas import TRAIN_METRICS, VERDICTS

from .layout import PLOT, ROUND_GLOB, dataset_name, eval_summary, parse_round, policy_index
from .store import RunStore

PLOTS_DIR = PLOT.rsplit("/", 1)[0]
CURVES_PNG, ACCURACY_PNG, SUMMARY_MD = "curves.png", "accuracy.png", "summary.md"
FIVE_COLUMN_MEAN = "5-column mean"


@dataclass
class RoundStats:
    """What one round left behind; None where the stage has not finished (or the run lacks it)."""

    round: int
    rollouts: int | None = None
    reward_rate: float | None = None
    coverage: float | None = None  # mean coverage of the round's annotated rows (NULL rows out)
    steps: int | None = None
    first_step: int | None = None
    last_step: int | None = None
    loss: float | None = None
    entropy: float | None = None
    response_len: float | None = None
    kl_weight: float | None = None
    span_token_frac: float | None = None
    clip_frac: float | None = None
    grad_norm: float | None = None


@dataclass(frozen=True)
class Accuracy:
    """One benchmark's avg@k for one policy and its 95% CI (None when not bootstrapped)."""

    value: float
    ci95: tuple[float, float] | None = None


@dataclass
class RunStats:
    rounds: list[RoundStats] = field(default_factory=list)
    # One entry per train-metrics column (fixed and namespaced), all rounds concatenated in step
    # order; NaN where a round's table lacks a column.
    steps: dict[str, list[float]] = field(default_factory=dict)
    # policy index (0 = initial) -> {benchmark or "5-column mean": Accuracy}
    evals: dict[int, dict[str, Accuracy]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.evals and not self.steps and all(r.rollouts is None for r in self.rounds)


def _finite(values: list[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def _mean(values: list[Any]) -> float | None:
    finite = _finite(values)
    return sum(finite) / len(finite) if finite else None


def _rounds(store: RunStore) -> list[int]:
    """The rounds that have a directory in the run, ascending."""
    found = (parse_round(path) for path in store.fs.glob(store.path(ROUND_GLOB)))
    return sorted(k for k in found if k is not None)


def _train_columns(store: RunStore, k: int) -> dict[str, list[Any]] | None:
    """Round k's train metrics by column (extras included), or None before its train stage."""
    train = dataset_name("train", k)
    if store.manifest(train) is None:
        return None
    table = store.read(train, TRAIN_METRICS, allow_extra=True).sort_by("step")
    return {name: table.column(name).to_pylist() for name in table.column_names}


def round_stats(store: RunStore, k: int, cols: dict[str, list[Any]] | None = None) -> RoundStats:
    """Reward rate from round k's verdicts, coverage from its annotations' manifest, and step
    means from its train metrics (`cols`, read here when not given)."""
    stats = RoundStats(round=k)
    verdicts = dataset_name("verify", k)
    if store.manifest(verdicts) is not None:
        rewards = store.read(verdicts, VERDICTS).column("reward").to_pylist()
        stats.rollouts, stats.reward_rate = len(rewards), _mean(rewards)
    annotations = store.manifest(dataset_name("annotate", k))
    if annotations is not None:
        # runs written before coverage became NULL for unannotated rows recorded the ok rows' mean
        stats.coverage = annotations.extra.get("mean_coverage", annotations.extra.get("mean_coverage_ok"))
    cols = _train_columns(store, k) if cols is None else cols
    if cols is not None:
        stats.steps = len(cols["step"])
        if cols["step"]:
            stats.first_step, stats.last_step = int(cols["step"][0]), int(cols["step"][-1])
        for attr, col in (("loss", "loss"), ("entropy", "entropy"), ("response_len", "response_len_mean"),
                          ("kl_weight", "kl_weight"), ("span_token_frac", "span_token_frac"),
                          ("clip_frac", "clip_frac"), ("grad_norm", "grad_norm")):
            setattr(stats, attr, _mean(cols.get(col, [])))
    return stats


def _concat_steps(per_round: list[dict[str, list[Any]]]) -> dict[str, list[float]]:
    """Columns of every round's metrics end to end; a column one round lacks is NaN there."""
    names = sorted({n for cols in per_round for n in cols}, key=lambda n: (n not in TRAIN_METRICS.names, n))
    out: dict[str, list[float]] = {n: [] for n in names}
    for cols in per_round:
        rows = len(cols["step"])
        for n in names:
            out[n] += [math.nan if v is None else float(v) for v in cols.get(n, [None] * rows)]
    return out if out.get("step") else {}


def _accuracy(entry: dict[str, Any], key: str) -> Accuracy | None:
    value = entry.get(key)
    if value is None:
        return None
    ci = entry.get("ci95")
    return Accuracy(float(value), (float(ci[0]), float(ci[1])) if ci else None)


def eval_stats(store: RunStore) -> dict[int, dict[str, Accuracy]]:
    """avg@k with CIs by policy index from eval summaries ('initial' = 0, 'round-000k' = k)."""
    out: dict[int, dict[str, Accuracy]] = {}
    for path in store.fs.glob(store.path(eval_summary("*"))):
        k = policy_index(path.rsplit("/", 2)[-2])
        if k is None:
            continue  # an external model dir has no place on the round axis
        summary = json.loads(store.read_text(path))
        accs = {b: _accuracy(e, "avg@k") for b, e in summary.get("benchmarks", {}).items()}
        accs[FIVE_COLUMN_MEAN] = _accuracy(summary.get("five_column_mean") or {}, "value")
        out[k] = {b: a for b, a in accs.items() if a is not None}
    return out


def collect_run(run_root: str) -> RunStats:
    """Every round's stats, every optimizer step's metrics and every policy's eval of a run."""
    store = RunStore(run_root)
    rounds, per_round = [], []
    for k in _rounds(store):
        cols = _train_columns(store, k)
        rounds.append(round_stats(store, k, cols))
        if cols is not None:
            per_round.append(cols)
    return RunStats(rounds, _concat_steps(per_round), eval_stats(store))


def rollout_stats(store: RunStore, k: int) -> dict[str, float] | None:
    """What round k's samples say about the policy that drew them (TRL logs the same): reward
    mean and std over rollouts, accuracy, the fraction of prompt groups whose rewards are all
    equal (GRPO's advantage is zero there: no gradient), and the truncation rate (stopped at
    max_tokens). None until the round is verified."""
    import statistics
    from collections import defaultdict

    from trace_rl.data_schemas import ROLLOUTS

    if store.manifest(dataset_name("verify", k)) is None or store.manifest(dataset_name("rollout", k)) is None:
        return None
    verdicts = store.read(dataset_name("verify", k), VERDICTS).select(["rollout_id", "reward", "correct"])
    rollouts = store.read(dataset_name("rollout", k), ROLLOUTS).select(["rollout_id", "prompt_id", "finish_reason"])
    by_id = {r["rollout_id"]: r for r in verdicts.to_pylist()}
    groups: dict[str, list[float]] = defaultdict(list)
    truncated = 0
    for r in rollouts.to_pylist():
        groups[r["prompt_id"]].append(float(by_id[r["rollout_id"]]["reward"]))
        truncated += r["finish_reason"] == "length"
    rewards = [float(v["reward"]) for v in by_id.values()]
    if not rewards:
        return None
    return {
        "reward_mean": sum(rewards) / len(rewards),
        "reward_std": statistics.pstdev(rewards),
        "accuracy": sum(bool(v["correct"]) for v in by_id.values()) / len(rewards),
        "zero_variance_group_frac": sum(len(set(g)) == 1 for g in groups.values()) / len(groups),
        "truncation_rate": truncated / len(rewards),
    }
