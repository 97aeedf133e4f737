"""Stage `verify`: one verdict per rollout, from the configured verifier (math, choice, testbed)."""

from __future__ import annotations

import json
import logging

from trace_rl.data_schemas import PROMPTS, ROLLOUTS, VERDICTS
from trace_rl.stages.config import TraceConfig
from trace_rl.pipeline.store import Manifest

from .common import dataset_name, decide

log = logging.getLogger("trace_rl.stages.verify")



def run(cfg: TraceConfig, round_index: int | None, *, force: bool = False, progress: bool = True) -> Manifest:
    round_index = 0 if round_index is None else round_index
    rollouts_name = dataset_name("rollout", round_index)
    p = decide(cfg, "verify", round_index, ["prompts", rollouts_name], force=force)
    if p.skip:
        return p.existing
    prompts = {r["prompt_id"]: r for r in p.store.read("prompts", PROMPTS).to_pylist()}
    rollouts = p.store.read(rollouts_name, ROLLOUTS).select(["rollout_id", "prompt_id", "response_text", "finish_reason"]).to_pylist()
    items = []
    for r in rollouts:
        prompt = prompts[r["prompt_id"]]
        items.append({"rollout_id": r["rollout_id"], "response_text": r["response_text"],
                      "answer": prompt["answer"], "meta": json.loads(prompt["meta"] or "{}"),
                      "finish_reason": r["finish_reason"]})
    from trace_rl.stages.verifiers import verify_rows

    verdicts = verify_rows(cfg.verify, items)
    with p.writer(VERDICTS, "verify") as w:
        w.write_rows([{**v, "round": round_index} for v in verdicts])
        w.extra = {"reward_mean": sum(v["reward"] for v in verdicts) / max(len(verdicts), 1)}
    log.info("verify round %d: %d verdicts, reward mean %.3f, statuses %s", round_index, len(verdicts),
             w.extra["reward_mean"], dict(w.counts))
    return w.manifest
