"""The run directory's layout and the stage registry: the one place that names paths and stages.

    <run>/config.yaml                       the resolved config every stage of the run reads
    <run>/prompts/                          prepare
    <run>/round-000k/{rollouts,verdicts,annotations,train}/   the round stages of round k
    <run>/checkpoints/round-000k/           the start checkpoint of round k (k >= 1), written by
                                            round k-1's train stage; round 0 starts from the
                                            initial model, which lives outside the run
    <run>/scratch/round-000k/train-<attempt>/   the trainer's resume state while round k trains
    <run>/eval/<checkpoint>/<benchmark>/samples.parquet (one file), eval/<checkpoint>/summary.json
    <run>/cache/annotations/, <run>/plots/ (curves.png, accuracy.png, summary.md)

"Policy k" is the model that samples round k, i.e. round k's start checkpoint; its eval name is
`initial` for k = 0 and `round-000k` after, the name of its checkpoint directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trace_rl.data_schemas.errors import StageError

RESOLVED_CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
EVAL = "eval"
SAMPLES_DATASET = "samples.parquet"
EVAL_SUMMARY = "summary.json"
ANNOTATION_CACHE = "cache/annotations"
PLOT = "plots/curves.png"
INITIAL = "initial"
# The input name under which round 0's stages record the initial model's identity.
INITIAL_MODEL_INPUT = "initial_model"
ROUND_RE = re.compile(r"round-(\d+)")
ROUND_GLOB = "round-*"


@dataclass(frozen=True)
class StageSpec:
    """One stage: where its output dataset lives and how it runs.

    `dataset` is the folder of its output (under `round-000k/` when `per_round`, else under the
    run root; None for evaluate, whose outputs live under `eval/`); `schema` names its contract
    in data_schemas; `gpu` stages run in a child process of their own on a GPU machine.
    """

    name: str
    dataset: str | None
    schema: str | None
    per_round: bool
    gpu: bool


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec("prepare", "prompts", "prompts", per_round=False, gpu=False),
        StageSpec("rollout", "rollouts", "rollouts", per_round=True, gpu=True),
        StageSpec("verify", "verdicts", "verdicts", per_round=True, gpu=False),
        StageSpec("annotate", "annotations", "annotations", per_round=True, gpu=False),
        StageSpec("train", "train", "train_metrics", per_round=True, gpu=True),
        StageSpec("evaluate", None, "eval_samples", per_round=False, gpu=True),
    )
}
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)
ROUND_STAGES: tuple[str, ...] = tuple(n for n, s in STAGES.items() if s.per_round)
# Datasets in the order the pipeline writes them (by schema name).
SCHEMA_ORDER: tuple[str, ...] = tuple(s.schema for s in STAGES.values() if s.schema)


def stage_spec(name: str) -> StageSpec:
    if name not in STAGES:
        raise StageError(f"unknown stage {name!r}; valid: {list(STAGE_NAMES)}")
    return STAGES[name]


def round_dir(round_index: int) -> str:
    """`round-0003`: zero-padded so directory listings sort by round."""
    if round_index < 0:
        raise StageError(f"round index {round_index} must be >= 0")
    return f"round-{round_index:04d}"


def parse_round(name: str) -> int | None:
    """3 for `round-0003` (or `round-3`), None for any other name."""
    m = ROUND_RE.fullmatch(name.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def dataset_name(stage: str, round_index: int | None = None) -> str:
    """Where a stage's output dataset lives inside the run directory."""
    spec = stage_spec(stage)
    if spec.dataset is None:
        raise StageError(f"stage {stage!r} writes under {EVAL}/, not one dataset; "
                         f"valid: {[n for n, s in STAGES.items() if s.dataset]}")
    if not spec.per_round:
        return spec.dataset
    if round_index is None:
        raise StageError(f"stage {stage!r} needs a round (--round K)")
    return f"{round_dir(round_index)}/{spec.dataset}"


def start_checkpoint_dir(round_index: int) -> str:
    """`checkpoints/round-000k`: the start checkpoint of round k >= 1 (policy k), which the train
    stage of round k-1 writes. Round 0 starts from the initial model, outside the run."""
    if round_index < 1:
        raise StageError("round 0 starts from the initial model (model.path), not a run checkpoint")
    return f"{CHECKPOINTS}/{round_dir(round_index)}"


def checkpoint_name(round_index: int) -> str:
    """The eval name of policy k: `initial` for k = 0, else `round-000k`."""
    return INITIAL if round_index == 0 else round_dir(round_index)


def policy_index(checkpoint: str) -> int | None:
    """The inverse of checkpoint_name; None for an external model (no place on the round axis)."""
    return 0 if checkpoint == INITIAL else parse_round(checkpoint)


def train_scratch_dir(round_index: int, attempt: str) -> str:
    """The trainer's resume state for one attempt at round k's update."""
    return f"scratch/{round_dir(round_index)}/train-{attempt}"


def eval_dir(checkpoint: str) -> str:
    return f"{EVAL}/{checkpoint}"


def eval_samples_dataset(checkpoint: str, benchmark: str) -> str:
    """`eval/<ckpt>/<benchmark>`: the store dataset of one benchmark's samples, whose one part is
    the file `samples.parquet` (SAMPLES_DATASET) beside its manifest."""
    return f"{EVAL}/{checkpoint}/{benchmark}"


def eval_summary(checkpoint: str) -> str:
    return f"{EVAL}/{checkpoint}/{EVAL_SUMMARY}"
