"""avg@k, bootstrap CIs, the 5-column mean and an end-to-end eval with the hf engine (plots: test_plots.py)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SHARED_DATA, needs_shared_data
from tiny import build_model_dir

from trace_rl.data_schemas import EVAL_SAMPLES, TRAIN_METRICS
from trace_rl.stages.config import TraceConfig
from trace_rl.data_schemas.errors import StageError
from trace_rl.pipeline.store import RunStore
from trace_rl.stages.eval_summary import (
    FIVE_COLUMNS,
    bootstrap_means,
    compare_evaluations,
    five_column_mean,
    paired_difference,
    percentile_ci,
    summarize_samples,
)
from trace_rl.stages.evaluate import eval_rollout_config, resolve_checkpoint, run, run_eval

# ---------------------------------------------------------------------------------------------
# metrics


def _rows(correct_by_problem: dict[str, list[bool]], tokens: int = 10) -> list[dict]:
    return [
        {"problem_id": p, "correct": c, "num_tokens": tokens + i}
        for p, cs in correct_by_problem.items()
        for i, c in enumerate(cs)
    ]


def test_bootstrap_ci_all_correct_is_exactly_one() -> None:
    acc_P = np.ones(30)
    assert percentile_ci(bootstrap_means(acc_P, 500, seed=0)) == [1.0, 1.0]


def test_bootstrap_ci_half_correct_contains_half_and_stays_in_unit_interval() -> None:
    acc_P = np.array([1.0, 0.0] * 15)
    lo, hi = percentile_ci(bootstrap_means(acc_P, 1000, seed=0))
    assert 0.0 <= lo < 0.5 < hi <= 1.0
    # Binomial-like spread for 30 problems: sd = 0.5 / sqrt(30) ~ 0.091, so the 95% CI is
    # about +-0.18; a CI from resampling samples instead of problems would not be this wide.
    assert 0.12 < 0.5 - lo < 0.25 and 0.12 < hi - 0.5 < 0.25
    again = percentile_ci(bootstrap_means(acc_P, 1000, seed=0))
    assert again == [lo, hi]  # seeded
    assert percentile_ci(bootstrap_means(acc_P, 0, seed=0)) is None


def test_summarize_samples_hand_computed() -> None:
    # per problem: p1 1/2, p2 2/2, p3 0/2 -> avg@2 = 0.5; tokens 10,11 per problem -> mean 10.5
    rows = _rows({"p1": [True, False], "p2": [True, True], "p3": [False, False]})
    entry, means = summarize_samples(rows, resamples=200, seed=3, benchmark="x")
    assert entry["avg@k"] == entry["pass@1"] == pytest.approx(0.5)
    assert (entry["n_problems"], entry["k"], entry["n_samples"]) == (3, 2, 6)
    assert entry["mean_response_tokens"] == pytest.approx(10.5)
    assert means.shape == (200,) and set(np.round(means * 6).astype(int)) <= set(range(7))
    lo, hi = entry["ci95"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0


def test_five_column_mean_needs_all_five() -> None:
    entries = {b: {"avg@k": v} for b, v in zip(FIVE_COLUMNS, [0.9, 0.3, 0.2, 0.6, 0.5])}
    means = {b: np.full(100, e["avg@k"]) for b, e in entries.items()}
    full = five_column_mean(entries, means)
    assert full["value"] == pytest.approx(0.5) and full["reason"] is None
    assert full["ci95"] == pytest.approx([0.5, 0.5])
    partial = five_column_mean({b: entries[b] for b in ("math500", "aime24")}, means)
    assert partial["value"] is None and partial["ci95"] is None
    assert "aime25" in partial["reason"] and "gpqa_diamond" in partial["reason"]
    assert "math500" not in partial["reason"]


def test_paired_difference_is_the_difference_of_avg_at_k_on_random_pairs() -> None:
    rng = np.random.default_rng(0)
    for trial in range(20):
        problems, k = int(rng.integers(1, 40)), int(rng.integers(1, 5))
        before = {f"p{i}": list(rng.random(k) < 0.4) for i in range(problems)}
        after = {f"p{i}": list(rng.random(k) < 0.6) for i in range(problems)}
        got = paired_difference(_rows(before), _rows(after), resamples=200, seed=trial, benchmark="x")
        a = summarize_samples(_rows(before), resamples=0, seed=0, benchmark="x")[0]["avg@k"]
        b = summarize_samples(_rows(after), resamples=0, seed=0, benchmark="x")[0]["avg@k"]
        assert got["difference"] == pytest.approx(b - a) and got["n_problems"] == problems
        lo, hi = got["ci95"]
        assert -1.0 <= lo <= hi <= 1.0


def test_paired_interval_keeps_what_the_pair_shares_out() -> None:
    # 200 problems, half easy (always solved) and half hard (never); training solves 20 more
    # hard ones. The two per-policy intervals overlap; the paired one excludes 0 and holds 0.10.
    before = {f"p{i}": [i < 100] * 2 for i in range(200)}
    after = {f"p{i}": [i < 120] * 2 for i in range(200)}
    ci_a = summarize_samples(_rows(before), resamples=1000, seed=0, benchmark="x")[0]["ci95"]
    ci_b = summarize_samples(_rows(after), resamples=1000, seed=0, benchmark="x")[0]["ci95"]
    assert ci_b[0] < ci_a[1]  # the separate intervals overlap
    got = paired_difference(_rows(before), _rows(after), resamples=1000, seed=0, benchmark="x")
    assert got["difference"] == pytest.approx(0.10) and 0.0 < got["ci95"][0] < 0.10 < got["ci95"][1]
    same = paired_difference(_rows(before), _rows(before), resamples=1000, seed=0, benchmark="x")
    assert same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0]


def test_paired_difference_refuses_different_problems() -> None:
    with pytest.raises(StageError, match="different problems"):
        paired_difference(_rows({"p1": [True]}), _rows({"p2": [True]}), resamples=10, seed=0,
                          benchmark="x")


def test_summary_refuses_samples_that_miss_problems(tmp_path) -> None:
    # Stored samples for 2 of a benchmark's 3 problems averaged over 2 (n_problems 2) in silence.
    from trace_rl.stages.benchmarks import Benchmark
    from trace_rl.stages.eval_summary import build_summary
    from trace_rl.stages.evaluate import Checkpoint, samples_job, write_samples

    cfg = _cfg(tmp_path / "run", str(tmp_path / "model"))
    store, ckpt = RunStore(str(tmp_path / "run")), Checkpoint("initial", "m", {"checkpoint": "c"})
    bench = Benchmark("mini", "math", [{"prompt_id": f"p{i}"} for i in range(3)], "bench-fp")
    job = samples_job(cfg, ckpt, bench)
    rows = [{"benchmark": "mini", "problem_id": p, "sample_index": i, "response_text": "1",
             "extracted_answer": "1", "correct": p == "p0", "num_tokens": 1}
            for p in ("p0", "p1") for i in range(2)]
    m = write_samples(store, job, ckpt, rows, {"verdict_status": {"ok": 4}}, k=2)
    with pytest.raises(StageError, match="4 samples over 2 problems .* 3 problems x k 2"):
        build_summary(cfg, store, "initial", {}, {"mini": m}, current=lambda _: True)
    # Both problems there, one with a single sample: it would weigh 1 sample as 2.
    two = Benchmark("mini", "math", [{"prompt_id": "p0"}, {"prompt_id": "p1"}], "bench-fp")
    m = write_samples(store, samples_job(cfg, ckpt, two), ckpt, rows[:3], {"verdict_status": {"ok": 3}}, k=2)
    with pytest.raises(StageError, match="k \\[1, 2\\]"):
        build_summary(cfg, store, "initial", {}, {"mini": m}, current=lambda _: True)


# ---------------------------------------------------------------------------------------------
# end to end: a tiny random Qwen3, the hf engine, the real math verifier


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(build_model_dir(tmp_path_factory.mktemp("tiny-model"), p_eos=0.01))


def _cfg(root, model_dir: str, **eval_over) -> TraceConfig:
    return TraceConfig.model_validate(
        {
            "run": {"name": "evaltest", "root": str(root)},
            "model": {"path": model_dir},
            "rollout": {"engine": "hf"},
            "verify": {"workers": 1},
            "eval": {
                "data_dir": str(SHARED_DATA),
                "benchmarks": ["math500"],
                "k": 2,
                "limit": 3,
                "max_tokens": 12,
                "bootstrap": 200,
                **eval_over,
            },
        }
    )


@needs_shared_data
def test_end_to_end_eval_writes_samples_and_summary(tmp_path, model_dir) -> None:
    cfg = _cfg(tmp_path / "run", model_dir)
    summary = run_eval(cfg, checkpoint="initial", progress=False)

    samples = tmp_path / "run" / "eval" / "initial" / "math500" / "samples.parquet"
    assert samples.is_file()  # one Parquet file any reader opens
    table = pq.read_table(samples)
    assert table.num_rows == 3 * 2
    assert set(EVAL_SAMPLES.names) <= set(table.column_names)
    rows = table.to_pylist()
    assert sorted((r["problem_id"], r["sample_index"]) for r in rows) == sorted(
        (pid, i)
        for pid in (
            "test/precalculus/807.json",
            "test/intermediate_algebra/1994.json",
            "test/algebra/2584.json",
        )
        for i in (0, 1)
    )
    assert all(r["benchmark"] == "math500" and 1 <= r["num_tokens"] <= 12 for r in rows)

    on_disk = json.loads((tmp_path / "run" / "eval" / "initial" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    entry = summary["benchmarks"]["math500"]
    for key in ("avg@k", "pass@1", "ci95", "n_problems", "k", "mean_response_tokens"):
        assert key in entry
    assert (entry["n_problems"], entry["k"]) == (3, 2)
    assert entry["avg@k"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    assert entry["mean_response_tokens"] == pytest.approx(np.mean([r["num_tokens"] for r in rows]))
    assert sum(entry["verdict_status"].values()) == 6
    assert summary["five_column_mean"]["value"] is None
    assert "aime24" in summary["five_column_mean"]["reason"]
    assert summary["sampling"] == {
        "n": 2,
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
        "max_tokens": 12,
        "enable_thinking": True,
        "seed": 0,
    }

    # Current samples are not redone: the manifest (and its fingerprint) stays the same.
    store = RunStore(str(tmp_path / "run"))
    fp = store.manifest("eval/initial/math500").fingerprint
    run_eval(cfg, checkpoint="initial", progress=False)
    assert store.manifest("eval/initial/math500").fingerprint == fp
    # A sampling change makes them stale.
    run_eval(_cfg(tmp_path / "run", model_dir, max_tokens=8), checkpoint="initial", progress=False)
    again = store.read("eval/initial/math500", EVAL_SAMPLES).to_pylist()
    assert all(r["num_tokens"] <= 8 for r in again)
    # Other benchmarks later (the testbed and choice verifiers): the summary keeps math500 (its
    # samples are unchanged) and adds them.
    both = run_eval(
        _cfg(tmp_path / "run", model_dir, max_tokens=8),
        checkpoint="initial",
        benchmarks=["testbed", "gpqa_diamond"],
        progress=False,
    )
    assert set(both["benchmarks"]) == {"math500", "testbed", "gpqa_diamond"}
    for bench in ("testbed", "gpqa_diamond"):
        assert both["benchmarks"][bench]["n_problems"] == 3
        assert sum(both["benchmarks"][bench]["verdict_status"].values()) == 6
    assert both["benchmarks"]["math500"]["avg@k"] == pytest.approx(
        np.mean([r["correct"] for r in again])
    )


def test_checkpoint_resolution_and_stage_entry(tmp_path, model_dir) -> None:
    cfg = _cfg(tmp_path / "run", model_dir)
    store = RunStore(str(tmp_path / "run"))
    latest = resolve_checkpoint(cfg, store, "latest")  # nothing trained yet -> the initial model
    assert (latest.name, latest.model_dir) == ("initial", model_dir)
    direct = resolve_checkpoint(cfg, store, model_dir)
    assert direct.name == "tiny-model0" and direct.model_dir == model_dir
    with pytest.raises(StageError, match="round 0's train stage"):
        run(cfg, 0, progress=False)  # round 0 produces checkpoints/round-0001, not trained yet
    # Once round 0's train stage has finished, its checkpoint is "latest" and the stage entry
    # point evaluates it.
    with store.writer(
        "round-0000/train", TRAIN_METRICS, stage="train", config_fingerprint="x"
    ) as w:
        w.write_rows(
            [
                {name: 0.0 for name in TRAIN_METRICS.names}
                | {"step": 0, "round": 0, "peak_mem_bytes": 0}
            ]
        )
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "round-0001").symlink_to(model_dir)
    assert resolve_checkpoint(cfg, store, "latest").name == "round-0001"
    manifest = run(_cfg(tmp_path / "run", model_dir, benchmarks=["testbed"]), 0, progress=False)
    assert manifest.dataset == "eval/round-0001/testbed" and manifest.rows == 6
    assert manifest.inputs["round-0000/train"] == store.manifest("round-0000/train").fingerprint
    rcfg = eval_rollout_config(cfg)
    assert (rcfg.n, rcfg.temperature, rcfg.top_p, rcfg.top_k, rcfg.engine) == (
        2,
        0.6,
        0.95,
        20,
        "hf",
    )
    assert cfg.rollout.n == 8  # the training rollout config is not touched


def test_summary_keeps_only_entries_sampled_as_its_header_says(tmp_path, model_dir) -> None:
    # A summary's header states one sampling config; an earlier benchmark entry sampled with
    # another one (here temperature 0.6, 12 tokens) was kept beside a new one (1.0, 6 tokens).
    bench = tmp_path / "mini.jsonl"
    bench.write_text("\n".join(json.dumps({"id": f"q{i}", "problem": f"What is {i} + {i}?",
                                           "answer": str(2 * i)}) for i in range(3)))
    root = tmp_path / "run"
    run_eval(_cfg(root, model_dir, benchmarks=["testbed"], temperature=0.6), checkpoint="initial",
             progress=False)
    hot = _cfg(root, model_dir, temperature=1.0, max_tokens=6)
    later = run_eval(hot, checkpoint="initial", benchmarks=[f"file:{bench}"], progress=False)
    assert later["sampling"]["temperature"] == 1.0
    assert set(later["benchmarks"]) == {"mini"}
    on_disk = json.loads((root / "eval" / "initial" / "summary.json").read_text())
    assert set(on_disk["benchmarks"]) == {"mini"}
    # Sampled again with the header's settings, the testbed entry is back, and "mini" stays.
    both = run_eval(hot, checkpoint="initial", benchmarks=["testbed"], progress=False)
    assert set(both["benchmarks"]) == {"mini", "testbed"}
    tokens = RunStore(str(root)).read("eval/initial/testbed", EVAL_SAMPLES).column("num_tokens")
    assert max(tokens.to_pylist()) <= 6


def test_compare_evaluations_pairs_only_the_same_benchmark_data(tmp_path, model_dir) -> None:
    root = tmp_path / "run"
    first = run_eval(_cfg(root, model_dir, benchmarks=["testbed"]), checkpoint="initial", progress=False)
    again = run_eval(_cfg(root, model_dir, benchmarks=["testbed"]), checkpoint=model_dir, progress=False)
    cfg, store = _cfg(root, model_dir), RunStore(str(root))
    got = compare_evaluations(cfg, store, "initial", again["checkpoint"], "testbed")
    assert got["n_problems"] == 3
    assert got["difference"] == pytest.approx(again["benchmarks"]["testbed"]["avg@k"]
                                              - first["benchmarks"]["testbed"]["avg@k"])
    # The stage's log line without a round reports 'latest' (here the initial policy), not the
    # summary whose checkpoint name sorts last (this model directory's, "tiny-model0").
    from trace_rl.flows.reporting import stage_figures

    assert again["checkpoint"] > "initial"
    assert stage_figures(cfg, "evaluate", None).startswith("eval initial: testbed avg@2")
    # Four held-out problems for one policy, three for the other: not a pair.
    run_eval(_cfg(root, model_dir, benchmarks=["testbed"], limit=4), checkpoint=model_dir, progress=False)
    with pytest.raises(StageError, match="different 'testbed' data"):
        compare_evaluations(cfg, store, "initial", again["checkpoint"], "testbed")
