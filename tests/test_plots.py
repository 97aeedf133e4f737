"""Run plots and the markdown summary, on tiny runs written through the real store and schemas."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from trace_rl.data_schemas import ANNOTATIONS, TRAIN_METRICS, VERDICTS, extend_metrics
from trace_rl.data_schemas.errors import StageError
from trace_rl.pipeline.plots import Accuracy, collect_run, metrics_markdown, plot_run
from trace_rl.pipeline.plots_figures import build_figures, curve_panels
from trace_rl.pipeline.store import RunStore
from trace_rl.stages.eval_summary import five_column_mean, summarize_samples

REWARDS = [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]  # round means 0.25, 0.5
COVERAGE = [0.2, 0.4]
STEPS = 3  # optimizer steps per round


def _write_round(store: RunStore, k: int, *, trace: bool) -> list[dict]:
    with store.writer(f"round-{k:04d}/verdicts", VERDICTS, stage="verify", config_fingerprint="x") as w:
        w.write_rows([{"rollout_id": f"{k}:{i}", "reward": r, "correct": r == 1.0, "extracted_answer": None,
                       "status": "ok", "detail": None} for i, r in enumerate(REWARDS[k])])
    if trace:  # annotate records the mean coverage of its ok rows in the manifest
        with store.writer(f"round-{k:04d}/annotations", ANNOTATIONS, stage="annotate", config_fingerprint="x") as w:
            w.write_rows([])
            w.extra = {"mean_coverage_ok": COVERAGE[k]}
    # kl/forward only in round 0: a column one round lacks must read as NaN there, not shift.
    extras = ["kl/forward"] if trace and k == 0 else []
    rows = []
    for s in range(STEPS):
        step = STEPS * k + s
        lam = 0.5 * (1 - step / 6) if trace else 0.0
        rows.append({name: 0.0 for name in TRAIN_METRICS.names} | {
            "step": step, "round": k, "peak_mem_bytes": 0, "kl_weight": lam,
            "loss": 0.3 - 0.01 * step, "pg_loss": 0.2 - 0.01 * step, "kl_loss": 0.1 * lam,
            "entropy": 1.0 + 0.1 * step, "response_len_mean": 100.0 + 10 * step,
            "span_token_frac": 0.05 * (step + 1) if trace else 0.0, "clip_frac": 0.01 * step,
            "grad_norm": 2.0 - 0.1 * step,
        } | {c: 0.02 * step for c in extras})
    with store.writer(f"round-{k:04d}/train", extend_metrics(extras), stage="train", config_fingerprint="x",
                      allow_extra=True) as w:
        w.write_rows(rows)
    return rows


def _write_eval(store: RunStore, ckpt: str, correct: dict[str, list[bool]], bench: str = "testbed") -> dict:
    """A summary.json made by evaluate's own summarize_samples, so the CI format is the real one."""
    rows = [{"problem_id": p, "correct": c, "num_tokens": 10} for p, cs in correct.items() for c in cs]
    entry, means = summarize_samples(rows, resamples=200, seed=0, benchmark=bench)
    summary = {"checkpoint": ckpt, "benchmarks": {bench: entry},
               "five_column_mean": five_column_mean({bench: entry}, {bench: means})}
    store.write_text(store.path("eval", ckpt, "summary.json"), json.dumps(summary))
    return entry


def _trace_run(root) -> tuple[RunStore, list[dict], dict[str, dict]]:
    store = RunStore(str(root))
    rows = [r for k in range(2) for r in _write_round(store, k, trace=True)]
    evals = {"initial": _write_eval(store, "initial", {f"p{i}": [i % 4 == 0, False] for i in range(12)}),
             "round-0002": _write_eval(store, "round-0002", {f"p{i}": [i % 2 == 0, True] for i in range(12)})}
    return store, rows, evals


def _axis(fig, title: str):
    matches = [ax for ax in fig.axes if ax.get_title() == title]
    assert len(matches) == 1, f"no single panel titled {title!r} in {[a.get_title() for a in fig.axes]}"
    return matches[0]


