"""vLLM rollout worker: runs in the vLLM virtual environment, never in the main one.

    <vllm-python> vllm_worker.py REQUEST.json RESULT.parquet

REQUEST.json (written by stages/engines/vllm_engine.py):
    model: checkpoint dir; llm_kwargs: keyword arguments of vllm.LLM;
    sampling: {n, temperature, top_p, top_k, max_tokens}; stop_token_ids: [int];
    prompts: [{index, seed, prompt_token_ids}]; progress: bool
RESULT.parquet: one row per (prompt, sample): prompt_index, sample_index, response_token_ids,
    response_logprobs, finish_reason; file metadata "stats" holds JSON timings.

Standalone on purpose (only vllm and pyarrow): the repo's packages are not installed here.
"""

from __future__ import annotations

import json
import sys
import time


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


def _avoid_chunked_prefill_on_cpu(kwargs: dict, request: dict) -> None:
    """On CPU, give the scheduler a token budget that holds every prefill whole.

    vLLM rewinds a seeded request's generator after a partial (chunked) prefill with
    Generator.set_offset, which CPU generators lack ("CPU Generator does not use offset"); a
    budget covering all prompts of the round means no prefill is ever split. GPU is unaffected.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or "max_num_batched_tokens" in kwargs:
        return
    n = request["sampling"]["n"]
    prefill = sum(len(p["prompt_token_ids"]) for p in request["prompts"]) * n
    kwargs["max_num_batched_tokens"] = max(8192, prefill + 1024)


def run(request: dict) -> tuple[dict, dict]:
    """Generate every prompt of the request; returns (columns, stats)."""
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(request.get("llm_kwargs", {}))
    # Log-probs must be those of the distribution actually sampled from (after temperature,
    # top-k, top-p); vLLM's default reports the raw model log-probs.
    kwargs.setdefault("logprobs_mode", "processed_logprobs")
    _avoid_chunked_prefill_on_cpu(kwargs, request)
    llm = LLM(model=request["model"], **kwargs)
    t_ready = time.perf_counter()

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
    outputs = llm.generate(inputs, params, use_tqdm=bool(request.get("progress", False)))
    t_done = time.perf_counter()

    cols: dict[str, list] = {
        k: []
        for k in (
            "prompt_index",
            "sample_index",
            "response_token_ids",
            "response_logprobs",
            "finish_reason",
        )
    }
    for prompt, out in zip(request["prompts"], outputs):
        for comp in sorted(out.outputs, key=lambda c: c.index):
            ids = list(comp.token_ids)
            cols["prompt_index"].append(prompt["index"])
            cols["sample_index"].append(comp.index)
            cols["response_token_ids"].append(ids)
            cols["response_logprobs"].append(_sampled_logprobs(ids, comp.logprobs))
            cols["finish_reason"].append(_finish_reason(comp.finish_reason, prompt["index"]))
    stats = {
        "engine_start_s": t_ready - t0,
        "generate_s": t_done - t_ready,
        "generated_tokens": sum(len(ids) for ids in cols["response_token_ids"]),
    }
    return cols, stats


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


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} REQUEST.json RESULT.parquet", file=sys.stderr)
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
