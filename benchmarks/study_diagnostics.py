"""Why TRACE does or does not beat GRPO on the testbed: per-round diagnostics of a study's runs.

    python benchmarks/study_diagnostics.py --out runs/study [--methods grpo trace_fkl] \
        [--seeds 0 1 2] [--rollouts 128] [--teacher-eval 128]

For every run `<out>/<method>-s<seed>` and every round k whose rollouts exist, with policy k
(the checkpoint that sampled round k) as student and the same weights with the privileged prompt
as teacher, over up to `--rollouts` of round k's rollouts:

- disagreement per token, unbounded FKL = KL(teacher‖student) and RKL = KL(student‖teacher), on
  key spans of correct rollouts, error spans of incorrect rollouts, and off-span tokens
  (the annotator's spans, whatever the run's method, so GRPO runs are measured on the same spans);
- the premise of key-span FKL: the share of key tokens the student under-allocates and the teacher
  supports (q(y_t) − p(y_t) > 0.1), and the mean log q(y_t) − log p(y_t) on them;
- gradient norms on the run's routed span tokens (key spans / error spans; `grpo` and
  `self_opd` use the key spans of correct rollouts): ‖∇ Σ_S D_t‖ (D_t as the run bounds it) vs
  ‖∇ Σ_S ℓ_t‖ (the GRPO term those tokens would carry), both / N tokens, at ρ = 1 (a round's
  first step), and the KL share of the span gradient at the round's mean λ:
  λ‖g_D‖ / (λ‖g_D‖ + (1 − λ/w0)‖g_ℓ‖);
- held-out accuracy of the privileged teacher (reference solution in the prompt), `--teacher-eval`
  problems × 1 sample at the eval temperature (the student's own accuracy is in rows.jsonl).

Rows go to `<out>/diagnostics.jsonl` (appended; a (method, seed, round) already there is skipped).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

UNDER_ALLOCATED = 0.1  # q(y_t) - p(y_t) above this: a token the teacher supports more


def _kl_fn(train_cfg):
    """Per-token divergence with the run's bound, whichever trainer API is installed."""
    import inspect

    from trace_rl.trainer import losses

    params = inspect.signature(losses.token_kl).parameters
    if "bound" in params:
        bound = train_cfg.kl_bound
        c = train_cfg.kl_term_clip if bound == "per_term_clip" else train_cfg.kl_token_cap
        return lambda s, t, d: losses.token_kl(s, t, d, bound=bound, c=c)
    return lambda s, t, d: losses.token_kl(s, t, d, train_cfg.kl_term_clip)


def _tables(cfg, k: int):
    from trace_rl.stages.common import open_store
    from trace_rl.trainer.launch import read_round_inputs

    return read_round_inputs(open_store(cfg), k)


def _checkpoint(cfg, k: int) -> str:
    from trace_rl.stages.common import open_store, start_checkpoint

    return start_checkpoint(cfg, open_store(cfg), k)[0]


def _logits(model, prompt_ids: list[int], response_ids: list[int]):
    """Logits [R, V] predicting each response token (one sequence, no padding)."""
    import torch

    ids = torch.tensor([prompt_ids + response_ids])
    out = model(input_ids=ids).logits[0]
    p = len(prompt_ids)
    return out[p - 1 : p - 1 + len(response_ids)]


