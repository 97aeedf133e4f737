"""Pipeline stages: each is a plain `run(cfg, round_index, *, force, progress) -> Manifest`,
in the module of the same name (the stage names live in pipeline/layout.py)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

from trace_rl.data_schemas.errors import TraceError
from trace_rl.pipeline.layout import STAGE_NAMES


def get_stage(name: str) -> Callable:
    """The `run` function of a stage, by name."""
    if name not in STAGE_NAMES:
        raise TraceError(f"unknown stage {name!r}; valid: {list(STAGE_NAMES)}")
    return import_module(f"trace_rl.stages.{name}").run
