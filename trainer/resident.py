"""A run-scoped trainer: policy, optimizer and scheduler kept in memory from one round to the next.

The cold path of `train_round` loads checkpoint k (weights and, when present, the full trainer
state) and ends by writing checkpoint k+1. A `Resident` lets consecutive rounds in one process
skip the load: after round k it holds the prepared model, optimizer and scheduler, labelled with
the checkpoint they equal, and round k+1 takes them when its start checkpoint is that one.
Checkpoints then need only weights (for the rollout engine); the full trainer state goes to disk
every `train.state_every` rounds, at the run's last round and when the session closes, and a cold
start from a weights-only checkpoint replays the rounds since the last full state
(stages/train.py). Persistence is an optimisation: whatever the resident cannot vouch for (another
checkpoint, another config, a rewritten round) is dropped and the round starts cold.

On an accelerator the resident is moved to CPU memory while the rollout engine holds the device
(`offload`), and back when the next round takes it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from trace_rl.trainer.checkpoint import write_full_state

log = logging.getLogger("trace_rl.trainer.resident")


def _move_optimizer_state(optimizer: Any, device: torch.device | str) -> None:
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                state[key] = value.to(device, non_blocking=True)


@dataclass
class Held:
    """What one round hands the next: the prepared model and optimizer, not yet on disk."""

    tokenizer: Any
    wrapped: torch.nn.Module  # as returned by accelerator.prepare
    unwrapped: torch.nn.Module  # the LeanCausalLM inside it
    optimizer: Any
    scheduler: Any
    global_step: int
    checkpoint: str  # the checkpoint directory these weights equal
    round_index: int  # the round whose update produced them
    config: str  # the TrainConfig (JSON) they were trained under
    accelerator: Any  # the process group they were prepared in
    state_on_disk: bool  # whether `checkpoint` also holds this optimizer state
    start: str | None = None  # the checkpoint the round started from (replays are checked by it)


class Resident:
    """Holds at most one `Held`; `tag` is set by the caller (the train stage's manifest
    fingerprint) to tie it to the round that wrote `checkpoint`."""

    def __init__(self) -> None:
        self.held: Held | None = None
        self.tag: str | None = None
        self.rounds_reused = 0

    def mismatch(self, checkpoint: str, config_json: str, accelerator: Any = None) -> str | None:
        """Why the held state is not the state at `checkpoint` under `config_json` (None: it is,
        or nothing is held)."""
        held = self.held
        if held is None:
            return None
        if held.checkpoint != str(checkpoint):
            return f"it holds {held.checkpoint}, not {checkpoint}"
        if held.config != config_json:
            return "the train config changed"
        if accelerator is not None and held.accelerator is not accelerator:
            return "another accelerator (process group)"
        return None

    def take(self, checkpoint: str, config_json: str, accelerator: Any) -> Held | None:
        """The held state if it is the state at `checkpoint` under `config_json`, else None (and
        whatever was held is dropped, with a warning). Taking unregisters it: until the round
        that took it hands its end state back (`keep`), nothing is held, so a round that raises
        leaves nothing behind for the session's exit to write into any checkpoint."""
        held = self.held
        if held is None:
            return None
        reason = self.mismatch(checkpoint, config_json, accelerator)
        if reason:
            log.warning("resident trainer state rejected (%s): dropped; the round starts from "
                        "%s on disk", reason, checkpoint)
            self.clear()
            return None
        self.held, self.tag = None, None
        self._to(held, held.accelerator.device)
        self.rounds_reused += 1
        return held

    def keep(self, held: Held) -> None:
        """Hold a round's end state; it counts as committed once the caller sets `tag`."""
        if self.held is not None and self.held is not held:
            release(self.held.accelerator, self.held.wrapped, self.held.optimizer)
        self.held, self.tag = held, None

    def clear(self) -> None:
        if self.held is not None:
            release(self.held.accelerator, self.held.wrapped, self.held.optimizer)
        self.held, self.tag = None, None

    def offload(self) -> str:
        """Move the held state to CPU memory (frees an accelerator for the rollout engine)."""
        held = self.held
        if held is None:
            return "nothing held"
        if torch.device(held.accelerator.device).type == "cpu":
            return "held in CPU memory already"
        self._to(held, "cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the cached blocks back for the engine to use
        return "moved to CPU memory"

    @staticmethod
    def _to(held: Held, device) -> None:
        held.unwrapped.to(device)
        _move_optimizer_state(held.optimizer, device)

    def save_state(self) -> str | None:
        """Write the held optimizer state into its checkpoint, if it is not there yet."""
        held = self.held
        if held is None or held.state_on_disk:
            return None
        write_full_state(held.accelerator, held.unwrapped, held.optimizer, held.scheduler,
                         held.checkpoint, held.global_step, held.round_index)
        held.state_on_disk = True
        return held.checkpoint


def release(accelerator: Any, *objects: Any) -> None:
    """Drop prepared models / optimizers from the accelerator's registries (accelerate keeps a
    reference to everything `prepare` returned, so a round's model would otherwise outlive it)."""
    for registry in ("_models", "_optimizers", "_schedulers"):
        items = getattr(accelerator, registry, None)
        if isinstance(items, list):
            items[:] = [x for x in items if not any(x is o for o in objects)]


def config_json(cfg: Any) -> str:
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)


_ACTIVE: Resident | None = None


def active_resident() -> Resident | None:
    """The resident of the enclosing `trainer_session`, if any."""
    return _ACTIVE


@contextmanager
def trainer_session() -> Iterator[Resident]:
    """Keep the trainer resident across the rounds run inside the block. On exit, however it
    ends, the optimizer state of the last COMMITTED round (the train stage sets `tag` once its
    manifest is written) goes into that round's checkpoint, so a later cold start has no rounds
    to replay. A round that raised, or whose stage did not commit, writes nothing: its start
    checkpoint stays byte-identical and the rerun replays what it needs."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("a trainer session is already active in this process")
    resident = Resident()
    _ACTIVE = resident
    try:
        yield resident
    finally:
        _ACTIVE = None
        try:
            if resident.held is not None and resident.tag is None:
                log.warning("trainer session closed with an uncommitted round's state in memory "
                            "(%s): not written", resident.held.checkpoint)
            else:
                path = resident.save_state()
                if path:
                    log.info("trainer state written to %s", path)
        finally:
            resident.clear()
