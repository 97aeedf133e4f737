"""Running one stage: in this process, or in a child process when it holds a GPU.

vLLM and the trainer each want the whole GPU; running every GPU stage in its own process means
one has released the device before the next starts. On a CPU-only machine that isolation buys
nothing and costs an interpreter start, so `run.isolate` defaults to "auto" (isolate iff CUDA).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from trace_rl.stages.config import TraceConfig, dump_config, load_config
from trace_rl.data_schemas.errors import StageError
from trace_rl.pipeline.store import Manifest

GPU_STAGES = {"rollout", "train", "evaluate"}


def write_resolved_config(cfg: TraceConfig) -> str:
    """The run's resolved config at `<run>/config.yaml`: what every stage of the run reads."""
    from trace_rl.stages.common import open_store

    store = open_store(cfg)
    path = store.path("config.yaml")
    store.write_text(path, dump_config(cfg))
    return path


def _want_isolation(stage: str) -> bool:
    if stage not in GPU_STAGES:
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
    if not _want_isolation(stage):
        from trace_rl.stages import get_stage

        cfg = load_config(config_path)
        return get_stage(stage)(cfg, round_index, force=force, progress=progress)
    cmd = [sys.executable, "-m", "trace_rl.flows.stage_task", stage, config_path, json.dumps(round_index),
           json.dumps(force)]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise StageError(f"stage {stage} (round {round_index}) failed in its child process "
                         f"(exit code {proc.returncode}); its log is above")
    # The child wrote a current output, so running the stage here only reads its manifest.
    from trace_rl.stages import get_stage

    return get_stage(stage)(load_config(config_path), round_index, force=False, progress=False)


if __name__ == "__main__":
    _stage, _cfg, _round, _force = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    os.environ["TRACE_ISOLATE_STAGES"] = "never"
    run_stage(_stage, _cfg, _round, force=_force)
