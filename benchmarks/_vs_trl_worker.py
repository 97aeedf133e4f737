"""One timed run of benchmarks/vs_trl.py, in its own process: this project's round or TRL's step.

    python benchmarks/_vs_trl_worker.py {grpo|trace|trl} --model-dir DIR --work DIR --out FILE.json

`grpo` / `trace`: one round of this project through the stage functions (prepare, rollout with
the hf engine, verify, annotate, train), exactly what `trace-rl stage NAME ... --force` runs.
`trl`: TRL's GRPOTrainer on the same model, the same 32 prompts, 8 generations each, one
optimizer step. Times are taken from the first line of this file, so imports count.
"""

from __future__ import annotations

import time

T_PROCESS = time.perf_counter()

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS_PER_ROUND = 32
GROUP = 8
MAX_TOKENS = 128
MICRO_BATCH = 16
LR = 2.0e-4


def ours_overrides(method: str, model_dir: str, run_root: str) -> list[str]:
    """demo.yaml, resized to the benchmark's work: one update of 32 prompts x 8 samples."""
    return [
        f"run.root={run_root}",
        f"model.path={model_dir}",
        f"rollout.prompts_per_round={PROMPTS_PER_ROUND}",
        f"rollout.n={GROUP}",
        f"rollout.max_tokens={MAX_TOKENS}",
        f"train.method={method}",
        f"train.lr={LR}",
        f"train.mini_batch_size={PROMPTS_PER_ROUND * GROUP}",
        f"train.micro_batch_size={MICRO_BATCH}",
        "train.save_every=0",
    ]


def run_ours(method: str, model_dir: str, work: str, rounds: int = 1) -> dict:
    """`rounds` rounds through the stage functions, inside the engine and trainer sessions a flow
    opens (the hf model and the trainer stay loaded between rounds); per-stage wall times of
    round 0 (the cold round, prepare included) and of the last round (the steady state)."""
    from trace_rl.data_schemas import ANNOTATIONS, ROLLOUTS, VERDICTS
    from trace_rl.stages.config import load_config
    from trace_rl.stages import get_stage
    from trace_rl.stages.common import dataset_name, open_store
    from trace_rl.stages.engines.session import engine_session
    from trace_rl.trainer.resident import trainer_session

    t_ready = time.perf_counter()
    cfg = load_config("demo", ours_overrides(method, model_dir, str(Path(work) / "run"))
                      + [f"run.rounds={max(rounds, 1)}"])
    per_round = []
    with engine_session(), trainer_session():
        for k in range(rounds):
            phases = {}
            for name in ("prepare", "rollout", "verify", "annotate", "train"):
                if name == "prepare" and k > 0:
                    continue
                t = time.perf_counter()
                get_stage(name)(cfg, None if name == "prepare" else k, force=True, progress=False)
                phases[name] = time.perf_counter() - t
            per_round.append(phases)
    phases = per_round[0]
    steady = {}
    if rounds > 1:
        last = per_round[-1]
        steady = {"steady_round_s": sum(last.values()), "steady_generation_s": last["rollout"],
                  "steady_training_s": last["train"], "steady_phases_s": last}
    store = open_store(cfg)
    rollouts = store.read(dataset_name("rollout", 0), ROLLOUTS)
    verdicts = store.read(dataset_name("verify", 0), VERDICTS)
    notes = store.read(dataset_name("annotate", 0), ANNOTATIONS).to_pylist()
    span_tokens = sum(s["token_end"] - s["token_start"] for r in notes for s in (r["spans"] or []))
    return {
        "imports_s": t_ready - T_PROCESS,
        "phases_s": phases,
        "generation_s": phases["rollout"],
        "training_s": phases["train"],
        "completions": rollouts.num_rows,
        "completion_tokens": sum(len(x) for x in rollouts.column("response_token_ids").to_pylist()),
        "reward_mean": sum(verdicts.column("reward").to_pylist()) / max(verdicts.num_rows, 1),
        "span_tokens": span_tokens,
        "cold_round_s": sum(v for k, v in phases.items() if k != "prepare"),
        **steady,
    }


