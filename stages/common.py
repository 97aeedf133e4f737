"""What every stage shares: where its output lives, when it may be skipped, and what it records.

A stage is `run(cfg, round_index, *, force=False, progress=True) -> Manifest`. It is complete
when its manifest exists, and current when that manifest records the same config fingerprint and
the same input fingerprints; a current stage is skipped unless forced.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from trace_rl.data_schemas.errors import StageError
from trace_rl.pipeline.fingerprint import fingerprint, result_fields
from trace_rl.pipeline.integrity import verify_dataset
from trace_rl.pipeline.layout import (
    INITIAL_MODEL_INPUT,
    ROUND_STAGES,
    dataset_name,
    start_checkpoint_dir,
)
from trace_rl.pipeline.store import Manifest, RunStore
from trace_rl.stages.config import TraceConfig
from trace_rl.stages.models import initial_model_dir, testbed_dir  # noqa: F401  (model paths resolve there)

log = logging.getLogger("trace_rl.stages")

# Per config section: the fields that change how a stage runs but never what it writes. Everything
# else is fingerprinted, so a new field counts as result-affecting until it is listed here.
RUNTIME_ONLY: dict[str, tuple[str, ...]] = {
    # Sampling and batching pick the samples (each hf batch has its own seed): all of it counts.
    "rollout": ("vllm.python", "vllm.timeout_s", "vllm.persistent", "vllm.sleep_level"),
    # Pool sizing and start method change no verdict; `workers` defaults to the core count,
    # which must not make a copied run look stale.
    "verify": ("workers", "chunk_size", "start_method", "kill_grace_s"),
    "annotate": ("cache_dir", "api.api_key_env", "api.concurrency", "api.http_client",
                 "api.max_retries", "api.timeout_s", "api.backoff_base_s", "api.backoff_max_s",
                 "self_host.python", "self_host.host", "self_host.port",
                 "self_host.startup_timeout_s", "self_host.concurrency",
                 "surprise.batch_size", "surprise.device"),
    # Logging, progress saves and how the same update is spread over processes (DDP, FSDP or
    # DeepSpeed compute the same mean gradient) or recomputed (activation checkpointing).
    "train": ("tensorboard", "report_to", "save_every", "state_every", "keep_checkpoints",
              "persistent", "num_threads",
              "num_processes", "collective_timeout_s",
              "accelerate_config", "gradient_checkpointing"),
}


def section_fingerprint_part(cfg: TraceConfig, section: str) -> dict[str, Any]:
    """A config section as stage fingerprints see it: without its runtime-only fields."""
    return result_fields(cfg.section(section), RUNTIME_ONLY.get(section, ()), where=f"{section} config")


def stage_config(cfg: TraceConfig, stage: str, round_index: int | None) -> dict[str, Any]:
    """What a stage's output depends on in the config (its config fingerprint is this one's)."""
    if stage == "prepare":
        parts: dict[str, Any] = {"data": cfg.section("data")}
        if cfg.data.source == "testbed":
            parts["testbed"] = cfg.model.testbed.model_dump(mode="json")
        return parts
    if stage == "rollout":
        return {"rollout": section_fingerprint_part(cfg, "rollout"), "round": round_index, "seed": cfg.run.seed}
    if stage == "verify":
        return {"verify": section_fingerprint_part(cfg, "verify")}
    if stage == "annotate":
        # Routing decides which rollouts are annotated at all.
        t = cfg.train
        parts = {"annotate": section_fingerprint_part(cfg, "annotate"),
                 "route": [t.method, t.span_source, t.route.model_dump()]}
        if cfg.annotate.backend == "surprise":  # it scores with the trainer's teacher prompt
            parts["teacher_template"] = t.teacher_template
        return parts
    if stage == "train":
        return {"train": section_fingerprint_part(cfg, "train"), "round": round_index}
    raise StageError(f"stage {stage!r} has no single config fingerprint; valid: {list(ROUND_STAGES)}")


def open_store(cfg: TraceConfig) -> RunStore:
    store = RunStore(cfg.run.run_root)
    store.fs.makedirs(store.path(""), exist_ok=True)
    return store


@dataclass
class StageDecision:
    """What a stage decides before doing any work: its output, identity and whether to skip."""

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


def decide(cfg: TraceConfig, stage: str, round_index: int | None, input_datasets: list[str], *,
           force: bool, extra_inputs: dict[str, str] | None = None) -> StageDecision:
    """Check upstream datasets are complete, fingerprint them and the stage's config
    (`stage_config`), and decide whether to skip."""
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
    cfg_fp = fingerprint(stage_config(cfg, stage, round_index))
    name = dataset_name(stage, round_index)
    existing = None
    if not force and store.is_current(name, cfg_fp, inputs):
        existing = store.manifest(name)
        log.info("%s: %s is current (made %s), skipping; use --force to redo it",
                 stage, store.path(name), existing and existing.code_version)
    return StageDecision(store, name, cfg_fp, inputs, existing, started_at=time.time())


def initial_model_inputs(cfg: TraceConfig) -> dict[str, str]:
    """The identity round 0's stages record for the initial model: its config section."""
    return {INITIAL_MODEL_INPUT: fingerprint(["initial", cfg.model.model_dump(mode="json")])}


def start_checkpoint(cfg: TraceConfig, store: RunStore, round_index: int) -> tuple[str, dict[str, str]]:
    """(model dir, {input name: fingerprint}) of round k's start checkpoint: the policy that
    samples round k and that its train stage updates.

    Round 0 starts from the initial model; round k > 0 from the checkpoint round k-1's train
    stage wrote, which counts as existing only once that stage's manifest does.
    """
    if round_index == 0:
        return initial_model_dir(cfg), initial_model_inputs(cfg)
    name = dataset_name("train", round_index - 1)
    train = store.manifest(name)
    if train is None:
        raise StageError(
            f"round {round_index} needs the checkpoint of round {round_index - 1}'s train stage, "
            "which has not finished; run it first"
        )
    damage = verify_dataset(store, name, train)
    if damage:  # never train from (or replay against) a checkpoint that is not the one recorded
        raise StageError(
            f"round {round_index}'s start checkpoint is damaged ({'; '.join(map(str, damage))}); "
            f"recreate it with `trace-rl stage train CONFIG --round {round_index - 1} --force` "
            "(or `trace-rl run CONFIG`, which recomputes damaged stages)"
        )
    return str(store.local_path(start_checkpoint_dir(round_index))), {name: train.fingerprint}
