"""Running one stage: in this process, or in a child process when it holds a GPU.

vLLM and the trainer each want the whole GPU; running every GPU stage in its own process means
one has released the device before the next starts. On a CPU-only machine that isolation buys
nothing and costs an interpreter start, so $TRACE_ISOLATE_STAGES defaults to "auto" (isolate
the GPU stages of the registry iff CUDA is available); "never" / "always" force it.
"""

from __future__ import annotations

import os
import subprocess
import sys

from trace_rl.data_schemas.errors import StageError
from trace_rl.pipeline.layout import RESOLVED_CONFIG, stage_spec
from trace_rl.pipeline.store import Manifest
from trace_rl.stages.config import TraceConfig, dump_config, load_config


def write_resolved_config(cfg: TraceConfig) -> str:
    """The run's resolved config at `<run>/config.yaml`: what every stage of the run reads."""
    from trace_rl.stages.common import open_store

    store = open_store(cfg)
    path = store.path(RESOLVED_CONFIG)
    store.write_text(path, dump_config(cfg))
    return path


def _want_isolation(stage: str) -> bool:
    if not stage_spec(stage).gpu:
        return False
    mode = os.environ.get("TRACE_ISOLATE_STAGES", "auto")
    if mode in ("0", "false", "never"):
        return False
    if mode in ("1", "true", "always"):
        return True
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def run_stage(stage: str, config_path: str, round_index: int | None, *, force: bool = False,
              progress: bool = True) -> Manifest:
    """Run a stage from a config file, isolated in a child process where it needs a GPU."""
    from trace_rl.stages import get_stage

    if not _want_isolation(stage):
        return get_stage(stage)(load_config(config_path), round_index, force=force, progress=progress)
    # The child is `trace-rl stage`, which runs the stage in its own process; it inherits this
    # process's working directory, so a relative run root means the same directory there.
    cmd = [sys.executable, "-m", "trace_rl.flows.cli", "stage", stage, config_path]
    cmd += [] if round_index is None else ["--round", str(round_index)]
    cmd += ["--force"] if force else []
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise StageError(f"stage {stage} (round {round_index}) failed in its child process "
                         f"(exit code {proc.returncode}); its log is above")
    # The child wrote a current output, so running the stage here only reads its manifest.
    return get_stage(stage)(load_config(config_path), round_index, force=False, progress=False)
