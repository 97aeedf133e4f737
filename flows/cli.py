"""`trace-rl`: the command line. Every command is a thin shell over a stage, a flow or a tool.

Errors a user can cause end in one readable line (exit code 2), not a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

import typer
from rich.console import Console

from trace_rl.data_schemas.errors import TraceError
from trace_rl.pipeline.layout import STAGE_NAMES

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="TRACE: GRPO + token-routed on-policy self-distillation, as a staged pipeline.")
testbed_app = typer.Typer(no_args_is_help=True, help="The CPU testbed (tiny model + synthetic task).")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configs.")
app.add_typer(testbed_app, name="testbed")
app.add_typer(config_app, name="config")
model_app = typer.Typer(no_args_is_help=True, help="Model aliases and imports (stages/models.py).")
app.add_typer(model_app, name="model")
console = Console(stderr=True)

# Every command names its run the same way; the log says which of the three it resolved.
CONFIG_HELP = "a packaged config name (demo), a config file, or a run directory (its config.yaml)"
OverridesArg = typer.Argument(None, help="overrides: section.key=value ...", show_default=False)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"trace-rl {version('trace-rl')}")
        raise typer.Exit()


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
          show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                            help="print the installed version and exit")) -> None:
    _setup_logging(verbose)


def _load(config: Optional[str], overrides: Optional[list[str]]):
    """Load and validate the config, and check what it names on disk (model path, data file
    columns, benchmark names): every refusal happens here, before any work."""
    from trace_rl.stages.config import describe_config_arg, load_config
    from trace_rl.stages.preflight import check_config

    cfg = load_config(config, overrides or [])
    _said_config(describe_config_arg(config), cfg)
    check_config(cfg)
    return cfg


def _said_config(source: str, cfg) -> None:
    """One line naming what the config argument resolved to and the run it addresses."""
    logging.getLogger("trace_rl.cli").info("config: %s -> run %s at %s", source, cfg.run.name,
                                           cfg.run.run_root)


def _verify_run(cfg) -> None:
    from trace_rl.pipeline.store import RunStore
    from trace_rl.stages.damage import invalidate_damaged

    for line in invalidate_damaged(RunStore(cfg.run.run_root)):
        console.print(f"[red]damaged[/] {line} (recomputing it)")


def _locked(cfg):
    """The run's lock (pipeline/runlock.py) for a command that writes the run."""
    from trace_rl.pipeline.runlock import run_lock

    return run_lock(cfg.run.run_root)


@app.command()
def run(config: str = typer.Argument("demo", help=CONFIG_HELP),
        overrides: Optional[list[str]] = OverridesArg,
        rounds: Optional[int] = typer.Option(None, help="number of rounds (default: run.rounds)"),
        verify: bool = typer.Option(False, "--verify", help="first hash every committed file; "
                                    "damaged stages are recomputed (default: sizes only)")) -> None:
    """Run the training flow in-process (Prefect ephemeral mode): rounds of rollout, verify,
    annotate, train; continues from the first incomplete stage."""
    if rounds is not None and rounds < 1:
        raise TraceError(f"--rounds {rounds}: a run has at least 1 round")
    if rounds is not None:  # the same as run.rounds=N: the config (and `status`) shows N rounds
        overrides = [*(overrides or []), f"run.rounds={rounds}"]
    cfg = _load(config, overrides)
    with _locked(cfg):  # before the (slow) Prefect imports: a second run refuses at once
        from trace_rl.flows.interrupts import isolate_prefect_server
        from trace_rl.flows.training import run_training_local

        isolate_prefect_server()
        if verify:
            _verify_run(cfg)
        run_training_local(cfg)


@app.command()
def demo(overrides: Optional[list[str]] = OverridesArg) -> None:
    """The testbed end to end on CPU: build it, a few TRACE rounds, evaluation, where to look."""
    cfg = _load("demo", overrides)
    with _locked(cfg):
        from trace_rl.flows.demo import run_demo
        from trace_rl.flows.interrupts import isolate_prefect_server

        isolate_prefect_server()
        run_demo(cfg)


