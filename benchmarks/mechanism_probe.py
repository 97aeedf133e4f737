"""TRACE's claim token by token: one update of TRACE vs one of GRPO, same start, batch, lr and seed.

    python benchmarks/mechanism_probe.py --testbed-dir /tmp/i30/tb-demo --out runs/probe \
        --batches 24 [--variants grpo trace_rkl trace_fkl rkl_w0x4 ...] [section.key=value ...]

For every batch b (run seed b: its own prompts and rollouts), the round-0 pipeline (prepare,
rollout, verify, annotate with BOTH routes on, so incorrect rollouts carry the rule annotator's
error span and correct ones its key spans) runs once in `<out>/b<b>`. From the warm start,
every variant then takes exactly ONE optimizer update on the whole batch (one mini-batch; the
real `train_round`, fresh AdamW, the study's lr), and the student's next-token probabilities are
measured before and after at:

- `err`: error-span tokens of incorrect rollouts; `err_dis`: those where the privileged teacher's
  argmax differs from the token sampled (the slip itself, not the format around it);
- `key`: key-span tokens of correct rollouts; `key_dis` likewise;
- `off_inc` / `off_cor`: the other tokens of incorrect / correct rollouts (the leakage check).

Per set: Δ p(sampled token), Δ p(teacher's argmax), Δ log p(sampled), and Δ of the distribution-
level RKL = KL(student‖teacher) and FKL = KL(teacher‖student) (teacher = the warm start with the
privileged prompt, the snapshot the update distils from; measured with the same teacher prompt,
type labels included). GRPO is measured on the same annotated tokens. One row per (batch,
variant) goes to `<out>/probe.jsonl` (a rerun skips rows already there and reuses each batch's
round-0 data in `<out>/b<b>`, so variants can be added later); `--report` prints the
paired table (variant − grpo per batch, mean with a 95% t-interval over batches); `--pool OUT
[OUT ...]` pools folders made on different testbed builds (`model.testbed.seed=N`) with a
two-level bootstrap interval over builds, then batches.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Named variants: overrides on top of the data config. The probe's question is the routed KL's
# effect at its spans; the rest vary the knobs that could hide it (METHOD.md, docs/method.md).
VARIANTS: dict[str, list[str]] = {
    "grpo": ["train.method=grpo"],
    "trace_rkl": ["train.method=trace", "train.route.key_forward=false",
                  "train.route.error_reverse=true"],
    "trace_fkl": ["train.method=trace", "train.route.key_forward=true",
                  "train.route.error_reverse=false"],
    "rkl_w0x4": ["train.method=trace", "train.route.key_forward=false",
                 "train.route.error_reverse=true", "train.schedule.w0=2.0"],
    "rkl_w0x16": ["train.method=trace", "train.route.key_forward=false",
                  "train.route.error_reverse=true", "train.schedule.w0=8.0"],
    "rkl_nobound": ["train.method=trace", "train.route.key_forward=false",
                    "train.route.error_reverse=true", "train.kl_bound=none"],
    "fkl_w0x4": ["train.method=trace", "train.route.key_forward=true",
                 "train.route.error_reverse=false", "train.schedule.w0=2.0"],
}
DATA_OVERRIDES = ["train.method=trace", "train.route.key_forward=true",
                  "train.route.error_reverse=true"]
SETS = ("err", "err_dis", "key", "key_dis", "off_inc", "off_cor")
QUANTITIES = ("p_sampled", "p_teacher", "logp_sampled", "rkl", "fkl")


def batch_overrides(out: str, batch: int, testbed_dir: str, extra: list[str]) -> list[str]:
    """Batch b's config: the study's defaults, both routes on (so the annotate stage marks key
    spans of correct and error spans of incorrect rollouts), run seed b."""
    from testbed_study import STUDY_DEFAULTS

    return [*STUDY_DEFAULTS, *extra, *DATA_OVERRIDES,
            f"run.root={os.path.join(out, f'b{batch}')}", f"run.seed={batch}",
            f"train.seed={batch}", f"model.testbed_dir={testbed_dir}"]


def make_batch(cfg) -> dict:
    """Round 0's prompts, rollouts, verdicts and annotations (stages skip themselves when done)."""
    from trace_rl.stages import get_stage
    from trace_rl.stages.common import open_store
    from trace_rl.trainer.launch import read_round_inputs

    get_stage("prepare")(cfg, None, progress=False)
    for stage in ("rollout", "verify", "annotate"):
        get_stage(stage)(cfg, 0, progress=False)
    return read_round_inputs(open_store(cfg), 0)


