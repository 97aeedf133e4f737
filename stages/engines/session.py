"""A run-scoped vLLM engine: one engine for all rounds of a flow, new weights loaded in place.

The cold path (vllm_engine.generate) starts a vLLM process per rollout stage: interpreter start,
`import vllm`, model load and KV-cache set-up every round. An `EngineSession` keeps the workers
(vllm_worker.py --serve, one per data-parallel shard) alive between rounds:

  - generate(cfg, model_dir, prompts): starts the engine at the first call; later calls reuse
    it, loading `model_dir`'s safetensors in place when it holds other weights (the next round's
    checkpoint) and waking it when asleep;
  - release_device(): before the trainer (or an evaluation engine) takes the accelerator, the
    engine sleeps (vLLM sleep mode, `vllm.sleep_level`); a GPU platform without sleep mode
    stops the engine instead; on CPU there is nothing to free and the engine stays resident;
  - close(): stops the workers.

Persistence is only an optimisation. The stage contract is unchanged (the rollout stage writes
its Parquet and manifest as before), and the session falls back to a cold start whenever the
engine cannot be reused: a worker died, a command failed, or the engine config changed (see
`engine_key`). Rollouts equal a cold engine's on the same checkpoint: sampling is seeded per
request, and the prefix cache is cleared on every weight load.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import select
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq

from trace_rl.data_schemas.errors import StageError
from trace_rl.stages.engines.config import RolloutConfig
from trace_rl.stages.engines.vllm_engine import (
    LOG_TAIL_LINES,
    VllmProgress,
    copy_worker_script,
    failure_hint,
    llm_kwargs,
    prepare,
    rows_from_tables,
    shard_env,
)

log = logging.getLogger("trace_rl.stages.engines.session")

# config.json keys that change with every save but not the architecture vLLM built.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version"}


class WorkerGone(StageError):
    """The serving worker exited, failed a command or did not answer in time."""


def engine_key(cfg: RolloutConfig, model_dir: str) -> str:
    """What the built engine depends on; a different key means a cold start.

    The seed is left out: every request carries its own per-prompt seed, so the engine's
    global seed does not reach the samples (and it changes every round). The checkpoint's path
    is left out too (weights load in place), but not its architecture.
    """
    config = json.loads((Path(model_dir) / "config.json").read_text())
    arch = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    kwargs = {k: v for k, v in llm_kwargs(cfg).items() if k != "seed"}
    return json.dumps(
        {"python": cfg.vllm.python, "env": cfg.vllm.env, "kwargs": kwargs,
         "dp": cfg.vllm.data_parallel_size, "arch": arch},
        sort_keys=True, default=str,
    )


class _Worker:
    """One `vllm_worker.py --serve` process: JSON commands on stdin, replies on a private pipe."""

    def __init__(self, cmd: list[str], env: dict[str, str], tag: str, progress: bool):
        read_fd, write_fd = os.pipe()
        self.tag = tag
        self.tail: collections.deque = collections.deque(maxlen=LOG_TAIL_LINES)
        try:
            self.proc = subprocess.Popen(
                [*cmd, str(write_fd)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, errors="replace", pass_fds=(write_fd,),
                process_group=0,  # its own group: stop() reaches vLLM's engine core through it
            )
        except OSError as exc:
            os.close(read_fd)
            raise StageError(f"cannot start the vLLM worker with {cmd[0]!r}: {exc}; set "
                             "vllm.python (or $TRACE_VLLM_PYTHON) to a venv's python") from exc
        finally:
            os.close(write_fd)
        self._fd, self._buf = read_fd, b""
        self.lines: VllmProgress | None = None  # the current generate call's progress
        self._thread = threading.Thread(target=self._stream, args=(progress,), daemon=True)
        self._thread.start()

    def _stream(self, progress: bool) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            lines = self.lines
            if lines is not None and lines.seen(line):
                continue
            self.tail.append(line.rstrip("\n"))
            if progress:
                print(f"[{self.tag}] {line}", end="", file=sys.stderr, flush=True)

    def send(self, cmd: dict) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise self._gone(f"could not send {cmd['op']!r} ({exc})") from exc

    def reply(self, timeout_s: float | None) -> dict:
        """The next reply line; WorkerGone if the process exits or `timeout_s` passes first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            if self.lines is not None:
                self.lines.tick()
            if deadline is not None and time.monotonic() > deadline:
                raise self._gone(f"no answer within vllm.timeout_s={timeout_s}")
            ready, _, _ = select.select([self._fd], [], [], 1.0)
            if ready:
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    self.proc.wait()
                    raise self._gone("closed its reply channel")
                self._buf += chunk
            elif self.proc.poll() is not None:
                raise self._gone("exited")
        line, self._buf = self._buf.split(b"\n", 1)
        answer = json.loads(line)
        if not answer.get("ok"):
            raise self._gone(f"failed {answer.get('op')!r}:\n{answer.get('error', '')}")
        return answer

    def _gone(self, what: str) -> WorkerGone:
        self._thread.join(timeout=2)
        text = "\n".join(self.tail)
        code = self.proc.poll()
        return WorkerGone(f"vLLM worker {self.tag} {what} (exit code {code}); last lines:\n{text}")

    def stop(self, timeout_s: float = 30) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"op": "close"})
                self.proc.wait(timeout=timeout_s)
            except (WorkerGone, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        # A killed worker (here, by the OOM killer or by pid) leaves vLLM's engine core and the
        # resource tracker running, reparented to init, with the model and KV cache in memory
        # (measured: the engine core, 0.6 GB RSS, still up 90 s after a SIGKILL of the worker).
        # They are still in the worker's process group.
        _kill_group(self.proc.pid)
        os.close(self._fd)
        self._thread.join(timeout=2)


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of process group `pgid` (a stopped worker's group; nothing when
    all of it exited, so a reused number is never signalled)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return


class EngineSession:
    """A vLLM engine kept up across rounds; see the module docstring. Not thread-safe."""

    def __init__(self) -> None:
        self._workers: list[_Worker] = []
        self._ready: list[dict] = []
        self._key: str | None = None
        self._weights: str | None = None  # the checkpoint dir whose weights the engine holds
        self._asleep = False
        self._sleep_level = 2
        self._tmp: str | None = None
        self._calls = 0
        self._restart_reason: str | None = None  # why this call's engine is not the one up before
        self.events: list[dict] = []  # one entry per engine operation, for the benchmark
        self.hf = None  # the hf engine's model, kept across rounds (stages/engines/hf.py)

    @property
    def running(self) -> bool:
        return bool(self._workers) and all(w.proc.poll() is None for w in self._workers)

    def generate(self, cfg: RolloutConfig, model_dir: str, prompts: list[dict], *,
                 progress: bool = True) -> list[dict]:
        return self.generate_with_stats(cfg, model_dir, prompts, progress=progress)[0]

    def generate_with_stats(self, cfg: RolloutConfig, model_dir: str, prompts: list[dict], *,
                            progress: bool = True) -> tuple[list[dict], dict]:
        """cfg.n samples per prompt, as vllm_engine.generate, from the session's engine."""
        if cfg.engine != "vllm":
            raise ValueError(f"an engine session serves the vllm engine, not {cfg.engine!r}")
        prep = prepare(cfg, model_dir, prompts)
        stats: dict = {"engine_start_s": 0.0, "load_weights_s": 0.0, "wake_s": 0.0}
        self._restart_reason = None
        reused = self._reusable(cfg, model_dir, prep.requests)
        if self._restart_reason:
            stats["restarted"] = self._restart_reason
        if reused:
            try:
                self._refresh(cfg, model_dir, stats)
                tables = self._generate(cfg, prep.requests, stats, progress)
            except WorkerGone as exc:
                log.warning("the run's vLLM engine could not be reused, starting it again: %s", exc)
                reused = False
                # the manifest says why this call paid a start, not the failed attempt's times
                stats = {"engine_start_s": 0.0, "load_weights_s": 0.0, "wake_s": 0.0,
                         "restarted": str(exc).splitlines()[0][:300]}
        if not reused:
            self._start(cfg, model_dir, prep.requests, progress, stats)
            tables = self._generate(cfg, prep.requests, stats, progress)
        # "resident": the engine was already up; "cold": it started for this call.
        stats["mode"] = "resident" if reused else "cold"
        stats["memory"] = self._ready[0].get("memory", {})
        self._calls += 1
        return rows_from_tables(cfg, prompts, prep.prompt_ids, tables, prep.tokenizer), stats

    def _reusable(self, cfg: RolloutConfig, model_dir: str, requests: list[dict]) -> bool:
        if not self._workers:
            return False
        if not self.running:
            log.warning("the run's vLLM engine exited; starting it again (cold start)")
            self._restart_reason = "the engine exited between calls"
            return False
        if engine_key(cfg, model_dir) != self._key:
            log.info("rollout engine config changed since the engine started: cold start")
            return False
        for ready, request in zip(self._ready, requests):
            budget = ready.get("max_num_batched_tokens")
            if budget is not None and _largest_prompt(request) + 1024 > budget:
                log.info("a prompt exceeds the engine's CPU token budget (%d): cold start with "
                         "a larger one", budget)
                return False
        return len(requests) <= len(self._workers)

    def _start(self, cfg: RolloutConfig, model_dir: str, requests: list[dict], progress: bool,
               stats: dict) -> None:
        self.close()
        self._tmp = tempfile.mkdtemp(prefix="trace-vllm-session-")
        script = copy_worker_script(self._tmp)
        t0 = time.perf_counter()
        try:
            for rank in range(cfg.vllm.data_parallel_size):
                request = requests[min(rank, len(requests) - 1)]
                # Twice this round's prefill: later rounds' prompts differ in length, and
                # outgrowing the CPU token budget costs a restart.
                spec = {"model": str(model_dir), "llm_kwargs": llm_kwargs(cfg),
                        "prefill_tokens": 2 * _prefill_tokens(request)}
                spec_path = Path(self._tmp) / f"spec-{rank}.json"
                spec_path.write_text(json.dumps(spec))
                cmd = [cfg.vllm.python, script, "--serve", str(spec_path)]
                self._workers.append(_Worker(cmd, shard_env(cfg, rank), f"vllm:{rank}", progress))
            self._ready = [w.reply(cfg.vllm.timeout_s) for w in self._workers]
        except StageError as exc:
            self.close()
            raise StageError(f"{exc}{failure_hint(str(exc), cfg.vllm.python)}") from exc
        stats["engine_start_s"] = time.perf_counter() - t0
        self._key, self._weights, self._asleep = engine_key(cfg, model_dir), str(model_dir), False
        self._sleep_level = cfg.vllm.sleep_level
        self._event("start", stats["engine_start_s"], platform=self._ready[0]["platform"])
        log.info("vLLM engine up for the run in %.1f s (%s, sleep mode %s)",
                 stats["engine_start_s"], self._ready[0]["platform"],
                 "available" if self._ready[0]["sleep_mode"] else "not available")

    def _refresh(self, cfg: RolloutConfig, model_dir: str, stats: dict) -> None:
        """Wake the engine if asleep, then load `model_dir`'s weights unless it holds them."""
        self._sleep_level = cfg.vllm.sleep_level
        if self._asleep:
            stats["wake_s"] = self._broadcast({"op": "wake"}, cfg.vllm.timeout_s)
            self._asleep = False
            self._event("wake", stats["wake_s"])
        if self._weights != str(model_dir):
            self._weights = None  # a failed load leaves the engine's weights unknown
            stats["load_weights_s"] = self._broadcast(
                {"op": "load_weights", "model": str(model_dir)}, cfg.vllm.timeout_s)
            self._weights = str(model_dir)
            self._event("load_weights", stats["load_weights_s"], model=str(model_dir))

    def _broadcast(self, cmd: dict, timeout_s: float | None) -> float:
        t0 = time.perf_counter()
        for w in self._workers:
            w.send(cmd)
        for w in self._workers:
            w.reply(timeout_s)
        return time.perf_counter() - t0

    def _generate(self, cfg: RolloutConfig, requests: list[dict], stats: dict,
                  progress: bool = False) -> list:
        """Every worker's request, in pieces that fit its CPU token budget (a whole prefill per
        piece; every prompt carries its own seed, so the split does not change a sample).
        Progress lines per finished request of each piece (vllm_engine.VllmProgress)."""
        assert self._tmp is not None
        t0 = time.perf_counter()
        lines = VllmProgress(sum(len(r["prompts"]) for r in requests) * cfg.n, progress)
        for w in self._workers:
            w.lines = lines
        pieces = [_pieces(r, ready.get("max_num_batched_tokens"))
                  for r, ready in zip(requests, self._ready)]
        tables, stats["generate_s"], stats["generated_tokens"], stats["peak_rss_gb"] = [], 0.0, 0, 0.0
        for step in range(max(len(p) for p in pieces)):
            sent = []
            for rank, (w, mine) in enumerate(zip(self._workers, pieces)):
                if step < len(mine):
                    req = Path(self._tmp) / f"request-{self._calls}-{rank}-{step}.json"
                    res = req.with_suffix(".parquet")
                    req.write_text(json.dumps({**mine[step], "progress": progress,
                                               "progress_id": f"{rank}-{step}"}))
                    w.send({"op": "generate", "request": str(req), "result": str(res)})
                    sent.append((w, req, res))
            replies = [w.reply(cfg.vllm.timeout_s)["stats"] for w, _, _ in sent]
            for _, req, res in sent:
                tables.append(pq.read_table(res))
                req.unlink(), res.unlink()
            stats["generate_s"] += max(r["generate_s"] for r in replies)
            stats["generated_tokens"] += sum(r["generated_tokens"] for r in replies)
            stats["peak_rss_gb"] = max(stats["peak_rss_gb"],
                                       sum(r.get("peak_rss_gb", 0.0) for r in replies))
        lines.finish()
        self._event("generate", time.perf_counter() - t0, tokens=stats["generated_tokens"])
        return tables

    def release_device(self) -> str:
        """Free the accelerator for the trainer; returns what was done (for logs and tests)."""
        hf = self.hf.model if self.hf is not None else None
        if hf is not None and next(hf.parameters()).device.type != "cpu":
            import torch

            self.hf.clear()  # the hf engine holds a device: drop it (reloaded next round)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return "hf model dropped"
        if not self.running or self._asleep:
            return "idle"
        if self._ready[0]["platform"] == "cpu":
            log.info("vLLM on CPU has no sleep mode; the engine stays resident during training")
            return "resident"
        if not self._ready[0]["sleep_mode"]:
            log.info("no vLLM sleep mode on %s: stopping the engine to free the device",
                     self._ready[0]["platform"])
            self.close()
            return "stopped"
        took = self._broadcast({"op": "sleep", "level": self._sleep_level}, None)
        self._asleep = True
        if self._sleep_level >= 2:
            self._weights = None  # level 2 drops the weights: the next round must load them
        self._event("sleep", took, level=self._sleep_level)
        return f"asleep (level {self._sleep_level})"

    def generate_hf(self, cfg: RolloutConfig, model_dir: str, prompts: list[dict], *,
                    progress: bool = True) -> list[dict]:
        """The hf engine with its model kept in this session from one round to the next."""
        from trace_rl.stages.engines.hf import HFModel
        from trace_rl.stages.engines.hf import generate as hf_generate

        if self.hf is None:
            self.hf = HFModel()
        return hf_generate(cfg, model_dir, prompts, progress=progress, held=self.hf)

    def close(self) -> None:
        if self.hf is not None:
            self.hf.clear()
        for w in self._workers:
            w.stop()
        self._workers, self._ready, self._key, self._weights = [], [], None, None
        self._asleep = False
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _event(self, op: str, seconds: float, **extra) -> None:
        self.events.append({"op": op, "s": seconds, **extra})

    def __enter__(self) -> EngineSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _prefill_tokens(request: dict) -> int:
    return sum(len(p["prompt_token_ids"]) for p in request["prompts"]) * request["sampling"]["n"]


def _largest_prompt(request: dict) -> int:
    n = request["sampling"]["n"]
    return max((len(p["prompt_token_ids"]) * n for p in request["prompts"]), default=0)


def _pieces(request: dict, budget: int | None) -> list[dict]:
    """`request` as consecutive requests whose prefill fits `budget` - 1024 tokens (the
    worker's margin); one piece when the engine has no budget (GPU) or all of it fits."""
    if budget is None or _prefill_tokens(request) + 1024 <= budget:
        return [request]
    n, pieces, current, used = request["sampling"]["n"], [], [], 0
    for prompt in request["prompts"]:
        cost = len(prompt["prompt_token_ids"]) * n
        if current and used + cost + 1024 > budget:
            pieces.append({**request, "prompts": current})
            current, used = [], 0
        current.append(prompt)
        used += cost
    return [*pieces, {**request, "prompts": current}]


_ACTIVE: EngineSession | None = None


def generate_in_run(cfg: RolloutConfig, model_dir: str, prompts: list[dict], *,
                    progress: bool = True) -> tuple[list[dict], dict]:
    """cfg.n samples per prompt with the flow's run-scoped engine when one is active (rollouts
    and evaluations share it: same engine, each request with its own sampling settings), else
    a cold engine. Returns the rows and what a manifest records of the engine: name, mode
    ("resident": up before this call; "cold": started for it) and timings in seconds."""
    from trace_rl.stages.lora_weights import engine_weights

    model_dir = engine_weights(model_dir)  # a LoRA checkpoint: its merged model (a folder)
    session = active_session()
    if cfg.engine == "vllm":
        from trace_rl.stages.engines.vllm_engine import generate_with_stats

        if session is not None and cfg.vllm.persistent:
            rows, stats = session.generate_with_stats(cfg, model_dir, prompts, progress=progress)
        else:
            rows, stats = generate_with_stats(cfg, model_dir, prompts, progress=progress)
            stats = {"mode": "cold", "load_weights_s": 0.0, **stats}
        return rows, {"name": "vllm", **stats}
    t0 = time.perf_counter()
    if session is not None:  # the hf model stays loaded across rounds
        loads = session.hf.loads if session.hf is not None else 0
        rows = session.generate_hf(cfg, model_dir, prompts, progress=progress)
        resident = session.hf is not None and session.hf.loads == loads  # no full load now
    else:
        from trace_rl.stages.engines.hf import generate as hf_generate

        resident = False
        rows = hf_generate(cfg, model_dir, prompts, progress=progress)
    return rows, {"name": "hf", "mode": "resident" if resident else "cold",
                  "generate_s": time.perf_counter() - t0,
                  "generated_tokens": sum(len(r["response_token_ids"]) for r in rows)}


def active_session() -> EngineSession | None:
    """The engine session of the flow running in this process, if any."""
    return _ACTIVE


def _preload() -> None:
    """The hf engine's Python code and transformers' model-loading and generation machinery:
    ~2.5-4 s of imports (measured on the testbed, 2 cores) that the first round's generation
    paid inside its rollout stage ("the first generation pays no set-up"). Imported once per
    process, so a later from_pretrained and generate find them loaded."""
    import transformers.generation.utils  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    import trace_rl.stages.engines.hf  # noqa: F401


@contextmanager
def engine_session() -> Iterator[EngineSession]:
    """A session made the process's active one for the block, closed when the block ends.

    Entering it imports what the first generation needs (`_preload`): set-up paid once when the
    run's engine is set up, not inside round 0's rollout. Not in a background thread:
    transformers' lazy module is not safe to import from two threads at once (a concurrent
    `from transformers import AutoModelForCausalLM` failed with ImportError)."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("an engine session is already active in this process")
    _preload()
    session = EngineSession()
    _ACTIVE = session
    try:
        yield session
    finally:
        _ACTIVE = None
        session.close()
