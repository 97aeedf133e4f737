"""Prefect flows: one round, the whole training, and evaluation.

Tasks pass config paths, round numbers and manifest fingerprints, never tables. Each stage skips
itself when its output is current, so rerunning `trace_training` continues from the first
incomplete stage of the first incomplete round. `trace_training` holds one run-scoped vLLM engine
(stages/engines/session.py) and one resident trainer (trainer/resident.py, or a worker group of
trainer processes, trainer/worker_group.py) across its rounds; a round or stage flow run alone
starts cold.
"""

from __future__ import annotations

import logging
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from trace_rl.data_schemas.errors import ConfigError
from trace_rl.pipeline.layout import ROUND_STAGES, STAGES
from trace_rl.pipeline.runlock import run_lock
from trace_rl.stages.config import load_config
from trace_rl.stages.engines.session import engine_session
from trace_rl.trainer.resident import active_resident, trainer_session
from trace_rl.trainer.group_handle import active_group, trainer_group_session

from . import reporting
from .stage_task import run_config_path, run_stage, write_resolved_config

# The stage deployment's choice (the UI shows a drop-down); checked against the registry below.
StageName = Literal["prepare", "rollout", "verify", "annotate", "train", "evaluate"]


def _stage_task(stage: str, config_path: str, round_index: int | None, force: bool = False) -> dict:
    manifest = run_stage(stage, config_path, round_index, force=force)
    return {"dataset": manifest.dataset, "fingerprint": manifest.fingerprint, "rows": manifest.rows,
            "counts": manifest.counts}


def _rollout_task(stage: str, config_path: str, round_index: int | None, force: bool = False) -> dict:
    """The rollout (or evaluate) stage; with the run's engine session when the flow has one.

    The session's engine runs in its own worker process, so this process only tokenizes: the
    stage runs here (no per-stage child process), where the session lives.
    """
    from trace_rl.stages.engines.session import active_session

    cfg = load_config(config_path)
    if active_session() is None or cfg.rollout.engine != "vllm" or not cfg.rollout.vllm.persistent:
        return _stage_task(stage, config_path, round_index, force)
    from trace_rl.stages import get_stage

    manifest = get_stage(stage)(cfg, round_index, force=force, progress=True)
    return {"dataset": manifest.dataset, "fingerprint": manifest.fingerprint, "rows": manifest.rows,
            "counts": manifest.counts}


def _train_task(stage: str, config_path: str, round_index: int | None, force: bool = False) -> dict:
    """The train stage; in this process when the flow keeps the trainer resident: a single
    process trainer here, or several processes in the flow's worker group, which this process
    sends the round to (trainer/worker_group.py)."""
    cfg = load_config(config_path)
    multi = cfg.train.accelerate_config or cfg.train.num_processes > 1
    held_here = active_group() is not None if multi else active_resident() is not None
    if not held_here or not cfg.train.persistent:
        return _stage_task(stage, config_path, round_index, force)
    from trace_rl.stages import get_stage

    manifest = get_stage(stage)(cfg, round_index, force=force, progress=True)
    return {"dataset": manifest.dataset, "fingerprint": manifest.fingerprint, "rows": manifest.rows,
            "counts": manifest.counts}


def _release_trainer() -> None:
    """Before the rollout engine takes the accelerator: the resident trainer moves to CPU (in
    this process, or in every process of the worker group)."""
    resident = active_resident()
    if resident is not None:
        logging.getLogger("trace_rl.flows").info("resident trainer: %s", resident.offload())
    group = active_group()
    if group is not None:
        logging.getLogger("trace_rl.flows").info("trainer group: %s", group.offload())


def _release_engine() -> None:
    """Before a stage that takes the accelerator: the run's engine sleeps (or stops) meanwhile."""
    from trace_rl.stages.engines.session import active_session

    session = active_session()
    if session is not None:
        logging.getLogger("trace_rl.flows").info("rollout engine: %s", session.release_device())


# Retries only where a failure is plausibly transient: the annotate stage talks to an API.
_TASK_OPTS = {"cache_policy": NO_CACHE, "log_prints": True, "task_run_name": reporting.task_run_name}


