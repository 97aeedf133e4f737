"""`trace-rl demo`: the whole method on the CPU testbed, offline, in a few minutes.

Builds (or reuses) the testbed, runs the configured rounds of TRACE with the rule annotator
through the Prefect training flow, evaluates the final checkpoint, writes the HTML view of the
last round's annotations, and says where everything is.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.panel import Panel

from trace_rl.pipeline.layout import dataset_name, round_dir
from trace_rl.stages.config import TraceConfig

console = Console()


def run_demo(cfg: TraceConfig) -> dict:
    t0 = time.time()
    root = cfg.run.run_root
    console.rule(f"[bold]TRACE demo[/] - {cfg.run.rounds} rounds on the CPU testbed -> {root}")
    from trace_rl.stages.common import initial_model_dir

    console.print("[bold]testbed[/]: building or reusing the tiny model and tokenizer")
    initial_model_dir(cfg)
    from .training import run_training_local

    run_training_local(cfg)
    console.print("[bold]evaluate[/]: the initial policy and the final checkpoint on held-out problems")
    from trace_rl.stages.evaluate import run_eval

    before = run_eval(cfg, checkpoint="initial", progress=True)
    after = run_eval(cfg, checkpoint="latest", progress=True)
    last = round_dir(cfg.run.rounds - 1)
    html = f"{root}/{last}/annotations.html"
    from trace_rl.pipeline.inspect import inspect_path

    annotations = f"{root}/{dataset_name('annotate', cfg.run.rounds - 1)}"
    inspect_path(annotations, html=html, examples=1)
    from trace_rl.pipeline.plots import plot_run

    png = plot_run(root)[0]  # curves.png; accuracy.png and summary.md sit beside it
    elapsed = time.time() - t0
    acc0, acc1 = _acc(before), _acc(after)
    change = _change(cfg, before, after)
    console.print(Panel.fit(
        f"done in {elapsed:.0f} s\n"
        f"held-out accuracy: initial {acc0} -> final {acc1}\n"
        f"change:            {_fmt_change(change)}\n"
        f"run directory:     {root}\n"
        f"annotated spans:   open {html} in a browser\n"
        f"                   or: trace-rl inspect {annotations}\n"
        f"curves:            {png}\n"
        f"stage states:      trace-rl status demo",
        title="TRACE demo"))
    return {"seconds": elapsed, "initial": before, "final": after, "change": change, "html": html,
            "plot": png}


def _change(cfg: TraceConfig, before: dict, after: dict) -> dict | None:
    """The final minus the initial accuracy on the same held-out problems, with its paired CI
    (the two intervals above each carry the problems' difficulty, which the pair shares)."""
    from trace_rl.stages.common import open_store
    from trace_rl.stages.eval_summary import compare_evaluations

    if "testbed" not in before.get("benchmarks", {}) or "testbed" not in after.get("benchmarks", {}):
        return None
    return compare_evaluations(cfg, open_store(cfg), before["checkpoint"], after["checkpoint"], "testbed")


def _fmt_change(change: dict | None) -> str:
    if change is None:
        return "n/a"
    ci = change["ci95"]
    interval = f" (paired 95% CI {100 * ci[0]:+.1f} to {100 * ci[1]:+.1f})" if ci else ""
    return f"{100 * change['difference']:+.1f} points{interval}, the same {change['n_problems']} problems"


def _acc(summary: dict) -> str:
    try:
        b = summary["benchmarks"]["testbed"]
        lo, hi = b["ci95"]
        return f"{100 * b['avg@k']:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f})"
    except (KeyError, TypeError, IndexError):
        return "n/a"
