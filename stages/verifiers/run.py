"""``verify_rows``: one verdict row per rollout, in input order, whatever happens to an item."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from trace_rl.stages.verifiers.registry import DETAIL_MAX_CHARS, Verdict, get_verifier
from trace_rl.stages.verifiers.config import VerifyConfig
from trace_rl.stages.verifiers.pool import Item, VerifierPool

__all__ = ["REQUIRED_ITEM_KEYS", "VerifierPool", "verify_rows"]

REQUIRED_ITEM_KEYS = ("rollout_id", "response_text", "answer")


def _meta(raw: Any) -> Mapping[str, Any]:
    """Item meta as a dict: prompts carry it as a JSON string, callers may pass a dict."""
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return raw
    try:
        parsed = json.loads(raw)
    except (TypeError, ValueError):
        return {"raw": str(raw)}
    return parsed if isinstance(parsed, dict) else {"value": parsed}


def _to_items(items: Sequence[Mapping[str, Any]]) -> tuple[list[Item], dict[int, Verdict]]:
    """Numbered work items, plus verdicts already decided for malformed items."""
    work: list[Item] = []
    decided: dict[int, Verdict] = {}
    for i, row in enumerate(items):
        missing = [k for k in REQUIRED_ITEM_KEYS if k not in row]
        if missing:
            raise ValueError(
                f"verify item {i} lacks {missing}; every item needs {list(REQUIRED_ITEM_KEYS)} "
                "(join rollouts with their prompt's answer before verifying)"
            )
        answer = row["answer"]
        if answer is None or not str(answer).strip():
            decided[i] = Verdict("error", detail="reference answer is missing or empty")
        meta = _meta(row.get("meta"))
        if row.get("finish_reason"):  # the checker may read it: a response cut by length
            meta = {**meta, "finish_reason": row["finish_reason"]}
        work.append((i, row["response_text"] or "", str(answer or ""), meta))
    return work, decided


def _run_inline(cfg: VerifyConfig, items: list[Item]) -> list[Verdict]:
    """In-process checking for verifiers that cannot hang (plain regex ones)."""
    check = get_verifier(cfg.kind).make(cfg)
    verdicts = []
    for _, response, reference, meta in items:
        try:
            verdicts.append(check(response, reference, meta))
        except Exception as exc:  # noqa: BLE001 - one item's failure is that item's verdict
            detail = f"{type(exc).__name__}: {exc}"[:DETAIL_MAX_CHARS]
            verdicts.append(Verdict("error", detail=detail))
    return verdicts


def verify_rows(
    cfg: VerifyConfig, items: Sequence[Mapping[str, Any]], pool: VerifierPool | None = None
) -> list[dict[str, Any]]:
    """Verdict rows (verdicts-table columns) for ``items``, one per item, in input order.

    ``items``: mappings with rollout_id, response_text, answer (the reference string) and
    optionally meta (dict or JSON string). Verifiers registered with ``isolate=True`` (math)
    run in ``pool`` if given (reuse one across calls: starting workers costs seconds), else in
    a pool started and stopped here; a given pool's own config (workers, timeouts) governs.
    A failing or hanging item gets an error/timeout row; nothing is dropped.
    """
    spec = get_verifier(cfg.kind)
    work, decided = _to_items(items)
    todo = [it for it in work if it[0] not in decided]
    numbered = [(j, *it[1:]) for j, it in enumerate(todo)]
    if not numbered:
        verdicts: list[Verdict] = []
    elif not spec.isolate:
        verdicts = _run_inline(cfg, numbered)
    elif pool is not None:
        if pool.cfg.kind != cfg.kind:
            raise ValueError(f"pool runs {pool.cfg.kind!r} but cfg.kind is {cfg.kind!r}")
        verdicts = pool.run(numbered)
    else:
        with VerifierPool(cfg) as own_pool:
            verdicts = own_pool.run(numbered)
    by_index = dict(decided)
    by_index.update({it[0]: v for it, v in zip(todo, verdicts, strict=True)})
    return [by_index[i].to_row(str(row["rollout_id"])) for i, row in enumerate(items)]
