"""Per-step metrics reach the trackers named in train.report_to, through accelerate's trackers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from trace_rl.trainer import metrics
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.metrics import Logger


def test_tensorboard_tracker_writes_the_logged_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = Logger(SimpleNamespace(is_main_process=True), str(tmp_path), ["tensorboard"], "round-0000")
    for step, lam in enumerate([0.5, 0.25, 0.0]):
        logger.log({"step": step, "kl_weight": lam, "route": "key", "flag": True}, step)
    logger.close()
    (events,) = {p.parent for p in (tmp_path / "tensorboard").rglob("events.out.tfevents*")}
    acc = EventAccumulator(str(events))
    acc.Reload()
    # grouped tags: the per-step scalars under train/
    assert [(e.step, e.value) for e in acc.Scalars("train/kl_weight")] == [(0, 0.5), (1, 0.25), (2, 0.0)]
    assert set(acc.Tags()["scalars"]) == {"train/kl_weight"}  # no flag, no step, no route


def test_only_the_main_process_reports(tmp_path):
    logger = Logger(SimpleNamespace(is_main_process=False), str(tmp_path), ["tensorboard"], "r")
    logger.log({"kl_weight": 0.5}, 0)
    logger.close()
    assert not list(tmp_path.rglob("events.out.tfevents*"))


def test_a_tracker_that_is_not_installed_is_refused_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "missing_tracker_packages", lambda names: [n for n in names if n == "wandb"])
    with pytest.raises(RuntimeError, match="pip install wandb"):
        Logger(SimpleNamespace(is_main_process=True), str(tmp_path), ["tensorboard", "wandb"], "r")


def test_report_to_names_known_trackers_and_tensorboard_false_drops_it():
    assert TrainConfig().trackers == ["tensorboard"]
    assert TrainConfig(report_to=["tensorboard", "mlflow"], tensorboard=False).trackers == ["mlflow"]
    with pytest.raises(ValidationError, match="report_to"):
        TrainConfig(report_to=["neptune"])


def test_event_files_of_one_run_are_read_in_the_order_they_were_written(tmp_path):
    """TensorBoard orders a run's event files by name: creation second, host, pid, then a
    per-process counter compared as text. Files made in one second by writers 9 and 10 sort
    10 first, and the reader then drops the later steps as a restart (seen in CI: a round's
    rollout figures vanished). Each writer of the run starts in a second of its own."""
    import time

    from torch.utils.tensorboard import SummaryWriter
    from trace_rl.pipeline.tracking import start_in_a_new_second

    # the mechanism: within one second, name order is not creation order
    now = int(time.time())
    names = [f"events.out.tfevents.{now:010d}.host.1.{uid}" for uid in (9, 10)]
    assert sorted(names) != names

    log_dir = tmp_path / "train"
    for step in range(4):
        start_in_a_new_second(log_dir)
        with SummaryWriter(str(log_dir)) as writer:
            writer.add_scalar("x", float(step), global_step=step)
    files = sorted(p.name for p in log_dir.glob("events.out.tfevents*"))
    seconds = [int(name.split(".")[3]) for name in files]
    assert len(files) == 4 and seconds == sorted(set(seconds)), files  # a second each, in order

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("x")] == [0, 1, 2, 3]


def test_eval_scalars_per_policy_written_once_per_summary(tmp_path):
    """`eval/<benchmark>/avg@k` at step k for policy k (0 = initial), with its CI bounds; a summary
    already written is not written again, a re-evaluation is; a model outside the run is left out."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from trace_rl.pipeline.store import RunStore
    from trace_rl.pipeline.tracking import log_eval_scalars

    store = RunStore(str(tmp_path / "run"))

    def summary(ckpt: str, avg: float) -> None:
        body = {"checkpoint": ckpt, "benchmarks": {"testbed": {"avg@k": avg, "ci95": [avg - 0.1, avg + 0.1]}},
                "five_column_mean": {"value": None}}
        store.write_text(store.path("eval", ckpt, "summary.json"), json.dumps(body))

    summary("initial", 0.2)
    summary("round-0002", 0.5)
    summary("some-model-dir", 0.9)
    assert set(log_eval_scalars(store)) == {"initial", "round-0002"}
    assert log_eval_scalars(store) == {}  # nothing new
    summary("round-0002", 0.6)  # re-evaluated
    assert log_eval_scalars(store) == {"round-0002": {"eval/testbed/avg@k": 0.6, "eval/testbed/ci_low": 0.5,
                                                      "eval/testbed/ci_high": 0.7}}
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "eval"))
    acc.Reload()
    got = [(e.step, round(e.value, 6)) for e in acc.Scalars("eval/testbed/avg@k")]
    assert got[:2] == [(0, 0.2), (2, 0.5)] and got[-1] == (2, 0.6)
    assert {t.split("/")[0] for t in acc.Tags()["scalars"]} == {"eval"}



