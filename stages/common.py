"""What every stage shares: where its output lives, when it may be skipped, and what it records.

A stage is `run(cfg, round_index, *, force=False, progress=True) -> Manifest`. It is complete
when its manifest exists, and current when that manifest records the same config fingerprint and
the same input fingerprints; a current stage is skipped unless forced.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trace_rl.stages.config import TraceConfig
from trace_rl.data_schemas.errors import StageError
from trace_rl.pipeline.fingerprint import fingerprint
from trace_rl.pipeline.store import Manifest, RunStore, round_dir

log = logging.getLogger("trace_rl.stages")

STAGES = ("prepare", "rollout", "verify", "annotate", "train", "evaluate")
ROUND_STAGES = ("rollout", "verify", "annotate", "train")


def dataset_name(stage: str, round_index: int | None = None) -> str:
    """Where a stage's output dataset lives inside the run directory."""
    if stage == "prepare":
        return "prompts"
    if stage not in ROUND_STAGES:
        raise StageError(f"stage {stage!r} has no per-round dataset; valid: {ROUND_STAGES}")
    if round_index is None:
        raise StageError(f"stage {stage!r} needs a round (--round K)")
    sub = {"rollout": "rollouts", "verify": "verdicts", "annotate": "annotations", "train": "train"}[stage]
    return f"{round_dir(round_index)}/{sub}"


def open_store(cfg: TraceConfig) -> RunStore:
    store = RunStore(cfg.run.run_root)
    store.fs.makedirs(store.path(""), exist_ok=True)
    return store


@dataclass
class StagePlan:
    """The decision a stage takes before doing any work."""

    store: RunStore
    name: str
    config_fingerprint: str
    inputs: dict[str, str]
    existing: Manifest | None
    started_at: float = 0.0

    @property
    def skip(self) -> bool:
        return self.existing is not None

    def writer(self, schema, stage: str, allow_extra: bool = False):
        """The output's writer, timed from the moment the stage was planned."""
        w = self.store.writer(self.name, schema, stage=stage, config_fingerprint=self.config_fingerprint,
                              inputs=self.inputs, allow_extra=allow_extra)
        w.started_at = self.started_at
        return w


def plan(cfg: TraceConfig, stage: str, round_index: int | None, config_parts: Any,
         input_datasets: list[str], *, force: bool, extra_inputs: dict[str, str] | None = None) -> StagePlan:
    """Check upstream datasets are complete, fingerprint them, and decide whether to skip."""
    store = open_store(cfg)
    inputs: dict[str, str] = {}
    for name in input_datasets:
        m = store.manifest(name)
        if m is None:
            raise StageError(
                f"stage {stage!r} needs {store.path(name)}, which is missing or incomplete; "
                f"run the stage that writes it first (trace-rl stage ... --round {round_index})"
            )
        inputs[name] = m.fingerprint
    inputs.update(extra_inputs or {})
    cfg_fp = fingerprint(config_parts)
    name = dataset_name(stage, round_index)
    existing = None
    if not force and store.is_current(name, cfg_fp, inputs):
        existing = store.manifest(name)
        log.info("%s: %s is current (made %s), skipping; use --force to redo it",
                 stage, store.path(name), existing and existing.code_version)
    return StagePlan(store, name, cfg_fp, inputs, existing, started_at=time.time())


def initial_model_dir(cfg: TraceConfig) -> str:
    """The round-0 policy: the configured model, or the testbed (built on first use)."""
    if cfg.model.path != "testbed":
        return cfg.model.path
    from trace_rl.testbed.build import build_testbed

    return build_testbed(cfg.model.testbed, testbed_dir(cfg), progress=True)


def testbed_dir(cfg: TraceConfig) -> str:
    """Where the testbed build lives: `model.testbed_dir`, else a per-fingerprint folder of the
    user cache ($TRACE_RL_CACHE, default ~/.cache/trace-rl), so runs with the same testbed
    config share one build."""
    if cfg.model.testbed_dir:
        return cfg.model.testbed_dir
    cache = Path(os.environ.get("TRACE_RL_CACHE", Path.home() / ".cache" / "trace-rl"))
    return str(cache / f"testbed-{cfg.model.testbed.fingerprint()}")


def checkpoint_for_round(cfg: TraceConfig, store: RunStore, round_index: int) -> tuple[str, dict[str, str]]:
    """(model dir, {input name: fingerprint}) of the policy that samples round `round_index`.

    Round 0 samples the initial model; round k > 0 the checkpoint the train stage of round k-1
    wrote, which counts as existing only once that stage's manifest does.
    """
    if round_index == 0:
        path = initial_model_dir(cfg)
        return path, {"initial_model": fingerprint(["initial", cfg.model.model_dump(mode="json")])}
    train = store.manifest(dataset_name("train", round_index - 1))
    if train is None:
        raise StageError(
            f"round {round_index} needs the checkpoint of round {round_index - 1}'s train stage, "
            "which has not finished; run it first"
        )
    name = dataset_name("train", round_index - 1)
    return str(store.local_path("checkpoints", round_dir(round_index))), {name: train.fingerprint}
