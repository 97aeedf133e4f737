"""`trace-rl status` tells the truth: staleness propagates downstream through every round and into
evaluations, and status judges a run by the run's own resolved config (no phantom rounds).

The run is made of real store datasets whose manifests are decided by the stages' own `decide`
(same config fingerprints, same recorded inputs) and evaluation samples written by evaluate's
own writer and summary; the tables are tiny, since status reads manifests only.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT
from trace_rl.data_schemas import PROMPTS, SCHEMAS
from trace_rl.pipeline.layout import STAGES, dataset_name, eval_summary
from trace_rl.stages.benchmarks import Benchmark
from trace_rl.stages.common import decide, open_store, start_checkpoint
from trace_rl.stages.config import dump_config, load_config
from trace_rl.stages.eval_summary import build_summary
from trace_rl.stages.evaluate import resolve_checkpoint, sampled_as_now, samples_job, write_samples
from trace_rl.stages.status import eval_states, run_config, stage_states
from trace_rl.trainer.launch import round_input_names

INPUTS = {"rollout": ["prompts"], "verify": ["prompts", "rollouts"],
          "annotate": ["prompts", "rollouts", "verdicts"]}


def write_stage(cfg, stage: str, k: int | None, content: str | None = None) -> None:
    """An (empty) output of `stage` in round k, recording what the real stage records; `content`
    stands for different output (it goes to the manifest's `extra`, where a train stage records
    its checkpoint's file hashes): without it a rewrite is byte-identical to the first write."""
    store = open_store(cfg)
    if stage == "prepare":
        names, extra = [], {}
    elif stage == "train":
        names, extra = list(round_input_names(k).values()), start_checkpoint(cfg, store, k)[1]
    else:
        names = [n if n == "prompts" else dataset_name({"rollouts": "rollout", "verdicts": "verify"}[n], k)
                 for n in INPUTS[stage]]
        extra = start_checkpoint(cfg, store, k)[1] if stage == "rollout" else {}
    p = decide(cfg, stage, k, names, force=True, extra_inputs=extra)
    with p.writer(SCHEMAS[STAGES[stage].schema], stage, allow_extra=True) as w:
        w.write_rows([])
        w.extra = {"content": content} if content else {}
    if stage == "train":
        store.local_path("checkpoints", f"round-{k + 1:04d}").mkdir(parents=True, exist_ok=True)


def write_eval(cfg, checkpoint: str) -> None:
    store = open_store(cfg)
    ckpt = resolve_checkpoint(cfg, store, checkpoint)
    bench = Benchmark("testbed", "testbed", [{"prompt_id": "p0"}], "bench-fp")
    job = samples_job(cfg, ckpt, bench)
    rows = [{"benchmark": "testbed", "problem_id": "p0", "sample_index": 0, "response_text": "4",
             "extracted_answer": "4", "correct": True, "num_tokens": 1}]
    m = write_samples(store, job, ckpt, rows, {"verdict_status": {"ok": 1}}, k=1)
    summary = build_summary(cfg, store, ckpt.name, {"checkpoint": ckpt.name}, {"testbed": m},
                            current=lambda old: sampled_as_now(cfg, ckpt, old))
    import json

    store.write_text(store.path(eval_summary(ckpt.name)), json.dumps(summary))


@pytest.fixture
def run(tmp_path):
    cfg = load_config("demo", [f"run.root={tmp_path / 'run'}", "run.rounds=3", "eval.bootstrap=10"])
    store = open_store(cfg)
    store.write_text(store.path("config.yaml"), dump_config(cfg))
    write_stage(cfg, "prepare", None)
    for k in range(3):
        for stage in ("rollout", "verify", "annotate", "train"):
            write_stage(cfg, stage, k)
    for ckpt in ("initial", "round-0001", "round-0003"):
        write_eval(cfg, ckpt)
    return cfg


def manifests(cfg) -> dict:
    store = open_store(cfg)
    names = ["prompts"] + [dataset_name(s, k) for k in range(cfg.run.rounds)
                           for s in ("rollout", "verify", "annotate", "train")]
    return {name: store.manifest(name) for name in names}


def states_of(cfg) -> dict[tuple[str, int], str]:
    return {(s, k): st.state for s, by in stage_states(cfg).items() if s != "prepare"
            for k, st in by.items()}


def test_a_fresh_run_is_complete_with_its_evaluations_listed(run):
    assert set(states_of(run).values()) == {"complete"}
    evals = eval_states(run)
    assert [(e.checkpoint, e.state) for e in evals] == [
        ("initial", "complete"), ("round-0001", "complete"), ("round-0003", "complete")]
    assert evals[0].avg == 1.0


def test_a_forced_stage_with_identical_output_leaves_everything_current(run):
    """Staleness follows content: `stage annotate --round 0 --force` with the same settings
    wrote the same bytes, so nothing after it is stale (and nothing reruns)."""
    before = {name: m.fingerprint for name, m in manifests(run).items()}
    write_stage(run, "annotate", 0)
    write_stage(run, "train", 1)
    assert {name: m.fingerprint for name, m in manifests(run).items()} == before
    assert set(states_of(run).values()) == {"complete"}
    assert {e.state for e in eval_states(run)} == {"complete"}


def test_a_forced_rollout_with_the_same_samples_but_another_engine_record_is_current(run):
    """A rollout's manifest records how its engine ran (cold or resident, seconds to generate):
    facts of the run, not of its rows. A forced rollout that sampled the same rows, timed
    differently, leaves verify/annotate/train current; other `extra` content does not."""
    before = manifests(run)["round-0001/rollouts"].fingerprint

    def rewrite_rollouts(extra: dict) -> str:
        names = ["prompts"]
        p = decide(run, "rollout", 1, names, force=True, extra_inputs=start_checkpoint(run, open_store(run), 1)[1])
        with p.writer(SCHEMAS["rollouts"], "rollout", allow_extra=True) as w:
            w.write_rows([])
            w.extra = extra
        return w.manifest.fingerprint

    assert rewrite_rollouts({"engine": {"mode": "cold", "generate_s": 81.2}}) == before
    assert rewrite_rollouts({"engine": {"mode": "resident", "generate_s": 3.5}}) == before
    assert set(states_of(run).values()) == {"complete"}
    assert rewrite_rollouts({"prompts": 31}) != before
    assert states_of(run)[("verify", 1)] == "stale" and states_of(run)[("train", 2)] == "stale"


def test_a_forced_annotation_with_a_changed_setting_makes_its_dependants_stale(run):
    """The run's annotate setting changed and round 0 was re-annotated under it: what depends on
    the new annotations is stale, what came before is not."""
    changed = load_config("demo", [f"run.root={run.run.run_root}", "run.rounds=3", "eval.bootstrap=10",
                                   "annotate.coverage_cap=0.3"])
    write_stage(changed, "annotate", 0)
    run = changed
    states = states_of(run)
    assert states["annotate", 0] == "complete" and states["verify", 0] == "complete"
    assert states["rollout", 0] == "complete"
    # round 0's train, then every stage of rounds 1 and 2
    stale = sorted(key for key, s in states.items() if s == "stale")
    assert stale == sorted([("train", 0)] + [(s, k) for k in (1, 2)
                                             for s in ("rollout", "verify", "annotate", "train")])
    reasons = {(s, k): st.reason for s, by in stage_states(run).items() for k, st in by.items()}
    assert reasons["rollout", 1] == f"its input {dataset_name('train', 0)} is stale"
    assert reasons["verify", 1] == f"its input {dataset_name('rollout', 1)} is stale"
    by_ckpt = {e.checkpoint: e for e in eval_states(run)}
    assert by_ckpt["initial"].state == "complete"
    assert by_ckpt["round-0001"].state == "stale" and by_ckpt["round-0003"].state == "stale"
    assert "checkpoint's input" in by_ckpt["round-0001"].reason


def test_retraining_round_0_leaves_later_rounds_stale_until_they_rerun(run):
    write_stage(run, "train", 0, content="other weights")  # a forced retrain with a new result
    states = states_of(run)
    assert states["train", 0] == "complete"
    assert states["rollout", 1] == "stale"
    # verify/annotate of round 1 did not change, but they judge rollouts that are stale
    assert states["verify", 1] == "stale" and states["annotate", 1] == "stale"
    assert states["train", 2] == "stale"
    for stage in ("rollout", "verify", "annotate", "train"):  # rerun round 1 (new samples)
        write_stage(run, stage, 1, content="new samples")
    states = states_of(run)
    assert all(states[s, 1] == "complete" for s in ("rollout", "verify", "annotate", "train"))
    assert states["rollout", 2] == "stale"  # round 2 still sampled the old round-1 checkpoint


def test_a_config_change_for_eval_sampling_makes_evaluations_stale(run):
    changed = load_config("demo", [f"run.root={run.run.run_root}", "run.rounds=3", "eval.k=7"])
    assert {e.state for e in eval_states(changed)} == {"stale"}
    assert set(states_of(changed).values()) == {"complete"}  # training stages do not use eval.*


def test_status_reads_the_runs_own_config_no_phantom_round(tmp_path):
    root = tmp_path / "run"
    cfg = load_config("demo", [f"run.root={root}", "run.rounds=1"])
    store = open_store(cfg)
    store.write_text(store.path("config.yaml"), dump_config(cfg))
    write_stage(cfg, "prepare", None)
    for stage in ("rollout", "verify", "annotate", "train"):
        write_stage(cfg, stage, 0)
    # `status demo run.root=...` and `status <run dir>` both see the run's rounds, not demo's 3
    assert load_config("demo").run.rounds > 1
    for seen in (run_config("demo", [f"run.root={root}"]), run_config(str(root))):
        assert seen.run.rounds == 1
        assert set(states_of(seen).values()) == {"complete"}
        assert len(stage_states(seen)["train"]) == 1
    assert open_store(cfg).read("prompts", PROMPTS).num_rows == 0


def test_status_command_prints_stale_rounds_and_evaluations(run):
    write_stage(run, "annotate", 1, content="other spans")
    out = subprocess.run([sys.executable, "-m", "trace_rl.flows.cli", "status", run.run.run_root],
                         check=False, capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": str(ROOT)})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"round 2 rollout: its input {dataset_name('train', 1)} is stale" in text
    assert "evaluations" in text and "initial" in text and "round-0003" in text
    assert "eval round-0003 testbed: its checkpoint's input" in text