FAILING_ROUND = """
import sys
from pathlib import Path
from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint
from trace_rl.trainer import round as round_mod
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.watchdog import run_then_exit

tmp, calls, original = Path(sys.argv[1]), [], round_mod._apply_update
def fail_second(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise RuntimeError("step 1 failed")
    return original(*args, **kwargs)
round_mod._apply_update = fail_second

def main():
    cfg = TrainConfig(method="grpo", mini_batch_size=4, micro_batch_size=4, logprob_chunk=16,
                      report_to=["tensorboard"])
    tables = make_round_tables(make_tokenizer(), n_prompts=2, samples=4)
    round_mod.train_round(cfg, **tables, init_checkpoint=save_tiny_checkpoint(tmp / "i", seed=0),
                          output_checkpoint=str(tmp / "out"), work_dir=str(tmp / "work"),
                          round_index=0, progress=False)
run_then_exit(main)
"""


def test_a_trainer_process_whose_round_fails_keeps_the_steps_it_logged(tmp_path):
    """A trainer process ends by os._exit (watchdog.run_then_exit: no interpreter finalization),
    and its round's second step raises: TensorBoard still holds step 0, and the process exits 1
    with the traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tests = Path(__file__).resolve().parent
    done = subprocess.run([sys.executable, "-c", FAILING_ROUND, str(tmp_path)], cwd=tests,
                          env={**os.environ, "PYTHONPATH": str(tests)},
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 1 and "RuntimeError: step 1 failed" in done.stderr, done.stderr[-2000:]
    (events,) = {p.parent for p in (tmp_path / "work").rglob("events.out.tfevents*")}
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [0]


def test_a_round_whose_step_fails_ends_its_trackers_runs(tmp_path, monkeypatch):
    """wandb and mlflow end a run from their own atexit hooks, which a trainer process (ended by
    os._exit) never runs: the round ends its trackers itself, when a step fails too."""
    from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint
    from trace_rl.trainer import round as round_mod

    class Recording:
        def __init__(self):
            self.steps, self.finished = [], False

        def start(self):
            pass

        def log(self, values, step):
            self.steps.append(step)

        def finish(self):
            self.finished = True

    tracker = Recording()
    monkeypatch.setattr(metrics, "_make_tracker", lambda *args, **kwargs: tracker)
    calls, original = [], round_mod._apply_update

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("step 1 failed")
        return original(*args, **kwargs)

    monkeypatch.setattr(round_mod, "_apply_update", fail_second)
    cfg = TrainConfig(method="grpo", mini_batch_size=4, micro_batch_size=4, logprob_chunk=16,
                      report_to=["wandb"])
    monkeypatch.setattr(metrics, "missing_tracker_packages", lambda names: [])
    with pytest.raises(RuntimeError, match="step 1 failed"):
        round_mod.train_round(cfg, **make_round_tables(make_tokenizer(), n_prompts=2, samples=4),
                              init_checkpoint=save_tiny_checkpoint(tmp_path / "i", seed=0),
                              output_checkpoint=str(tmp_path / "out"), work_dir=str(tmp_path / "work"),
                              round_index=0, progress=False)
    assert tracker.steps == [0] and tracker.finished
