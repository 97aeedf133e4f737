"""Checks of what a config names outside itself, run when a command loads its config and before
any work: the model path, the training data file and its columns, the benchmark names.

The config models validate values (ranges, enums, templates) on construction; these checks look
at the disk, so they live here and run once per command (`trace-rl run|stage|eval|demo|status`),
not on every `load_config` of a stage. Each refusal is one ConfigError saying what to change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trace_rl.data_schemas.errors import ConfigError
from trace_rl.pipeline.layout import CHECKPOINTS, INITIAL, parse_round
from trace_rl.stages.config import TraceConfig

from .models import ALIASES

WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt")


def looks_local(path: str) -> bool:
    """A path that can only mean a local folder or file (never a hub id `org/name`): the same
    rule `resolve_model` applies."""
    return path.startswith((".", "/", "~")) or path.endswith(".gguf") or path.count("/") > 1


def check_model_dir(path: str, what: str) -> None:
    """A local model folder that is missing, or holds no config.json or no weights, is refused
    with what to do; a hub id or an alias passes."""
    if path in ALIASES:
        return
    local = Path(path).expanduser()
    if not local.exists():
        if looks_local(path):
            raise ConfigError(
                f"{what}={path!r} does not exist; give a model folder (with config.json and "
                f"weights), a hub id (org/name) or an alias {list(ALIASES)}; import a GGUF file "
                "with `trace-rl model import-gguf FILE --out DIR`")
        return
    if not local.is_dir():
        raise ConfigError(f"{what}={path!r} is a file, not a model folder")
    missing = [n for n in ("config.json",) if not (local / n).exists()]
    if not any(next(local.glob(g), None) for g in WEIGHT_GLOBS):
        missing.append("weights (*.safetensors)")
    if missing:
        raise ConfigError(f"{what}={path!r} is not a complete model folder: it lacks "
                          f"{' and '.join(missing)} (deleted or partly copied?)")


def _first_record(path: Path, split: str | None) -> dict[str, Any] | None:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1):
            rows = batch.to_pylist()
            return rows[0] if rows else None
        return None
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        rows = data if isinstance(data, list) else data.get(split or "train", [])
        return rows[0] if rows else None
    with path.open() as fh:
        for line in fh:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"data file {path}: first row is not valid JSON: {exc}") from None
    return None


def check_data(cfg: TraceConfig) -> None:
    """A local training file must exist and have the columns the config maps."""
    from .prepare import source_spec
    from .sources import check_columns

    if cfg.data.source == "testbed":
        return
    spec = source_spec(cfg)  # refuses a missing data file
    if not spec.is_file:
        return
    path = Path(spec.source).expanduser()
    first = _first_record(path, spec.split)
    if first is None:
        raise ConfigError(f"data.source {cfg.data.source!r}: the file has no rows")
    check_columns(first, spec, f"data.source {cfg.data.source!r}")


def check_benchmarks(cfg: TraceConfig, names: list[str]) -> None:
    """Every benchmark name must be a configured source, a registered name (with its local
    file when eval.data_dir is set) or an inline file/HF spec whose file exists."""
    from .benchmarks import REGISTRY, benchmark_names, parse_inline, registered_spec

    for name in names:
        if name in cfg.eval.sources or name == "testbed":
            continue
        if name in REGISTRY:
            if cfg.eval.data_dir is not None:
                registered_spec(cfg, name)  # refuses a missing local copy
            continue
        if name.startswith("file:"):
            if not Path(name[5:]).expanduser().exists():
                raise ConfigError(f"benchmark {name!r}: the file {name[5:]!r} does not exist")
            continue
        if parse_inline(name) is None:
            raise ConfigError(
                f"unknown benchmark {name!r} in eval.benchmarks; valid names: {benchmark_names()}"
                + (f", configured sources: {sorted(cfg.eval.sources)}" if cfg.eval.sources else "")
                + "; or a data file (file:<path.jsonl|.parquet>) or a HF dataset (hf:<name>[:<split>])")


def check_checkpoint_arg(checkpoint: str) -> None:
    """`eval --checkpoint`: 'latest', 'initial', round-K (K >= 0) or a model folder / hub id."""
    if checkpoint in ("latest", INITIAL) or parse_round(checkpoint) is not None:
        return
    if checkpoint.startswith(("round", f"{CHECKPOINTS}/")) or not checkpoint.strip():
        raise ConfigError(
            f"--checkpoint {checkpoint!r}: use 'latest', 'initial', round-K with K = 1, 2, ... "
            "(the policy after round K-1's update) or a model folder")
    check_model_dir(checkpoint, "--checkpoint")


def check_config(cfg: TraceConfig) -> None:
    """All of the above for a loaded config."""
    if cfg.model.path != "testbed":
        check_model_dir(cfg.model.path, "model.path")
    check_data(cfg)
    check_benchmarks(cfg, cfg.eval.benchmarks)
