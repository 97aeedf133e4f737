"""This project vs TRL's GRPOTrainer on the same work, CPU: one GRPO update of 32 prompts x 8.

    python benchmarks/vs_trl.py [--reps 3] [--model random|testbed] [--threads N]
        [--variants grpo,trl,trace] [--rounds 3] [--json out.json]

Variants, each run in its own process, alternated (a, b, c, a, b, c, ...):
  grpo   (a) one round of this project with train.method=grpo, through the stage functions
             (prepare, rollout with the hf engine, verify, annotate, train; Parquet written):
             what `trace-rl stage NAME demo --round 0 --force` runs, with the overrides below
  trl    (b) TRL GRPOTrainer: transformers generation (no vLLM), num_generations=8, one optimizer
             step over 32 x 8 completions (micro-batches of 16), DAPO loss, clip 0.2 / 0.28
  trace  (c) one TRACE round during warm-up (λ = 0.5, route.key_forward, rule annotator)
Same model, the 32 testbed train prompts of round 0, max 128 new tokens, temperature 1, lr 2e-4,
float32. Wall time = the whole worker process as the parent sees it (interpreter start and
imports included). Targets: grpo / trl <= 0.8 and trace / trl <= 1.0.

--rounds R (default 3): our variants run R rounds in one process, inside the engine and trainer
sessions a flow opens (hf model and trainer kept loaded between rounds), and report the last
round's stage times ("steady round": rollout + verify + annotate + train) beside the first, cold
round's; the wall time of ours then covers R rounds, so the wall ratio is taken against
R x TRL's wall only when R = 1 (use the round columns for R > 1).

--model random: a random Qwen3 (4 layers, width 256, vocab 4,096, 4.5M parameters) whose eos is
made near-impossible, so both sides generate ~128 tokens for every completion: equal work, but
every reward is 0, so TRACE finds no key spans (its teacher never runs). --model testbed: the
warm-started testbed policy (~30% correct), so rewards vary and TRACE distils on key spans;
response lengths then depend on what each side happens to sample.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "benchmarks" / "_vs_trl_worker.py"
VARIANTS = ("grpo", "trl", "trace")
LABELS = {"grpo": "(a) ours grpo", "trl": "(b) TRL GRPOTrainer", "trace": "(c) ours trace"}


def build_model(kind: str, tmp: Path) -> str:
    """The model directory both sides load (built once, outside any timing)."""
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    if kind == "random":
        from tiny import build_model_dir

        return str(build_model_dir(tmp / "model", layers=4, hidden=256, heads=4, kv_heads=2,
                                   vocab_size=4096, p_eos=1e-9))
    if kind == "testbed":
        from trace_rl.stages.config import load_config
        from trace_rl.stages.common import initial_model_dir

        return initial_model_dir(load_config("demo"))
    raise SystemExit(f"unknown --model {kind!r}; valid: random, testbed")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_one(variant: str, model_dir: str, work: Path, env: dict[str, str],
            rounds: int = 1) -> dict:
    """One worker process; its JSON result plus the wall time the parent measured."""
    out = work / "result.json"
    cmd = [sys.executable, str(WORKER), variant, "--model-dir", model_dir, "--work", str(work),
           "--out", str(out)]
    if variant != "trl":
        cmd += ["--rounds", str(rounds)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return {**json.loads(out.read_text()), "wall_s": wall, "loadavg": os.getloadavg()}


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for v, rs in runs.items():
        def med(key: str, rs: list[dict] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        out[v] = {"wall_s": med("wall_s"), "wall_min_s": min(r["wall_s"] for r in rs),
                  "wall_max_s": max(r["wall_s"] for r in rs), "generation_s": med("generation_s"),
                  "training_s": med("training_s"), "imports_s": med("imports_s"),
                  "completion_tokens": med("completion_tokens"), "reward_mean": med("reward_mean")}
        if "span_tokens" in rs[0]:
            out[v]["span_tokens"] = med("span_tokens")
        for key in ("cold_round_s", "steady_round_s", "steady_generation_s", "steady_training_s"):
            if key in rs[0]:
                out[v][key] = med(key)
    return out


def print_report(summary: dict[str, dict], runs: dict[str, list[dict]], meta: dict) -> None:
    print(f"{meta['model']} model, 32 prompts x 8, max 128 tokens, 1 optimizer step; "
          f"{meta['reps']} reps; {meta['nproc']} cores ({meta['cpu']}); torch threads "
          f"{meta['threads']}; load average {meta['load_start'][0]:.2f} at start, "
          f"{meta['load_end'][0]:.2f} at end")
    print(f"{'variant':22s} {'median wall':>11s} {'min-max':>15s} {'generation':>10s} "
          f"{'training':>9s} {'imports':>8s} {'tokens':>7s} {'reward':>6s}")
    for v, s in summary.items():
        print(f"{LABELS[v]:22s} {s['wall_s']:10.1f}s {s['wall_min_s']:6.1f}-{s['wall_max_s']:6.1f}s "
              f"{s['generation_s']:9.1f}s {s['training_s']:8.1f}s {s['imports_s']:7.1f}s "
              f"{s['completion_tokens']:7.0f} {s['reward_mean']:6.3f}")
    for v, rs in runs.items():
        print(f"  {v:6s} walls: " + ", ".join(f"{r['wall_s']:.1f}s (load {r['loadavg'][0]:.1f})"
                                           for r in rs))
    for v, s in summary.items():
        if "steady_round_s" in s:
            print(f"  {v:6s} cold round {s['cold_round_s']:.1f}s (generation {s['generation_s']:.1f}s,"
                  f" training {s['training_s']:.1f}s); steady round {s['steady_round_s']:.1f}s "
                  f"(generation {s['steady_generation_s']:.1f}s, training "
                  f"{s['steady_training_s']:.1f}s)")
    if "trl" in summary and meta["rounds"] == 1:
        for v, target in (("grpo", 0.8), ("trace", 1.0)):
            if v in summary:
                ratio = summary[v]["wall_s"] / summary["trl"]["wall_s"]
                print(f"{v} / trl wall ratio: {ratio:.2f} (target <= {target})")
    if "trace" in summary:
        print(f"trace span tokens distilled: {summary['trace'].get('span_tokens', 0):.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", default="random", choices=["random", "testbed"])
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP/torch threads in every worker (default: torch's own)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of ours per worker; the last is reported as the steady round")
    ap.add_argument("--json", help="also write all runs and the summary here")
    a = ap.parse_args()
    variants = [v for v in a.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; valid: {list(VARIANTS)}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    with tempfile.TemporaryDirectory(prefix="trace-vs-trl-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build_model(a.model, tmp)
        load_start = os.getloadavg()
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for rep in range(a.reps):
            for v in variants:
                r = run_one(v, model_dir, tmp / f"{v}-{rep}", env, a.rounds)
                runs[v].append(r)
                print(f"rep {rep} {v}: {r['wall_s']:.1f}s (generation {r['generation_s']:.1f}s, "
                      f"training {r['training_s']:.1f}s)", file=sys.stderr, flush=True)
    meta = {"model": a.model, "reps": a.reps, "rounds": a.rounds, "nproc": os.cpu_count(), "cpu": cpu_model(),
            "threads": a.threads or "default", "load_start": load_start,
            "load_end": os.getloadavg()}
    summary = summarise(runs)
    print_report(summary, runs, meta)
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs},
                                           indent=1))


if __name__ == "__main__":
    main()
