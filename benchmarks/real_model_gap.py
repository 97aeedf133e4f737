"""The privileged teacher against the student on a real LM, and where they disagree.

    python benchmarks/real_model_gap.py --data path/to/gsm8k_test.jsonl --limit 200 --k 4 \
        --out runs/gap-smollm2 [--engine vllm] [section.key=value ...]

Student and teacher are the same weights (configs/smollm2-gsm8k.yaml's model, SmolLM2-135M-
Instruct by default). The student sees the config's prompt; the teacher the trainer's teacher
prompt (trainer/teacher_prompt.py: the same prompt plus the reference solution). Both sample k
responses per problem with the config's rollout sampling; the math verifier grades them.

The student side runs through the pipeline's own stages in a run root (prepare -> rollout ->
verify), so its rollouts and verdicts are the Parquet datasets a training round would use. The
teacher's rollouts use the same engine call.

Disagreement: per-token KL between the teacher's and the student's next-token distributions on
the student's rollouts (full vocabulary, the trainer's lean path: stages/annotators/surprise.py's
batch_divergence), forward KL(teacher || student) on correct and reverse KL(student || teacher)
on incorrect rollouts, as the routes distil. Compared on three kinds of tokens:
  - arithmetic errors: the tokens of the first wrong equation of an incorrect rollout, as the
    equations annotator finds it (stages/annotators/equations.py; its error span);
  - the teacher-surprise annotator's spans: exactly the tokens the trainer distils
    (stages/annotators/surprise.py's `choose_windows` on the same KL within
    annotate.coverage_cap: high by construction, shown for scale);
  - every other token of the same rollouts.
Accuracies get 95% bootstrap intervals over problems; the paired difference too.
Results go to <out>/gap.json and a markdown table on stdout; rollouts stay in <out>.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

def mean_ci(per_problem: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and its 95% bootstrap interval over problems (in %), as evaluation reports avg@k."""
    import numpy as np

    from trace_rl.stages.eval_summary import bootstrap_means, percentile_ci

    acc = np.asarray(per_problem, dtype=float)
    lo, hi = percentile_ci(bootstrap_means(acc, reps, seed))
    return (100 * float(acc.mean()), 100 * lo, 100 * hi)


def per_problem_acc(rows: list[dict], correct: dict[str, bool]) -> dict[str, float]:
    by: dict[str, list[bool]] = {}
    for r in rows:
        by.setdefault(r["prompt_id"], []).append(correct[r["rollout_id"]])
    return {p: sum(v) / len(v) for p, v in by.items()}


def teacher_rollouts(cfg, model_dir: str, prompts: list[dict]) -> list[dict]:
    from trace_rl.stages.engines import generate
    from trace_rl.trainer.teacher_prompt import teacher_message

    rows = [{**p, "problem": teacher_message(cfg.train.teacher_template, p, [])} for p in prompts]
    rcfg = cfg.rollout.model_copy(update={"seed": cfg.rollout.seed + 1000 * cfg.run.seed})
    out = generate(rcfg, model_dir, rows, progress=True)
    for r in out:
        r["rollout_id"] = f"teacher:{r['prompt_id']}:{r['sample_index']}"
    return out


def grade(cfg, rows: list[dict], answers: dict[str, str]) -> dict[str, bool]:
    from trace_rl.stages.verifiers import get_verifier

    check = get_verifier(cfg.verify.kind).make(cfg.verify)
    return {r["rollout_id"]: check(r["response_text"], answers[r["prompt_id"]], {}).correct
            for r in rows}


def token_kinds(job, kl: list[float], cap: float, window: int) -> list[str]:
    """Per response token: 'span' (what the trainer distils from the surprise annotator),
    'arith' (the first wrong equation of an incorrect rollout), both ('span+arith') or 'rest'."""
    from trace_rl.stages.annotators.align import char_span_to_tokens
    from trace_rl.stages.annotators.equations import find_equations
    from trace_rl.stages.annotators.surprise import choose_windows

    item = job.item
    n = len(item["response_token_ids"])
    kinds = ["rest"] * n

    def mark(t0: int, t1: int, kind: str) -> None:
        for t in range(t0, min(t1, n)):
            kinds[t] = kind if kinds[t] == "rest" else kinds[t] + "+" + kind

    for t0, t1 in choose_windows(kl, cap, window):
        mark(t0, t1, "span")
    wrong = [e for e in find_equations(item["response_text"]) if e.wrong_at is not None]
    if item["route"] == "error" and wrong:
        offsets = job.offsets()
        tok = char_span_to_tokens(offsets.offsets_T2, item["response_text"], wrong[0].start,
                                  wrong[0].end, offsets.index)
        if tok is not None:
            mark(*tok, "arith")
    return kinds


