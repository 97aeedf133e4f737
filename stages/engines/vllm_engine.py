"""The `vllm` rollout engine, parent side (runs in the main venv, never imports vllm).

vLLM pins its own torch, so it lives in another venv: this module tokenizes the prompts, writes a
request file, runs stages/engines/vllm_worker.py with cfg.vllm.python (one process per
data-parallel shard), streams its log and reads back a Parquet result. That is the cold path;
stages/engines/session.py keeps the same workers up across rounds and reuses the pieces here.
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from trace_rl.data_schemas.errors import StageError
from trace_rl.pipeline.progress_lines import ProgressLines
from trace_rl.stages.engines.protocol import (
    check_prompts,
    decode_response,
    encode_prompt,
    load_tokenizer,
    make_row,
    prompt_seed,
    sampling_json,
    stop_token_ids,
)
from trace_rl.stages.engines.config import RolloutConfig

ENGINE = "vllm"
WORKER_SCRIPT = Path(__file__).with_name("vllm_worker.py")
LOG_TAIL_LINES = 80  # vLLM's root cause sits well above its last traceback
PROGRESS_TAG = "[trace-progress] "  # as in vllm_worker.py (which cannot import this module)


class VllmProgress:
    """Sequences done across the workers' requests, from their PROGRESS_TAG lines (one per
    finished request, at most one a second each), which the reader threads hand in (`seen`);
    the thread that waits for the workers logs them (`tick`) through ProgressLines at its
    cadence, because a Prefect run context is per thread."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.latest: dict[str, tuple[int, int]] = {}  # request id -> (sequences, tokens)
        self.lock = threading.Lock()
        self.lines: ProgressLines | None = None
        self.finished = False

    def seen(self, line: str) -> bool:
        """Take a worker's stdout line; True when it was a progress line."""
        if not line.startswith(PROGRESS_TAG):
            return False
        msg = json.loads(line[len(PROGRESS_TAG):])
        with self.lock:
            self.latest[msg["id"]] = (int(msg["sequences"]), int(msg["tokens"]))
        return True

    def tick(self) -> None:
        if not self.enabled:
            return
        with self.lock:
            if not self.latest:  # the engine is still starting: no sampling to time yet
                return
            done = sum(n for n, _ in self.latest.values())
            tokens = sum(t for _, t in self.latest.values())
        if self.finished:  # the last line is said once
            return
        if self.lines is None:  # rates and ETA count from the first request's start
            self.lines = ProgressLines("vllm sampling", self.total, "sequences")
        self.lines.update(done, tokens=tokens)
        self.finished = done >= self.total

    def finish(self, grace_s: float = 2.0) -> None:
        """The last line, once the workers answered: their last progress lines may still be on
        their way through the reader threads (a reply has its own channel)."""
        deadline = time.monotonic() + grace_s
        while self.enabled and time.monotonic() < deadline:
            with self.lock:
                if sum(n for n, _ in self.latest.values()) >= self.total:
                    break
            time.sleep(0.05)
        self.tick()


def cpu_env(
    cache_dir: str | Path, omp_threads_bind: str | None = None, in_process: bool = False
) -> dict[str, str]:
    """Environment for vLLM's CPU build (tests, benchmark): small KV cache, no torch.compile.

    omp_threads_bind: e.g. "0-1"; without it vLLM's CPU worker may bind to a single core.
    in_process: run the engine core in the worker process (no extra process importing torch
    and vllm again); pair with engine_kwargs distributed_executor_backend="uni".
    """
    cache_dir = Path(cache_dir)
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "TORCH_COMPILE_DISABLE": "1",  # skips a ~20 s compile that tiny models never pay back
        "VLLM_CACHE_ROOT": str(cache_dir / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "inductor"),
        "TRITON_CACHE_DIR": str(cache_dir / "triton"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
    }
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if omp_threads_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = omp_threads_bind
    return env


def llm_kwargs(cfg: RolloutConfig) -> dict[str, Any]:
    """Keyword arguments of vllm.LLM; cfg.vllm.engine_kwargs override the named options."""
    kwargs: dict[str, Any] = {
        "seed": cfg.seed,
        "tensor_parallel_size": cfg.vllm.tensor_parallel_size,
        "gpu_memory_utilization": cfg.vllm.gpu_memory_utilization,
        "enforce_eager": cfg.vllm.enforce_eager,
        "dtype": cfg.vllm.dtype,
        "logprobs_mode": "processed_logprobs",
    }
    if cfg.vllm.max_model_len is not None:
        kwargs["max_model_len"] = cfg.vllm.max_model_len
    kwargs.update(cfg.vllm.engine_kwargs)
    return kwargs


