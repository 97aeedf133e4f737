"""evaluate's numbers: avg@k per benchmark with bootstrap 95% CIs, and the five-column mean.

The metrics are pure functions of sample rows; `build_summary` reads a checkpoint's stored
samples (eval/<ckpt>/<benchmark>/samples.parquet) and gives summary.json's content.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from trace_rl.data_schemas import EVAL_SAMPLES
from trace_rl.data_schemas.errors import StageError
from trace_rl.pipeline.fingerprint import fingerprint
from trace_rl.pipeline.layout import eval_samples_dataset, eval_summary
from trace_rl.pipeline.store import Manifest, RunStore
from trace_rl.stages.config import TraceConfig

log = logging.getLogger("trace_rl.stages.evaluate")

FIVE_COLUMNS = ("math500", "aime24", "aime25", "amc23", "gpqa_diamond")


# ---------------------------------------------------------------------------------------------
# metrics (pure)


def per_problem_accuracy(correct_by_problem: dict[str, list[bool]]) -> np.ndarray:
    """Mean correctness of each problem's k samples: [P] floats, in sorted problem-id order."""
    return np.array([np.mean(correct_by_problem[p]) for p in sorted(correct_by_problem)], dtype=float)


def bootstrap_means(acc_P: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of `resamples` resamples of the problems drawn with replacement: [resamples].

    Problems, not samples, are resampled: the k samples of one problem are correlated, and the
    uncertainty that matters is which problems the benchmark happened to contain.
    """
    if acc_P.size == 0 or resamples <= 0:
        return np.empty(0)
    rng = np.random.default_rng(seed)
    idx_RP = rng.integers(0, acc_P.size, size=(resamples, acc_P.size))
    return acc_P[idx_RP].mean(axis=1)


def percentile_ci(means_R: np.ndarray, level: float = 0.95) -> list[float] | None:
    """The central `level` percentile interval of bootstrap means, or None without resamples."""
    if means_R.size == 0:
        return None
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(means_R, [tail, 1.0 - tail])
    return [float(lo), float(hi)]


def benchmark_seed(seed: int, benchmark: str) -> int:
    """An independent, reproducible bootstrap stream per benchmark."""
    return int(fingerprint([seed, benchmark]), 16) % (2**32)


def _by_problem(rows: list[dict[str, Any]]) -> dict[str, list[bool]]:
    by_problem: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        by_problem[r["problem_id"]].append(bool(r["correct"]))
    return by_problem


def paired_difference(before: list[dict[str, Any]], after: list[dict[str, Any]], *, resamples: int,
                      seed: int, benchmark: str) -> dict[str, Any]:
    """avg@k of `after` minus `before` on the same problems, with a paired bootstrap 95% CI.

    Each resample draws problems once and takes both policies' accuracy on them, so what the
    two share (which problems happen to be easy) cancels; two separate intervals, one per
    policy, carry it twice and overlap where the difference's interval excludes 0. Sample rows
    of different problem sets are refused: they are not a before/after pair.
    """
    a, b = _by_problem(before), _by_problem(after)
    if not a or set(a) != set(b):
        raise StageError(f"benchmark {benchmark!r}: the two evaluations scored different problems "
                         f"({len(set(a) ^ set(b))} in one only); evaluate both with the same data and "
                         "eval.limit to compare them")
    diff_P = per_problem_accuracy(b) - per_problem_accuracy(a)  # both in sorted problem-id order
    means_R = bootstrap_means(diff_P, resamples, benchmark_seed(seed, f"{benchmark}:paired"))
    return {"difference": float(diff_P.mean()), "ci95": percentile_ci(means_R),
            "n_problems": int(diff_P.size), "bootstrap_resamples": int(means_R.size)}


def summarize_samples(rows: list[dict[str, Any]], *, resamples: int, seed: int,
                      benchmark: str) -> tuple[dict[str, Any], np.ndarray]:
    """One benchmark's summary entry from its sample rows, and its bootstrap means [R]."""
    by_problem = _by_problem(rows)
    if not by_problem:
        raise StageError(f"benchmark {benchmark!r} has no samples to summarise")
    acc_P = per_problem_accuracy(by_problem)
    ks = {len(v) for v in by_problem.values()}
    means_R = bootstrap_means(acc_P, resamples, benchmark_seed(seed, benchmark))
    avg = float(acc_P.mean())
    entry = {
        "avg@k": avg, "pass@1": avg, "ci95": percentile_ci(means_R), "n_problems": int(acc_P.size),
        "k": max(ks) if len(ks) == 1 else sorted(ks), "n_samples": len(rows),
        "mean_response_tokens": float(np.mean([r["num_tokens"] for r in rows])),
        "bootstrap_resamples": int(means_R.size),
    }
    return entry, means_R


def five_column_mean(entries: dict[str, dict[str, Any]],
                     means_by_bench: dict[str, np.ndarray]) -> dict[str, Any]:
    """The paper's headline: the unweighted mean of FIVE_COLUMNS' avg@k, or null with a reason.

    Its CI averages the benchmarks' bootstrap means resample by resample (independent problem
    resamples per benchmark), so it reflects that AIME's 30 problems dominate the uncertainty.
    """
    missing = [b for b in FIVE_COLUMNS if b not in entries]
    if missing:
        return {"value": None, "ci95": None, "columns": list(FIVE_COLUMNS),
                "reason": f"not evaluated: {', '.join(missing)} (all five are needed)"}
    value = float(np.mean([entries[b]["avg@k"] for b in FIVE_COLUMNS]))
    sizes = {means_by_bench.get(b, np.empty(0)).size for b in FIVE_COLUMNS}
    ci = None
    if len(sizes) == 1 and 0 not in sizes:
        ci = percentile_ci(np.mean([means_by_bench[b] for b in FIVE_COLUMNS], axis=0))
    return {"value": value, "ci95": ci, "columns": list(FIVE_COLUMNS), "reason": None}


# ---------------------------------------------------------------------------------------------
# the summary


def _previous_entries(store: RunStore, ckpt_name: str,
                      current: Callable[[Manifest], bool]) -> dict[str, dict[str, Any]]:
    """Entries of an earlier summary whose samples are still exactly the ones summarised and
    `current` (drawn from this checkpoint with this call's sampling and verifier settings): the
    summary's header describes every entry in it, so an entry sampled otherwise (another
    temperature, or weights since rewritten) is left out, with a warning, rather than mixed in."""
    path = store.path(eval_summary(ckpt_name))
    if not store.fs.exists(path):
        return {}
    old = json.loads(store.read_text(path)).get("benchmarks", {})
    keep = {}
    for bench, entry in old.items():
        m = store.manifest(eval_samples_dataset(ckpt_name, bench))
        if m is None or m.fingerprint != entry.get("dataset_fingerprint"):
            continue
        if current(m):
            keep[bench] = entry
        else:
            log.warning("eval %s: %s left out of summary.json: its samples were drawn with other "
                        "settings or from other weights; evaluate it again (--benchmarks %s)",
                        ckpt_name, bench, bench)
    return keep


def _read_samples(store: RunStore, dataset: str) -> list[dict[str, Any]]:
    return store.read(dataset, EVAL_SAMPLES).select(["problem_id", "correct", "num_tokens"]).to_pylist()


def _check_complete(entry: dict[str, Any], m: Manifest) -> None:
    """Every problem of the benchmark has its k samples: a problem without samples would leave
    avg@k's denominator silently, and one with fewer would weigh its few samples as k."""
    problems, k = m.extra.get("problems"), m.extra.get("k")
    if problems is None or k is None:  # written before these were recorded
        return
    if entry["n_problems"] != problems or entry["k"] != k or entry["n_samples"] != problems * k:
        raise StageError(
            f"{m.dataset}: {entry['n_samples']} samples over {entry['n_problems']} problems (k "
            f"{entry['k']}), but the benchmark has {problems} problems x k {k}; evaluate it again "
            "with --force")


def build_summary(cfg: TraceConfig, store: RunStore, ckpt_name: str, header: dict[str, Any],
                  manifests: dict[str, Manifest],
                  current: Callable[[Manifest], bool]) -> dict[str, Any]:
    """summary.json's content: `header` (what was evaluated, how it was sampled), then the
    entries computed from the stored samples of `manifests` (+ old entries whose samples are
    unchanged and `current`: sampled as the header says)."""
    entries = _previous_entries(store, ckpt_name, current)
    means: dict[str, np.ndarray] = {}
    for bench, m in manifests.items():
        rows = _read_samples(store, m.dataset)
        entry, means[bench] = summarize_samples(rows, resamples=cfg.eval.bootstrap, seed=cfg.run.seed,
                                                benchmark=bench)
        _check_complete(entry, m)
        entry.update({"dataset": m.dataset, "dataset_fingerprint": m.fingerprint,
                      "verdict_status": m.extra.get("verdict_status", {}),
                      "finish_reason": m.extra.get("finish_reason", {})})
        entries[bench] = entry
    for bench in FIVE_COLUMNS:  # an old entry re-enters the headline CI with its own resamples
        if bench in entries and bench not in means:
            rows = _read_samples(store, entries[bench]["dataset"])
            means[bench] = summarize_samples(rows, resamples=cfg.eval.bootstrap, seed=cfg.run.seed,
                                             benchmark=bench)[1]
    return {
        **header,
        "bootstrap": {"resamples": cfg.eval.bootstrap, "seed": cfg.run.seed, "level": 0.95},
        "benchmarks": dict(sorted(entries.items())),
        "five_column_mean": five_column_mean(entries, means),
        "created_at": time.time(),
    }


def compare_evaluations(cfg: TraceConfig, store: RunStore, before: str, after: str,
                        benchmark: str) -> dict[str, Any]:
    """`paired_difference` of two checkpoints' stored samples of one benchmark (eval/<ckpt>/
    <benchmark>); refused unless both were drawn from the same benchmark data."""
    names = [eval_samples_dataset(ckpt, benchmark) for ckpt in (before, after)]
    manifests = [store.manifest(name) for name in names]
    missing = [n for n, m in zip(names, manifests) if m is None]
    if missing:
        raise StageError(f"no finished evaluation at {', '.join(missing)}; run `trace-rl eval` first")
    data = {m.inputs.get("benchmark") for m in manifests if m is not None}
    if len(data) != 1:
        raise StageError(f"{names[0]} and {names[1]} were sampled from different {benchmark!r} data "
                         "(its file, limit or task changed); evaluate both again to compare them")
    return paired_difference(*(_read_samples(store, n) for n in names), resamples=cfg.eval.bootstrap,
                             seed=cfg.run.seed, benchmark=benchmark)


def print_summary(summary: dict[str, Any]) -> None:
    """A rich table of avg@k (percent) with CIs, to stderr."""
    from rich.console import Console
    from rich.table import Table

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}"

    def ci(c: list[float] | None) -> str:
        return "-" if not c else f"[{pct(c[0])}, {pct(c[1])}]"

    table = Table(title=f"eval {summary['checkpoint']} (avg@k, %)")
    for col in ("benchmark", "n", "k", "avg@k", "95% CI", "mean tokens"):
        table.add_column(col, justify="left" if col == "benchmark" else "right")
    for bench, e in summary["benchmarks"].items():
        table.add_row(bench, str(e["n_problems"]), str(e["k"]), pct(e["avg@k"]), ci(e["ci95"]),
                      f"{e['mean_response_tokens']:.0f}")
    five = summary["five_column_mean"]
    if five["value"] is not None or five["reason"] not in _SAID:
        table.add_row("5-column mean", "", "", pct(five["value"]), ci(five["ci95"]), "")
    if five["reason"] and five["reason"] not in _SAID:
        _SAID.add(five["reason"])
        table.caption = f"5-column mean: {five['reason']} (said once per run)"
    Console(stderr=True).print(table)


# Why the 5-column mean is missing, said once per process (a run evaluates every round; the
# reason is the same each time, and the summary.json of each evaluation keeps it).
_SAID: set[str] = set()


