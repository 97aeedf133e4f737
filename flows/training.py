"""Prefect flows: one round, the whole training, and evaluation.

Tasks pass config paths, round numbers and manifest fingerprints, never tables. Each stage skips
itself when its output is current, so rerunning `trace_training` continues from the first
incomplete stage of the first incomplete round. `trace_training` holds one run-scoped vLLM engine
(stages/engines/session.py) and one resident trainer (trainer/resident.py) across its rounds; a
round or stage flow run alone starts cold.
"""

from __future__ import annotations

import logging
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from trace_rl.pipeline.layout import ROUND_STAGES
from trace_rl.stages.config import load_config
from trace_rl.stages.engines.session import engine_session
from trace_rl.trainer.resident import active_resident, trainer_session

from .stage_task import run_stage, write_resolved_config


def _stage_task(stage: str, config_path: str, round_index: Optional[int], force: bool = False) -> dict:
    manifest = run_stage(stage, config_path, round_index, force=force)
    return {"dataset": manifest.dataset, "fingerprint": manifest.fingerprint, "rows": manifest.rows,
            "counts": manifest.counts}


def _rollout_task(stage: str, config_path: str, round_index: Optional[int], force: bool = False) -> dict:
    """The rollout stage; with the run's engine session when the flow has one.

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


def _train_task(stage: str, config_path: str, round_index: Optional[int], force: bool = False) -> dict:
    """The train stage; in this process when the flow keeps the trainer resident (a single
    process trainer: `accelerate launch` starts its own processes every round)."""
    cfg = load_config(config_path)
    multi = cfg.train.accelerate_config or cfg.train.num_processes > 1
    if active_resident() is None or multi or not cfg.train.persistent:
        return _stage_task(stage, config_path, round_index, force)
    from trace_rl.stages import get_stage

    manifest = get_stage(stage)(cfg, round_index, force=force, progress=True)
    return {"dataset": manifest.dataset, "fingerprint": manifest.fingerprint, "rows": manifest.rows,
            "counts": manifest.counts}


def _release_trainer() -> None:
    """Before the rollout engine takes the accelerator: the resident trainer moves to CPU."""
    resident = active_resident()
    if resident is not None:
        logging.getLogger("trace_rl.flows").info("resident trainer: %s", resident.offload())


def _release_engine() -> None:
    """Before a stage that takes the accelerator: the run's engine sleeps (or stops) meanwhile."""
    from trace_rl.stages.engines.session import active_session

    session = active_session()
    if session is not None:
        logging.getLogger("trace_rl.flows").info("rollout engine: %s", session.release_device())


# Retries only where a failure is plausibly transient: the annotate stage talks to an API.
_TASK_OPTS = dict(cache_policy=NO_CACHE, log_prints=True)
stage_prepare = task(name="prepare", **_TASK_OPTS)(_stage_task)
stage_rollout = task(name="rollout", **_TASK_OPTS)(_rollout_task)
stage_verify = task(name="verify", **_TASK_OPTS)(_stage_task)
stage_annotate = task(name="annotate", retries=2, retry_delay_seconds=30, **_TASK_OPTS)(_stage_task)
stage_train = task(name="train", **_TASK_OPTS)(_train_task)
stage_evaluate = task(name="evaluate", **_TASK_OPTS)(_stage_task)
TASKS = {"prepare": stage_prepare, "rollout": stage_rollout, "verify": stage_verify,
         "annotate": stage_annotate, "train": stage_train, "evaluate": stage_evaluate}


def _publish_round_artifacts(config_path: str, round_index: int) -> None:
    """A markdown table of the run's metrics so far, and a link to its plot."""
    try:
        from prefect.artifacts import create_link_artifact, create_markdown_artifact

        from trace_rl.pipeline.plots import metrics_markdown, plot_run

        cfg = load_config(config_path)
        root = cfg.run.run_root
        create_markdown_artifact(key=f"{cfg.run.name}-metrics".lower().replace("_", "-"),
                                 markdown=metrics_markdown(root),
                                 description=f"metrics after round {round_index}")
        png = plot_run(root)[0]  # curves.png; accuracy.png and summary.md sit beside it
        create_link_artifact(key=f"{cfg.run.name}-plot".lower().replace("_", "-"), link=f"file://{png}",
                             description="training curves per optimizer step (plots/)")
    except Exception as exc:  # artifacts are a convenience; never fail a finished round for them
        logging.getLogger("trace_rl.flows").warning("could not publish artifacts: %s", exc)


@flow(name="trace-round", log_prints=True)
def trace_round(config_path: str, round_index: int, force_from: Optional[str] = None) -> dict:
    """rollout -> verify -> annotate -> train for one round. `force_from` redoes that stage and
    everything after it."""
    logger = get_run_logger()
    results = {}
    forcing = False
    for stage in ROUND_STAGES:
        forcing = forcing or stage == force_from
        logger.info("round %d: %s", round_index, stage)
        if stage == "train":
            _release_engine()
        elif stage == "rollout":
            _release_trainer()
        results[stage] = TASKS[stage](stage, config_path, round_index, force=forcing)
    _publish_round_artifacts(config_path, round_index)
    return results


@flow(name="trace-training", log_prints=True)
def trace_training(config: str = "demo", overrides: Optional[list[str]] = None,
                   rounds: Optional[int] = None) -> dict:
    """The whole run: prepare, then `rounds` on-policy rounds; continues where a run stopped."""
    cfg = load_config(config, overrides or [])
    config_path = write_resolved_config(cfg)
    total = rounds or cfg.run.rounds
    stage_prepare("prepare", config_path, None)
    out = {}
    # One vLLM engine for all rounds (started by the first rollout, closed however the flow ends)
    # and one resident trainer (its optimizer state is written to the last checkpoint at the end).
    with engine_session(), trainer_session():
        for k in range(total):
            out[k] = trace_round(config_path, k)
            if cfg.eval.benchmarks and (cfg.eval.every_round or k == total - 1):
                _release_engine()
                _release_trainer()
                # Evaluates checkpoints/round-(k+1); skipped when its samples are current.
                stage_evaluate("evaluate", config_path, k)
    return {"run": cfg.run.run_root, "rounds": total, "last": out.get(total - 1)}


@flow(name="trace-stage", log_prints=True)
def trace_stage(stage: str, config: str, round_index: Optional[int] = None,
                overrides: Optional[list[str]] = None, force: bool = False) -> dict:
    """One stage of one round, e.g. to redo an annotation with another annotator."""
    cfg = load_config(config, overrides or [])
    config_path = write_resolved_config(cfg)
    if stage not in TASKS:
        raise ValueError(f"unknown stage {stage!r}; valid: {sorted(TASKS)}")
    return TASKS[stage](stage, config_path, round_index, force=force)


@flow(name="trace-evaluate", log_prints=True)
def evaluate(config: str, checkpoint: str = "latest", benchmarks: Optional[list[str]] = None,
             overrides: Optional[list[str]] = None) -> dict:
    """Evaluate a checkpoint: avg@k with bootstrap CIs per benchmark and the 5-column mean."""
    cfg = load_config(config, overrides or [])
    from trace_rl.stages.evaluate import run_eval

    return run_eval(cfg, checkpoint=checkpoint, benchmarks=benchmarks, progress=True)


def run_training_local(cfg, rounds: Optional[int] = None) -> dict:
    """What `trace-rl run` does: the training flow in this process (Prefect's ephemeral mode)."""
    config_path = write_resolved_config(cfg)
    return trace_training(config_path, [], rounds)
