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
    assert [(e.step, e.value) for e in acc.Scalars("kl_weight")] == [(0, 0.5), (1, 0.25), (2, 0.0)]
    assert "flag" not in acc.Tags()["scalars"] and "step" not in acc.Tags()["scalars"]


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
