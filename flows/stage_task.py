"""Running one stage: in this process, or in a child process when it holds a GPU.

vLLM and the trainer each want the whole GPU; running every GPU stage in its own process means
one has released the device before the next starts. On a CPU-only machine that isolation buys
nothing and costs an interpreter start, so $TRACE_ISOLATE_STAGES defaults to "auto" (isolate
the GPU stages of the registry iff CUDA is available); "never" / "always" force it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

import yaml
from trace_rl.data_schemas.errors import ConfigError, StageError
from trace_rl.pipeline.layout import RESOLVED_CONFIG, checkpoint_name, stage_spec
from trace_rl.pipeline.store import Manifest
from trace_rl.stages.config import TraceConfig, dump_config, load_config

log = logging.getLogger("trace_rl.flows")


def config_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`section.key: old -> new` for every leaf that differs between two config dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            out += config_changes(old.get(key, "<unset>"), new.get(key, "<unset>"), path)
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def write_resolved_config(cfg: TraceConfig, *, update: bool = False) -> str:
    """The run's resolved config at `<run>/config.yaml`: what every stage of the run reads.

    Written when the run has none. An existing one is never changed behind the user's back: a
    config that differs raises ConfigError listing what would change, unless `update` (an explicit
    `trace-rl run`, or a deployment's `update_config=true`), which rewrites it and logs each change.
    """
    from trace_rl.stages.common import open_store

    store = open_store(cfg)
    path = store.path(RESOLVED_CONFIG)
    text = dump_config(cfg)
    if not store.fs.exists(path):
        store.write_text(path, text)
        return path
    # run.root is where the file lives, not a setting: a run directory named from another
    # folder gets an absolute root (stages/config.py _rooted_at_run_dir) and is the same run.
    changes = [c for c in config_changes(yaml.safe_load(store.read_text(path)), yaml.safe_load(text))
               if not c.startswith("run.root:")]
    if not changes:
        return path
    if not update:
        raise ConfigError(
            f"{path} would change: {'; '.join(changes)}. A run's config changes only on request: "
            f"pass the run directory ({cfg.run.run_root}) as the config to use it as it is, or "
            "`trace-rl run <config> [overrides]` / update_config=true to change it")
    store.write_text(path, text)
    for change in changes:
        log.warning("run %s: config.yaml changed: %s", cfg.run.name, change)
    return path


def run_config_path(config: str, overrides: list[str] | None = None, *, update: bool = False) -> str:
    """The path of the run's config.yaml for a config name/file or a run directory (+ overrides),
    written only when the run has none yet (see write_resolved_config)."""
    from trace_rl.stages.config import describe_config_arg

    cfg = load_config(config, overrides or [])  # a run directory reads its own config.yaml
    _say(f"config: {describe_config_arg(config)} -> run {cfg.run.name} at {cfg.run.run_root}")
    return write_resolved_config(cfg, update=update)


def _say(line: str) -> None:
    """To the flow run's Prefect log when a flow runs (a deployment), else the module log. A
    flow run has imported Prefect; a plain call must not (its import reconfigures logging)."""
    if "prefect" in sys.modules:
        from prefect import get_run_logger
        from prefect.exceptions import MissingContextError

        try:
            get_run_logger().info(line)
            return
        except MissingContextError:  # outside any flow run
            pass
    log.info(line)


def _run_forwarding_progress(cmd: list[str]) -> int:
    """Run the child stage; its stderr passes through to ours, and its progress lines (the
    `trace_rl.progress` logger, pipeline/progress_lines.py) are also logged here, in the task's
    thread, so that the flow's run log shows them (a child process has no Prefect context)."""
    from trace_rl.pipeline.progress_lines import PROGRESS_LOGGER

    marker = f" {PROGRESS_LOGGER}: "
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            sys.stderr.write(line)
            if marker in line:
                log.info(line.rstrip("\n").split(marker, 1)[1])
    except BaseException:  # as subprocess.run does: no child outlives an interrupted parent
        proc.kill()
        proc.wait()
        raise
    return proc.wait()


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
    cmd = [sys.executable, "-m", "trace_rl.flows.cli"]
    if stage == "evaluate":  # round K -> policy K+1 (round -1: the initial policy), as evaluate.run
        ckpt = "latest" if round_index is None else checkpoint_name(round_index + 1)
        cmd += ["eval", config_path, "--checkpoint", ckpt]
    else:
        cmd += ["stage", stage, config_path] + ([] if round_index is None else ["--round", str(round_index)])
    cmd += ["--force"] if force else []
    returncode = _run_forwarding_progress(cmd)
    if returncode != 0:
        raise StageError(f"stage {stage} (round {round_index}) failed in its child process "
                         f"(exit code {returncode}); its log is above")
    # The child wrote a current output, so running the stage here only reads its manifest.
    return get_stage(stage)(load_config(config_path), round_index, force=False, progress=False)
