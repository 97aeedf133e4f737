"""Entry point for `accelerate launch`: one training round, its inputs read from the run store.

    accelerate launch --config_file configs/accelerate/ddp.yaml -m trace_rl.trainer.launch --args-json A.json

A.json: {"config": {...TrainConfig fields...}, "run_root": the run directory, "round_index": k,
"inputs": {dataset name: manifest fingerprint} as the train stage recorded them,
"init_checkpoint": path, "output_checkpoint": path, "work_dir": path,
"metrics_out": path | null (JSON lines, main process), "progress": bool,
"save_state": bool (write the full trainer state with the checkpoint; default true),
"replay": [{"round_index", "inputs", "init_checkpoint", "output_checkpoint", "work_dir"}, ...]
(earlier rounds retrained in memory first, when the start checkpoint holds weights only; each is
checked on every process against its checkpoint, and the max |Δ| goes to replay.json beside
metrics_out), "nonce": str, "parent_pid": int, "parent_id": str (set by the train stage: see
below)}.

A launch belongs to the flow that made it, like the worker group: with "parent_pid" every process
runs the group's watchdog (it ends within a second of the flow's or the launcher's death, mid-round
too, so a SIGKILLed flow leaves no launch writing into the run), and the main process's last act is
`answer.json` beside metrics_out, written whole and carrying "nonce": the stage takes only an
answer with its own nonce, never one an orphaned launch of an earlier flow wrote.

trainer/worker_group.py runs the same `run_round` for one round after another in a group launched
once per flow, with the prepared model and optimizer kept between rounds.

Every process reads the round's datasets through the run store, as the single-process stage does:
only the parts a manifest lists, checked against the schemas, and only if each manifest is still
the one the stage planned with (a dataset rewritten in between is refused, not trained on).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pyarrow as pa
from trace_rl.data_schemas import ANNOTATIONS, PROMPTS, ROLLOUTS, VERDICTS
from trace_rl.data_schemas.errors import StageError
from trace_rl.pipeline.layout import dataset_name
from trace_rl.pipeline.progress_lines import lines_to_stderr
from trace_rl.pipeline.store import RunStore
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.watchdog import (end_if_orphaned, leave_group, make_accelerator, run_then_exit, watch_flow,
                                      write_json)

ANSWER = "answer.json"  # the launch's answer to the stage, beside metrics_out

# train_round's keyword -> (the stage that writes it, its contract)
ROUND_INPUTS = {"prompts": ("prepare", PROMPTS), "rollouts": ("rollout", ROLLOUTS),
                "verdicts": ("verify", VERDICTS), "annotations": ("annotate", ANNOTATIONS)}


def round_input_names(round_index: int) -> dict[str, str]:
    """{train_round keyword: dataset name} of the datasets round k's update is made from."""
    return {key: dataset_name(stage, round_index) for key, (stage, _) in ROUND_INPUTS.items()}


def read_round_inputs(store: RunStore, round_index: int,
                      expected: dict[str, str] | None = None) -> dict[str, pa.Table]:
    """The four tables of round k's update, read through the store (manifest + schema).

    With `expected` ({dataset name: fingerprint}), a dataset whose manifest is no longer that
    one raises: it was rewritten after the stage decided what to train on.
    """
    tables = {}
    for key, name in round_input_names(round_index).items():
        if expected is not None:
            m = store.manifest(name)
            if m is None or m.fingerprint != expected.get(name):
                raise StageError(
                    f"{store.path(name)} changed after the train stage of round {round_index} "
                    "started (another process rewrote it?); rerun the train stage"
                )
        tables[key] = store.read(name, ROUND_INPUTS[key][1])
    return tables


def run_round(args: dict, accelerator, resident) -> tuple[list[dict], float]:
    """The replay plan, then the round, under `accelerator` with `resident` (on every process).
    Returns the round's metrics rows and the max |Δ| of the replayed weights (0.0: no replay)."""
    import shutil

    from trace_rl.trainer.round import train_round
    from trace_rl.trainer.round_io import check_replayed

    cfg = TrainConfig.model_validate(args.get("config", {}))
    store = RunStore(args["run_root"])
    worst = 0.0
    for step in args.get("replay", []):
        tables = read_round_inputs(store, step["round_index"], step["inputs"])
        train_round(cfg, **tables, init_checkpoint=step["init_checkpoint"],
                    output_checkpoint=step["output_checkpoint"], work_dir=step["work_dir"],
                    round_index=step["round_index"], accelerator=accelerator, progress=False,
                    resident=resident, write_output=False)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(step["work_dir"], ignore_errors=True)
        worst = max(worst, check_replayed(resident))  # on every process; refuses beyond tolerance
    round_index = int(args.get("round_index", 0))
    tables = read_round_inputs(store, round_index, args.get("inputs"))
    rows = train_round(
        cfg, **tables, init_checkpoint=args["init_checkpoint"],
        output_checkpoint=args["output_checkpoint"], work_dir=args["work_dir"],
        round_index=round_index, accelerator=accelerator, progress=bool(args.get("progress", False)),
        resident=resident, save_state=bool(args.get("save_state", True)),
    )
    return rows, worst


def run_from_args(args: dict) -> list[dict]:
    """One round in a fresh launch (nothing held before it; what it leaves is dropped)."""
    from trace_rl.trainer.resident import Resident

    # the group's Accelerator: every collective has train.collective_timeout_s as its deadline
    timeout_s = TrainConfig.model_validate(args.get("config", {})).collective_timeout_s
    accelerator = make_accelerator(timeout_s)
    rows, worst = run_round(args, accelerator, Resident())
    out = args.get("metrics_out")
    if out and accelerator.is_main_process:
        if args.get("parent_pid") is not None:  # launched by a flow: answer it only while it runs
            end_if_orphaned(int(args["parent_pid"]), args.get("parent_id") or None, os.getppid(), "the round")
        Path(out).write_text("".join(json.dumps(row) + "\n" for row in rows))
        if args.get("replay"):
            Path(out).with_name("replay.json").write_text(json.dumps({"max_abs_delta": worst}))
        write_json(Path(out).with_name(ANSWER), {"nonce": args.get("nonce"), "rows": rows,
                                                 "replay_max_abs_delta": worst if args.get("replay") else None})
    leave_group(accelerator)
    return rows


def belong_to_flow(args: dict) -> None:
    """With "parent_pid": end this process once the flow that launched it (or the launcher) is
    gone (the worker group's watchdog, in a daemon thread)."""
    import os
    import threading

    if args.get("parent_pid") is None:
        return  # run by hand: nothing to belong to
    threading.Thread(target=watch_flow, args=(int(args["parent_pid"]), args.get("parent_id") or None,
                                         os.getppid()), daemon=True, name="launch-watch").start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one TRACE training round.")
    parser.add_argument("--args-json", required=True, help="JSON file with the round's arguments")
    ns = parser.parse_args(argv)
    args = json.loads(Path(ns.args_json).read_text())
    lines_to_stderr()  # the progress lines, for the stage that launched this to forward
    belong_to_flow(args)
    run_from_args(args)


if __name__ == "__main__":
    run_then_exit(main)