def test_collect_run_reads_steps_rounds_and_cis(tmp_path) -> None:
    _, rows, evals = _trace_run(tmp_path / "run")
    stats = collect_run(str(tmp_path / "run"))
    assert [(r.round, r.rollouts, r.reward_rate, r.coverage, r.steps, r.first_step, r.last_step)
            for r in stats.rounds] == [(0, 4, 0.25, 0.2, 3, 0, 2), (1, 4, 0.5, 0.4, 3, 3, 5)]
    assert stats.steps["step"] == [float(r["step"]) for r in rows]
    assert stats.steps["kl_weight"] == pytest.approx([r["kl_weight"] for r in rows])
    fwd = stats.steps["kl_forward"]  # the trainer's kl/forward, by its SQL-safe column name
    assert fwd[:3] == pytest.approx([0.0, 0.02, 0.04]) and all(math.isnan(v) for v in fwd[3:])
    assert stats.rounds[1].grad_norm == pytest.approx(np.mean([r["grad_norm"] for r in rows[3:]]))
    for ckpt, k in (("initial", 0), ("round-0002", 2)):
        acc = stats.evals[k]["testbed"]
        assert acc == Accuracy(evals[ckpt]["avg@k"], tuple(evals[ckpt]["ci95"]))
        assert acc.ci95[0] <= acc.value <= acc.ci95[1]
    assert "5-column mean" not in stats.evals[0]  # one benchmark: the headline is null


def test_curve_figure_data_equals_the_metrics(tmp_path) -> None:
    _, rows, _ = _trace_run(tmp_path / "run")
    stats = collect_run(str(tmp_path / "run"))
    fig = build_figures(stats, "t")["curves.png"]
    steps = [r["step"] for r in rows]

    (lam,) = _axis(fig, "KL weight λ").get_lines()[:1]
    assert list(lam.get_xdata()) == steps
    assert list(lam.get_ydata()) == pytest.approx([r["kl_weight"] for r in rows])
    for title, col in (("clip fraction", "clip_frac"), ("policy entropy", "entropy"),
                       ("response length", "response_len_mean"), ("grad norm", "grad_norm")):
        line = _axis(fig, title).get_lines()[0]
        assert list(line.get_ydata()) == pytest.approx([r[col] for r in rows]), title
    loss_parts = {ln.get_label(): list(ln.get_ydata()) for ln in _axis(fig, "loss parts").get_lines()
                  if not ln.get_label().startswith("_")}
    assert loss_parts == {c: pytest.approx([r[c] for r in rows]) for c in ("loss", "pg_loss", "kl_loss")}
    # Reward and coverage are round means, drawn flat across the steps of their round.
    reward = [ln for ln in _axis(fig, "train reward (rollouts of the round)").get_lines()
              if ln.get_color() == "tab:green"]
    assert [(list(ln.get_xdata()), list(ln.get_ydata())) for ln in reward] == [
        ([0, 2], [0.25, 0.25]), ([3, 5], [0.5, 0.5])]
    span = _axis(fig, "span token fraction / coverage")
    assert [list(ln.get_ydata()) for ln in span.get_lines() if ln.get_color() == "tab:orange"] == [
        [0.2, 0.2], [0.4, 0.4]]
    # coverage is a mean over the rows with spans only (NULL elsewhere), and says so: a round
    # with 33 of 256 rows at 0.30 covers about 4% of its tokens, not 30%
    assert "annotation coverage (mean over rows with spans)" in [t.get_text() for t in span.get_legend().get_texts()]
    # The round boundary (round 1 starts at step 3) is marked on every panel.
    assert any(list(ln.get_xdata()) == [2.5, 2.5] for ln in _axis(fig, "grad norm").get_lines())


def test_accuracy_figure_draws_only_evaluated_policies_as_points(tmp_path) -> None:
    """Policies 0 and 2 evaluated, 1 not: two points with their CIs, no line or band across 1."""
    _, _, evals = _trace_run(tmp_path / "run")
    fig = build_figures(collect_run(str(tmp_path / "run")), "t")["accuracy.png"]
    ax = _axis(fig, "testbed")
    assert not [c for c in ax.collections if type(c).__name__ == "PolyCollection"]  # no band
    (points,) = [ln for ln in ax.get_lines() if ln.get_marker() == "o"]
    assert points.get_linestyle() == "None"  # points, not a line through policy 1
    assert list(points.get_xdata()) == [0, 2]
    assert list(points.get_ydata()) == pytest.approx([100 * evals[c]["avg@k"] for c in ("initial", "round-0002")])
    (bars,) = [c for c in ax.collections if type(c).__name__ == "LineCollection"]
    segments = sorted((seg[0][0], seg[0][1], seg[1][1]) for seg in bars.get_segments())
    assert segments == [pytest.approx((x, 100 * evals[c]["ci95"][0], 100 * evals[c]["ci95"][1]))
                        for x, c in ((0, "initial"), (2, "round-0002"))]