def _reported(fn):
    """The stage, then its figures (counts, accuracy, coverage, loss parts, λ, KL, avg@k) to the
    run's Prefect log."""
    def run(stage: str, config_path: str, round_index: int | None, force: bool = False) -> dict:
        out = fn(stage, config_path, round_index, force)
        reporting.log_stage(config_path, stage, round_index)
        return out

    run.__name__ = fn.__name__
    return run


stage_prepare = task(name="prepare", **_TASK_OPTS)(_reported(_stage_task))
stage_rollout = task(name="rollout", **_TASK_OPTS)(_reported(_rollout_task))
stage_verify = task(name="verify", **_TASK_OPTS)(_reported(_stage_task))
stage_annotate = task(name="annotate", retries=2, retry_delay_seconds=30, **_TASK_OPTS)(_reported(_stage_task))
stage_train = task(name="train", **_TASK_OPTS)(_reported(_train_task))
stage_evaluate = task(name="evaluate", **_TASK_OPTS)(_reported(_rollout_task))
TASKS = {"prepare": stage_prepare, "rollout": stage_rollout, "verify": stage_verify,
         "annotate": stage_annotate, "train": stage_train, "evaluate": stage_evaluate}
assert set(TASKS) == set(STAGES) == set(StageName.__args__), "StageName must list the registry's stages"


@task(name="testbed build", task_run_name="testbed build", cache_policy=NO_CACHE, log_prints=True)
def build_model(config_path: str) -> str:
    """The testbed model, built once and cached (stages/models.py): a task of its own, so its
    minutes show as such, not inside the first stage that loads the model."""
    from trace_rl.stages.models import resolve_model

    cfg = load_config(config_path)
    return resolve_model(cfg.model, cfg, progress=True)


@flow(name="trace-round", log_prints=True, flow_run_name=reporting.round_run_name)
def trace_round(config: str, round_index: int, force_from: StageName | None = None) -> dict:
    """rollout -> verify -> annotate -> train for one round of a run.

    Args:
        config: the run directory (or its config.yaml), or a config name/file whose run has
            the same resolved config; the run's config.yaml is never rewritten here.
        round_index: the round K to run (0, 1, ...).
        force_from: redo this stage and everything after it in the round.
    """
    config_path = run_config_path(config)
    if round_index < 0:
        raise ConfigError(f"round_index={round_index}: use 0, 1, ...")
    logger = get_run_logger()
    results = {}
    forcing = False
    with reporting.forward_trace_logs():
        for stage in ROUND_STAGES:
            forcing = forcing or stage == force_from
            logger.info("round %d: %s", round_index, stage)
            if stage == "train":
                _release_engine()
            elif stage == "rollout":
                _release_trainer()
            results[stage] = TASKS[stage](stage, config_path, round_index, force=forcing)
    reporting.publish_run_artifacts(config_path, f"after round {round_index}")
    return results


def _evaluate_in_flow(config_path: str, round_index: int | None) -> None:
    from trace_rl.stages.engines.session import active_session

    vllm = load_config(config_path).rollout.vllm
    if active_session() is None or not vllm.persistent:  # else it samples with the run's engine
        _release_engine()
    _release_trainer()
    stage_evaluate("evaluate", config_path, round_index)  # skipped when its samples are current


