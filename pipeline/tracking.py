"""The run's one TensorBoard run, `<run>/tensorboard/train/`, its tags in three groups:
`train/<metric>` per optimizer step (trainer/metrics.py), `rollout/<figure>` of each round at the
round's first step; beside it, `<run>/tensorboard/eval/`, `eval/<benchmark>/avg@k` of each
evaluated policy, whose step is the policy's index k (policy k: the checkpoint that sampled round
k; 0 = the initial model). A run of its own: the trainer's purge_step (below) would otherwise
drop an evaluation logged at a step the next round's training starts from.

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

from .layout import EVAL, EVAL_SUMMARY, dataset_name, policy_index
from .plots_data import rollout_stats
from .store import RunStore

TENSORBOARD_DIR, TENSORBOARD_RUN, TENSORBOARD_EVAL_RUN = "tensorboard", "train", "eval"
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


EVAL_LOGGED = ".eval_logged.json"  # {checkpoint: summary sha256} of what log_eval_scalars wrote


def log_eval_scalars(store: RunStore) -> dict[str, dict[str, float]]:
    """`eval/<benchmark>/avg@k` (and its 95% CI bounds, `.../ci_low`, `.../ci_high`) of every
    evaluated policy of the run, at step k, written once per summary (a re-evaluation writes
    its new figures again). Checkpoints outside the run (a model dir) have no k: left out.
    Returns what was written, by checkpoint."""
    import hashlib
    import json

    from torch.utils.tensorboard import SummaryWriter

    log_dir = store.local_path(TENSORBOARD_DIR, TENSORBOARD_EVAL_RUN)
    record = log_dir / EVAL_LOGGED
    done = json.loads(record.read_text()) if record.is_file() else {}
    todo: dict[str, tuple[int, dict, str]] = {}
    for path in sorted(store.fs.glob(store.path(EVAL, "*", EVAL_SUMMARY))):
        ckpt = path.rstrip("/").split("/")[-2]
        k = policy_index(ckpt)
        text = store.read_text(path)
        digest = hashlib.sha256(text.encode()).hexdigest()
        if k is not None and done.get(ckpt) != digest:
            todo[ckpt] = (k, json.loads(text), digest)
    written: dict[str, dict[str, float]] = {}
    if not todo:
        return written
    start_in_a_new_second(log_dir)
    with SummaryWriter(str(log_dir)) as writer:  # makes log_dir
        for ckpt, (k, summary, digest) in todo.items():
            figures = _eval_figures(summary)
            for tag, value in figures.items():
                writer.add_scalar(tag, value, global_step=k)
            written[ckpt], done[ckpt] = figures, digest
    record.write_text(json.dumps(done, sort_keys=True))
    return written


def _eval_figures(summary: dict) -> dict[str, float]:
    out = {}
    for bench, e in summary.get("benchmarks", {}).items():
        out[f"eval/{bench}/avg@k"] = float(e["avg@k"])
        if e.get("ci95"):
            out[f"eval/{bench}/ci_low"], out[f"eval/{bench}/ci_high"] = map(float, e["ci95"])
    five = summary.get("five_column_mean") or {}
    if five.get("value") is not None:
        out["eval/5-column mean/avg@k"] = float(five["value"])
    return out
