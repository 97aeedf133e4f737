"""benchmarks/real_model_study.py: rows appended per round, a rerun continues where it stopped,
round 0 shared by the methods of a seed, and the paired report's arithmetic. No model runs here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import real_model_study as rms


def _row(method, seed, rnd, acc=None, per=None, reward=0.1):
    r = {"method": method, "seed": seed, "round": rnd, "train_reward": reward if rnd else None}
    if acc is not None:
        r |= {"heldout_acc": acc, "heldout_per_problem": per or {}}
    return r


def test_rows_append_and_torn_last_line(tmp_path):
    out = str(tmp_path)
    assert rms.load_rows(out) == []
    rms.append_row(out, _row("grpo", 0, 0, 0.1))
    rms.append_row(out, _row("grpo", 0, 1))
    rms.append_row(out, _row("grpo", 0, 1, reward=0.3))  # a redone round: the latest row wins
    with open(tmp_path / "rows.jsonl", "a") as f:
        f.write('{"method": "grpo", "seed": 0, "rou')  # killed mid-write
    rows = rms.load_rows(out)
    assert [(r["round"], r["train_reward"]) for r in rows] == [(0, None), (1, 0.3)]
    rms.append_row(out, _row("grpo", 0, 2))  # the next row starts a line of its own
    assert [r["round"] for r in rms.load_rows(out)] == [0, 1, 2]
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 5


def test_pending_rounds_continue_where_stopped():
    rows = [_row("grpo", 0, 0, 0.1), _row("grpo", 0, 1), _row("grpo", 0, 2),
            _row("trace_rkl", 0, 0, 0.1), _row("grpo", 1, 0, 0.2)]
    assert rms.pending_rounds(rows, "grpo", 0, 5, None) == [3, 4, 5]
    assert rms.pending_rounds(rows, "grpo", 0, 2, None) == [2]  # round 2 is last: needs held-out
    assert rms.pending_rounds(rows, "grpo", 0, 2, [1]) == [1, 2]
    assert rms.pending_rounds(rows, "trace_rkl", 0, 3, None) == [1, 2, 3]
    assert rms.pending_rounds(rows, "trace_rkl", 1, 1, None) == [0, 1]
    done = rows + [_row("grpo", 0, 3), _row("grpo", 0, 4), _row("grpo", 0, 5, 0.3)]
    assert rms.pending_rounds(done, "grpo", 0, 5, None) == []


def test_round0_shared_by_seed(tmp_path):
    rows = [_row("grpo", 0, 0, 0.12, {"a": 0.5}), _row("grpo", 1, 0, 0.2)]
    assert rms.shared_initial(rows, 0)["heldout_acc"] == 0.12
    assert rms.shared_initial(rows, 2) is None
    src, dst = tmp_path / "grpo-s0", tmp_path / "trace_rkl-s0"
    for name in ("rollout/round-0000", "verify/round-0000"):
        (src / name).mkdir(parents=True)
        (src / name / "_manifest.json").write_text(json.dumps({"name": name}))
    (dst / "verify/round-0000").mkdir(parents=True)  # this run's own: never overwritten
    copied = rms.copy_round0(str(src), str(dst), ["rollout/round-0000", "verify/round-0000",
                                                  "annotate/round-0000"])
    assert copied == ["rollout/round-0000"]
    assert json.loads((dst / "rollout/round-0000/_manifest.json").read_text())["name"] == "rollout/round-0000"
    assert not (dst / "verify/round-0000/_manifest.json").exists()


def test_run_overrides_pair_by_seed():
    a = rms.run_overrides("grpo", 3, "/o", ["rollout.n=4"])
    b = rms.run_overrides("trace_rkl", 3, "/o", ["rollout.n=4"])
    # everything but the method, name and root is the same: same prompts, sampling seeds, eval
    strip = lambda o: [x for x in o if not x.startswith(("train.method", "train.route", "run.name", "run.root"))]
    assert strip(a) == strip(b) and "run.seed=3" in a and "rollout.n=4" in a
    assert a.index("rollout.n=4") > a.index("rollout.n=8")  # user overrides win over defaults
    with pytest.raises(SystemExit):
        rms.run_overrides("nope", 0, "/o", [])


def test_paired_problem_ci_matches_direct_bootstrap():
    rng = np.random.default_rng(0)
    a = {f"p{i}": float(rng.integers(0, 3)) / 2 for i in range(60)}
    b = {p: min(1.0, v + (0.5 if i % 3 == 0 else 0.0)) for i, (p, v) in enumerate(a.items())}
    b["extra"] = 1.0  # only problems both hold are paired
    m, ci = rms.paired_problem_ci(a, b, resamples=4000, seed=1)
    d = np.array([b[p] - a[p] for p in sorted(a)])
    assert m == pytest.approx(d.mean())
    idx = np.random.default_rng(1).integers(0, d.size, size=(4000, d.size))
    lo, hi = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    assert ci == pytest.approx([lo, hi]) and lo > 0  # a real gain: the interval excludes 0
    same = rms.paired_problem_ci(a, dict(a))
    assert same == (0.0, [0.0, 0.0])


def test_report_pairs_methods_and_rounds(tmp_path):
    probs = [f"p{i}" for i in range(40)]
    rows = []
    for s in (0, 1, 2):
        base = {p: (i + s) % 4 / 4 for i, p in enumerate(probs)}
        up = {p: min(1.0, v + 0.25) for p, v in base.items()}
        rows += [_row("grpo", s, 0, np.mean(list(base.values())), base),
                 _row("trace_rkl", s, 0, np.mean(list(base.values())), base),
                 _row("grpo", s, 1, np.mean(list(up.values())), up),
                 _row("trace_rkl", s, 1, np.mean(list(base.values())), base)]
    for r in rows:
        rms.append_row(str(tmp_path), r)
    text = rms.report(rms.load_rows(str(tmp_path)), 1)
    gain = np.mean([min(1.0, (i + s) % 4 / 4 + 0.25) - (i + s) % 4 / 4 for s in (0, 1, 2) for i in range(40)])
    grpo_line = next(line for line in text.splitlines() if line.startswith("| grpo: round 1 - round 0"))
    assert f"| {100 * gain:+.1f} [" in grpo_line
    rkl_line = next(line for line in text.splitlines() if line.startswith("| trace_rkl: round 1 - round 0"))
    assert "+0.0 [+0.0, +0.0]" in rkl_line
    diff_line = next(line for line in text.splitlines() if line.startswith("| trace_rkl - grpo, round 1"))
    assert f"| {-100 * gain:+.1f} [" in diff_line
    assert rms.main(["--out", str(tmp_path), "--rounds", "1", "--report-only"]) == 0
    assert (tmp_path / "table.md").read_text() == text
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_self_host_python_falls_back_to_trace_vllm_python(monkeypatch):
    from trace_rl.stages.annotators.config import SelfOptions
    from trace_rl.stages.engines.config import VLLMOptions

    monkeypatch.setenv("TRACE_VLLM_PYTHON", "/opt/vllm-venv/bin/python")
    assert SelfOptions().python == VLLMOptions().python == "/opt/vllm-venv/bin/python"
    assert SelfOptions(python="/x/python").python == "/x/python"
    monkeypatch.delenv("TRACE_VLLM_PYTHON")
    assert SelfOptions().python == sys.executable


def test_train_num_threads_is_runtime_only_and_scoped(tmp_path):
    import torch
    from trace_rl.stages.common import stage_config
    from trace_rl.stages.config import load_config
    from trace_rl.stages.train import torch_threads

    over = [f"run.root={tmp_path}"]
    a = load_config("smollm2-gsm8k", over + ["train.num_threads=1"])
    b = load_config("smollm2-gsm8k", over + ["train.num_threads=2"])
    assert a.train.num_threads == 1 and b.train.num_threads == 2
    # the same update with other thread counts: a run copied between machines stays current
    assert stage_config(a, "train", 0) == stage_config(b, "train", 0)
    with pytest.raises(Exception, match="num_threads"):
        load_config("smollm2-gsm8k", over + ["train.num_threads=0"])
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