@app.command()
def stage(name: str = typer.Argument(..., help=f"one of {list(STAGE_NAMES)}"),
          config: str = typer.Argument(..., help=CONFIG_HELP),
          overrides: Optional[list[str]] = OverridesArg,
          round: Optional[int] = typer.Option(None, "--round", "-r", help="round index K (0, 1, ...)"),
          force: bool = typer.Option(False, help="redo it even if its output is current")) -> None:
    """Run one stage (without Prefect). Its output is rewritten atomically; downstream stages
    of the same round become stale."""
    if name not in STAGE_NAMES:
        raise TraceError(f"unknown stage {name!r}; valid: {list(STAGE_NAMES)}")
    if round is not None and round < 0:
        raise TraceError(f"--round {round}: rounds are numbered 0, 1, 2, ...")
    cfg = _load(config, overrides)
    from trace_rl.stages import get_stage

    with _locked(cfg):
        manifest = get_stage(name)(cfg, round, force=force, progress=True)
    console.print(f"[green]{name}[/]: {manifest.rows} rows {manifest.counts} in "
                  f"{manifest.seconds:.1f}s -> {cfg.run.run_root}/{manifest.dataset}")


@app.command("eval")
def eval_cmd(config: str = typer.Argument(..., help=CONFIG_HELP),
             overrides: Optional[list[str]] = OverridesArg,
             checkpoint: str = typer.Option("latest", help="'latest', 'initial', round-K or a model dir"),
             benchmarks: Optional[str] = typer.Option(None, help="comma-separated (default: eval.benchmarks)"),
             force: bool = typer.Option(False, help="resample even if the samples are current")) -> None:
    """Evaluate a checkpoint on benchmarks: avg@k with bootstrap 95% CIs and the 5-column mean."""
    cfg = _load(config, overrides)
    from trace_rl.stages.evaluate import run_eval
    from trace_rl.stages.preflight import check_benchmarks, check_checkpoint_arg

    names = benchmarks.split(",") if benchmarks else None
    check_checkpoint_arg(checkpoint)
    if names:
        check_benchmarks(cfg, names)
    with _locked(cfg):
        run_eval(cfg, checkpoint=checkpoint, benchmarks=names, force=force, progress=True)


@app.command()
def inspect(path: str = typer.Argument(..., help="a Parquet file, a dataset directory, a round "
                                       "directory, a run directory, or a config name/file (its run)"),
            html: Optional[str] = typer.Option(None, help="write a self-contained HTML view here"),
            examples: int = typer.Option(3, help="examples to print"),
            teacher: bool = typer.Option(False, help="with --html: a heat strip per example of the "
                                         "privileged teacher's vs the student's log-prob of each "
                                         "sampled token (loads each round's checkpoint)")) -> None:
    """Summarise a shard: counts by status, reward rate, span coverage, examples with spans."""
    from trace_rl.pipeline.inspect import inspect_path

    path = _inspect_target(path)
    scorer = None
    if teacher:
        from trace_rl.stages.token_view import TeacherStudentScorer, run_root_of

        root = run_root_of(path)
        if root is None or html is None:
            raise TraceError("--teacher needs --html and a path inside a run directory (one with "
                             "config.yaml)")
        scorer = TeacherStudentScorer(root)
    inspect_path(path, html=html, examples=examples, scorer=scorer)


def _inspect_target(path: str) -> str:
    """`inspect` reads files; a config name or file names its run's directory."""
    import os

    is_config = path.endswith((".yaml", ".yml")) or not (os.path.exists(path) or "://" in path)
    if not is_config or path.endswith(".parquet"):
        return path
    from trace_rl.stages.config import describe_config_arg, load_config

    cfg = load_config(path)
    _said_config(describe_config_arg(path), cfg)
    return cfg.run.run_root


