"""`trace-rl status`: which stage of which round is complete, stale or missing, and why.

A complete stage is stale when its manifest no longer matches what the stage would be run with
now: the config fingerprint it recorded differs from the current config's (`stage_config`, the
same fields the stage itself fingerprints, so a runtime-only change such as `train.tensorboard`
never makes a stage stale), or an input it recorded has since been rewritten with different
content or has gone, or an input is itself stale. A dataset's fingerprint is a hash of its content
(pipeline/store.py `content_fingerprint`), so a forced stage that wrote byte-identical output
leaves everything downstream current. The last rule makes staleness transitive: re-annotating
round 0 with a different result makes round 0's train stale, hence round 1's rollout (sampled
from that checkpoint), and so on through every later round and every evaluation of a later
checkpoint.

A complete stage is damaged when its files no longer match the sizes (`--verify`: the sha256)
its manifest recorded, or the manifest itself was edited, or (a train stage) the checkpoint it
wrote lost or changed a file (stages/damage.py); the line under the table says what to do.

`status` of a run reads the run's own resolved config (`<run>/config.yaml`), so the rounds shown
are the ones the run was launched with, never the packaged default's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table
from trace_rl.pipeline.fingerprint import fingerprint
from trace_rl.pipeline.layout import (
    EVAL,
    EVAL_SUMMARY,
    INITIAL_MODEL_INPUT,
    RESOLVED_CONFIG,
    ROUND_GLOB,
    ROUND_STAGES,
    STAGES,
    dataset_name,
    parse_round,
    policy_index,
)
from trace_rl.pipeline.store import Manifest, RunStore
from trace_rl.stages.config import TraceConfig, load_config

from .common import initial_model_inputs, section_fingerprint_part, stage_config
from .damage import damage_reason


@dataclass(frozen=True)
class StageState:
    state: str  # "complete" | "stale" | "missing" | "damaged"
    reason: str | None = None


@dataclass(frozen=True)
class EvalState:
    """One benchmark's stored samples of one checkpoint."""

    checkpoint: str
    benchmark: str
    state: str  # "complete" (current) | "stale"
    reason: str | None = None
    avg: float | None = None
    ci95: list[float] | None = None


@dataclass
class _Checker:
    """Memoised states of the run's datasets: each manifest is read and judged once."""

    cfg: TraceConfig
    store: RunStore
    memo: dict[str, StageState] = field(default_factory=dict)
    deep: bool = False  # damage check (stages/damage.py): sizes, or every byte's hash

    def dataset(self, name: str) -> StageState:
        if name not in self.memo:
            self.memo[name] = StageState("stale", "its inputs form a cycle")  # guard, never expected
            self.memo[name] = self._judge(name)
        return self.memo[name]

    def _judge(self, name: str) -> StageState:
        m = self.store.manifest(name)
        if m is None:
            return StageState("missing")
        damaged = damage_reason(self.store, name, m, self.deep)  # files vs their recorded size/hash
        damaged = damaged or _trainer_state_damage(m, self.deep)
        if damaged:
            return StageState("damaged", damaged)
        stage = m.stage
        if stage in STAGES and STAGES[stage].dataset is not None:
            k = parse_round(name.split("/", 1)[0]) if STAGES[stage].per_round else None
            if m.config_fingerprint != fingerprint(stage_config(self.cfg, stage, k)):
                return StageState("stale", f"the {stage} config changed since it ran")
        reason = self.stale_input(m)
        return StageState("stale", reason) if reason else StageState("complete")

    def stale_input(self, m: Manifest) -> str | None:
        """Why one of the inputs `m` recorded is no longer current, or None. Inputs that are not
        run datasets (a benchmark's identity, an external model dir) are not judged here."""
        for name, fp in m.inputs.items():
            if name == INITIAL_MODEL_INPUT:
                if initial_model_inputs(self.cfg)[name] != fp:
                    return "the model config (the initial policy) changed"
                continue
            if not _is_run_dataset(name):
                continue
            upstream = self.store.manifest(name)
            if upstream is None:
                return f"its input {name} is missing or incomplete"
            if upstream.fingerprint != fp:
                return f"its input {name} was rewritten with different content"
            upstream_state = self.dataset(name)
            if upstream_state.state != "complete" and not _state_only(upstream_state):
                return f"its input {name} is {upstream_state.state}"
        return None


_TRAINER_STATE = "its checkpoint's trainer state"


def _state_only(state: StageState) -> bool:
    """Damage of a trainer state alone: the weights the later rounds came from are intact."""
    return state.state == "damaged" and (state.reason or "").startswith(_TRAINER_STATE)


def _trainer_state_damage(m: Manifest, deep: bool) -> str | None:
    """A train stage's checkpoint whose trainer state fails its own record (trainer/
    state_record.py: truncated, changed, or another checkpoint's); the weights may be fine."""
    from trace_rl.trainer.state_record import TrainerStateError, state_problems

    ckpt = (m.extra or {}).get("checkpoint") if m.stage == "train" else None
    if not ckpt:
        return None
    try:
        problems = state_problems(ckpt, deep=deep)
    except TrainerStateError as e:
        problems = [str(e)]
    if not problems:
        return None
    return (f"{_TRAINER_STATE}: {'; '.join(problems)}. It is never trained from: "
            "`trace-rl run CONFIG` replays the rounds since the last good trainer state")


def _is_run_dataset(name: str) -> bool:
    head = name.split("/", 1)[0]
    return parse_round(head) is not None or head in {s.dataset for s in STAGES.values() if s.dataset}


def run_rounds(cfg: TraceConfig, store: RunStore) -> int:
    """The rounds to show: the config's, or more where the run went further (`--rounds`)."""
    found = [parse_round(p) for p in store.fs.glob(store.path(ROUND_GLOB))]
    return max([cfg.run.rounds] + [k + 1 for k in found if k is not None])


