"""Stage `rollout`: sample n responses per prompt of round k with the round's policy.

Prompts are drawn without repeats within an epoch: each epoch is a seeded permutation of all
prompts, and round k takes the next `prompts_per_round` of the concatenated epochs, so rerunning a
round (or resuming a run) draws exactly the same prompts. Nor does a round draw a prompt twice
where it straddles two epochs (`select_prompt_ids`): its rollout_ids are unique, as the store
requires.
"""

from __future__ import annotations

import logging
import random

import pyarrow as pa

from trace_rl.data_schemas import PROMPTS, ROLLOUTS
from trace_rl.stages.config import TraceConfig
from trace_rl.pipeline.store import Manifest

from .common import dataset_name, decide, open_store, start_checkpoint
from .prune import require_weights

log = logging.getLogger("trace_rl.stages.rollout")


def select_prompt_ids(prompt_ids: list[str], round_index: int, per_round: int, seed: int) -> list[str]:
    """The prompt ids of round `round_index`: a slice of seeded per-epoch permutations, with no
    prompt twice in a round. A round that straddles an epoch boundary takes, from the new epoch,
    the first ids it has not drawn yet; the ids it skipped come right after them in that epoch,
    so every epoch still draws every prompt exactly once."""
    ids = sorted(prompt_ids)
    n = len(ids)
    if per_round > n:
        raise ValueError(f"rollout.prompts_per_round={per_round} exceeds the {n} prompts: a round "
                         "would draw a prompt twice (and its rollout_ids would collide)")
    start = round_index * per_round
    orders = _epoch_orders(ids, per_round, seed, (start + per_round - 1) // n if n else 0)
    return [orders[pos // n][pos % n] for pos in range(start, start + per_round)] if n else []


def _epoch_orders(ids: list[str], per_round: int, seed: int, last_epoch: int) -> list[list[str]]:
    """The draw order of epochs 0..last_epoch (select_prompt_ids' docstring)."""
    n = len(ids)
    orders: list[list[str]] = []
    for epoch in range(last_epoch + 1):
        perm = ids[:]
        random.Random(f"{seed}:{epoch}").shuffle(perm)
        begin = epoch * n  # global draw position of this epoch's first prompt
        round_begin = begin - begin % per_round
        if epoch and round_begin < begin:  # a round straddles the boundary
            drawn = set(orders[-1][round_begin - (epoch - 1) * n:])
            head = [i for i in perm if i not in drawn][: round_begin + per_round - begin]
            chosen = set(head)
            perm = head + [i for i in perm if i not in chosen]
        orders.append(perm)
    return orders


def run_relative(store, path: str) -> str:
    """`path` relative to the run directory when inside it (the `checkpoint` column: a run
    moved or mounted elsewhere still names its own checkpoints); a path outside, as given."""
    return path.removeprefix(store.path().rstrip("/") + "/")


def run_path(store, checkpoint: str) -> str:
    """A rollout's `checkpoint` as a path to load (the inverse of run_relative)."""
    return checkpoint if checkpoint.startswith("/") or "://" in checkpoint else store.path(checkpoint)


def rollout_id(round_index: int, prompt_id: str, sample_index: int) -> str:
    return f"{round_index:04d}:{prompt_id}:{sample_index}"


def run(cfg: TraceConfig, round_index: int | None, *, force: bool = False, progress: bool = True) -> Manifest:
    round_index = 0 if round_index is None else round_index
    model_dir, model_fp = start_checkpoint(cfg, open_store(cfg), round_index)
    p = decide(cfg, "rollout", round_index, ["prompts"], force=force, extra_inputs=model_fp)
    if p.skip:
        return p.existing
    require_weights(model_dir)
    prompts = p.store.read("prompts", PROMPTS)
    ids = select_prompt_ids(prompts.column("prompt_id").to_pylist(), round_index,
                            cfg.rollout.prompts_per_round, cfg.run.seed)
    by_id = {r["prompt_id"]: r for r in prompts.to_pylist()}
    chosen = [by_id[i] for i in ids]
    rcfg = cfg.rollout.model_copy(update={"seed": cfg.rollout.seed + 1000 * cfg.run.seed + round_index})
    log.info("rollout round %d: %d prompts x %d samples with %s (%s)", round_index, len(chosen),
             rcfg.n, rcfg.engine, model_dir)
    samples, engine = _generate(rcfg, model_dir, chosen, progress)
    rows = []
    for s in samples:
        rows.append({**s, "rollout_id": rollout_id(round_index, s["prompt_id"], s["sample_index"]),
                     "round": round_index, "checkpoint": run_relative(p.store, model_dir)})
    expected = len(chosen) * rcfg.n
    if len(rows) != expected:
        raise RuntimeError(f"engine returned {len(rows)} samples, expected {expected}")
    with p.writer(ROLLOUTS, "rollout") as w:
        w.write_rows(rows)
        reasons: dict[str, int] = {}
        for r in rows:
            reasons[r["finish_reason"]] = reasons.get(r["finish_reason"], 0) + 1
        w.counts.update(reasons)
        w.extra = {"model_dir": model_dir, "prompts": len(chosen), "n": rcfg.n,
                   "engine": engine}
    return w.manifest


def _generate(rcfg, model_dir: str, chosen: list[dict], progress: bool) -> tuple[list[dict], dict]:
    """With the flow's run-scoped engine when one is active, else a cold engine; the samples and
    what the manifest records of the engine (session.generate_in_run)."""
    from trace_rl.stages.engines.session import generate_in_run

    samples, engine = generate_in_run(rcfg, model_dir, chosen, progress=progress)
    log.info("rollout engine %s (%s): start %.1f s, weight load %.1f s, generate %.1f s",
             engine["name"], engine["mode"], engine.get("engine_start_s", 0.0),
             engine.get("load_weights_s", 0.0), engine["generate_s"])
    return samples, engine


def read_round(store, round_index: int) -> pa.Table:
    return store.read(dataset_name("rollout", round_index), ROLLOUTS)
