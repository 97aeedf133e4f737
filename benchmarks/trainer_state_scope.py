"""Who writes trainer state, and where a run's state comes from: two figures on a tiny model.

    python benchmarks/trainer_state_scope.py

1. A round interrupted (KeyboardInterrupt after its 2nd optimizer step) inside a trainer session:
   the sha256 of its start checkpoint before the round and after the session has closed, and the
   Adam step the checkpoint then holds (none: nothing was written).
2. A new run whose initial model is another run's final checkpoint (3 steps, lr 1e-3, λ schedule
   0.5 -> 0 at step 3): the global step, λ and lr the new run's first step logs (its config: lr
   5e-5, the same schedule; a fresh run starts at step 0, λ 0.5, lr 5e-5).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests")]


def _tree_sha(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def main() -> None:
    import torch
    import trace_rl.trainer.round as round_mod
    from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint
    from trace_rl.trainer.config import TrainConfig
    from trace_rl.trainer.resident import trainer_session
    from trace_rl.trainer.round import train_round

    tables = make_round_tables(make_tokenizer(), n_prompts=3, samples=4, seed=1)  # 3 steps
    sched = {"w0": 0.5, "hold_steps": 0, "zero_step": 3}

    def cfg(lr):
        return TrainConfig(method="trace", route={"key_forward": True, "error_reverse": True},
                           mini_batch_size=4, micro_batch_size=2, lr=lr, logprob_chunk=8,
                           tensorboard=False, report_to=[], schedule=sched)

    def run(c, src, dst, k, resident=None, **kw):
        return train_round(c, **tables, init_checkpoint=str(src), output_checkpoint=str(dst),
                           work_dir=str(Path(dst).parent / f"w-{Path(dst).name}"),
                           round_index=k, progress=False, resident=resident, **kw)

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init = save_tiny_checkpoint(root / "init", seed=0)
        real, calls = round_mod._apply_update, []

        def interrupted(*a, **kw):
            calls.append(1)
            result = real(*a, **kw)
            if len(calls) == 5:
                raise KeyboardInterrupt
            return result

        round_mod._apply_update = interrupted
        try:
            with trainer_session() as res:
                run(cfg(1e-3), init, root / "c1", 0, res, save_state=False)
                res.tag = "committed"  # what the train stage does once round 0's manifest is written
                before = _tree_sha(root / "c1")
                run(cfg(1e-3), root / "c1", root / "c2", 1, res)
        except KeyboardInterrupt:
            pass
        finally:
            round_mod._apply_update = real
        state = root / "c1" / "trainer_state" / "state.pt"
        adam = None
        if state.exists():
            opt = torch.load(state, weights_only=False)["optimizer"]["state"]
            adam = int(next(iter(opt.values()))["step"])
        out["failed_round"] = {"start_sha256_before": before[:16],
                               "start_sha256_after": _tree_sha(root / "c1")[:16],
                               "identical": before == _tree_sha(root / "c1"),
                               "adam_step_written_into_start": adam,
                               "committed_adam_step": 3}

        run(cfg(1e-3), init, root / "final", 0)  # another run's final checkpoint, full state
        rows = run(cfg(5e-5), root / "final", root / "new", 0)
        out["new_run_from_trained_model_path"] = {
            "first_step": rows[0]["step"], "kl_weight": rows[0]["kl_weight"], "lr": rows[0]["lr"],
            "configured": {"step": 0, "kl_weight": 0.5, "lr": 5e-5}}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