def _examples(cfg, tokenizer, tables, n: int, seed: int):
    """Up to n rollouts with student ids, teacher ids, reward, advantage, key/error masks."""
    import numpy as np
    from trace_rl.trainer.batch import build_examples
    from trace_rl.trainer.losses import grpo_advantages
    from trace_rl.trainer.teacher import enable_thinking_of, teacher_prompt_ids

    # The annotator's spans for every method: plan as TRACE with both routes on.
    probe = cfg.train.model_copy(update={
        "method": "trace", "span_source": "annotated",
        "route": cfg.train.route.model_copy(update={"key_forward": True, "error_reverse": True})})
    exs = build_examples(probe, tokenizer, **tables)
    adv = grpo_advantages([e.reward for e in exs], [e.group for e in exs], probe.adv_norm_std).tolist()
    prompts = {r["prompt_id"]: r for r in tables["prompts"].to_pylist()}
    ann = {r["rollout_id"]: r for r in tables["annotations"].to_pylist()} if tables.get("annotations") else {}
    rollouts = {r["rollout_id"]: r for r in tables["rollouts"].to_pylist()}
    pick = np.random.default_rng(seed).permutation(len(exs))[:n]
    out = []
    for i in sorted(pick):
        e = exs[i]
        a = ann.get(e.rollout_id) or {}
        labels = [s.get("label") for s in (a.get("spans") or []) if a.get("status") == "ok"]
        thinking = enable_thinking_of(rollouts[e.rollout_id].get("sampling"))
        t_ids = teacher_prompt_ids(tokenizer, probe.teacher_template, prompts[e.group],
                                   [x for x in labels if x], thinking)
        span = e.plan.mask_R if e.plan.direction else np.zeros(len(e.response_ids), bool)
        out.append({"ids": e.prompt_ids, "t_ids": t_ids, "resp": e.response_ids,
                    "correct": e.reward > 0, "adv": adv[i], "span": span})
    return out


def _token_stats(model, exs) -> dict[str, Any]:
    """Disagreement on key / error spans vs off-span tokens, and the key-token premise."""
    import numpy as np
    import torch

    buckets: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for e in exs:
            s_lp = _logits(model, e["ids"], e["resp"]).float().log_softmax(-1)
            t_lp = _logits(model, e["t_ids"], e["resp"]).float().log_softmax(-1)
            fkl = (t_lp.exp() * (t_lp - s_lp)).sum(-1).numpy()
            rkl = (s_lp.exp() * (s_lp - t_lp)).sum(-1).numpy()
            ent = -(s_lp.exp() * s_lp).sum(-1).numpy()
            y = torch.tensor(e["resp"])
            p_y = s_lp.gather(-1, y[:, None])[:, 0].numpy()
            q_y = t_lp.gather(-1, y[:, None])[:, 0].numpy()
            where = "key" if e["correct"] else "error"
            off = "off_correct" if e["correct"] else "off_incorrect"
            for name, sel in ((where, e["span"]), (off, ~e["span"])):
                if sel.any():
                    buckets.setdefault(name, []).append(
                        np.stack([fkl[sel], rkl[sel], ent[sel], p_y[sel], q_y[sel]], 1))
    row: dict[str, Any] = {}
    for name, parts in buckets.items():
        m = np.concatenate(parts)
        row[f"fkl_{name}"], row[f"rkl_{name}"] = float(m[:, 0].mean()), float(m[:, 1].mean())
        row[f"entropy_{name}"], row[f"tokens_{name}"] = float(m[:, 2].mean()), len(m)
        gap = np.exp(m[:, 4]) - np.exp(m[:, 3])
        row[f"under_alloc_{name}"] = float((gap > UNDER_ALLOCATED).mean())
        row[f"logq_minus_logp_{name}"] = float((m[:, 4] - m[:, 3]).mean())
    return row


def _route_of(method: str, train_cfg) -> tuple[str, str]:
    """(which spans, which divergence) the run distils; key/forward for runs without spans."""
    routed = method.startswith("trace") or method.split("@")[0] in ("random25", "inverted25")
    if routed and train_cfg.route.error_reverse and not train_cfg.route.key_forward:
        return "error", "reverse"
    return "key", "forward"


