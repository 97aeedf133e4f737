"""Pipeline stages: each is a plain `run(cfg, round_index, *, force, progress) -> Manifest`."""

from __future__ import annotations

from importlib import import_module
from typing import Callable

from trace_rl.data_schemas.errors import NotBuiltError, TraceError

_STAGE_MODULES = {
    "prepare": "trace_rl.stages.prepare",
    "rollout": "trace_rl.stages.rollout",
    "verify": "trace_rl.stages.verify",
    "annotate": "trace_rl.stages.annotate",
    "train": "trace_rl.stages.train",
    "evaluate": "trace_rl.stages.evaluate",
}


def get_stage(name: str) -> Callable:
    """The `run` function of a stage, by name."""
    if name not in _STAGE_MODULES:
        raise TraceError(f"unknown stage {name!r}; valid: {sorted(_STAGE_MODULES)}")
    try:
        module = import_module(_STAGE_MODULES[name])
    except ModuleNotFoundError as exc:
        if exc.name == _STAGE_MODULES[name]:
            raise NotBuiltError(f"stage {name!r} is planned (DESIGN.md) but not built yet") from None
        raise
    return module.run
