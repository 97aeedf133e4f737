"""`trace-rl status`: which stage of which round is complete, stale or missing, and why.

A complete stage is stale when its manifest no longer matches what the stage would be run with
now: the config fingerprint it recorded differs from the current config's (`stage_config`, the
same fields the stage itself fingerprints, so a runtime-only change such as `train.tensorboard`
never makes a stage stale), or an input it recorded has since been rewritten or has gone.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from trace_rl.pipeline.fingerprint import fingerprint
from trace_rl.pipeline.layout import INITIAL_MODEL_INPUT, ROUND_STAGES, dataset_name
from trace_rl.pipeline.store import Manifest, RunStore
from trace_rl.stages.config import TraceConfig

from .common import initial_model_inputs, stage_config


@dataclass(frozen=True)
class StageState:
    state: str  # "complete" | "stale" | "missing"
    reason: str | None = None


def stage_states(cfg: TraceConfig, store: RunStore | None = None) -> dict[str, dict[int | None, StageState]]:
    """{stage: {round: StageState}} for prepare (round None) and each round stage."""
    store = store or RunStore(cfg.run.run_root)
    states = {"prepare": {None: stage_state(cfg, store, "prepare", None)}}
    for stage in ROUND_STAGES:
        states[stage] = {k: stage_state(cfg, store, stage, k) for k in range(cfg.run.rounds)}
    return states


def stage_state(cfg: TraceConfig, store: RunStore, stage: str, round_index: int | None) -> StageState:
    m = store.manifest(dataset_name(stage, round_index))
    if m is None:
        return StageState("missing")
    if m.config_fingerprint != fingerprint(stage_config(cfg, stage, round_index)):
        return StageState("stale", f"the {stage} config changed since it ran")
    reason = _stale_input(cfg, store, m)
    return StageState("stale", reason) if reason else StageState("complete")


def _stale_input(cfg: TraceConfig, store: RunStore, m: Manifest) -> str | None:
    """Why one of the inputs `m` recorded is no longer the one it was made from, or None."""
    for name, fp in m.inputs.items():
        if name == INITIAL_MODEL_INPUT:
            if initial_model_inputs(cfg)[name] != fp:
                return "the model config (the initial policy) changed"
            continue
        upstream = store.manifest(name)
        if upstream is None:
            return f"its input {name} is missing or incomplete"
        if upstream.fingerprint != fp:
            return f"its input {name} was rewritten"
    return None


def print_status(cfg: TraceConfig) -> None:
    states = stage_states(cfg)
    table = Table(title=f"run {cfg.run.name} ({cfg.run.run_root})")
    table.add_column("round")
    for stage in ROUND_STAGES:
        table.add_column(stage)
    colour = {"complete": "green", "stale": "yellow", "missing": "dim"}
    reasons = []
    for k in range(cfg.run.rounds):
        cells = []
        for s in ROUND_STAGES:
            st = states[s][k]
            cells.append(f"[{colour[st.state]}]{st.state}[/]")
            if st.reason:
                reasons.append(f"round {k} {s}: {st.reason}")
        table.add_row(str(k), *cells)
    console = Console()
    prepare = states["prepare"][None]
    console.print(f"prepare: {prepare.state}" + (f" ({prepare.reason})" if prepare.reason else ""))
    console.print(table)
    for line in reasons:
        console.print(f"[yellow]stale[/] {line}")