def shard_devices(rank: int, tp: int) -> str:
    """CUDA_VISIBLE_DEVICES for data-parallel shard `rank` (tp GPUs each, from those visible)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(1024)]
    mine = ids[rank * tp : (rank + 1) * tp]
    if len(mine) < tp:
        raise StageError(
            f"data-parallel shard {rank} needs {tp} GPUs but CUDA_VISIBLE_DEVICES={visible!r} "
            "has too few: lower vllm.data_parallel_size or vllm.tensor_parallel_size"
        )
    return ",".join(mine)


def _stream(proc: subprocess.Popen, tag: str, tail: collections.deque, progress: bool,
            lines: VllmProgress | None = None) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if lines is not None and lines.seen(line):
            continue
        tail.append(line.rstrip("\n"))
        if progress:
            print(f"[{tag}] {line}", end="", file=sys.stderr, flush=True)


def failure_hint(tail_text: str, python: str) -> str:
    if "No module named 'vllm'" in tail_text:
        return (
            f"\nvllm is not importable by {python}: run scripts/setup_vllm_cpu.sh (CPU) or "
            "install vllm in a separate venv, then set vllm.python (or $TRACE_VLLM_PYTHON) to "
            "that venv's python."
        )
    return ""


def _wait(proc: subprocess.Popen, timeout_s: float | None, lines: VllmProgress | None) -> int:
    """proc.wait(timeout_s), logging progress lines meanwhile."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while proc.poll() is None:
        if lines is not None:
            lines.tick()
        if deadline is not None and time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout_s)
        time.sleep(0.5)
    return proc.returncode


def run_workers(
    jobs: list[tuple[list[str], dict[str, str]]], cfg: RolloutConfig, progress: bool,
    lines: VllmProgress | None = None,
) -> None:
    """Run worker commands concurrently, streaming logs (and progress lines to `lines`); raise
    StageError on any failure."""
    procs, threads, tails = [], [], []
    for rank, (cmd, env) in enumerate(jobs):
        tail: collections.deque = collections.deque(maxlen=LOG_TAIL_LINES)
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        thread = threading.Thread(
            target=_stream, args=(proc, f"vllm:{rank}", tail, progress, lines), daemon=True
        )
        thread.start()
        procs.append(proc), threads.append(thread), tails.append(tail)
    failures = []
    for rank, (proc, thread, tail) in enumerate(zip(procs, threads, tails)):
        try:
            rc = _wait(proc, cfg.vllm.timeout_s, lines)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            tail.append(f"killed after vllm.timeout_s={cfg.vllm.timeout_s}")
        thread.join()
        if lines is not None:
            lines.tick()
        if rc != 0:
            text = "\n".join(tail)
            failures.append(
                f"shard {rank} exited with {rc}; last lines:\n{text}"
                f"{failure_hint(text, cfg.vllm.python)}"
            )
    if failures:
        raise StageError("vLLM worker failed: " + "\n".join(failures))


def _request(
    cfg: RolloutConfig,
    model_dir: str,
    prompts: list[dict],
    prompt_ids: list[list[int]],
    indices: range,
    stop_ids: list[int],
    progress: bool,
) -> dict:
    return {
        "model": str(model_dir),
        "llm_kwargs": llm_kwargs(cfg),
        "sampling": {
            k: getattr(cfg, k) for k in ("n", "temperature", "top_p", "top_k", "max_tokens")
        },
        "stop_token_ids": stop_ids,
        "prompts": [
            {
                "index": i,
                "seed": prompt_seed(cfg.seed, prompts[i]["prompt_id"]),
                "prompt_token_ids": prompt_ids[i],
            }
            for i in indices
        ],
        "progress": progress,
    }


@dataclass
class Prepared:
    """A rollout's prompts tokenized and split into one worker request per data-parallel shard."""

    tokenizer: Any
    prompt_ids: list[list[int]]
    requests: list[dict]


