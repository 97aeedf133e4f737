"""`trace-rl status`: which stage of which round is complete, stale or missing.

A stage is stale when it is complete but one of the inputs it recorded has since been rewritten
(its fingerprint changed) or the config section it depends on changed.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from trace_rl.stages.config import TraceConfig
from trace_rl.pipeline.store import RunStore

from .common import ROUND_STAGES, dataset_name


def stage_states(cfg: TraceConfig, store: RunStore | None = None) -> dict[str, dict[int | None, str]]:
    """{stage: {round: "complete" | "stale" | "missing"}} for prepare and each round."""
    store = store or RunStore(cfg.run.run_root)
    states: dict[str, dict[int | None, str]] = {"prepare": {None: _state(store, "prompts")}}
    for stage in ROUND_STAGES:
        states[stage] = {k: _state(store, dataset_name(stage, k)) for k in range(cfg.run.rounds)}
    return states


def _state(store: RunStore, name: str) -> str:
    m = store.manifest(name)
    if m is None:
        return "missing"
    for upstream, fp in m.inputs.items():
        if upstream == "initial_model":
            continue
        um = store.manifest(upstream)
        if um is None or um.fingerprint != fp:
            return "stale"
    return "complete"


def print_status(cfg: TraceConfig) -> None:
    states = stage_states(cfg)
    table = Table(title=f"run {cfg.run.name} ({cfg.run.run_root})")
    table.add_column("round")
    for stage in ROUND_STAGES:
        table.add_column(stage)
    colour = {"complete": "green", "stale": "yellow", "missing": "dim"}
    for k in range(cfg.run.rounds):
        table.add_row(str(k), *[f"[{colour[states[s][k]]}]{states[s][k]}[/]" for s in ROUND_STAGES])
    console = Console()
    console.print(f"prepare: {states['prepare'][None]}")
    console.print(table)