def benchmark_prompts(model_dir: str) -> list[dict]:
    """The 32 testbed train prompts of round 0, chosen as this project's rollout stage chooses."""
    from trace_rl.stages.config import load_config
    from trace_rl.testbed.task import make_prompts
    from trace_rl.stages.rollout import select_prompt_ids

    cfg = load_config("demo", ours_overrides("grpo", model_dir, "unused"))
    rows = make_prompts(cfg.model.testbed, cfg.data.testbed_prompts, seed=cfg.run.seed, split="train")
    ids = select_prompt_ids([r["prompt_id"] for r in rows], 0, PROMPTS_PER_ROUND, cfg.run.seed)
    by_id = {r["prompt_id"]: r for r in rows}
    return [by_id[i] for i in ids]


def testbed_reward(completions: list, answer: list[str], **_: object) -> list[float]:
    """1.0 when the last \\boxed{} integer equals the reference answer (testbed.task)."""
    from trace_rl.testbed.task import is_correct

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if is_correct(t, a) else 0.0 for t, a in zip(texts, answer)]


def run_trl(model_dir: str, work: str) -> dict:
    """TRL GRPOTrainer, transformers generation on CPU, one optimizer step over 32 x 8."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    t_ready = time.perf_counter()
    prompts = benchmark_prompts(model_dir)
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": p["problem"]}], "answer": p["answer"]} for p in prompts
    ])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = GRPOConfig(
        output_dir=str(Path(work) / "trl-out"),
        use_cpu=True,
        use_vllm=False,
        max_steps=1,
        num_generations=GROUP,
        # One optimizer step = 32 x 8 completions, accumulated over micro-batches of 16, all 256
        # generated in one call (generation_batch_size = per_device_batch x accumulation steps).
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=PROMPTS_PER_ROUND * GROUP // MICRO_BATCH,
        max_completion_length=MAX_TOKENS,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        # The same objective as this project's grpo: DAPO token-mean, clip 0.2 / 0.28, no KL term.
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        beta=0.0,
        # This project trains without activation checkpointing; TRL's default (on) would be slower.
        gradient_checkpointing=False,
        chat_template_kwargs={"enable_thinking": False},
        bf16=False,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=testbed_reward, args=args,
                          train_dataset=dataset, processing_class=tokenizer)
    timing = {"generation_s": 0.0, "completion_tokens": 0, "completions": 0}
    inner = trainer._generate_and_score_completions

    def timed_generation(inputs):
        # Measurement only: the same call, timed; TRL does generation + rewards here.
        t = time.perf_counter()
        out = inner(inputs)
        timing["generation_s"] += time.perf_counter() - t
        timing["completion_tokens"] += int(out["completion_mask"].sum())
        timing["completions"] += int(out["completion_mask"].shape[0])
        return out

    trainer._generate_and_score_completions = timed_generation
    t_setup = time.perf_counter()
    trainer.train()
    t_done = time.perf_counter()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {
        "imports_s": t_ready - T_PROCESS,
        "phases_s": {"setup": t_setup - t_ready, "train_call": t_done - t_setup},
        "generation_s": timing["generation_s"],
        "training_s": t_done - t_setup - timing["generation_s"],
        "completions": timing["completions"],
        "completion_tokens": timing["completion_tokens"],
        "reward_mean": logs[-1]["reward"] if logs else None,
        "optimizer_steps": trainer.state.global_step,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", choices=["grpo", "trace", "trl"])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--work", required=True, help="scratch directory of this run")
    ap.add_argument("--out", required=True, help="JSON result file")
    ap.add_argument("--rounds", type=int, default=1,
                    help="ours: rounds in one process (the last one is the steady state)")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    if a.variant == "trl":
        result = run_trl(a.model_dir, a.work)
    else:
        result = run_ours(a.variant, a.model_dir, a.work, a.rounds)
    result["in_process_s"] = time.perf_counter() - T_PROCESS
    result["torch_threads"] = __import__("torch").get_num_threads()
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
