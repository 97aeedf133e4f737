"""Stage `evaluate`: avg@k of a checkpoint on benchmarks, with bootstrap 95% CIs.

For each benchmark, k responses per problem are sampled with the eval sampling settings (thinking
mode, temperature 0.6, top-p 0.95, top-k 20 by default), verified, and written to
`eval/<ckpt>/<benchmark>/samples.parquet` (a store dataset: a directory of parts plus a
manifest, readable as one table by `pyarrow.parquet.read_table`). A benchmark whose samples are
current (same checkpoint, data, sampling and verifier) is not sampled again unless forced.
`eval/<ckpt>/summary.json` is then computed from the stored samples: avg@k (= pass@1 estimated
from k samples) per benchmark with a CI from resampling problems, and the paper's headline, the
unweighted mean of five columns.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

from trace_rl.data_schemas import EVAL_SAMPLES
from trace_rl.stages.config import TraceConfig
from trace_rl.data_schemas.errors import ConfigError, StageError
from trace_rl.pipeline.fingerprint import fingerprint
from trace_rl.pipeline.store import Manifest, RunStore, round_dir

from .benchmarks import Benchmark, BenchmarkSource, load_benchmark
from .common import checkpoint_for_round, dataset_name, open_store

log = logging.getLogger("trace_rl.stages.evaluate")

FIVE_COLUMNS = ("math500", "aime24", "aime25", "amc23", "gpqa_diamond")
SAMPLES_FILE = "samples.parquet"
SUMMARY_FILE = "summary.json"
# Verifier settings that change no verdict (parallelism only) stay out of the fingerprint.
_VERIFY_RUNTIME_FIELDS = ("workers", "chunk_size", "start_method")


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


def summarize_samples(rows: list[dict[str, Any]], *, resamples: int, seed: int,
                      benchmark: str) -> tuple[dict[str, Any], np.ndarray]:
    """One benchmark's summary entry from its sample rows, and its bootstrap means [R]."""
    by_problem: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        by_problem[r["problem_id"]].append(bool(r["correct"]))
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
# checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A policy to evaluate: `name` is its directory under eval/, `inputs` its identity
    ({input name: fingerprint}, as the stages record upstream inputs)."""

    name: str
    model_dir: str
    inputs: dict[str, str]


def _as_inputs(fp: dict[str, str] | str) -> dict[str, str]:
    return dict(fp) if isinstance(fp, dict) else {"checkpoint": fp}


def _trained_rounds(store: RunStore) -> list[int]:
    """Rounds whose train stage finished (so checkpoints/round-(k+1) exists), ascending."""
    found = []
    for path in store.fs.glob(store.path("round-*")):
        m = re.fullmatch(r"round-(\d+)", path.rstrip("/").rsplit("/", 1)[-1])
        if m and store.manifest(dataset_name("train", int(m.group(1)))) is not None:
            found.append(int(m.group(1)))
    return sorted(found)


def _model_dir_fingerprint(model_dir: str) -> str:
    path = Path(model_dir).expanduser()
    if not path.is_dir():  # a hub name: its identity is its name
        return fingerprint(["model", model_dir])
    files = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime))
                   for p in path.iterdir() if p.is_file())
    return fingerprint(["model", str(path.resolve()), files])


def resolve_checkpoint(cfg: TraceConfig, store: RunStore, checkpoint: str) -> Checkpoint:
    """'initial', 'latest' (last finished round, else initial), 'round-K' or a model dir/name."""
    if checkpoint == "latest":
        rounds = _trained_rounds(store)
        checkpoint = f"round-{rounds[-1] + 1}" if rounds else "initial"
    m = re.fullmatch(r"round-(\d+)", checkpoint)
    if checkpoint == "initial" or (m and int(m.group(1)) == 0):
        model_dir, fp = checkpoint_for_round(cfg, store, 0)
        return Checkpoint("initial", model_dir, _as_inputs(fp))
    if m:
        model_dir, fp = checkpoint_for_round(cfg, store, int(m.group(1)))
        return Checkpoint(round_dir(int(m.group(1))), model_dir, _as_inputs(fp))
    if not checkpoint:
        raise ConfigError("checkpoint: use 'latest', 'initial', 'round-K' or a model directory")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(checkpoint.rstrip("/")).name) or "model"
    return Checkpoint(name, checkpoint, {"model_dir": _model_dir_fingerprint(checkpoint)})


# ---------------------------------------------------------------------------------------------
# sampling


def eval_rollout_config(cfg: TraceConfig):
    """cfg.rollout with its sampling fields replaced by eval's (n = k)."""
    from trace_rl.stages.engines.config import RolloutConfig

    update = {"n": cfg.eval.k, "temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p,
              "top_k": cfg.eval.top_k, "max_tokens": cfg.eval.max_tokens,
              "enable_thinking": cfg.eval.enable_thinking}
    try:
        return RolloutConfig.model_validate({**cfg.rollout.model_dump(), **update})
    except ValueError as exc:
        raise ConfigError(f"the eval sampling settings are not valid rollout settings: {exc}") from None