def stage_states(cfg: TraceConfig, store: RunStore | None = None,
                 deep: bool = False) -> dict[str, dict[int | None, StageState]]:
    """{stage: {round: StageState}} for prepare (round None) and each round stage; `deep`
    verifies every file's hash, not only its size."""
    store = store or RunStore(cfg.run.run_root)
    check = _Checker(cfg, store, deep=deep)
    states: dict[str, dict[int | None, StageState]] = {"prepare": {None: check.dataset("prompts")}}
    rounds = run_rounds(cfg, store)
    for stage in ROUND_STAGES:
        states[stage] = {k: check.dataset(dataset_name(stage, k)) for k in range(rounds)}
    return states


def stage_state(cfg: TraceConfig, store: RunStore, stage: str, round_index: int | None) -> StageState:
    return _Checker(cfg, store).dataset(dataset_name(stage, round_index))


def eval_states(cfg: TraceConfig, store: RunStore | None = None, deep: bool = False) -> list[EvalState]:
    """Every evaluated benchmark of every checkpoint under eval/, current or stale, in policy
    order (initial, round-0001, ...; external models last)."""
    from .evaluate import eval_rollout_config

    store = store or RunStore(cfg.run.run_root)
    check = _Checker(cfg, store, deep=deep)
    rollout_fp = eval_rollout_config(cfg).model_dump(mode="json")
    out = []
    ckpts = sorted((p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.glob(store.path(EVAL, "*"))
                    if store.fs.isdir(p)), key=lambda c: (policy_index(c) is None, policy_index(c) or 0, c))
    for ckpt in ckpts:
        summary_path = store.path(EVAL, ckpt, EVAL_SUMMARY)
        summary = json.loads(store.read_text(summary_path)) if store.fs.exists(summary_path) else {}
        for bench, entry in summary.get("benchmarks", {}).items():
            m = store.manifest(entry["dataset"])
            if m is None:
                out.append(EvalState(ckpt, bench, "stale", "its samples are missing or incomplete"))
                continue
            parts = {"rollout": rollout_fp,
                     "verify": {**section_fingerprint_part(cfg, "verify"), "kind": m.extra.get("verifier")}}
            reason = damage_reason(store, entry["dataset"], m, deep)
            if reason:
                reason = f"its samples are damaged: {reason}"
            elif m.fingerprint != entry.get("dataset_fingerprint"):
                reason = "its samples were rewritten after the summary"
            elif m.config_fingerprint != fingerprint(parts):
                reason = "the eval sampling or verify config changed since it ran"
            else:
                reason = check.stale_input(m)
                reason = reason and reason.replace("its input", "its checkpoint's input")
            out.append(EvalState(ckpt, bench, "stale" if reason else "complete", reason,
                                 entry.get("avg@k"), entry.get("ci95")))
    return out


def run_config(config: str, overrides: list[str] | None = None) -> TraceConfig:
    """The config `status` judges by: the run's own resolved `<run>/config.yaml` when the run has
    one (so overrides given at launch hold), else the named config. `config` may also be a run
    directory."""
    from pathlib import Path

    if (Path(config) / RESOLVED_CONFIG).is_file():
        return load_config(config, overrides or [])  # a run directory: rooted where it lies
    cfg = load_config(config, overrides or [])
    store = RunStore(cfg.run.run_root)
    path = store.path(RESOLVED_CONFIG)
    if store.fs.exists(path):
        return load_config(path, overrides or []) if store.is_local else cfg
    return cfg


def print_status(cfg: TraceConfig, verify: bool = False) -> None:
    store = RunStore(cfg.run.run_root)
    states = stage_states(cfg, store, deep=verify)
    table = Table(title=f"run {cfg.run.name} ({cfg.run.run_root})")
    table.add_column("round")
    for stage in ROUND_STAGES:
        table.add_column(stage)
    colour = {"complete": "green", "stale": "yellow", "missing": "dim", "damaged": "red"}
    reasons = []
    for k in range(run_rounds(cfg, store)):
        cells = []
        for s in ROUND_STAGES:
            st = states[s][k]
            cells.append(f"[{colour[st.state]}]{st.state}[/]")
            if st.reason:
                reasons.append((st.state, f"round {k} {s}: {st.reason}"))
        table.add_row(str(k), *cells)
    console = Console()
    prepare = states["prepare"][None]
    console.print(f"prepare: {prepare.state}" + (f" ({prepare.reason})" if prepare.reason else ""))
    console.print(table)
    for state, line in reasons:
        console.print(f"[{colour[state]}]{state}[/] {line}")
    console.print("files checked: " + ("every byte (sha256)" if verify else
                                       "sizes (`--verify` hashes every byte)"))
    evals = eval_states(cfg, store, deep=verify)
    if not evals:
        console.print("evaluations: none yet")
        return
    etable = Table(title="evaluations (avg@k, %)")
    for col in ("checkpoint", "benchmark", "avg@k", "95% CI", "state"):
        etable.add_column(col)
    for e in evals:
        ci = f"[{100 * e.ci95[0]:.1f}, {100 * e.ci95[1]:.1f}]" if e.ci95 else "-"
        avg = "-" if e.avg is None else f"{100 * e.avg:.1f}"
        etable.add_row(e.checkpoint, e.benchmark, avg, ci,
                       f"[{colour[e.state]}]{'current' if e.state == 'complete' else 'stale'}[/]")
    console.print(etable)
    for e in evals:
        if e.reason:
            console.print(f"[yellow]stale[/] eval {e.checkpoint} {e.benchmark}: {e.reason}")