@flow(name="trace-training", log_prints=True, flow_run_name=reporting.training_run_name)
def trace_training(config: str = "demo", overrides: list[str] | None = None,
                   rounds: int | None = None, update_config: bool = False) -> dict:
    """The whole run: prepare, then `rounds` on-policy rounds; continues where a run stopped.

    Args:
        config: a config name/file (+ overrides) for a new run, or a run directory to continue.
        overrides: section.key=value items applied to the config.
        rounds: the number of rounds (default: run.rounds).
        update_config: allow the run's existing config.yaml to change (each change is logged);
            without it a differing config is refused.
    """
    if rounds is not None:
        overrides = [*(overrides or []), f"run.rounds={rounds}"]
    config_path = run_config_path(config, overrides, update=update_config)
    cfg = load_config(config_path)
    total = cfg.run.rounds
    out = {}
    # One writer per run (pipeline/runlock.py); `trace-rl run` already holds it (passes through).
    with run_lock(cfg.run.run_root), reporting.forward_trace_logs():
        # One vLLM engine for all rounds and evaluations (started by the first that samples,
        # closed however the flow ends) and one resident trainer (its optimizer state is
        # written to the last checkpoint): in this process, or, when training takes several
        # processes, in one worker group launched by the first train stage and stopped when the
        # flow ends (trainer/worker_group.py).
        with engine_session(), trainer_session(), trainer_group_session(cfg):
            if cfg.model.path == "testbed":
                build_model(config_path)
            stage_prepare("prepare", config_path, None)
            if cfg.eval.benchmarks and cfg.eval.initial:
                _evaluate_in_flow(config_path, -1)
                reporting.publish_run_artifacts(config_path, "initial policy evaluated")
            for k in range(total):
                out[k] = trace_round(config_path, k)
                if cfg.eval.benchmarks and (cfg.eval.every_round or k == total - 1):
                    _evaluate_in_flow(config_path, k)  # policy k+1: checkpoints/round-(k+1)
                get_run_logger().info(reporting.round_line(config_path, k))
                reporting.publish_run_artifacts(config_path, f"after round {k}")
    return {"run": cfg.run.run_root, "rounds": total, "last": out.get(total - 1)}


@flow(name="trace-stage", log_prints=True, flow_run_name=reporting.stage_run_name)
def trace_stage(stage: StageName, config: str, round_index: int,
                overrides: list[str] | None = None, force: bool = False) -> dict:
    """One stage of one round of a run, e.g. to redo an annotation with force=true.

    Args:
        stage: which stage to run.
        config: the run directory (or its config.yaml), or a config name/file for a new run;
            an existing run's config.yaml is never rewritten here.
        round_index: the round K (0, 1, ...); prepare (no round) ignores it. For evaluate, the
            policy that round K's train stage wrote (-1: the initial policy). An integer: the
            deployment's schema refuses null when the run is submitted, not when it starts.
        overrides: section.key=value items for a new run; on an existing run, one that would
            change its config.yaml is refused (nothing is written).
        force: redo the stage even if its output is current (later stages become stale).
    """
    if stage not in TASKS:
        raise ConfigError(f"unknown stage {stage!r}; valid: {sorted(TASKS)}")
    if STAGES[stage].per_round and round_index < 0:
        raise ConfigError(f"stage {stage!r} needs round_index 0, 1, ... (got {round_index})")
    if stage == "prepare":
        round_index = None  # prepare writes the run's prompts, of no round
    config_path = run_config_path(config, overrides)
    with run_lock(load_config(config_path).run.run_root), reporting.forward_trace_logs():
        out = TASKS[stage](stage, config_path, round_index, force=force)
    if stage in ("train", "evaluate"):
        reporting.publish_run_artifacts(config_path, f"after {reporting.stage_label(stage, round_index)}")
    return out


@flow(name="trace-evaluate", log_prints=True, flow_run_name=reporting.evaluate_run_name)
def evaluate(config: str, checkpoint: str = "latest", benchmarks: list[str] | None = None,
             force: bool = False) -> dict:
    """Evaluate a checkpoint: avg@k with bootstrap CIs per benchmark and the 5-column mean;
    then the run's plots and summary are redrawn.

    Args:
        config: the run directory (or its config.yaml), or a config name/file of the run.
        checkpoint: 'latest', 'initial', 'round-K' or a model directory.
        benchmarks: benchmark names (default: eval.benchmarks).
        force: resample even if the samples are current.
    """
    from trace_rl.stages.evaluate import run_eval

    config_path = run_config_path(config)
    with reporting.forward_trace_logs():
        summary = run_eval(load_config(config_path), checkpoint=checkpoint, benchmarks=benchmarks,
                           force=force, progress=True)
        get_run_logger().info(reporting._eval_line(summary))
    reporting.publish_run_artifacts(config_path, f"evaluated {summary['checkpoint']}")
    return summary


def run_training_local(cfg, rounds: int | None = None) -> dict:
    """What `trace-rl run` does: the training flow in this process (Prefect ephemeral mode). An
    explicit command: the run's config.yaml takes this config, each change logged."""
    if rounds is not None:
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"rounds": rounds})})
    config_path = write_resolved_config(cfg, update=True)
    return trace_training(config_path)
