"""What a Prefect run of the pipeline shows: names that carry the run and the round, each stage's
figures in the run's log, and the parent run's artifacts (a per-round table, the evaluation
summary and the plots embedded as images, so the UI shows them without access to the worker).

Everything here is a convenience over the run directory, which stays the record: a failure to
report is logged and never fails a stage.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from trace_rl.pipeline.layout import checkpoint_name, dataset_name, eval_summary
from trace_rl.stages.config import TraceConfig, load_config

log = logging.getLogger("trace_rl.flows")


# ---------------------------------------------------------------------------------------------
# names


def _params(kind: str) -> dict[str, Any]:
    from prefect.runtime import flow_run, task_run

    return dict((flow_run if kind == "flow" else task_run).parameters or {})


def _run_name(config: str | None) -> str:
    try:
        return load_config(config).run.name if config else "run"
    except Exception:  # noqa: BLE001  (a name is cosmetic); the flow itself reports a bad config
        return str(config)


def stage_label(stage: str, round_index: int | None) -> str:
    """`annotate r1`; `prepare` (no round); `evaluate policy 2` for the checkpoint round 1 wrote."""
    if round_index is None:
        return stage
    if stage == "evaluate":
        return f"evaluate {checkpoint_name(round_index + 1)}"
    return f"{stage} r{round_index}"


def round_run_name() -> str:
    p = _params("flow")
    return f"{_run_name(p.get('config'))} · round {p.get('round_index')}"


def training_run_name() -> str:
    p = _params("flow")
    return f"{_run_name(p.get('config'))} · training"


def stage_run_name() -> str:
    p = _params("flow")
    stage = p.get("stage", "?")
    k = None if stage == "prepare" else p.get("round_index")  # prepare is of no round
    return f"{_run_name(p.get('config'))} · {stage_label(stage, k)}"


def evaluate_run_name() -> str:
    p = _params("flow")
    return f"{_run_name(p.get('config'))} · evaluate {p.get('checkpoint', 'latest')}"


def task_run_name() -> str:
    p = _params("task")
    return stage_label(p.get("stage", "?"), p.get("round_index"))


# ---------------------------------------------------------------------------------------------
# logs


class _InRunOnly(logging.Filter):
    """Forward a record only where a Prefect run context exists (stage worker threads have none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.context import FlowRunContext, TaskRunContext

        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


@contextmanager
def forward_trace_logs() -> Iterator[None]:
    """While a flow runs, the `trace_rl` loggers also write to the run's Prefect log."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("trace_rl")
    if any(isinstance(h, APILogHandler) for h in logger.handlers):
        yield
        return
    handler = APILogHandler(level=logging.INFO)
    handler.addFilter(_InRunOnly())
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    # The progress lines reach the run only through `trace_rl`: a process that earlier set them
    # up for a parent to forward (lines_to_stderr: propagate off) or any logging config that
    # disabled the logger would keep them out of the run's log, silently.
    progress = logging.getLogger("trace_rl.progress")
    old_progress = (progress.propagate, progress.disabled)
    progress.propagate, progress.disabled = True, False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        progress.propagate, progress.disabled = old_progress


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _eval_line(summary: dict[str, Any]) -> str:
    parts = []
    for bench, e in summary.get("benchmarks", {}).items():
        ci = e.get("ci95")
        parts.append(f"{bench} avg@{e.get('k')} {100 * e['avg@k']:.1f}%"
                     + (f" (95% CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f})" if ci else ""))
    five = summary.get("five_column_mean") or {}
    if five.get("value") is not None:
        parts.append(f"5-column mean {100 * five['value']:.1f}%")
    return f"eval {summary.get('checkpoint')}: " + "; ".join(parts)


def stage_figures(cfg: TraceConfig, stage: str, round_index: int | None) -> str:
    """One line of the figures a finished stage produced, read back from the run directory."""
    from trace_rl.pipeline.plots_data import round_stats
    from trace_rl.pipeline.store import RunStore

    store = RunStore(cfg.run.run_root)
    if stage == "evaluate":
        from trace_rl.stages.evaluate import latest_checkpoint_name

        # no round: the stage evaluated 'latest' (not the summary whose name sorts last: an
        # external model's eval/<name>/ would be reported in its place)
        ckpt = checkpoint_name(round_index + 1) if round_index is not None else latest_checkpoint_name(store)
        path = store.path(eval_summary(ckpt))
        return _eval_line(json.loads(store.read_text(path))) if store.fs.exists(path) else "evaluate: no summary"
    m = store.manifest(dataset_name(stage, round_index))
    if m is None:
        return f"{stage_label(stage, round_index)}: no output"
    head = f"{stage_label(stage, round_index)}: {m.rows} rows {dict(sorted(m.counts.items()))} in {m.seconds:.1f}s"
    if stage in ("prepare", "rollout"):
        return head
    r = round_stats(store, round_index)
    if stage == "verify":
        return f"{head}; accuracy (reward rate) {_fmt(r.reward_rate)}"
    if stage == "annotate":
        from trace_rl.stages.annotate import coverage_phrase

        return f"{head}; {coverage_phrase(m.extra)}"
    from trace_rl.data_schemas import TRAIN_METRICS

    t = store.read(m.dataset, TRAIN_METRICS, allow_extra=True)
    means = {}
    for col in ("loss", "pg_loss", "kl_loss", "kl_weight", "kl_forward", "kl_reverse", "kl_jsd",
                "entropy", "grad_norm"):
        if col in t.column_names:
            vals = [v for v in t.column(col).to_pylist() if v is not None]
            means[col] = sum(vals) / len(vals) if vals else None
    figs = ", ".join(f"{'λ' if k == 'kl_weight' else k} {_fmt(v, '.4f')}" for k, v in means.items())
    return f"{head}; step means: {figs}"


def round_line(config_path: str, round_index: int) -> str:
    """The parent run's one line per finished round: what policy k did and what training made of
    it (step means), and the evaluation of the policy it wrote when there is one."""
    from trace_rl.pipeline.plots_data import round_stats
    from trace_rl.stages.common import open_store

    cfg = load_config(config_path)
    store = open_store(cfg)
    r = round_stats(store, round_index)
    line = (f"round {round_index} done (policy {round_index} sampled, policy {round_index + 1} "
            f"written): reward rate {_fmt(r.reward_rate)}, coverage of rows with spans "
            f"{_fmt(r.coverage)}, step-mean loss {_fmt(r.loss, '.4f')}, λ {_fmt(r.kl_weight)}")
    path = store.path(eval_summary(checkpoint_name(round_index + 1)))
    if store.fs.exists(path):
        line += f"; policy {round_index + 1}: {_eval_line(json.loads(store.read_text(path)))}"
    return line


def log_stage(config_path: str, stage: str, round_index: int | None) -> None:
    """The stage's figures, to the current Prefect run's log."""
    from prefect import get_run_logger

    try:
        line = stage_figures(load_config(config_path), stage, round_index)
    except Exception as exc:  # noqa: BLE001  (reporting never fails a stage)
        line = f"{stage_label(stage, round_index)}: finished (figures unavailable: {exc})"
    get_run_logger().info(line)


# ---------------------------------------------------------------------------------------------
# artifacts


def _key(cfg: TraceConfig, what: str) -> str:
    return f"{cfg.run.name}-{what}".lower().replace("_", "-").replace(".", "-")


def plots_markdown(paths: list[str]) -> str:
    """The PNGs as markdown images with the bytes embedded (data URIs): the UI shows them from
    the server, wherever the worker ran."""
    out = []
    for path in paths:
        if path.endswith(".png"):
            with open(path, "rb") as fh:
                data = base64.b64encode(fh.read()).decode()
            out.append(f"**{path.rsplit('/', 1)[-1]}**\n\n![{path.rsplit('/', 1)[-1]}](data:image/png;base64,{data})\n")
    return "\n".join(out)


def _log_evaluations(cfg: TraceConfig) -> None:
    """`eval/<benchmark>/avg@k` per evaluated policy into the run's TensorBoard run."""
    from trace_rl.pipeline.tracking import log_eval_scalars
    from trace_rl.stages.common import open_store

    store = open_store(cfg)
    if "tensorboard" in cfg.train.trackers and store.is_local:
        log_eval_scalars(store)


def publish_run_artifacts(config_path: str, note: str) -> None:
    """Redraw `<run>/plots/` and attach to the current run: a table artifact (one row per round),
    and a markdown artifact with the evaluation summary and the plots."""
    try:
        from dataclasses import asdict

        from prefect.artifacts import create_markdown_artifact, create_table_artifact
        from trace_rl.pipeline.plots import metrics_markdown, plot_run
        from trace_rl.pipeline.plots_data import collect_run

        cfg = load_config(config_path)
        root = cfg.run.run_root
        stats = collect_run(root)
        if stats.empty:
            return
        paths = plot_run(root)
        _log_evaluations(cfg)
        # round k's row: what policy k sampled, and the training that wrote policy k+1
        rows = [{"round": r.round, "sampled by": f"policy {r.round}",
                 **{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(r).items()
                    if k not in ("first_step", "last_step", "round")}} for r in stats.rounds]
        if rows:
            create_table_artifact(key=_key(cfg, "rounds"), table=rows,
                                  description=f"{cfg.run.name}: one row per round ({note})")
        create_markdown_artifact(
            key=_key(cfg, "summary"),
            markdown=f"# {cfg.run.name} ({note})\n\n{metrics_markdown(root, stats)}\n{plots_markdown(paths)}",
            description=f"{cfg.run.name}: per-round metrics, evaluation and plots ({note})")
    except Exception as exc:  # noqa: BLE001  (artifacts never fail a finished round)
        log.warning("could not publish artifacts: %s", exc)
