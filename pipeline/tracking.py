"""The run's one TensorBoard run, `<run>/tensorboard/train/`: the trainer's per-step scalars
(trainer/metrics.py) and each round's rollout figures, on one global-step axis.

The trainer's writer starts each attempt at a round with TensorBoard's `purge_step` (its first
step), so a forced retrain or a replay replaces what an earlier attempt wrote from that step on,
instead of doubling the curve back; the rollout figures of the rounds it replaced are then
written again (`log_rollout_scalars`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from pathlib import Path

from trace_rl.data_schemas import TRAIN_METRICS

from .layout import dataset_name
from .plots_data import rollout_stats
from .store import RunStore

TENSORBOARD_DIR, TENSORBOARD_RUN = "tensorboard", "train"
_EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d+)\.")


def start_in_a_new_second(log_dir: str | Path) -> None:
    """Wait until the clock is past the second of the newest event file in `log_dir`.

    TensorBoard reads a run's event files in name order. A name starts with the second the file
    was made, then host and pid, and ends with a per-process counter compared as text ("10" sorts
    before "9"). Two files made in one second can therefore be read in the wrong order, and the
    reader then takes the earlier steps for a restart and drops the later ones. Every writer of
    the run's one event stream starts in a second of its own, so name order is write order."""
    seconds = [int(m.group(1)) for f in Path(log_dir).glob("events.out.tfevents.*")
               if (m := _EVENT_FILE.match(f.name))]
    if seconds:
        delay = max(seconds) + 1 - time.time()
        if delay > 0:
            time.sleep(delay)


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
        log_dir = store.local_path(TENSORBOARD_DIR, TENSORBOARD_RUN)
        start_in_a_new_second(log_dir)
        with SummaryWriter(str(log_dir)) as writer:
            for stats in written.values():
                for name, value in stats.items():
                    if name != "step":
                        writer.add_scalar(f"rollout/{name}", value, global_step=int(stats["step"]))
    return written