def eval_verify_config(cfg: TraceConfig, kind: str):
    """cfg.verify with the benchmark's verifier kind."""
    from trace_rl.stages.verifiers import VerifyConfig

    return VerifyConfig.model_validate({**cfg.verify.model_dump(), "kind": kind})


class VerifierPools:
    """One verifier worker pool per isolated verifier kind, shared by the benchmarks of a call
    (starting math-verify workers costs seconds each time)."""

    def __init__(self, cfg: TraceConfig):
        self.cfg, self.pools, self.stack = cfg, {}, ExitStack()

    def get(self, kind: str):
        from trace_rl.stages.verifiers import VerifierPool, get_verifier

        if not get_verifier(kind).isolate:
            return None
        if kind not in self.pools:
            pool = VerifierPool(eval_verify_config(self.cfg, kind))
            self.pools[kind] = self.stack.enter_context(pool)
        return self.pools[kind]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()


def generate_all(cfg: TraceConfig, benches: list[Benchmark], model_dir: str, *,
                 progress: bool) -> dict[str, list[dict[str, Any]]]:
    """k samples per problem of every benchmark in ONE engine call, split back by benchmark.

    One call means one model load (a vLLM engine start costs minutes for a large model) and
    full batches across benchmarks; prompt ids are prefixed with the benchmark so they stay
    unique (vLLM's per-prompt seeds derive from them).
    """
    from trace_rl.stages.engines import generate

    prompts, owner = [], {}
    for bench in benches:
        for row in bench.rows:
            key = f"{bench.name}::{row['prompt_id']}"
            owner[key] = (bench.name, row["prompt_id"])
            prompts.append({**row, "prompt_id": key})
    out: dict[str, list[dict[str, Any]]] = {b.name: [] for b in benches}
    if not prompts:
        return out
    for s in generate(eval_rollout_config(cfg), model_dir, prompts, progress=progress):
        bench_name, pid = owner[s["prompt_id"]]
        out[bench_name].append({**s, "prompt_id": pid})
    return out