@app.command()
def status(config: str = typer.Argument("demo", help=CONFIG_HELP),
           overrides: Optional[list[str]] = OverridesArg,
           verify: bool = typer.Option(False, "--verify", help="hash every file (default: sizes)")) -> None:
    """Show which stages of which rounds are complete, stale, damaged or missing, and why, and
    every evaluation (current or stale). Judged against the run's own resolved config."""
    from trace_rl.stages.config import describe_config_arg
    from trace_rl.stages.status import print_status, run_config

    cfg = run_config(config, overrides)
    _said_config(describe_config_arg(config), cfg)
    print_status(cfg, verify=verify)


@app.command()
def export(config: str = typer.Argument(..., help=CONFIG_HELP),
           overrides: Optional[list[str]] = OverridesArg,
           checkpoint: int = typer.Option(..., "--checkpoint", help="policy K (K >= 1): the start "
                                          "checkpoint of round K"),
           merge: str = typer.Option(..., "--merge", help="write the standalone model here")) -> None:
    """Write checkpoint K as a standalone Hugging Face model: a LoRA checkpoint (train.lora) merged
    into its base, full weights copied without their trainer state."""
    from trace_rl.stages.config import describe_config_arg
    from trace_rl.stages.lora_weights import export_merged
    from trace_rl.stages.status import run_config

    cfg = run_config(config, overrides)
    _said_config(describe_config_arg(config), cfg)
    console.print(f"model written to {export_merged(cfg, checkpoint, merge)}")


@testbed_app.command("init")
def testbed_init(config: str = typer.Argument("demo"), overrides: Optional[list[str]] = OverridesArg,
                 out: Optional[str] = typer.Option(None, help="output dir (default: model.testbed_dir, "
                                                   "else ~/.cache/trace-rl/testbed-<fingerprint>)"),
                 force: bool = typer.Option(False, help="rebuild even if a matching build exists")) -> None:
    """Build (deterministically) and cache the testbed model and tokenizer."""
    cfg = _load(config, overrides)
    from trace_rl.testbed.build import build_testbed
    from trace_rl.stages.common import testbed_dir

    target = out or testbed_dir(cfg)
    path = build_testbed(cfg.model.testbed, target, force=force, progress=True)
    console.print(f"testbed ready: {path}")


@model_app.command("import-gguf")
def model_import_gguf(source: str = typer.Argument("smollm2", help="an alias (smollm2) or a .gguf file"),
                      out: Optional[str] = typer.Option(None, help="output dir (default for an alias: "
                                                        "$TRACE_RL_CACHE/models/<alias>)"),
                      force: bool = typer.Option(False, help="import again even if already done")) -> None:
    """Convert a GGUF model (Llama architecture) into a float32 Hugging Face folder, once."""
    from trace_rl.stages.models import GGUF_ALIASES, import_alias, import_file

    if source in GGUF_ALIASES:
        report = import_alias(source, out_dir=out, force=force)
    elif out is None:
        raise typer.BadParameter("a GGUF file needs --out DIR (aliases have a cache folder)")
    else:
        report = import_file(source, out, force=force)
    console.print(f"model ready: {report.summary()}")
    if source in GGUF_ALIASES:
        console.print(f"use it with: model.path={source}" if out is None else f"use it with: model.path={out}")


@config_app.command("show")
def config_show(config: str = typer.Argument("demo", help=CONFIG_HELP), overrides: Optional[list[str]] = OverridesArg) -> None:
    """Print the resolved config (file + base + overrides + defaults)."""
    from trace_rl.stages.config import dump_config

    print(dump_config(_load(config, overrides)))


def main() -> None:
    from trace_rl.flows import interrupts

    interrupts.install()  # SIGTERM and SIGHUP end a command the way Ctrl-C does
    try:
        # Typer turns a KeyboardInterrupt into a returned 130 here, not an exception.
        rc = app(standalone_mode=False)
        if interrupts.received():
            raise KeyboardInterrupt
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except TraceError as exc:
        if interrupts.received():  # a stage that failed because it was interrupted
            console.print(interrupts.interrupted_message(interrupts.argv_command()))
            sys.exit(interrupts.exit_code())
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)))
    except (typer.Abort, KeyboardInterrupt):
        console.print(interrupts.interrupted_message(interrupts.argv_command()))
        sys.exit(interrupts.exit_code())
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