def _grad_norms(model, exs, route: tuple[str, str], kl) -> dict[str, float]:
    """‖∇ Σ_S D_t‖/N and ‖∇ Σ_S ℓ_t‖/N over the routed span tokens S, at ρ = 1."""
    import torch
    from trace_rl.trainer.losses import clipped_pg_loss

    want_correct = route[0] == "key"
    sel = [e for e in exs if e["correct"] == want_correct and e["span"].any()]
    n_tok = sum(len(e["resp"]) for e in exs)
    if not sel:
        return {"grad_kl": 0.0, "grad_pg": 0.0, "span_rollouts": 0}
    params = [p for p in model.parameters() if p.requires_grad]
    norms = {}
    for part in ("kl", "pg"):
        model.zero_grad(set_to_none=True)
        total = 0.0
        for e in sel:
            s_logits = _logits(model, e["ids"], e["resp"])
            mask = torch.from_numpy(e["span"])
            if part == "kl":
                with torch.no_grad():
                    t_logits = _logits(model, e["t_ids"], e["resp"])
                terms = kl(s_logits[mask], t_logits[mask], route[1])
            else:
                y = torch.tensor(e["resp"])[mask]
                logp = s_logits[mask].float().log_softmax(-1).gather(-1, y[:, None])[:, 0]
                terms, _ = clipped_pg_loss(logp[None], logp.detach()[None],
                                           torch.tensor([e["adv"]]), 0.2, 0.28)
            loss = terms.sum() / n_tok
            loss.backward()
            total += float(loss)
        norms[f"grad_{part}"] = float(torch.sqrt(sum((p.grad.float() ** 2).sum()
                                                     for p in params if p.grad is not None)))
    norms["span_rollouts"] = len(sel)
    return norms


def teacher_accuracy(cfg, checkpoint: str, n: int) -> float:
    """Held-out accuracy of the privileged teacher (the eval's problems, 1 sample each)."""
    from trace_rl.stages.benchmarks import TESTBED_EVAL_SEED
    from trace_rl.testbed.accuracy import measure_accuracy
    from trace_rl.testbed.task import make_prompts

    prompts = make_prompts(cfg.model.testbed, n, TESTBED_EVAL_SEED, split="heldout")
    return measure_accuracy(checkpoint, prompts, privileged=True, temperature=cfg.eval.temperature,
                            n=1, max_new_tokens=cfg.eval.max_tokens, seed=0)


def diagnose_run(run_root: str, method: str, seed: int, rounds: list[int], n_rollouts: int,
                 n_teacher: int) -> list[dict[str, Any]]:
    import torch
    from trace_rl.stages.config import load_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_config(str(Path(run_root, "config.yaml")))
    kl = _kl_fn(cfg.train)
    route = _route_of(method, cfg.train)
    rows = []
    for k in rounds:
        try:
            ckpt = _checkpoint(cfg, k)
        except Exception:  # noqa: BLE001 -- a round not trained yet: stop here
            break
        tok = AutoTokenizer.from_pretrained(ckpt)
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        row: dict[str, Any] = {"method": method, "seed": seed, "round": k}
        if n_teacher:
            row["teacher_acc"] = teacher_accuracy(cfg, ckpt, n_teacher)
        try:
            tables = _tables(cfg, k)
        except Exception:  # noqa: BLE001 -- the final policy has no rollouts of its own
            if n_teacher:
                rows.append(row)
            continue
        exs = _examples(cfg, tok, tables, n_rollouts, seed=k)
        row.update(_token_stats(model, exs))
        row.update({"route": f"{route[0]}/{route[1]}", **_grad_norms(model, exs, route, kl)})
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--rounds", type=int, default=5, help="policies 0..rounds (the last has no rollouts)")
    ap.add_argument("--only", type=int, nargs="+", default=None, help="only these policies (rounds)")
    ap.add_argument("--rollouts", type=int, default=128)
    ap.add_argument("--teacher-eval", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    path = Path(a.out, "diagnostics.jsonl")
    done = set()
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["method"], r["seed"], r["round"]))
    for run in sorted(Path(a.out).iterdir()):
        if not run.is_dir() or "-s" not in run.name or not (run / "config.yaml").exists():
            continue
        method, seed = run.name.rsplit("-s", 1)
        if (a.methods and method not in a.methods) or (a.seeds and int(seed) not in a.seeds):
            continue
        todo = [k for k in range(a.rounds + 1) if (method, int(seed), k) not in done
                and (a.only is None or k in a.only)]
        for row in diagnose_run(str(run), method, int(seed), todo, a.rollouts, a.teacher_eval):
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
