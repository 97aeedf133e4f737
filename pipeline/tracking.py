"""The run's one TensorBoard run, `<run>/tensorboard/train/`: the trainer's per-step scalars
(trainer/metrics.py) and each round's rollout figures, on one global-step axis.

The trainer's writer starts each attempt at a round with TensorBoard's `purge_step` (its first
step), so a forced retrain or a replay replaces what an earlier attempt wrote from that step on,
instead of doubling the curve back; the rollout figures of the rounds it replaced are then
written again (`log_rollout_scalars`).
"""

from __future__ import annotations

from collections.abc import Iterable

from trace_rl.data_schemas import TRAIN_METRICS

from .layout import dataset_name
from .plots_data import rollout_stats
from .store import RunStore

TENSORBOARD_DIR, TENSORBOARD_RUN = "tensorboard", "train"


def log_rollout_scalars(store: RunStore, rounds: Iterable[int]) -> dict[int, dict[str, float]]:
    """`rollout/<figure>` of each round (reward mean and std, accuracy, zero-variance group
    fraction, truncation rate) at the round's first optimizer step; rounds without verdicts or
    train metrics are skipped. Returns what was written, by round."""
    from torch.utils.tensorboard import SummaryWriter

    written: dict[int, dict[str, float]] = {}
    for k in rounds:
        stats = rollout_stats(store, k)
        train = dataset_name("train", k)
        if stats is None or store.manifest(train) is None:
            continue
        steps = store.read(train, TRAIN_METRICS, allow_extra=True).column("step").to_pylist()
        if steps:
            written[k] = {**stats, "step": min(steps)}
    if written:
        with SummaryWriter(str(store.local_path(TENSORBOARD_DIR, TENSORBOARD_RUN))) as writer:
            for stats in written.values():
                for name, value in stats.items():
                    if name != "step":
                        writer.add_scalar(f"rollout/{name}", value, global_step=int(stats["step"]))
    return written
