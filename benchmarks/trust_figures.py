"""Issue 26's trainer figures on a tiny model (CPU, about a minute): what an adversary's run gets.

    python benchmarks/trust_figures.py

1. Overlong masking: the gradient norm of one step on 16 rollouts with 4 cut by the token limit
   (`train.overlong: mask`), divided by the gradient norm of the same step on the 12 others alone
   (1.0 when the cut rollouts leave the loss's denominator; kept/all tokens when they do not).
2. Replay check at lr 1e-6: round 0 replayed on the rollouts it trained on, and on other rollouts
   (same prompt and rollout ids, other tokens); accepted or refused, with the checker's message.
3. Trainer state of checkpoint 2 (two rounds, two optimizer steps each) truncated, with 64
   flipped bytes, or replaced by checkpoint 1's: what round 2 does with it (the steps it runs, or
   the refusal).

To measure an older tree, put a `trace_rl` package made of its folders first on PYTHONPATH and
pass `--tests DIR` (that tree's tests/, for its tiny-model helpers).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}{'…' if len(text) > 160 else ''}"


def overlong_ratio(work: Path) -> float:
    import pyarrow as pa
    import torch
    from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint
    from trace_rl.trainer import round as round_mod
    from trace_rl.trainer.config import TrainConfig

    t = make_round_tables(make_tokenizer(), n_prompts=4, samples=4)
    cut_ids = {"r0-1", "r1-0", "r2-2", "r3-3"}
    rows = t["rollouts"].to_pylist()
    for r in rows:
        r["finish_reason"] = "length" if r["rollout_id"] in cut_ids else "stop"
    schema = t["rollouts"].schema
    variants = {"cut": pa.Table.from_pylist(rows, schema=schema),
                "kept": pa.Table.from_pylist([r for r in rows if r["rollout_id"] not in cut_ids],
                                             schema=schema)}
    init = save_tiny_checkpoint(work / "init", seed=0)
    norms = {}
    for tag, rollouts in variants.items():
        grads: dict = {}
        original = round_mod._apply_update

        def capture(r, optimizer, scheduler, _grads=grads, _original=original, **kw):
            _grads.update({k: p.grad.clone() for k, p in r.unwrapped.named_parameters()
                           if p.grad is not None})
            return _original(r, optimizer, scheduler, **kw)

        n = rollouts.num_rows
        cfg = TrainConfig(method="grpo", mini_batch_size=n, micro_batch_size=n, lr=1e-3,
                          logprob_chunk=16, tensorboard=False, report_to=[], overlong="mask")
        round_mod._apply_update = capture
        try:
            round_mod.train_round(cfg, **{**t, "rollouts": rollouts}, init_checkpoint=str(init),
                                  output_checkpoint=str(work / f"out-{tag}"),
                                  work_dir=str(work / f"w-{tag}"), round_index=0, progress=False,
                                  write_output=False)
        finally:
            round_mod._apply_update = original
        norms[tag] = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
    return norms["cut"] / norms["kept"]


def replay_decisions(work: Path) -> dict[str, str]:
    from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint
    from trace_rl.trainer.config import TrainConfig
    from trace_rl.trainer.resident import Resident
    from trace_rl.trainer.round import train_round
    from trace_rl.trainer.round_io import check_replayed

    tok = make_tokenizer()
    tables = {"same": make_round_tables(tok, n_prompts=2, samples=4, seed=1),
              "other": make_round_tables(tok, n_prompts=2, samples=4, seed=7)}
    init = save_tiny_checkpoint(work / "init", seed=0)
    cfg = TrainConfig(method="grpo", mini_batch_size=4, micro_batch_size=4, lr=1e-6,
                      logprob_chunk=16, tensorboard=False, report_to=[])
    c1 = work / "c1"
    train_round(cfg, **tables["same"], init_checkpoint=str(init), output_checkpoint=str(c1),
                work_dir=str(work / "w"), round_index=0, progress=False, save_state=False)
    out = {}
    for tag, t in tables.items():
        res = Resident()
        train_round(cfg, **t, init_checkpoint=str(init), output_checkpoint=str(c1),
                    work_dir=str(work / f"w-{tag}"), round_index=0, progress=False,
                    resident=res, write_output=False)
        try:
            out[tag] = f"accepted (max |Δ| {check_replayed(res):.3g})"
        except Exception as e:  # noqa: BLE001 - the decision is the figure
            out[tag] = f"refused: {_short(e)}"
    return out


def state_decisions(work: Path) -> dict[str, str]:
    from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint
    from trace_rl.trainer.config import TrainConfig
    from trace_rl.trainer.round import train_round

    cfg = TrainConfig(method="grpo", mini_batch_size=4, micro_batch_size=4, lr=1e-3,
                      logprob_chunk=16, tensorboard=False, report_to=[])
    tables = make_round_tables(make_tokenizer(), n_prompts=2, samples=4, seed=1)
    ckpts = [save_tiny_checkpoint(work / "c0", seed=0)]
    for k in range(2):
        out = work / f"c{k + 1}"
        train_round(cfg, **tables, init_checkpoint=ckpts[-1], output_checkpoint=str(out),
                    work_dir=str(work / f"w{k}"), round_index=k, progress=False)
        ckpts.append(str(out))

    def truncated(state: Path) -> None:
        f = state / "state.pt"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    def flipped(state: Path) -> None:
        f = state / "state.pt"
        data = bytearray(f.read_bytes())
        mid = len(data) // 2
        data[mid: mid + 64] = bytes(b ^ 0xFF for b in data[mid: mid + 64])
        f.write_bytes(bytes(data))

    def foreign(state: Path) -> None:
        shutil.rmtree(state)
        shutil.copytree(Path(ckpts[1]) / "trainer_state", state)

    out = {}
    for tag, damage in {"intact": lambda s: None, "truncated": truncated, "flipped": flipped,
                        "foreign (checkpoint 1's)": foreign}.items():
        ckpt = work / f"c2-{tag.split()[0]}"
        shutil.copytree(ckpts[2], ckpt)
        damage(ckpt / "trainer_state")
        try:
            rows = train_round(cfg, **tables, init_checkpoint=str(ckpt),
                               output_checkpoint=str(work / f"out-{tag.split()[0]}"),
                               work_dir=str(work / f"w-{tag.split()[0]}"), round_index=2,
                               progress=False, write_output=False)
            out[tag] = f"trained steps {[r['step'] for r in rows]} (intact state: [4, 5])"
        except Exception as e:  # noqa: BLE001 - the decision is the figure
            out[tag] = f"refused: {_short(e)}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tests", default=str(ROOT / "tests"), help="the tests/ folder of the tree")
    args = ap.parse_args()
    sys.path.insert(0, args.tests)
    import trace_rl.trainer

    print(f"trainer: {Path(trace_rl.trainer.__file__).parent}  load average: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"1. overlong mask, 4 of 16 cut: grad norm / grad norm without them = "
              f"{overlong_ratio(work / 'o'):.4f}")
        for tag, decision in replay_decisions(work / "r").items():
            print(f"2. replay of round 0 at lr 1e-6 on {tag} rollouts: {decision}")
        for tag, decision in state_decisions(work / "s").items():
            print(f"3. round 2 from checkpoint 2 with {tag} trainer state: {decision}")


if __name__ == "__main__":
    main()
