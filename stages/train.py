"""Stage `train`: the routed-loss update of round k, from its three Parquet datasets.

Writes `checkpoints/round-(k+1)/` (HF save_pretrained + trainer_state) and then
`round-k/train/metrics.parquet` with its manifest, which is what marks the checkpoint complete.
A killed run resumes inside the round from the trainer's own progress saves in
`scratch/round-k/train/`.
"""

from __future__ import annotations

import logging

from trace_rl.data_schemas import ANNOTATIONS, PROMPTS, ROLLOUTS, TRAIN_METRICS, VERDICTS, rows_to_table
from trace_rl.data_schemas import extend_metrics
from trace_rl.stages.config import TraceConfig
from trace_rl.pipeline.fingerprint import fingerprint
from trace_rl.pipeline.store import Manifest, round_dir

from .common import checkpoint_for_round, dataset_name, open_store, plan

log = logging.getLogger("trace_rl.stages.train")


def checkpoint_dir(store, round_index: int):
    """Where the train stage of round k writes the policy of round k+1."""
    return store.local_path("checkpoints", round_dir(round_index + 1))


def _launch_accelerate(cfg, p, names, init_dir, out_dir, work_dir, round_index) -> list[dict]:
    """Train under `accelerate launch` (DDP / FSDP / DeepSpeed from configs/accelerate/), reading
    the same Parquet datasets; the main process writes the metrics rows as JSON lines."""
    import json
    import subprocess
    import sys

    from trace_rl.data_schemas.errors import StageError

    args = {"config": cfg.train.model_dump(mode="json"), "init_checkpoint": init_dir,
            "output_checkpoint": str(out_dir), "work_dir": str(work_dir), "round_index": round_index,
            "prompts": p.store.path("prompts"), "rollouts": p.store.path(names[0]),
            "verdicts": p.store.path(names[1]), "annotations": p.store.path(names[2]),
            "metrics_out": str(work_dir / "metrics.jsonl"), "progress": True}
    args_file = work_dir / "launch_args.json"
    args_file.write_text(json.dumps(args, indent=2))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(cfg.train.num_processes)]
    if cfg.train.accelerate_config:
        cmd += ["--config_file", cfg.train.accelerate_config]
    cmd += ["-m", "trace_rl.trainer.launch", "--args-json", str(args_file)]
    log.info("train round %d: %s", round_index, " ".join(cmd))
    if subprocess.run(cmd).returncode != 0:
        raise StageError(f"accelerate launch of round {round_index}'s training failed; its log is above")
    return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines() if line]


def _drop_progress(work_dir) -> None:
    """The round is committed (manifest written): its resume state is no longer needed."""
    for f in list(work_dir.glob("progress*")) + list(work_dir.glob("old_logprobs-rank*.pt")):
        if f.is_dir():
            import shutil

            shutil.rmtree(f, ignore_errors=True)
        else:
            f.unlink(missing_ok=True)


def run(cfg: TraceConfig, round_index: int | None, *, force: bool = False, progress: bool = True) -> Manifest:
    round_index = 0 if round_index is None else round_index
    names = [dataset_name(s, round_index) for s in ("rollout", "verify", "annotate")]
    init_dir, init_fp = checkpoint_for_round(cfg, open_store(cfg), round_index)
    p = plan(cfg, "train", round_index, {"train": cfg.section("train"), "round": round_index},
             ["prompts", *names], force=force, extra_inputs=init_fp)
    if p.skip:
        return p.existing
    tables = {
        "prompts": p.store.read("prompts", PROMPTS),
        "rollouts": p.store.read(names[0], ROLLOUTS),
        "verdicts": p.store.read(names[1], VERDICTS),
        "annotations": p.store.read(names[2], ANNOTATIONS),
    }
    out_dir = checkpoint_dir(p.store, round_index)
    # Scratch keyed by what the update is made from: a rerun of the same update resumes from its
    # progress saves, while changed inputs (e.g. a forced re-annotation) start clean.
    attempt = fingerprint([p.config_fingerprint, p.inputs])
    work_dir = p.store.local_path("scratch", round_dir(round_index), f"train-{attempt}")
    work_dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.accelerate_config or cfg.train.num_processes > 1:
        metrics = _launch_accelerate(cfg, p, names, init_dir, out_dir, work_dir, round_index)
    else:
        from trace_rl.trainer.round import train_round

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
