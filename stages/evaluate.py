"""Stage `evaluate`: avg@k of a checkpoint on benchmarks, with bootstrap 95% CIs.

For each benchmark, k responses per problem are sampled with the eval sampling settings (thinking
mode, temperature 0.6, top-p 0.95, top-k 20 by default), verified, and written to
`eval/<ckpt>/<benchmark>/samples.parquet` (one Parquet file; its directory is a store dataset with
the file and a manifest). A benchmark whose samples are
current (same checkpoint, data, sampling and verifier) is not sampled again unless forced.
`eval/<ckpt>/summary.json` is then computed from the stored samples: avg@k (= pass@1 estimated
from k samples) per benchmark with a CI from resampling problems, and the paper's headline, the
unweighted mean of five columns. A benchmark evaluated by an earlier call stays in the summary
only while its samples were drawn from the same weights with the settings the header states;
samples that do not hold k of every problem are refused, never averaged over fewer problems.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from trace_rl.data_schemas import EVAL_SAMPLES, rows_to_table
from trace_rl.data_schemas.errors import ConfigError
from trace_rl.pipeline.fingerprint import fingerprint, model_dir_fingerprint
from trace_rl.pipeline.layout import (
    ROUND_GLOB,
    SAMPLES_DATASET,
    checkpoint_name,
    dataset_name,
    eval_samples_dataset,
    eval_summary,
    parse_round,
)
from trace_rl.pipeline.store import Manifest, RunStore
from trace_rl.stages.config import TraceConfig

from .benchmarks import Benchmark, BenchmarkSource, load_benchmark
from .common import open_store, section_fingerprint_part, start_checkpoint
from .eval_summary import build_summary, print_summary
from .prune import require_weights

log = logging.getLogger("trace_rl.stages.evaluate")


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
    """Rounds whose train stage finished (so round k+1's start checkpoint exists), ascending."""
    found = []
    for path in store.fs.glob(store.path(ROUND_GLOB)):
        k = parse_round(path)
        if k is not None and store.manifest(dataset_name("train", k)) is not None:
            found.append(k)
    return sorted(found)


def latest_checkpoint_name(store: RunStore) -> str:
    """The name 'latest' stands for: the policy after the last finished round, else initial."""
    rounds = _trained_rounds(store)
    return checkpoint_name(rounds[-1] + 1) if rounds else checkpoint_name(0)


def resolve_checkpoint(cfg: TraceConfig, store: RunStore, checkpoint: str) -> Checkpoint:
    """'initial', 'latest' (policy after the last finished round, else initial), 'round-K'
    (round K's start checkpoint) or a model dir/name."""
    if checkpoint == "latest":
        checkpoint = latest_checkpoint_name(store)
    k = 0 if checkpoint == checkpoint_name(0) else parse_round(checkpoint)
    if k is not None:
        model_dir, fp = start_checkpoint(cfg, store, k)
        return Checkpoint(checkpoint_name(k), model_dir, _as_inputs(fp))
    if not checkpoint:
        raise ConfigError("checkpoint: use 'latest', 'initial', 'round-K' or a model directory")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(checkpoint.rstrip("/")).name) or "model"
    return Checkpoint(name, checkpoint, {"model_dir": model_dir_fingerprint(checkpoint)})


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

    One call means one model load (a vLLM engine start costs minutes for a large model; in a
    training flow the run's engine serves it with no start at all) and full batches across
    benchmarks; prompt ids are prefixed with the benchmark so they stay
    unique (vLLM's per-prompt seeds derive from them).
    """
    from trace_rl.stages.engines.session import generate_in_run

    prompts, owner = [], {}
    for bench in benches:
        for row in bench.rows:
            key = f"{bench.name}::{row['prompt_id']}"
            owner[key] = (bench.name, row["prompt_id"])
            prompts.append({**row, "prompt_id": key})
    out: dict[str, list[dict[str, Any]]] = {b.name: [] for b in benches}
    if not prompts:
        return out
    # Inside a training flow: the run's engine (its weights loaded in place), not a new one.
    rows, engine = generate_in_run(eval_rollout_config(cfg), model_dir, prompts, progress=progress)
    log.info("evaluate: engine %s (%s), generate %.1f s", engine["name"], engine["mode"],
             engine["generate_s"])
    for s in rows:
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
              "meta": json.loads(by_id[s["prompt_id"]]["meta"] or "{}"),
              "finish_reason": s["finish_reason"]} for s in samples]
    pool = pools.get(bench.verifier) if pools is not None else None
    verdicts = verify_rows(eval_verify_config(cfg, bench.verifier), items, pool=pool)
    rows = [{"benchmark": bench.name, "problem_id": s["prompt_id"], "sample_index": s["sample_index"],
             "response_text": s["response_text"], "extracted_answer": v["extracted_answer"],
             "correct": bool(v["correct"]), "num_tokens": len(s["response_token_ids"])}
            for s, v in zip(samples, verdicts, strict=True)]
    counts = {"verdict_status": dict(Counter(v["status"] for v in verdicts)),
              "finish_reason": dict(Counter(s["finish_reason"] for s in samples))}
    return rows, counts


@dataclass(frozen=True)
class SamplesJob:
    """Where one benchmark's samples go and what they are made from."""

    bench: Benchmark
    name: str
    config_fingerprint: str
    inputs: dict[str, str]


def samples_config_fingerprint(cfg: TraceConfig, verifier: str) -> str:
    """The config fingerprint of samples graded by `verifier`: eval's sampling settings and the
    verify section; the verifier's runtime-only fields stay out, as for the verify stage."""
    parts = {"rollout": eval_rollout_config(cfg).model_dump(mode="json"),
             "verify": {**section_fingerprint_part(cfg, "verify"), "kind": verifier}}
    return fingerprint(parts)


def samples_job(cfg: TraceConfig, ckpt: Checkpoint, bench: Benchmark) -> SamplesJob:
    """The dataset, config fingerprint and inputs of one benchmark's samples."""
    return SamplesJob(bench, eval_samples_dataset(ckpt.name, bench.name),
                      samples_config_fingerprint(cfg, bench.verifier),
                      {**ckpt.inputs, "benchmark": bench.fingerprint})


def sampled_as_now(cfg: TraceConfig, ckpt: Checkpoint, m: Manifest) -> bool:
    """True when stored samples `m` were drawn from `ckpt` as it is now (same inputs) with this
    config's eval sampling and verifier settings: an earlier benchmark entry that may stay in a
    summary whose header states those settings. Its benchmark data is not reloaded here."""
    verifier = m.extra.get("verifier")
    return (isinstance(verifier, str) and m.config_fingerprint == samples_config_fingerprint(cfg, verifier)
            and all(m.inputs.get(name) == fp for name, fp in ckpt.inputs.items()))


def write_samples(store: RunStore, job: SamplesJob, ckpt: Checkpoint, rows: list[dict[str, Any]],
                  counts: dict[str, Any], k: int) -> Manifest:
    """Write one benchmark's samples (manifest last); verdict statuses become the counts."""
    with store.writer(job.name, EVAL_SAMPLES, stage="evaluate",
                      config_fingerprint=job.config_fingerprint, inputs=job.inputs) as w:
        # One file, `samples.parquet`, that any Parquet reader opens (duckdb, pandas, pyarrow).
        w.write_table(rows_to_table(rows, EVAL_SAMPLES, where=f"{job.name} (rows)"), part=SAMPLES_DATASET)
        w.counts.update(counts["verdict_status"])
        w.extra = {**counts, "model_dir": ckpt.model_dir, "benchmark": job.bench.name,
                   "verifier": job.bench.verifier, "problems": len(job.bench.rows), "k": k}
    return w.manifest


def sample_benchmarks(cfg: TraceConfig, store: RunStore, ckpt: Checkpoint, benches: list[Benchmark],
                      *, force: bool, progress: bool) -> dict[str, Manifest]:
    """Manifests of every benchmark's samples: current ones kept, the others sampled together."""
    manifests: dict[str, Manifest] = {}
    todo = []
    for job in (samples_job(cfg, ckpt, b) for b in benches):
        if not force and store.is_current(job.name, job.config_fingerprint, job.inputs):
            log.info("evaluate: %s is current, skipping; use --force to redo it", store.path(job.name))
            manifests[job.bench.name] = store.manifest(job.name)
        else:
            todo.append(job)
    if todo:
        require_weights(ckpt.model_dir)
        log.info("evaluate %s: sampling %s (%d problems) x %d", ckpt.name, [j.bench.name for j in todo],
                 sum(len(j.bench.rows) for j in todo), cfg.eval.k)
        samples = generate_all(cfg, [j.bench for j in todo], ckpt.model_dir, progress=progress)
        with VerifierPools(cfg) as pools:
            for job in todo:
                rows, counts = verify_samples(cfg, job.bench, samples[job.bench.name], pools)
                manifests[job.bench.name] = write_samples(store, job, ckpt, rows, counts, cfg.eval.k)
    return {b.name: manifests[b.name] for b in benches}


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


def evaluate_checkpoint(cfg: TraceConfig, *, checkpoint: str = "latest",
                        benchmarks: list[str] | None = None, force: bool = False,
                        progress: bool = True) -> EvalResult:
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
    header = {"checkpoint": ckpt.name, "model_dir": ckpt.model_dir, "checkpoint_inputs": ckpt.inputs,
              "sampling": eval_rollout_config(cfg).sampling_dict()}
    summary = build_summary(cfg, store, ckpt.name, header, manifests,
                            current=lambda m: sampled_as_now(cfg, ckpt, m))
    store.write_text(store.path(eval_summary(ckpt.name)), json.dumps(summary, indent=2))
    if progress:
        print_summary(summary)
    return EvalResult(summary, manifests)


def run_eval(cfg: TraceConfig, *, checkpoint: str = "latest", benchmarks: list[str] | None = None,
             force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Evaluate a checkpoint ('latest', 'initial', 'round-K' or a model dir); returns summary.json."""
    return evaluate_checkpoint(cfg, checkpoint=checkpoint, benchmarks=benchmarks, force=force,
                               progress=progress).summary


def run(cfg: TraceConfig, round_index: int | None, *, force: bool = False,
        progress: bool = True) -> Manifest:
    """Stage protocol: evaluate the checkpoint round k's train stage wrote (round k+1's start
    checkpoint); None = the latest. Returns the manifest of the last benchmark written."""
    checkpoint = "latest" if round_index is None else checkpoint_name(round_index + 1)
    result = evaluate_checkpoint(cfg, checkpoint=checkpoint, force=force, progress=progress)
    return list(result.manifests.values())[-1]