def test_accuracy_figure_draws_a_line_and_band_when_every_policy_is_evaluated() -> None:
    from trace_rl.pipeline.plots_data import RunStats
    from trace_rl.pipeline.plots_figures import accuracy_figure

    evals = {k: {"testbed": Accuracy(0.2 + 0.1 * k, (0.1 + 0.1 * k, 0.3 + 0.1 * k))} for k in range(3)}
    fig = accuracy_figure(RunStats(evals=evals), "t")
    ax = _axis(fig, "testbed")
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [0, 1, 2] and line.get_linestyle() == "-"
    band_y = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band_y.min() == pytest.approx(10.0) and band_y.max() == pytest.approx(50.0)


def test_plot_run_writes_readable_pngs_and_a_matching_summary(tmp_path) -> None:
    _trace_run(tmp_path / "run")
    paths = plot_run(str(tmp_path / "run"))
    plots = tmp_path / "run" / "plots"
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["curves.png", "accuracy.png", "summary.md"]
    for name, min_width in (("curves.png", 1200), ("accuracy.png", 600)):  # 9 panels; 1 benchmark
        assert (plots / name).stat().st_size > 20_000
        with Image.open(plots / name) as im:
            assert im.format == "PNG" and im.width >= min_width and im.height >= 300
            grey = np.asarray(im.convert("L"), dtype=float)
        assert grey.std() > 5  # drawn, not a blank canvas
    assert not list(plots.glob("*.tmp"))
    md = (plots / "summary.md").read_text()
    assert md == metrics_markdown(str(tmp_path / "run"))
    assert md.startswith("| round | rollouts | reward rate | coverage (rows with spans) |")
    assert "| 0 | 4 | 0.250 | 0.200 | 3 |" in md and "| 1 | 4 | 0.500 | 0.400 | 3 |" in md
    acc = collect_run(str(tmp_path / "run")).evals[2]["testbed"]
    assert f"| round-0002 | {100 * acc.value:.2f} [{100 * acc.ci95[0]:.1f}, {100 * acc.ci95[1]:.1f}] |" in md


def test_grpo_run_leaves_out_what_it_does_not_have(tmp_path) -> None:
    store = RunStore(str(tmp_path / "run"))
    rows = _write_round(store, 0, trace=False)  # λ = 0, kl_loss = 0, no spans, no annotations, no evals
    stats = collect_run(str(tmp_path / "run"))
    titles = [p.title for p in curve_panels(stats)]
    assert titles == ["train reward (rollouts of the round)", "loss parts", "clip fraction", "policy entropy",
                      "response length", "grad norm"]
    fig = build_figures(stats, "t")
    assert list(fig) == ["curves.png"]
    labels = [ln.get_label() for ln in _axis(fig["curves.png"], "loss parts").get_lines()]
    assert labels == ["loss", "pg_loss"]
    paths = plot_run(str(tmp_path / "run"))
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["curves.png", "summary.md"]
    assert "| 0 | 4 | 0.250 | – | 3 |" in (tmp_path / "run" / "plots" / "summary.md").read_text()
    assert len(rows) == STEPS


def test_round_without_training_yet_and_empty_run(tmp_path) -> None:
    with pytest.raises(StageError, match="nothing to plot"):
        plot_run(str(tmp_path / "empty"))
    store = RunStore(str(tmp_path / "run"))
    (tmp_path / "run" / "round-0000").mkdir(parents=True)
    with pytest.raises(StageError, match="no round has verdicts or train metrics"):
        plot_run(str(tmp_path / "run"))
    _write_eval(store, "initial", {"p0": [True, False], "p1": [False, False]})
    paths = plot_run(str(tmp_path / "run"))  # an eval of the initial model alone still plots
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["accuracy.png", "summary.md"]
    assert "| initial | 25.00 [" in (tmp_path / "run" / "plots" / "summary.md").read_text()
