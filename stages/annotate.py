"""Stage `annotate`: route each rollout and ask the annotator for its critical spans.

Routing is the training method's (trainer/methods.py, `Method.route`), so this stage annotates
exactly the rollouts the trainer will distil on: under `trace`, a correct rollout gets key spans
when `route.key_forward` is on and an incorrect one error spans when `route.error_reverse` is on
(the inverted ablation too, which inverts them; the random ablation needs none). Everything else
gets a `skipped` row without any call, so the dataset always has one row per rollout.
"""

from __future__ import annotations

import logging

from trace_rl.data_schemas import ANNOTATIONS, PROMPTS, ROLLOUTS, VERDICTS
from trace_rl.stages.config import TraceConfig
from trace_rl.pipeline.layout import ANNOTATION_CACHE
from trace_rl.pipeline.store import Manifest

from .common import dataset_name, decide
from .rollout import run_path

log = logging.getLogger("trace_rl.stages.annotate")


def coverage_phrase(extra: dict) -> str:
    """The logged coverage, saying which rows it averages: only rows with spans have one."""
    mean, n = extra.get("mean_coverage"), extra.get("coverage_rows")
    if mean is None:
        return "coverage: no row has spans"
    over = f"the {n} rows with spans" if n is not None else "the rows with spans"
    return f"mean coverage {mean:.3f} over {over} (NULL on rows without: too_broad, no_spans, skipped, errors)"


def route_for(cfg: TraceConfig, correct: bool) -> str:
    """'key', 'error' or 'none' for one rollout under the configured method."""
    # imported here: the method registry pulls in torch, which this stage otherwise never needs
    from trace_rl.trainer.methods import get_method

    return get_method(cfg.train.method).route(cfg.train, correct)


def run(cfg: TraceConfig, round_index: int | None, *, force: bool = False, progress: bool = True) -> Manifest:
    round_index = 0 if round_index is None else round_index
    rollouts_name = dataset_name("rollout", round_index)
    verdicts_name = dataset_name("verify", round_index)
    p = decide(cfg, "annotate", round_index, ["prompts", rollouts_name, verdicts_name], force=force)
    if p.skip:
        return p.existing
    prompts = {r["prompt_id"]: r for r in p.store.read("prompts", PROMPTS).to_pylist()}
    verdicts = {v["rollout_id"]: v for v in p.store.read(verdicts_name, VERDICTS).to_pylist()}
    rollouts = p.store.read(rollouts_name, ROLLOUTS)
    items = []
    # prompt_token_ids and sampling: what the surprise annotator needs to rebuild the student input.
    columns = ["rollout_id", "prompt_id", "response_text", "response_token_ids", "prompt_token_ids", "sampling"]
    for r in rollouts.select(columns).to_pylist():
        prompt = prompts[r["prompt_id"]]
        verdict = verdicts.get(r["rollout_id"])
        correct = bool(verdict and verdict["correct"])
        items.append({
            "rollout_id": r["rollout_id"], "route": route_for(cfg, correct),
            "problem": prompt["problem"], "answer": prompt["answer"], "solution": prompt["solution"],
            "meta": prompt["meta"], "response_text": r["response_text"],
            "response_token_ids": r["response_token_ids"], "prompt": prompt,
            "prompt_token_ids": r["prompt_token_ids"], "sampling": r["sampling"],
        })
    # The rollouts' own checkpoint: its tokenizer produced the ids that spans must index, and
    # the `self` annotator serves exactly this policy.
    model_dir = run_path(p.store, rollouts.column("checkpoint")[0].as_py()) if rollouts.num_rows else None
    from transformers import AutoTokenizer

    from trace_rl.stages.annotators import annotate_rows

    tokenizer = AutoTokenizer.from_pretrained(model_dir) if model_dir else None
    cache_dir = str(p.store.local_path(ANNOTATION_CACHE)) if p.store.is_local else None
    rows = annotate_rows(cfg.annotate, items, tokenizer, cache_dir=cache_dir, model_path=model_dir,
                         progress=progress, teacher_template=cfg.train.teacher_template)
    with p.writer(ANNOTATIONS, "annotate") as w:
        w.write_rows([{**r, "round": round_index} for r in rows])
        covered = [r["coverage"] for r in rows if r["coverage"] is not None]
        # the one mean coverage every view shows: over the rows with spans (the only non-NULL)
        w.extra = {"mean_coverage": sum(covered) / len(covered) if covered else None,
                   "coverage_rows": len(covered)}
    log.info("annotate round %d: %s; %s", round_index, dict(w.counts), coverage_phrase(w.extra))
    return w.manifest
