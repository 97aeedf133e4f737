"""Per-step metric accumulation (additive sums, reduced across processes) and logging."""

from __future__ import annotations

import resource
from collections import defaultdict
from typing import Any

import torch

from trace_rl.pipeline.tracking import TENSORBOARD_DIR, TENSORBOARD_RUN, start_in_a_new_second
from trace_rl.trainer.batch import MicroBatch

# Sums collected over micro-batches and processes, then turned into the per-step row.
_RATIOS = {
    "entropy": ("entropy_sum", "tokens"),
    "response_len_mean": ("tokens", "seqs"),
    "span_token_frac": ("span_tokens", "tokens"),
    "clip_frac": ("clipped", "tokens"),
    "kl/forward": ("kl_forward_sum", "kl_forward_n"),
    "kl/reverse": ("kl_reverse_sum", "kl_reverse_n"),
    "kl/jsd": ("kl_jsd_sum", "kl_jsd_n"),
}


class StepStats:
    """Additive statistics of one optimizer step."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)

    def add_micro(self, mb: MicroBatch, loss_metrics: dict[str, torch.Tensor],
                  entropy_BT: torch.Tensor, kl_BT: torch.Tensor, clipped_BT: torch.Tensor,
                  total_tokens: int) -> None:
        w = mb.weight
        if w == 0:
            return
        # the trained tokens only: rows masked by `train.overlong: mask` count nowhere
        s, mask = self.sums, mb.train_mask_BT
        for key in ("loss", "pg_loss", "kl_loss"):
            s[key] += float(loss_metrics[key])
        s["tokens"] += float(mask.sum())
        s["seqs"] += mask.shape[0] if mb.keep_B is None else float(mb.keep_B.sum())
        s["all_tokens"] += total_tokens
        s["entropy_sum"] += float((entropy_BT * mask).sum())
        s["span_tokens"] += float((mb.span_BT & mask).sum())
        s["clipped"] += float((clipped_BT & mask).sum())
        for direction, index_S, _ in mb.span_dirs:
            kl_flat = kl_BT[mb.mask_BT].detach()  # index_S counts every response token
            s[f"kl_{direction}_sum"] += float(kl_flat[index_S].sum())
            s[f"kl_{direction}_n"] += float(index_S.numel())

    def reduce(self, accelerator: Any) -> dict[str, float]:
        keys = sorted(set(self.sums) | {k for pair in _RATIOS.values() for k in pair}
                      | {"loss", "pg_loss", "kl_loss", "all_tokens"})
        if accelerator is not None and accelerator.num_processes > 1:
            # every process must reduce the same keys in the same order
            keys = sorted(set(keys) | {f"kl_{d}_{x}" for d in ("forward", "reverse", "jsd")
                                       for x in ("sum", "n")})
            vec = torch.tensor([self.sums.get(k, 0.0) for k in keys], dtype=torch.float64,
                               device=accelerator.device)
            vec = accelerator.reduce(vec, reduction="sum")
            return dict(zip(keys, vec.cpu().tolist()))
        return {k: self.sums.get(k, 0.0) for k in keys}


def step_row(sums: dict[str, float], extra: dict[str, Any]) -> dict[str, Any]:
    """The metrics row of one optimizer step (DESIGN.md's train metrics columns first)."""
    row: dict[str, Any] = dict(extra)
    for key in ("loss", "pg_loss", "kl_loss"):
        row[key] = sums.get(key, 0.0)
    for name, (num, den) in _RATIOS.items():
        if name.startswith("kl/") and not sums.get(den):
            continue
        row[name] = sums.get(num, 0.0) / sums[den] if sums.get(den) else 0.0
    return row


def peak_memory_bytes() -> int:
    """CUDA peak allocated bytes when on GPU, else the process's peak RSS."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


TRACKERS = ("tensorboard", "wandb", "mlflow")
_TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def missing_tracker_packages(names: list[str]) -> list[str]:
    """The trackers in `names` whose package is not installed (checked before any work starts)."""
    import importlib.util

    return [n for n in names if importlib.util.find_spec(_TRACKER_PACKAGES[n]) is None]


# TensorBoard: one continuous run per training run, `<run>/tensorboard/train/` (pipeline/tracking.py),
# whatever the round; steps are global, so rounds follow each other on one axis.


TRAIN_GROUP = "train"  # the tag prefix of the per-step scalars


def tensorboard_dir(log_dir: str) -> str:
    """`<run>/tensorboard` for a trainer work dir `<run>/scratch/round-K/train-<attempt>` (the
    stage's layout), else `<log_dir>/tensorboard`."""
    from pathlib import Path

    work = Path(log_dir)
    if len(work.parents) >= 3 and work.parent.parent.name == "scratch":
        return str(work.parents[2] / TENSORBOARD_DIR)
    return str(work / TENSORBOARD_DIR)


def _make_tracker(name: str, log_dir: str, run_name: str, first_step: int = 0) -> Any:
    """One of accelerate's trackers, offline by default: results stay under `log_dir` unless
    the user's own environment (WANDB_MODE, MLFLOW_TRACKING_URI) points elsewhere. TensorBoard
    writes the run's one event stream; `purge_step` drops what an earlier attempt at these
    steps wrote (a forced retrain), so the curve never doubles back."""
    import os

    from accelerate import tracking

    if name == "tensorboard":
        start_in_a_new_second(os.path.join(tensorboard_dir(log_dir), TENSORBOARD_RUN))
        return tracking.TensorBoardTracker(TENSORBOARD_RUN, tensorboard_dir(log_dir), purge_step=first_step)
    if name == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", log_dir)
        return tracking.WandBTracker(run_name, dir=log_dir)
    if name == "mlflow":
        uri = os.environ.get("MLFLOW_TRACKING_URI") or "file:" + os.path.join(os.path.abspath(log_dir), "mlruns")
        return tracking.MLflowTracker(experiment_name="trace-rl", logging_dir=uri, run_name=run_name)
    raise ValueError(f"unknown tracker {name!r}; valid: {list(TRACKERS)}")


class Logger:
    """Per-step metrics to the trackers named in `train.report_to`, through accelerate's tracker
    classes (main process only)."""

    def __init__(self, accelerator: Any, log_dir: str, report_to: list[str], run_name: str):
        self.trackers: list[Any] = []
        self._pending: list[str] = []
        self.log_dir, self.run_name = log_dir, run_name
        if not accelerator.is_main_process:
            return
        missing = missing_tracker_packages(report_to)
        if missing:
            raise RuntimeError(f"train.report_to names {missing}, not installed here: pip install "
                               f"{' '.join(_TRACKER_PACKAGES[m] for m in missing)} (or drop them)")
        self._pending = list(report_to)  # started at the first logged step (TensorBoard's purge)

    def log(self, row: dict[str, Any], step: int) -> None:
        # grouped tags: `train/loss`, `train/kl/forward`, beside `rollout/...` and `eval/...`
        # (pipeline/tracking.py) in the run's one TensorBoard run
        values = {f"{TRAIN_GROUP}/{k}": v for k, v in row.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        for name in self._pending:
            tracker = _make_tracker(name, self.log_dir, self.run_name, first_step=step)
            tracker.start()
            self.trackers.append(tracker)
        self._pending = []
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