def disagreement(cfg, model_dir: str, items: list[dict], batch: int = 8) -> dict:
    """Mean per-token KL by route and token kind over the given student rollouts."""
    import torch
    from trace_rl.stages.annotators.base import Job
    from trace_rl.stages.annotators.segments import segment_response
    from trace_rl.stages.annotators.surprise import batch_divergence
    from trace_rl.trainer.lean import LeanCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lean = LeanCausalLM(hf, chunk=256)
    sums: dict[tuple[str, str], list[float]] = {}
    t0 = time.time()
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        jobs = [Job(index=j, item=it, tokenizer=tok, segments=segment_response(it["response_text"]))
                for j, it in enumerate(chunk)]
        kls = batch_divergence(lean, tok, jobs, cfg.train.teacher_template)
        for job, kl in zip(jobs, kls):
            it = job.item
            kinds = token_kinds(job, kl, cfg.annotate.coverage_cap,
                                cfg.annotate.surprise.window_tokens)
            for kind, v in zip(kinds, kl):
                for k in {kind.split("+")[0], *kind.split("+")} | {"all"}:
                    sums.setdefault((it["route"], k), []).append(v)
        print(f"  KL: {min(i + batch, len(items))}/{len(items)} rollouts ({time.time() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    return {f"{route}/{kind}": {"tokens": len(v), "mean": sum(v) / len(v),
                                "median": sorted(v)[len(v) // 2]}
            for (route, kind), v in sorted(sums.items())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="smollm2-gsm8k")
    ap.add_argument("--data", required=True, help="problems with answer and solution: a local "
                    ".jsonl or a named source (docs/data.md), e.g. gsm8k")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--kl-rollouts", type=int, default=128, help="student rollouts scored for KL")
    ap.add_argument("--out", default="runs/gap-smollm2")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    from trace_rl.data_schemas import PROMPTS, ROLLOUTS, VERDICTS
    from trace_rl.stages import get_stage
    from trace_rl.stages.common import dataset_name, initial_model_dir, open_store
    from trace_rl.stages.config import load_config

    cfg = load_config(a.config, [
        f"run.root={a.out}", f"data.source={a.data}", f"data.limit={a.limit}",
        f"rollout.prompts_per_round={a.limit}", f"rollout.n={a.k}", f"rollout.engine={a.engine}",
        f"rollout.max_tokens={a.max_tokens}", "rollout.vllm.persistent=false", *a.overrides])
    t0 = time.time()
    for stage in ("prepare", "rollout", "verify"):
        print(f"[gap] student: {stage} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        get_stage(stage)(cfg, None if stage == "prepare" else 0, progress=True)
    store = open_store(cfg)
    prompts = store.read("prompts", PROMPTS).to_pylist()
    answers = {p["prompt_id"]: p["answer"] for p in prompts}
    student = store.read(dataset_name("rollout", 0), ROLLOUTS).to_pylist()
    verdicts = {v["rollout_id"]: v for v in store.read(dataset_name("verify", 0), VERDICTS).to_pylist()}
    s_correct = {rid: bool(v["correct"]) for rid, v in verdicts.items()}
    model_dir = initial_model_dir(cfg)
    teacher_file = Path(a.out) / "teacher_rollouts.jsonl"
    if teacher_file.exists():
        teacher = [json.loads(line) for line in teacher_file.read_text().splitlines()]
    else:
        print(f"[gap] teacher: rollout ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        teacher = teacher_rollouts(cfg, model_dir, prompts)
        teacher_file.write_text("".join(json.dumps(r) + "\n" for r in teacher))
    t_correct = grade(cfg, teacher, answers)
    ps, pt = per_problem_acc(student, s_correct), per_problem_acc(teacher, t_correct)
    ids = sorted(ps)
    res = {"problems": len(ids), "k": a.k, "data": a.data, "model": model_dir,
           "student": mean_ci([ps[i] for i in ids]), "teacher": mean_ci([pt[i] for i in ids]),
           "teacher_minus_student": mean_ci([pt[i] - ps[i] for i in ids]),
           "student_mean_tokens": sum(len(r["response_token_ids"]) for r in student) / len(student),
           "teacher_mean_tokens": sum(len(r["response_token_ids"]) for r in teacher) / len(teacher),
           "student_length_cut": sum(r["finish_reason"] == "length" for r in student) / len(student)}
    by_id = {p["prompt_id"]: p for p in prompts}
    items = [{**r, "route": "key" if s_correct[r["rollout_id"]] else "error",
              "prompt": by_id[r["prompt_id"]]} for r in student if r["response_token_ids"]]
    rng = random.Random(0)
    errors = [i for i in items if i["route"] == "error"]
    keys = [i for i in items if i["route"] == "key"]
    rng.shuffle(errors)
    picked = keys[: a.kl_rollouts // 2] + errors[: a.kl_rollouts - min(len(keys), a.kl_rollouts // 2)]
    print(f"[gap] KL on {len(picked)} student rollouts ({time.time() - t0:.0f} s)", file=sys.stderr)
    res["kl"] = disagreement(cfg, model_dir, picked)
    res["wall_s"] = time.time() - t0
    Path(a.out, "gap.json").write_text(json.dumps(res, indent=1))
    s, t, d = res["student"], res["teacher"], res["teacher_minus_student"]
    print(f"| role | accuracy [95% CI] |\n|---|---|\n| student | {s[0]:.1f}% [{s[1]:.1f}, {s[2]:.1f}] |\n"
          f"| teacher | {t[0]:.1f}% [{t[1]:.1f}, {t[2]:.1f}] |\n"
          f"| teacher − student | {d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}] |")
    print("\n| route / tokens | count | mean KL | median KL |\n|---|---|---|---|")
    for key, v in res["kl"].items():
        print(f"| {key} | {v['tokens']} | {v['mean']:.3f} | {v['median']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
