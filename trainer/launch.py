"""Entry point for `accelerate launch`: one training round from Parquet paths.

    accelerate launch --config_file configs/accelerate/ddp.yaml -m trace_rl.trainer.launch --args-json A.json

A.json: {"config": {...TrainConfig fields...}, "prompts": path, "rollouts": path,
"verdicts": path, "annotations": path | null, "init_checkpoint": path, "output_checkpoint": path,
"work_dir": path, "round_index": int, "metrics_out": path | null (JSON lines, main process)}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq

from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.round import train_round


def run_from_args(args: dict) -> list[dict]:
    from accelerate import Accelerator

    cfg = TrainConfig.model_validate(args.get("config", {}))
    read = lambda key: pq.read_table(args[key]) if args.get(key) else None
    accelerator = Accelerator()
    rows = train_round(
        cfg, prompts=read("prompts"), rollouts=read("rollouts"), verdicts=read("verdicts"),
        annotations=read("annotations"), init_checkpoint=args["init_checkpoint"],
        output_checkpoint=args["output_checkpoint"], work_dir=args["work_dir"],
        round_index=int(args.get("round_index", 0)), accelerator=accelerator,
        progress=bool(args.get("progress", False)),
    )
    out = args.get("metrics_out")
    if out and accelerator.is_main_process:
        Path(out).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one TRACE training round.")
    parser.add_argument("--args-json", required=True, help="JSON file with the round's arguments")
    ns = parser.parse_args(argv)
    run_from_args(json.loads(Path(ns.args_json).read_text()))


if __name__ == "__main__":
    main()