def prepare(
    cfg: RolloutConfig, model_dir: str, prompts: list[dict], progress: bool = False
) -> Prepared:
    """Tokenize the prompts with the checkpoint's tokenizer and build the worker requests."""
    check_prompts(prompts)
    tokenizer = load_tokenizer(model_dir)
    stop_ids = stop_token_ids(tokenizer, model_dir)
    prompt_ids = [encode_prompt(tokenizer, p["problem"], cfg.enable_thinking) for p in prompts]
    per_shard = max(1, math.ceil(len(prompts) / cfg.vllm.data_parallel_size))
    shards = [
        range(lo, min(lo + per_shard, len(prompts))) for lo in range(0, len(prompts), per_shard)
    ]
    requests = [
        _request(cfg, model_dir, prompts, prompt_ids, indices, stop_ids, progress)
        for indices in shards
    ]
    return Prepared(tokenizer, prompt_ids, requests)


def copy_worker_script(directory: str | Path) -> str:
    """The worker script copied into `directory`, the path to run.

    A copy outside the package: the script's directory goes first on sys.path, and
    stages/engines holds modules (config.py, base.py) that would shadow real ones.
    """
    return shutil.copy(WORKER_SCRIPT, Path(directory) / "trace_vllm_worker.py")


def shard_env(cfg: RolloutConfig, rank: int) -> dict[str, str]:
    """The environment of data-parallel worker `rank`."""
    env = {**os.environ, **cfg.vllm.env}
    if cfg.vllm.data_parallel_size > 1:
        env["CUDA_VISIBLE_DEVICES"] = shard_devices(rank, cfg.vllm.tensor_parallel_size)
    return env


def generate_with_stats(
    cfg: RolloutConfig, model_dir: str, prompts: list[dict], *, progress: bool = True
) -> tuple[list[dict], dict]:
    """Like `generate`, plus worker timings {engine_start_s, generate_s, generated_tokens}."""
    prep = prepare(cfg, model_dir, prompts, progress)
    with tempfile.TemporaryDirectory(prefix="trace-vllm-") as tmp:
        script = copy_worker_script(tmp)
        jobs, results = [], []
        for rank, request in enumerate(prep.requests):
            req_path = Path(tmp) / f"request-{rank}.json"
            res_path = Path(tmp) / f"result-{rank}.parquet"
            req_path.write_text(json.dumps({**request, "progress_id": str(rank)}))
            jobs.append(
                ([cfg.vllm.python, script, str(req_path), str(res_path)], shard_env(cfg, rank))
            )
            results.append(res_path)
        run_workers(jobs, cfg, progress, VllmProgress(len(prompts) * cfg.n, progress))
        tables = [pq.read_table(p) for p in results]
    stats = merge_stats([json.loads(t.schema.metadata[b"stats"]) for t in tables])
    return rows_from_tables(cfg, prompts, prep.prompt_ids, tables, prep.tokenizer), stats


def merge_stats(per_shard: list[dict]) -> dict:
    return {
        "engine_start_s": max(s["engine_start_s"] for s in per_shard),
        "generate_s": max(s["generate_s"] for s in per_shard),
        "generated_tokens": sum(s["generated_tokens"] for s in per_shard),
        "peak_rss_gb": sum(s.get("peak_rss_gb", 0.0) for s in per_shard),
        "memory": per_shard[0].get("memory", {}),
    }


def rows_from_tables(
    cfg: RolloutConfig,
    prompts: list[dict],
    prompt_ids: list[list[int]],
    tables: list,
    tokenizer: Any,
) -> list[dict]:
    """Engine rows in prompt order, then sample order; every (prompt, sample) exactly once."""
    by_key: dict[tuple[int, int], dict] = {}
    for table in tables:
        for r in table.to_pylist():
            by_key[(r["prompt_index"], r["sample_index"])] = r
    sampling = sampling_json(cfg)
    rows = []
    for i, prompt in enumerate(prompts):
        for j in range(cfg.n):
            r = by_key.get((i, j))
            if r is None:
                raise StageError(f"vLLM returned no sample {j} for prompt {prompt['prompt_id']!r}")
            rows.append(
                make_row(
                    prompt_id=prompt["prompt_id"],
                    sample_index=j,
                    prompt_token_ids=prompt_ids[i],
                    response_text=decode_response(tokenizer, r["response_token_ids"]),
                    response_token_ids=r["response_token_ids"],
                    response_logprobs=r["response_logprobs"],
                    finish_reason=r["finish_reason"],
                    engine=ENGINE,
                    sampling=sampling,
                )
            )
    return rows


def generate(
    cfg: RolloutConfig, model_dir: str, prompts: list[dict], *, progress: bool = True
) -> list[dict]:
    """cfg.n samples per prompt with vLLM in cfg.vllm.python; rows as the hf engine's."""
    return generate_with_stats(cfg, model_dir, prompts, progress=progress)[0]
