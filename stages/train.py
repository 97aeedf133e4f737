"""Stage `train`: the routed-loss update of round k, from the prompts and round k's rollouts,
verdicts and annotations (read through the run store in this process or in every process of an
`accelerate launch`).

Writes round k+1's start checkpoint, `checkpoints/round-(k+1)/` (HF save_pretrained; the full
trainer state in `trainer_state/` only every `train.state_every` rounds and at the run's last
round), and then `round-k/train/metrics.parquet` with its manifest, which is what marks the
checkpoint complete. A killed run resumes inside the round from the trainer's own progress saves
in `scratch/round-k/train-<attempt>/`.

Inside a flow (`trace_training`) the trainer stays resident between rounds
(trainer/resident.py): round k+1 starts from the model and optimizer round k left in memory. A
round that starts cold from a weights-only checkpoint first replays the rounds since the last
full state from their recorded datasets, which gives back exactly the optimizer state the
uninterrupted run had (the replayed weights are checked against the checkpoint on disk).
A flow that trains in several processes keeps one worker group (trainer/worker_group.py) for its
rounds instead of a launch per round: the group holds the model and optimizer on every process
and replays only when it starts cold; if it dies, the round falls back to a launch of its own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from trace_rl.data_schemas import TRAIN_METRICS, extend_metrics, metric_column, rows_to_table
from trace_rl.data_schemas.errors import StageError
from trace_rl.pipeline.fingerprint import fingerprint
from trace_rl.pipeline.integrity import checkpoint_record, pruned_marker
from trace_rl.pipeline.layout import start_checkpoint_dir, train_scratch_dir
from trace_rl.pipeline.progress_lines import run_forwarding
from trace_rl.pipeline.runlock import process_identity
from trace_rl.pipeline.store import Manifest
from trace_rl.stages.config import TraceConfig
from trace_rl.trainer.checkpoint import PROGRESS_FILE, usable_trainer_state
from trace_rl.trainer.launch import ANSWER as LAUNCH_ANSWER
from trace_rl.trainer.launch import read_round_inputs, round_input_names
from trace_rl.trainer.resident import Resident, active_resident, config_json
from trace_rl.trainer.group_handle import GroupDied, active_group, launch_prefix

from .common import StageDecision, decide, open_store, start_checkpoint
from .prune import prune_checkpoints, require_weights

log = logging.getLogger("trace_rl.stages.train")


def _round_args(cfg: TraceConfig, p: StageDecision, init_dir: str, out_dir, work_dir,
                round_index: int, replay: list[dict]) -> dict:
    """What every trainer process needs for round k (trainer/launch.py's A.json)."""
    return {"config": cfg.train.model_dump(mode="json"), "run_root": p.store.root,
            "round_index": round_index, "inputs": p.inputs, "init_checkpoint": init_dir,
            "output_checkpoint": str(out_dir), "work_dir": str(work_dir),
            "metrics_out": str(work_dir / "metrics.jsonl"), "progress": True,
            "save_state": saves_state(cfg, round_index), "replay": replay}


def _launch_accelerate(cfg: TraceConfig, args: dict, work_dir) -> tuple[list[dict], float | None]:
    """Train under `accelerate launch` (DDP / FSDP2 from configs/accelerate/); each
    process reads the round's datasets through the run store and checks they are the ones this
    stage recorded as inputs; the main process writes the metrics rows as JSON lines. Returns
    them and the replay's max |Δ| (None: no replay)."""
    # The launch belongs to this flow (trainer/launch.py): it ends when this process dies, and
    # only an answer with this launch's nonce is taken (never one an orphan of a killed flow wrote).
    nonce = uuid.uuid4().hex[:12]
    args = {**args, "nonce": nonce, "parent_pid": os.getpid(), "parent_id": process_identity(os.getpid())}
    args_file = work_dir / "launch_args.json"
    args_file.write_text(json.dumps(args, indent=2))
    answer_file = work_dir / LAUNCH_ANSWER
    answer_file.unlink(missing_ok=True)
    cmd = [*launch_prefix(cfg.train), "-m", "trace_rl.trainer.launch", "--args-json", str(args_file)]
    log.info("train round %d: %s", args["round_index"], " ".join(cmd))
    # its progress lines (rank 0's) go on into this task's log (pipeline/progress_lines.py)
    if run_forwarding(cmd) != 0:
        raise StageError(f"accelerate launch of round {args['round_index']}'s training failed; its log is above")
    answer = json.loads(answer_file.read_text()) if answer_file.exists() else {}
    if answer.get("nonce") != nonce:
        raise StageError(f"round {args['round_index']}'s launch exited without its answer ({answer_file} "
                         f"carries nonce {answer.get('nonce')!r}, not {nonce}); rerun the train stage")
    return answer["rows"], answer["replay_max_abs_delta"]


def _train_multi(cfg: TraceConfig, args: dict, work_dir, init_fp: dict) -> tuple[list[dict], int, float | None, bool]:
    """Round k in several processes: in the flow's worker group when one is active (it holds
    the previous round's model and optimizer; it replays only when it starts cold), else in a
    launch of its own (falling back to one when the group died). Returns (metrics rows,
    rounds replayed, replay max |Δ|, whether the group ran it)."""
    group = active_group()
    if group is not None and not group.dead:
        try:
            reply = group.train(args["round_index"], args, group.tag in set(init_fp.values()))
            return reply["rows"], reply["replayed_rounds"], reply["replay_max_abs_delta"], True
        except GroupDied as e:
            log.warning("train round %d: %s; the round starts cold in a launch of its own "
                        "(replaying %d round(s))", args["round_index"], e, len(args["replay"]))
    rows, delta = _launch_accelerate(cfg, args, work_dir)
    return rows, len(args["replay"]), delta, False


def _drop_progress(work_dir) -> None:
    """The round is committed (manifest written): its resume state is no longer needed."""
    for f in list(work_dir.glob("progress*")) + list(work_dir.glob("old_logprobs-rank*.pt")):
        if f.is_dir():
            shutil.rmtree(f, ignore_errors=True)
        else:
            f.unlink(missing_ok=True)


def _prune(cfg: TraceConfig, store, round_index: int) -> None:
    """train.keep_checkpoints, once round k's checkpoint is committed and is the run's latest (a
    forced rerun of an earlier round prunes nothing)."""
    later = store.local_path(start_checkpoint_dir(round_index + 2))
    if not (later.exists() or pruned_marker(later).exists()):
        prune_checkpoints(store, round_index + 1, cfg.train.keep_checkpoints)


def saves_state(cfg: TraceConfig, round_index: int) -> bool:
    """Whether round k's checkpoint gets the full trainer state: every `state_every` rounds and
    at the run's last round (other checkpoints hold weights only)."""
    k = round_index + 1
    return k % cfg.train.state_every == 0 or k >= cfg.run.rounds


def _checkpoint_dir(cfg: TraceConfig, store, round_index: int) -> str:
    return start_checkpoint(cfg, store, round_index)[0]


def replay_plan(cfg: TraceConfig, store, round_index: int, work_dir) -> list[dict]:
    """The earlier rounds to retrain (in memory, from their recorded datasets) before round k,
    when its start checkpoint holds weights only: from the last checkpoint with a full trainer
    state (or the initial model) up to round k-1. Empty when nothing needs replaying."""
    if round_index == 0 or (work_dir / PROGRESS_FILE).exists():  # a progress save has it all
        return []
    # a damaged or foreign trainer state counts as none: replayed past, never trained from
    if usable_trainer_state(_checkpoint_dir(cfg, store, round_index)):
        return []
    start = round_index - 1
    while start > 0 and not usable_trainer_state(_checkpoint_dir(cfg, store, start)):
        start -= 1
    plan = []
    for i in range(start, round_index):
        names = round_input_names(i)
        inputs = {}
        for name in names.values():
            m = store.manifest(name)
            if m is None:
                raise StageError(f"round {round_index} starts from a weights-only checkpoint and "
                                 f"its optimizer state must be replayed from round {start}, but "
                                 f"{name} is missing; rerun from round {i}")
            inputs[name] = m.fingerprint
        plan.append({"round_index": i, "inputs": inputs,
                     "init_checkpoint": _checkpoint_dir(cfg, store, i),
                     "output_checkpoint": str(store.local_path(start_checkpoint_dir(i + 1))),
                     "work_dir": str(store.local_path(train_scratch_dir(i, "replay")))})
    return plan


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `n` (train.num_threads) inside the block, restored
    after it; None leaves it alone."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _replay_in_process(cfg: TraceConfig, store, plan: list[dict], resident: Resident,
                       progress: bool) -> float:
    """Replay `plan` into `resident`; returns the max |Δ| of the replayed weights against their
    checkpoints (check_replayed refuses beyond its tolerance)."""
    from trace_rl.trainer.round import train_round
    from trace_rl.trainer.round_io import check_replayed

    worst = 0.0
    for step in plan:
        i = step["round_index"]
        log.info("train: replaying round %d from its datasets (checkpoint %s holds weights only)",
                 i, step["output_checkpoint"])
        tables = read_round_inputs(store, i, step["inputs"])
        train_round(cfg.train, **tables, init_checkpoint=step["init_checkpoint"],
                    output_checkpoint=step["output_checkpoint"], work_dir=step["work_dir"],
                    round_index=i, progress=progress, resident=resident, write_output=False)
        shutil.rmtree(step["work_dir"], ignore_errors=True)
        if not any(Path(step["output_checkpoint"]).glob("*.safetensors")):
            raise StageError(f"replaying round {i}: {step['output_checkpoint']} holds no weights to "
                             f"compare the replay against; recreate it with `trace-rl stage train "
                             f"CONFIG --round {i} --force`")
        worst = max(worst, check_replayed(resident))
    return worst