def token_sets(cfg, tokenizer, tables) -> list[dict]:
    """Per rollout: prompt / teacher-prompt / response ids and the annotated span mask."""
    import numpy as np
    from trace_rl.trainer.batch import build_examples
    from trace_rl.trainer.teacher import enable_thinking_of, teacher_prompt_ids

    exs = build_examples(cfg.train, tokenizer, **tables)
    prompts = {r["prompt_id"]: r for r in tables["prompts"].to_pylist()}
    ann = {r["rollout_id"]: r for r in tables["annotations"].to_pylist()}
    sampling = {r["rollout_id"]: r.get("sampling") for r in tables["rollouts"].to_pylist()}
    # by rollout, not e.group: a rollout cut under `train.overlong: mask` has a group of its own
    prompt_of = {r["rollout_id"]: r["prompt_id"] for r in tables["rollouts"].to_pylist()}
    out = []
    for e in exs:
        a = ann.get(e.rollout_id) or {}
        labels = [s.get("label") for s in (a.get("spans") or []) if a.get("status") == "ok"]
        t_ids = teacher_prompt_ids(tokenizer, cfg.train.teacher_template, prompts[prompt_of[e.rollout_id]],
                                   [x for x in labels if x], enable_thinking_of(sampling[e.rollout_id]))
        span = e.plan.mask_R if e.plan.direction else np.zeros(len(e.response_ids), bool)
        out.append({"ids": e.prompt_ids, "t_ids": t_ids, "resp": e.response_ids,
                    "correct": e.reward > 0, "span": span})
    return out


def _logp(model, prompt_ids: list[int], response_ids: list[int]):
    """Log-probs [R, V] (float32, temperature 1) predicting each response token."""
    import torch

    ids = torch.tensor([prompt_ids + response_ids])
    p = len(prompt_ids)
    return model(input_ids=ids).logits[0, p - 1 : p - 1 + len(response_ids)].float().log_softmax(-1)


def teacher_view(model, exs: list[dict]) -> None:
    """Adds the teacher's log-probs and argmax to every rollout (the warm start, privileged)."""
    import torch

    with torch.no_grad():
        for e in exs:
            e["t_lp"] = _logp(model, e["t_ids"], e["resp"])
            e["t_arg"] = e["t_lp"].argmax(-1)


def student_view(model, exs: list[dict]) -> list[dict]:
    """Per rollout, per token: p(sampled), p(teacher argmax), RKL, FKL under `model`."""
    import torch

    views = []
    with torch.no_grad():
        for e in exs:
            s_lp, t_lp = _logp(model, e["ids"], e["resp"]), e["t_lp"]
            y = torch.tensor(e["resp"])
            lp_y = s_lp.gather(-1, y[:, None])[:, 0]
            views.append({
                "p_sampled": lp_y.exp().numpy(), "logp_sampled": lp_y.numpy(),
                "p_teacher": s_lp.gather(-1, e["t_arg"][:, None])[:, 0].exp().numpy(),
                "rkl": (s_lp.exp() * (s_lp - t_lp)).sum(-1).numpy(),
                "fkl": (t_lp.exp() * (t_lp - s_lp)).sum(-1).numpy()})
    return views


def masks(e: dict) -> dict[str, Any]:
    """The token sets of one rollout (see the module docstring)."""
    import numpy as np

    dis = e["t_arg"].numpy() != np.asarray(e["resp"])
    span, none = e["span"], np.zeros(len(e["resp"]), bool)
    if e["correct"]:
        return {"err": none, "err_dis": none, "key": span, "key_dis": span & dis,
                "off_inc": none, "off_cor": ~span}
    return {"err": span, "err_dis": span & dis, "key": none, "key_dis": none,
            "off_inc": ~span, "off_cor": none}


def deltas(exs: list[dict], before: list[dict], after: list[dict]) -> dict[str, Any]:
    """Mean after − before of every quantity on every token set, pooled over the batch."""
    import numpy as np

    row: dict[str, Any] = {}
    ms = [masks(e) for e in exs]
    for name in SETS:
        sel = [m[name] for m in ms]
        row[f"n_{name}"] = int(sum(s.sum() for s in sel))
        for q in QUANTITIES:
            d = np.concatenate([a[q][s] - b[q][s] for a, b, s in zip(after, before, sel)])
            v = np.concatenate([b[q][s] for b, s in zip(before, sel)])
            row[f"d_{q}_{name}"] = float(d.mean()) if len(d) else None
            row[f"base_{q}_{name}"] = float(v.mean()) if len(v) else None
    return row


