"""Stage `train`: the routed-loss update of round k, from the prompts and round k's rollouts,
verdicts and annotations (read through the run store in this process or in every process of an
`accelerate launch`).

Writes round k+1's start checkpoint, `checkpoints/round-(k+1)/` (HF save_pretrained +
trainer_state), and then `round-k/train/metrics.parquet` with its manifest, which is what marks
the checkpoint complete. A killed run resumes inside the round from the trainer's own progress
saves in `scratch/round-k/train-<attempt>/`.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

from trace_rl.data_schemas import TRAIN_METRICS, extend_metrics, rows_to_table
from trace_rl.data_schemas.errors import StageError
from trace_rl.pipeline.fingerprint import fingerprint
from trace_rl.pipeline.layout import start_checkpoint_dir, train_scratch_dir
from trace_rl.pipeline.store import Manifest
from trace_rl.stages.config import TraceConfig
from trace_rl.trainer.launch import read_round_inputs, round_input_names

from .common import StageDecision, decide, open_store, start_checkpoint

log = logging.getLogger("trace_rl.stages.train")


def _launch_accelerate(cfg: TraceConfig, p: StageDecision, init_dir: str, out_dir, work_dir,
                       round_index: int) -> list[dict]:
    """Train under `accelerate launch` (DDP / FSDP / DeepSpeed from configs/accelerate/); each
    process reads the round's datasets through the run store and checks they are the ones this
    stage recorded as inputs; the main process writes the metrics rows as JSON lines."""
    args = {"config": cfg.train.model_dump(mode="json"), "run_root": p.store.root,
            "round_index": round_index, "inputs": p.inputs, "init_checkpoint": init_dir,
            "output_checkpoint": str(out_dir), "work_dir": str(work_dir),
            "metrics_out": str(work_dir / "metrics.jsonl"), "progress": True}
    args_file = work_dir / "launch_args.json"
    args_file.write_text(json.dumps(args, indent=2))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(cfg.train.num_processes)]
    if cfg.train.accelerate_config:
        cmd += ["--config_file", cfg.train.accelerate_config]
    cmd += ["-m", "trace_rl.trainer.launch", "--args-json", str(args_file)]
    log.info("train round %d: %s", round_index, " ".join(cmd))
    if subprocess.run(cmd, check=False).returncode != 0:
        raise StageError(f"accelerate launch of round {round_index}'s training failed; its log is above")
    return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines() if line]


def _drop_progress(work_dir) -> None:
    """The round is committed (manifest written): its resume state is no longer needed."""
    for f in list(work_dir.glob("progress*")) + list(work_dir.glob("old_logprobs-rank*.pt")):
        if f.is_dir():
            shutil.rmtree(f, ignore_errors=True)
        else:
            f.unlink(missing_ok=True)


def run(cfg: TraceConfig, round_index: int | None, *, force: bool = False, progress: bool = True) -> Manifest:
    round_index = 0 if round_index is None else round_index
    init_dir, init_fp = start_checkpoint(cfg, open_store(cfg), round_index)
    p = decide(cfg, "train", round_index, list(round_input_names(round_index).values()), force=force,
               extra_inputs=init_fp)
    if p.skip:
        return p.existing
    # Round k's update writes the start checkpoint of round k+1.
    out_dir = p.store.local_path(start_checkpoint_dir(round_index + 1))
    # Scratch keyed by what the update is made from: a rerun of the same update resumes from its
    # progress saves, while changed inputs (e.g. a forced re-annotation) start clean.
    attempt = fingerprint([p.config_fingerprint, p.inputs])
    work_dir = p.store.local_path(train_scratch_dir(round_index, attempt))
    work_dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.accelerate_config or cfg.train.num_processes > 1:
        metrics = _launch_accelerate(cfg, p, init_dir, out_dir, work_dir, round_index)
    else:
        from trace_rl.trainer.round import train_round

        tables = read_round_inputs(p.store, round_index, p.inputs)
        metrics = train_round(cfg.train, **tables, init_checkpoint=init_dir, output_checkpoint=str(out_dir),
                              work_dir=str(work_dir), round_index=round_index, progress=progress)
    extras = sorted({k for row in metrics for k in row if k not in TRAIN_METRICS.names})
    schema = extend_metrics(extras)
    table = rows_to_table([{**{k: None for k in extras}, **row} for row in metrics], schema,
                          where=f"{p.name} metrics")
    with p.writer(TRAIN_METRICS, "train", allow_extra=True) as w:
        w.write_table(table, part="metrics.parquet")
        w.extra = {"checkpoint": str(out_dir), "steps": len(metrics)}
    _drop_progress(work_dir)
    if metrics:
        last = metrics[-1]
        log.info("train round %d: %d steps, loss %.4f, kl_weight %.3f -> %s", round_index, len(metrics),
                 last["loss"], last["kl_weight"], out_dir)
    return w.manifest