def run(cfg: TraceConfig, round_index: int | None, *, force: bool = False, progress: bool = True) -> Manifest:
    round_index = 0 if round_index is None else round_index
    init_dir, init_fp = start_checkpoint(cfg, open_store(cfg), round_index)
    p = decide(cfg, "train", round_index, list(round_input_names(round_index).values()), force=force,
               extra_inputs=init_fp)
    if p.skip:
        return p.existing
    require_weights(init_dir)
    # Round k's update writes the start checkpoint of round k+1.
    out_dir = p.store.local_path(start_checkpoint_dir(round_index + 1))
    # Scratch keyed by what the update is made from: a rerun of the same update resumes from its
    # progress saves, while changed inputs (e.g. a forced re-annotation) start clean.
    attempt = fingerprint([p.config_fingerprint, p.inputs])
    work_dir = p.store.local_path(train_scratch_dir(round_index, attempt))
    work_dir.mkdir(parents=True, exist_ok=True)
    session = active_resident()
    resident = session if session is not None else Resident()
    if resident.held is not None and resident.tag not in set(init_fp.values()):
        resident.clear()  # it holds another round's state (or one whose stage did not finish)
    reason = resident.mismatch(init_dir, config_json(cfg.train))
    if reason:  # decided here, not inside the round, so that the replay below can stand in
        log.warning("train round %d: the resident trainer state is rejected (%s); the round "
                    "starts from disk", round_index, reason)
        resident.clear()
    replay = [] if resident.held is not None else replay_plan(cfg, p.store, round_index, work_dir)
    in_group = False
    if cfg.train.accelerate_config or cfg.train.num_processes > 1:
        args = _round_args(cfg, p, init_dir, out_dir, work_dir, round_index, replay)
        metrics, replayed, replay_delta, in_group = _train_multi(cfg, args, work_dir, init_fp)
    else:
        from trace_rl.trainer.round import train_round

        with torch_threads(cfg.train.num_threads):
            replay_delta = _replay_in_process(cfg, p.store, replay, resident, progress) if replay else None
            replayed = len(replay)
            tables = read_round_inputs(p.store, round_index, p.inputs)
            metrics = train_round(cfg.train, **tables, init_checkpoint=init_dir,
                                  output_checkpoint=str(out_dir), work_dir=str(work_dir),
                                  round_index=round_index, progress=progress, resident=resident,
                                  save_state=saves_state(cfg, round_index))
    extras = sorted({k for row in metrics for k in row if k not in TRAIN_METRICS.names})
    schema = extend_metrics(extras)
    # the trainer's `kl/forward` is the column `kl_forward` (SQL-safe; data_schemas.metric_column)
    table = rows_to_table([{metric_column(k): v for k, v in {**{k: None for k in extras}, **row}.items()}
                           for row in metrics], schema, where=f"{p.name} metrics")
    with p.writer(TRAIN_METRICS, "train", allow_extra=True) as w:
        w.write_table(table, part="metrics.parquet")
        w.extra = {"checkpoint": str(out_dir), "steps": len(metrics),
                   "trainer_state": saves_state(cfg, round_index), "replayed_rounds": replayed,
                   # max |Δ| of the replayed weights against their checkpoints (None: no replay)
                   "replay_max_abs_delta": replay_delta,
                   # the checkpoint's manifest: what `status` and the next round verify
                   "checkpoint_files": checkpoint_record(p.store, start_checkpoint_dir(round_index + 1))}
    _drop_progress(work_dir)
    _prune(cfg, p.store, round_index)
    if "tensorboard" in cfg.train.trackers:  # the rounds this call (re)wrote in the TensorBoard run
        from trace_rl.pipeline.tracking import log_rollout_scalars

        log_rollout_scalars(p.store, range(round_index - replayed, round_index + 1))
    if in_group:
        active_group().tag = w.manifest.fingerprint  # the group's state is committed
    elif session is not None and resident.held is not None:
        resident.tag = w.manifest.fingerprint  # round k+1 may start from what is in memory
    if metrics:
        last = metrics[-1]
        # the last step's figures, named so (the flow's summary line gives the step means)
        log.info("train round %d: %d steps -> %s; last step: loss %.4f, λ %.3f", round_index,
                 len(metrics), out_dir, last["loss"], last["kl_weight"])
    return w.manifest