def one_update(cfg, tables, init: str, work: str):
    """ONE optimizer update of cfg.train on the whole batch; returns (model after, step row)."""
    import torch
    from trace_rl.trainer.round import train_round
    from transformers import AutoModelForCausalLM

    n = tables["rollouts"].num_rows
    tcfg = cfg.train.model_copy(update={"mini_batch_size": n, "save_every": 0})
    shutil.rmtree(work, ignore_errors=True)
    rows = train_round(tcfg, **tables, init_checkpoint=init, output_checkpoint=f"{work}/out",
                       work_dir=f"{work}/work", round_index=0, progress=False, save_state=False)
    if len(rows) != 1:
        raise RuntimeError(f"expected one optimizer update, got {len(rows)}")
    model = AutoModelForCausalLM.from_pretrained(f"{work}/out", dtype=torch.float32).eval()
    shutil.rmtree(work, ignore_errors=True)
    return model, rows[0]


def probe_batch(out: str, b: int, variants: list[str], testbed_dir: str, extra: list[str]) -> None:
    """All variants of one batch; appends one row per variant not yet in probe.jsonl."""
    import torch
    from trace_rl.stages.config import load_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    todo = [v for v in variants if (b, v) not in done_keys(out)]
    if not todo:
        return
    t0 = time.time()
    overrides = batch_overrides(out, b, testbed_dir, extra)
    cfg = load_config("demo", overrides)
    tables = make_batch(cfg)
    tokenizer = AutoTokenizer.from_pretrained(testbed_dir)
    base = AutoModelForCausalLM.from_pretrained(testbed_dir, dtype=torch.float32).eval()
    exs = token_sets(cfg, tokenizer, tables)
    teacher_view(base, exs)
    before = student_view(base, exs)
    common = {"batch": b, "rollouts": len(exs), "incorrect": sum(not e["correct"] for e in exs),
              "data_s": time.time() - t0}
    for v in todo:
        t1 = time.time()
        vcfg = load_config("demo", [*overrides, *VARIANTS[v]])
        model, step = one_update(vcfg, tables, testbed_dir, os.path.join(out, f"b{b}", f"upd-{v}"))
        row = {**common, "variant": v, **deltas(exs, before, student_view(model, exs)),
               **{f"step_{k}": step.get(k) for k in ("loss", "pg_loss", "kl_loss", "kl_weight",
                                                      "grad_norm", "span_token_frac", "lr")},
               "update_s": time.time() - t1}
        with open(os.path.join(out, "probe.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[probe] batch {b} {v}: d_p_sampled_err {row['d_p_sampled_err']} "
              f"d_p_teacher_err_dis {row['d_p_teacher_err_dis']} ({row['update_s']:.0f}s)", flush=True)


def done_keys(out: str) -> set[tuple[int, str]]:
    path = Path(out, "probe.jsonl")
    if not path.exists():
        return set()
    return {(r["batch"], r["variant"]) for r in map(json.loads, path.read_text().splitlines()) if r}


def load_rows(out: str) -> list[dict]:
    path = Path(out, "probe.jsonl")
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def paired(rows: list[dict], variant: str, key: str, base: str = "grpo") -> list[float]:
    """variant − base of `key`, per batch holding both."""
    by = {(r["batch"], r["variant"]): r.get(key) for r in rows}
    return [by[(b, variant)] - by[(b, base)] for b, v in sorted(by) if v == variant
            and (b, base) in by and by[(b, variant)] is not None and by[(b, base)] is not None]


def mean_ci(values: list[float], scale: float = 1.0) -> str:
    """'m [lo, hi]': mean with its 95% t-interval over batches."""
    import numpy as np
    from testbed_study import t95

    if len(values) < 2:
        return "-" if not values else f"{scale * values[0]:+.4f} (1 batch)"
    m = scale * float(np.mean(values))
    half = t95(len(values) - 1) * scale * float(np.std(values, ddof=1)) / np.sqrt(len(values))
    return f"{m:+.4f} [{m - half:+.4f}, {m + half:+.4f}]"


# (token set, quantity) rows of the report: the claim first, the leakage check last.
REPORT = [("err", "p_sampled"), ("err", "p_teacher"), ("err_dis", "p_sampled"),
          ("err_dis", "p_teacher"), ("err", "rkl"), ("key", "p_teacher"), ("key_dis", "p_teacher"),
          ("key", "fkl"), ("off_inc", "p_sampled"), ("off_inc", "p_teacher"),
          ("off_cor", "p_sampled"), ("off_cor", "p_teacher"), ("off_inc", "rkl"), ("off_cor", "fkl")]


def _mean_of(rows: list[dict], key: str) -> float:
    import numpy as np

    return float(np.mean([r[key] for r in rows if r.get(key) is not None] or [np.nan]))


def step_table(rows: list[dict], variants: list[str]) -> list[str]:
    """Markdown rows: each variant's logged loss pieces, λ and gradient norm (batch means)."""
    lines = ["", "| variant | batches | loss | pg_loss | kl_loss | λ | grad norm |",
             "|---|---|---|---|---|---|---|"]
    for v in variants:
        vr = [r for r in rows if r["variant"] == v]
        if vr:
            m = {k: _mean_of(vr, f"step_{k}") for k in ("loss", "pg_loss", "kl_loss", "kl_weight",
                                                        "grad_norm")}
            lines.append(f"| {v} | {len(vr)} | {m['loss']:.2e} | {m['pg_loss']:.2e} | "
                         f"{m['kl_loss']:.2e} | {m['kl_weight']:.2f} | {m['grad_norm']:.3f} |")
    return lines


def report(out: str, variants: list[str]) -> str:
    """Markdown: per (token set, quantity), GRPO's own Δ and each variant − GRPO, paired."""
    rows = load_rows(out)
    others = [v for v in variants if v != "grpo"]
    g = [r for r in rows if r["variant"] == "grpo"]
    head = ["token set", "quantity", "tokens/batch", "before", "GRPO Δ",
            *[f"{v} − GRPO" for v in others]]
    caption = (f"Batches with GRPO: {len(g)}. Δ = after one update − before; mean [95% "
               "t-interval over batches]; variant − GRPO paired by batch.")
    lines = [caption, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s, q in REPORT:
        key = f"d_{q}_{s}"
        cells = [s, q, f"{_mean_of(g, f'n_{s}'):.0f}", f"{_mean_of(g, f'base_{q}_{s}'):.3f}",
                 mean_ci([r[key] for r in g if r.get(key) is not None])]
        cells += [mean_ci(paired(rows, v, key)) for v in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + step_table(rows, variants)) + "\n"


def pooled_report(outs: list[str], variants: list[str]) -> str:
    """Markdown: each variant − GRPO pooled over builds (one `--out` folder per testbed build),
    with the two-level bootstrap interval of benchmarks/study_report.py (builds, then batches
    within them), so the interval carries build-to-build spread as well as batch-to-batch; and
    each build's own mean, to show how far builds agree."""
    from study_report import two_level_bootstrap

    rows = {out: load_rows(out) for out in outs}
    others = [v for v in variants if v != "grpo"]
    counts = ", ".join(f"{Path(o).name}: {sum(r['variant'] == 'grpo' for r in rs)}" for o, rs in rows.items())
    head = ["token set", "quantity", "GRPO Δ", *[f"{v} − GRPO" for v in others],
            *[f"{v} − GRPO per build" for v in others]]
    lines = [f"Builds: {len(outs)} (batches with GRPO: {counts}). Δ = after one update − before; "
             "mean over builds of each build's batch mean [95% two-level bootstrap interval: "
             "builds, then batches]; variant − GRPO paired by batch.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pooled(groups: list[list[float]]) -> str:
        if any(len(g) < 2 for g in groups):
            return "-"
        est, lo, hi = two_level_bootstrap(groups)
        return f"{est:+.4f} [{lo:+.4f}, {hi:+.4f}]"

    for s, q in REPORT:
        key = f"d_{q}_{s}"
        grpo = [[r[key] for r in rs if r["variant"] == "grpo" and r.get(key) is not None] for rs in rows.values()]
        diffs = {v: [paired(rs, v, key) for rs in rows.values()] for v in others}
        cells = [s, q, pooled(grpo), *[pooled(diffs[v]) for v in others],
                 *[" / ".join(f"{sum(g) / len(g):+.4f}" if g else "-" for g in diffs[v]) for v in others]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--first-batch", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=["grpo", "trace_rkl", "trace_fkl"])
    ap.add_argument("--out", default="runs/probe")
    ap.add_argument("--testbed-dir", default="/tmp/study-testbed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="only print the table")
    ap.add_argument("--pool", nargs="+", metavar="OUT", help="only print the table pooled over "
                    "these --out folders, one per testbed build (model.testbed.seed)")
    ap.add_argument("overrides", nargs="*", help="section.key=value for every batch")
    a = ap.parse_args(argv)
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    if "grpo" not in a.variants:
        raise SystemExit("the probe pairs every variant with grpo: include grpo in --variants")
    if a.pool:
        print(pooled_report(a.pool, a.variants))
        return 0
    os.makedirs(a.out, exist_ok=True)
    if not a.report:
        import torch
        from trace_rl.stages.config import load_config
        from trace_rl.testbed.build import build_testbed

        torch.set_num_threads(a.threads)
        cfg0 = load_config("demo", batch_overrides(a.out, a.first_batch, a.testbed_dir, a.overrides))
        build_testbed(cfg0.model.testbed, a.testbed_dir, progress=True)
        for b in range(a.first_batch, a.first_batch + a.batches):
            probe_batch(a.out, b, a.variants, a.testbed_dir, a.overrides)
    text = report(a.out, a.variants)
    Path(a.out, "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