def verify_samples(cfg: TraceConfig, bench: Benchmark, samples: list[dict[str, Any]],
                   pools: VerifierPools | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """EVAL_SAMPLES rows of one benchmark's engine samples, and counts for the manifest."""
    from trace_rl.stages.verifiers import verify_rows

    by_id = {r["prompt_id"]: r for r in bench.rows}
    items = [{"rollout_id": f"{s['prompt_id']}#{s['sample_index']}", "response_text": s["response_text"],
              "answer": by_id[s["prompt_id"]]["answer"],
              "meta": json.loads(by_id[s["prompt_id"]]["meta"] or "{}")} for s in samples]
    pool = pools.get(bench.verifier) if pools is not None else None
    verdicts = verify_rows(eval_verify_config(cfg, bench.verifier), items, pool=pool)
    rows = [{"benchmark": bench.name, "problem_id": s["prompt_id"], "sample_index": s["sample_index"],
             "response_text": s["response_text"], "extracted_answer": v["extracted_answer"],
             "correct": bool(v["correct"]), "num_tokens": len(s["response_token_ids"])}
            for s, v in zip(samples, verdicts, strict=True)]
    counts = {"verdict_status": dict(Counter(v["status"] for v in verdicts)),
              "finish_reason": dict(Counter(s["finish_reason"] for s in samples))}
    return rows, counts


def samples_dataset(ckpt_name: str, benchmark: str) -> str:
    """`eval/<ckpt>/<benchmark>/samples.parquet`: the store dataset of one benchmark's samples."""
    return f"eval/{ckpt_name}/{benchmark}/{SAMPLES_FILE}"


@dataclass(frozen=True)
class SamplesPlan:
    """Where one benchmark's samples go and what they are made from."""

    bench: Benchmark
    name: str
    config_fingerprint: str
    inputs: dict[str, str]


def plan_samples(cfg: TraceConfig, ckpt: Checkpoint, bench: Benchmark) -> SamplesPlan:
    """The dataset, config fingerprint and inputs of one benchmark's samples."""
    verify = {k: v for k, v in cfg.verify.model_dump(mode="json").items()
              if k not in _VERIFY_RUNTIME_FIELDS}
    parts = {"rollout": eval_rollout_config(cfg).model_dump(mode="json"),
             "verify": {**verify, "kind": bench.verifier}}
    return SamplesPlan(bench, samples_dataset(ckpt.name, bench.name), fingerprint(parts),
                       {**ckpt.inputs, "benchmark": bench.fingerprint})


def write_samples(store: RunStore, plan: SamplesPlan, ckpt: Checkpoint, rows: list[dict[str, Any]],
                  counts: dict[str, Any], k: int) -> Manifest:
    """Write one benchmark's samples (manifest last); verdict statuses become the counts."""
    with store.writer(plan.name, EVAL_SAMPLES, stage="evaluate",
                      config_fingerprint=plan.config_fingerprint, inputs=plan.inputs) as w:
        w.write_rows(rows)
        w.counts.update(counts["verdict_status"])
        w.extra = {**counts, "model_dir": ckpt.model_dir, "benchmark": plan.bench.name,
                   "verifier": plan.bench.verifier, "problems": len(plan.bench.rows), "k": k}
    return w.manifest


def sample_benchmarks(cfg: TraceConfig, store: RunStore, ckpt: Checkpoint, benches: list[Benchmark],
                      *, force: bool, progress: bool) -> dict[str, Manifest]:
    """Manifests of every benchmark's samples: current ones kept, the others sampled together."""
    plans = [plan_samples(cfg, ckpt, b) for b in benches]
    manifests: dict[str, Manifest] = {}
    todo = []
    for p in plans:
        if not force and store.is_current(p.name, p.config_fingerprint, p.inputs):
            log.info("evaluate: %s is current, skipping; use --force to redo it", store.path(p.name))
            manifests[p.bench.name] = store.manifest(p.name)
        else:
            todo.append(p)
    if todo:
        log.info("evaluate %s: sampling %s (%d problems) x %d", ckpt.name, [p.bench.name for p in todo],
                 sum(len(p.bench.rows) for p in todo), cfg.eval.k)
        samples = generate_all(cfg, [p.bench for p in todo], ckpt.model_dir, progress=progress)
        with VerifierPools(cfg) as pools:
            for p in todo:
                rows, counts = verify_samples(cfg, p.bench, samples[p.bench.name], pools)
                manifests[p.bench.name] = write_samples(store, p, ckpt, rows, counts, cfg.eval.k)
    return {b.name: manifests[b.name] for b in benches}


# ---------------------------------------------------------------------------------------------
# the summary


def _previous_entries(store: RunStore, ckpt_name: str) -> dict[str, dict[str, Any]]:
    """Entries of an earlier summary whose samples are still exactly the ones summarised."""
    path = store.path("eval", ckpt_name, SUMMARY_FILE)
    if not store.fs.exists(path):
        return {}
    old = json.loads(store.read_text(path)).get("benchmarks", {})
    keep = {}
    for bench, entry in old.items():
        m = store.manifest(samples_dataset(ckpt_name, bench))
        if m is not None and m.fingerprint == entry.get("dataset_fingerprint"):
            keep[bench] = entry
    return keep


def _read_samples(store: RunStore, dataset: str) -> list[dict[str, Any]]:
    return store.read(dataset, EVAL_SAMPLES).select(["problem_id", "correct", "num_tokens"]).to_pylist()


def build_summary(cfg: TraceConfig, store: RunStore, ckpt: Checkpoint,
                  manifests: dict[str, Manifest]) -> dict[str, Any]:
    """summary.json's content from the stored samples of `manifests` (+ still-valid old entries)."""
    entries = _previous_entries(store, ckpt.name)
    means: dict[str, np.ndarray] = {}
    for bench, m in manifests.items():
        rows = _read_samples(store, m.dataset)
        entry, means[bench] = summarize_samples(rows, resamples=cfg.eval.bootstrap, seed=cfg.run.seed,
                                                benchmark=bench)
        entry.update({"dataset": m.dataset, "dataset_fingerprint": m.fingerprint,
                      "verdict_status": m.extra.get("verdict_status", {}),
                      "finish_reason": m.extra.get("finish_reason", {})})
        entries[bench] = entry
    for bench in FIVE_COLUMNS:  # an old entry re-enters the headline CI with its own resamples
        if bench in entries and bench not in means:
            rows = _read_samples(store, entries[bench]["dataset"])
            means[bench] = summarize_samples(rows, resamples=cfg.eval.bootstrap, seed=cfg.run.seed,
                                             benchmark=bench)[1]
    sampling = eval_rollout_config(cfg).sampling_dict()
    return {
        "checkpoint": ckpt.name, "model_dir": ckpt.model_dir, "checkpoint_inputs": ckpt.inputs,
        "sampling": sampling,
        "bootstrap": {"resamples": cfg.eval.bootstrap, "seed": cfg.run.seed, "level": 0.95},
        "benchmarks": dict(sorted(entries.items())),
        "five_column_mean": five_column_mean(entries, means),
        "created_at": time.time(),
    }


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
    table.add_row("5-column mean", "", "", pct(five["value"]), ci(five["ci95"]), "")
    if five["reason"]:
        table.caption = f"5-column mean: {five['reason']}"
    Console(stderr=True).print(table)


# ---------------------------------------------------------------------------------------------
# entry points


@dataclass
class EvalResult:
    summary: dict[str, Any]
    manifests: dict[str, Manifest] = field(default_factory=dict)


def _sources(cfg: TraceConfig) -> dict[str, BenchmarkSource]:
    # `eval.sources`: named benchmarks with a column mapping, validated here (the config module
    # cannot import this one without a cycle).
    raw = cfg.eval.sources
    return {k: v if isinstance(v, BenchmarkSource) else BenchmarkSource.model_validate(v)
            for k, v in raw.items()}


def evaluate(cfg: TraceConfig, *, checkpoint: str = "latest", benchmarks: list[str] | None = None,
             force: bool = False, progress: bool = True) -> EvalResult:
    """Evaluate one checkpoint on `benchmarks` (default eval.benchmarks); writes summary.json."""
    names = list(benchmarks if benchmarks is not None else cfg.eval.benchmarks)
    if not names:
        raise ConfigError("no benchmarks to evaluate; set eval.benchmarks, e.g. [math500, aime24]")
    store = open_store(cfg)
    ckpt = resolve_checkpoint(cfg, store, checkpoint)
    sources = _sources(cfg)
    benches = {}
    for name in dict.fromkeys(names):  # keeps order, drops repeats
        bench = load_benchmark(cfg, name, sources)
        benches[bench.name] = bench
    manifests = sample_benchmarks(cfg, store, ckpt, list(benches.values()), force=force,
                                  progress=progress)
    summary = build_summary(cfg, store, ckpt, manifests)
    store.write_text(store.path("eval", ckpt.name, SUMMARY_FILE), json.dumps(summary, indent=2))
    if progress:
        print_summary(summary)
    return EvalResult(summary, manifests)


def run_eval(cfg: TraceConfig, *, checkpoint: str = "latest", benchmarks: list[str] | None = None,
             force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Evaluate a checkpoint ('latest', 'initial', 'round-K' or a model dir); returns summary.json."""
    return evaluate(cfg, checkpoint=checkpoint, benchmarks=benchmarks, force=force,
                    progress=progress).summary


def run(cfg: TraceConfig, round_index: int | None, *, force: bool = False,
        progress: bool = True) -> Manifest:
    """Stage protocol: evaluate the checkpoint round `round_index` produced (checkpoints/
    round-(k+1)); None = the latest. Returns the manifest of the last benchmark written."""
    checkpoint = "latest" if round_index is None else f"round-{round_index + 1}"
    result = evaluate(cfg, checkpoint=checkpoint, force=force, progress=progress)
    return list(result.manifests.values())[-1]
