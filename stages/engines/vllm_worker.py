"""vLLM rollout worker: runs in the vLLM virtual environment, never in the main one.

One-shot (a cold engine per rollout stage):
    <vllm-python> vllm_worker.py REQUEST.json RESULT.parquet
Serving (a run-scoped engine, see stages/engines/session.py):
    <vllm-python> vllm_worker.py --serve SPEC.json REPLY_FD

REQUEST.json (written by stages/engines/vllm_engine.py):
    model: checkpoint dir; llm_kwargs: keyword arguments of vllm.LLM;
    sampling: {n, temperature, top_p, top_k, max_tokens}; stop_token_ids: [int];
    prompts: [{index, seed, prompt_token_ids}]; progress: bool; progress_id: str (optional)
RESULT.parquet: one row per (prompt, sample): prompt_index, sample_index, response_token_ids,
    response_logprobs, finish_reason; file metadata "stats" holds JSON timings.

Serving: SPEC.json is {model, llm_kwargs, prefill_tokens}; the worker builds the engine once, then
reads one JSON command per line on stdin and answers each with one JSON line on file descriptor
REPLY_FD (stdout and stderr carry vLLM's log, so replies need their own channel):
    {"op": "generate", "request": REQUEST.json, "result": RESULT.parquet}  -> {"stats": {...}}
    {"op": "load_weights", "model": DIR}  new weights in place from DIR (vLLM's reload_weights)
    {"op": "sleep", "level": 1|2} / {"op": "wake"}   free / retake the accelerator's memory
    {"op": "close"}
With "progress", every finished request (a prompt with its n samples), at most one a second and
always the last, prints a stdout line PROGRESS_TAG + {"id", "sequences", "tokens"} (cumulative over
the request) that the parent logs as progress (stages/engines/vllm_engine.py, VllmProgress).
Every reply has "ok"; a failed command answers {"ok": false, "error": traceback} and the worker
keeps serving, so the parent decides whether to start over.

Standalone on purpose (only vllm, safetensors and pyarrow): the repo's packages are not
installed here.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from pathlib import Path


def _sampled_logprobs(token_ids: list[int], logprobs: object) -> list[float]:
    """Log-prob of each sampled token from vLLM's per-position {token_id: Logprob} entries."""
    if logprobs is None or len(logprobs) != len(token_ids):
        got = None if logprobs is None else len(logprobs)
        raise RuntimeError(f"vLLM returned {got} log-prob entries for {len(token_ids)} tokens")
    return [float(logprobs[t][tok].logprob) for t, tok in enumerate(token_ids)]


def _finish_reason(reason: str | None, index: int) -> str:
    if reason not in ("stop", "length"):
        raise RuntimeError(f"prompt {index}: vLLM finished with {reason!r}, expected stop|length")
    return reason


def prefill_tokens(request: dict) -> int:
    """Prompt tokens the request feeds the engine (each prompt once per sample)."""
    return sum(len(p["prompt_token_ids"]) for p in request["prompts"]) * request["sampling"]["n"]


