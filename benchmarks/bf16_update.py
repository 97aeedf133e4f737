"""Do small updates land under a bf16 config? The fraction of weights one real `train_round` moves.

    python benchmarks/bf16_update.py [--lr 1e-6] [--steps 10] [--hidden 64]

Trains a tiny random Qwen3 (tests/tiny.py) for `--steps` optimizer steps at `--lr`, once with
`train.dtype: float32` and once with `train.dtype: bfloat16`, through the trainer's own path, and
prints, per run, the fraction of weight entries that differ from the initial weights (the weights
the optimizer steps: the checkpoint's, or the float32 master copy in its trainer state), plus how far the bf16 run's update is from the float32 run's. Stepping
bf16 parameters directly (the trainer before fp32 master weights) loses every update smaller than
half a bf16 ulp of the weight, which at lr 1e-6 is most of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests")]


def train(dtype: str, lr: float, steps: int, hidden: int, root: Path):
    import torch
    from safetensors.torch import load_file
    from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint
    from trace_rl.trainer.config import TrainConfig
    from trace_rl.trainer.round import train_round

    init = root / "init"
    if not init.exists():
        save_tiny_checkpoint(init, seed=0, hidden=hidden)
    tables = make_round_tables(make_tokenizer(), n_prompts=steps, samples=4, seed=1)
    cfg = TrainConfig(method="trace", route={"key_forward": True, "error_reverse": True},
                      mini_batch_size=4, micro_batch_size=4, lr=lr, logprob_chunk=64,
                      dtype=dtype, tensorboard=False, report_to=[], teacher_sync_every=0)
    out = root / f"out-{dtype}"
    rows = train_round(cfg, **tables, init_checkpoint=str(init), output_checkpoint=str(out),
                       work_dir=str(root / f"work-{dtype}"), round_index=0, progress=False)
    before = load_file(str(init / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    state = out / "trainer_state" / "state.pt"
    master = torch.load(state, weights_only=False).get("master") if state.exists() else None
    if master is not None:  # mixed precision: the float32 weights AdamW steps
        after = {k.removeprefix("hf."): v for k, v in master.items()}
    names = [n for n in before if n != "lm_head.weight"]  # tied to the embedding
    moved = sum(int((after[n] != before[n].to(after[n].dtype)).sum()) for n in names)
    total = sum(before[n].numel() for n in names)
    delta = {n: after[n].double() - before[n].double() for n in names}
    disk = load_file(str(out / "model.safetensors"))
    return {"steps": len(rows), "stepped_dtype": str(after[names[0]].dtype).removeprefix("torch."),
            "checkpoint_dtype": str(disk[names[0]].dtype).removeprefix("torch."),
            "moved_frac": moved / total}, delta, torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        f32, d32, torch = train("float32", args.lr, args.steps, args.hidden, root)
        b16, d16, _ = train("bfloat16", args.lr, args.steps, args.hidden, root)
    u32 = torch.cat([d.flatten() for d in d32.values()])
    u16 = torch.cat([d.flatten() for d in d16.values()])
    report = {
        "lr": args.lr, "float32": f32, "bfloat16": b16,
        # the bf16 run's update against the float32 run's
        "update_cosine": float(torch.nn.functional.cosine_similarity(u32, u16, dim=0)),
        "update_rel_err": float((u16 - u32).norm() / u32.norm()),
        "max_abs_weight_diff": float((u16 - u32).abs().max()),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