def _avoid_chunked_prefill_on_cpu(kwargs: dict, prefill: int) -> None:
    """On CPU, give the scheduler a token budget that holds every prefill whole.

    vLLM rewinds a seeded request's generator after a partial (chunked) prefill with
    Generator.set_offset, which CPU generators lack ("CPU Generator does not use offset"); a
    budget covering all prompts of the round means no prefill is ever split. GPU is unaffected.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or "max_num_batched_tokens" in kwargs:
        return
    kwargs["max_num_batched_tokens"] = max(8192, prefill + 1024)


# The KV cache of a CPU engine whose config sets no VLLM_CPU_KVCACHE_SPACE, in GiB. Unset, vLLM
# sizes it from gpu_memory_utilization of the MACHINE's memory (0.9 of 24 GB put a demo worker at
# 22 GB); 2 GiB holds a SmolLM2 round (128 x 180 tokens) many times over.
CPU_KVCACHE_GIB = "2"


def bound_cpu_memory(llm_kwargs: dict) -> dict:
    """On CPU, the KV cache's size (VLLM_CPU_KVCACHE_SPACE set here when the config sets neither
    it nor kv_cache_memory_bytes, before the engine starts its processes, which inherit it); {}
    on a GPU. Returned for the manifest."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    if "kv_cache_memory_bytes" in llm_kwargs:  # vLLM's env setting would override it
        return {"kv_cache_memory_bytes": llm_kwargs["kv_cache_memory_bytes"]}
    if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = CPU_KVCACHE_GIB
    return {"VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]}


def build_llm(model: str, llm_kwargs: dict, prefill: int, sleep_mode: bool = False):
    from vllm import LLM

    kwargs = dict(llm_kwargs)
    # Log-probs must be those of the distribution actually sampled from (after temperature,
    # top-k, top-p); vLLM's default reports the raw model log-probs.
    kwargs.setdefault("logprobs_mode", "processed_logprobs")
    _avoid_chunked_prefill_on_cpu(kwargs, prefill)
    if sleep_mode:
        kwargs.setdefault("enable_sleep_mode", True)
    return LLM(model=model, **kwargs), kwargs


PROGRESS_TAG = "[trace-progress] "  # stages/engines/vllm_engine.py reads what follows it
_OUT_SPEED = re.compile(r"output: ([0-9.]+) toks/s")


def progress_bar(request: dict):
    """A tqdm class for LLM.generate's `use_tqdm` that draws nothing (a bar in a log is noise)
    and prints PROGRESS_TAG lines: vLLM updates it once per finished request, with n sequences,
    and puts its output speed in the postfix (cumulative tokens = speed x elapsed)."""
    from tqdm import tqdm

    total = len(request["prompts"]) * request["sampling"]["n"]
    ident = str(request.get("progress_id", "0"))

    class Lines(tqdm):
        def __init__(self, *args, **kwargs):
            self._sink = open(os.devnull, "w")  # noqa: SIM115 (the bar's file: closed in close)
            super().__init__(*args, **{**kwargs, "file": self._sink})
            self._said = 0.0
            if kwargs.get("desc") == "Processed prompts":
                self._say()  # generation starts: the parent times its rate from here

        def _say(self) -> None:
            speed = _OUT_SPEED.search(str(self.postfix or ""))
            tokens = round(float(speed.group(1)) * self.format_dict["elapsed"]) if speed else 0
            print(PROGRESS_TAG + json.dumps({"id": ident, "sequences": int(self.n), "tokens": tokens}),
                  flush=True)
            self._said = time.monotonic()

        def update(self, n=1):
            shown = super().update(n)
            if self.desc == "Processed prompts" and (self.n >= total or time.monotonic() - self._said >= 1.0):
                self._say()
            return shown

        def close(self):
            super().close()
            self._sink.close()

    return Lines


def generate(llm, request: dict) -> tuple[dict, dict]:
    """Generate every prompt of the request with a built engine; returns (columns, stats)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    s = request["sampling"]
    params = [
        SamplingParams(
            n=s["n"],
            temperature=s["temperature"],
            top_p=s["top_p"],
            top_k=s["top_k"],
            max_tokens=s["max_tokens"],
            seed=p["seed"],
            logprobs=0,
            stop_token_ids=request["stop_token_ids"],
            skip_special_tokens=True,
        )
        for p in request["prompts"]
    ]
    inputs = [TokensPrompt(prompt_token_ids=p["prompt_token_ids"]) for p in request["prompts"]]
    outputs = llm.generate(inputs, params,
                           use_tqdm=progress_bar(request) if request.get("progress") else False)
    keys = ("prompt_index", "sample_index", "response_token_ids", "response_logprobs", "finish_reason")
    cols: dict[str, list] = {k: [] for k in keys}
    for prompt, out in zip(request["prompts"], outputs):
        for comp in sorted(out.outputs, key=lambda c: c.index):
            ids = list(comp.token_ids)
            cols["prompt_index"].append(prompt["index"])
            cols["sample_index"].append(comp.index)
            cols["response_token_ids"].append(ids)
            cols["response_logprobs"].append(_sampled_logprobs(ids, comp.logprobs))
            cols["finish_reason"].append(_finish_reason(comp.finish_reason, prompt["index"]))
    stats = {
        "generate_s": time.perf_counter() - t0,
        "generated_tokens": sum(len(ids) for ids in cols["response_token_ids"]),
        "peak_rss_gb": peak_rss_gb(),
    }
    return cols, stats


def peak_rss_gb() -> float:
    """The sum of the peak resident memory of this worker and of every process below it (vLLM's
    engine core and its workers), in GB; Linux /proc only (0.0 elsewhere). Recorded to check
    the memory bound."""
    def status(pid: str, key: str) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def children(pid: str) -> list[str]:
        found: list[str] = []
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                found += task.read_text().split()
            except OSError:
                pass
        return found

    tree, todo = [], [str(os.getpid())]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children(pid)
    return round(sum(status(pid, "VmHWM") for pid in tree) / 1e9, 3)


def run(request: dict) -> tuple[dict, dict]:
    """Cold path: build an engine, generate every prompt of the request; (columns, stats)."""
    t0 = time.perf_counter()
    memory = bound_cpu_memory(request.get("llm_kwargs", {}))
    llm, _ = build_llm(request["model"], request.get("llm_kwargs", {}), prefill_tokens(request))
    start_s = time.perf_counter() - t0
    cols, stats = generate(llm, request)
    return cols, {"engine_start_s": start_s, **stats, "memory": memory}


def write_result(cols: dict, stats: dict, path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("prompt_index", pa.int32()),
            ("sample_index", pa.int32()),
            ("response_token_ids", pa.list_(pa.int32())),
            ("response_logprobs", pa.list_(pa.float32())),
            ("finish_reason", pa.string()),
        ],
        metadata={"stats": json.dumps(stats)},
    )
    pq.write_table(pa.table(cols, schema=schema), path)


def load_weights(llm, model_dir: str) -> dict:
    t0 = time.perf_counter()
    # The worker's own `reload_weights`, called BY NAME: a name and a path cross into vLLM's
    # engine-core process (the default multiprocess executor) as plain data, where a function
    # object would need VLLM_ALLOW_INSECURE_SERIALIZATION. vLLM's model loader does the rest
    # (same file selection and weight post-processing as a cold load). Tied embeddings: the
    # trainer writes lm_head.weight too; vLLM's tied models hold one tensor for embed_tokens and
    # lm_head and skip the lm_head entry, so the head follows the embedding either way.
    llm.collective_rpc("reload_weights", kwargs={"weights_path": model_dir})
    how = "reload_weights"
    # Cached prefixes hold keys/values of the old weights; reusing them would mix policies.
    llm.reset_prefix_cache()
    return {"load_s": time.perf_counter() - t0, "how": how}


class _Server:
    def __init__(self, spec: dict, reply_fd: int):
        from vllm.platforms import current_platform

        self.reply = os.fdopen(reply_fd, "w", buffering=1)
        self.platform = "cpu" if current_platform.is_cpu() else str(current_platform.device_type)
        self.sleep_mode = bool(current_platform.is_sleep_mode_available()) and self.platform != "cpu"
        t0 = time.perf_counter()
        memory = bound_cpu_memory(spec["llm_kwargs"])
        self.llm, kwargs = build_llm(
            spec["model"], spec["llm_kwargs"], spec["prefill_tokens"], self.sleep_mode
        )
        self.asleep = False
        self.answer(
            ok=True,
            op="ready",
            engine_start_s=time.perf_counter() - t0,
            platform=self.platform,
            sleep_mode=self.sleep_mode,
            max_num_batched_tokens=kwargs.get("max_num_batched_tokens"),
            memory=memory,
            pid=os.getpid(),
        )

    def answer(self, **reply) -> None:
        self.reply.write(json.dumps(reply) + "\n")

    def handle(self, cmd: dict) -> dict:
        op = cmd["op"]
        if op == "generate":
            if self.asleep:
                raise RuntimeError("generate while asleep: send wake first")
            with open(cmd["request"]) as f:
                request = json.load(f)
            cols, stats = generate(self.llm, request)
            write_result(cols, {"engine_start_s": 0.0, **stats}, cmd["result"])
            return {"stats": stats}
        if op == "load_weights":
            return load_weights(self.llm, cmd["model"])
        if op == "sleep":
            t0 = time.perf_counter()
            self.llm.sleep(level=int(cmd.get("level", 1)))
            self.asleep = True
            return {"sleep_s": time.perf_counter() - t0}
        if op == "wake":
            t0 = time.perf_counter()
            self.llm.wake_up()
            self.asleep = False
            return {"wake_s": time.perf_counter() - t0}
        raise ValueError(f"unknown op {op!r}; valid: generate, load_weights, sleep, wake, close")

    def serve(self) -> int:
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            if cmd.get("op") == "close":
                self.answer(ok=True, op="close")
                return 0
            try:
                self.answer(ok=True, op=cmd.get("op"), **self.handle(cmd))
            except Exception:  # the parent gets the traceback and decides to restart or raise
                self.answer(ok=False, op=cmd.get("op"), error=traceback.format_exc())
        return 0  # stdin closed: the parent went away


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] == "--serve":
        with open(argv[2]) as f:
            spec = json.load(f)
        return _Server(spec, int(argv[3])).serve()
    if len(argv) != 3:
        print(f"usage: {argv[0]} REQUEST.json RESULT.parquet | --serve SPEC.json REPLY_FD",
              file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        request = json.load(f)
    cols, stats = run(request)
    write_result(cols, stats, argv[2])
    print(f"[vllm-worker] done: {json.dumps(stats)}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    # vllm.LLM spawns engine processes that re-import this module: keep work behind this guard.
    sys.exit(main(sys.argv))
