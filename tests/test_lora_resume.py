"""A LoRA round SIGKILLed mid-round and rerun equals the uninterrupted round bitwise (metrics,
adapter, optimizer moments), the lagged teacher's adapter snapshot coming back from disk; and the
next round starts cold from the adapter checkpoint with the teacher snapshot it handed over."""

import json
import signal

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from test_trainer_resume import DETERMINISTIC, _run
from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint
from trace_rl.trainer import lora
from trace_rl.trainer.checkpoint import load_trainer_state, read_teacher_meta

CONFIG = dict(method="trace", route={"key_forward": True, "error_reverse": True},
              mini_batch_size=2, micro_batch_size=1, lr=1e-2, logprob_chunk=8,
              teacher_sync_every=2, save_every=1, tensorboard=False,
              schedule={"hold_steps": 4, "zero_step": 8},
              lora={"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]})


def _args(tmp, tag, init, paths, round_index=0):
    args = {"config": CONFIG, **paths, "init_checkpoint": str(init),
            "output_checkpoint": str(tmp / f"out-{tag}"), "work_dir": str(tmp / f"work-{tag}"),
            "round_index": round_index, "metrics_out": str(tmp / f"metrics-{tag}.jsonl")}
    f = tmp / f"args-{tag}.json"
    f.write_text(json.dumps(args))
    return f


def _rows(tmp, tag):
    return [json.loads(x) for x in (tmp / f"metrics-{tag}.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lora_resume_after_sigkill_is_bitwise_the_uninterrupted_round(tmp_path):
    tok = make_tokenizer()
    init = save_tiny_checkpoint(tmp_path / "ckpt0", seed=0)
    paths = {}
    for name, table in make_round_tables(tok, n_prompts=2, samples=3, seed=2).items():
        paths[name] = str(tmp_path / f"{name}.parquet")  # 6 rollouts = 3 steps
        pq.write_table(table, paths[name])
    clean = _run(_args(tmp_path, "clean", init, paths))
    assert clean.returncode == 0, clean.stderr[-3000:]
    resumed = _args(tmp_path, "resumed", init, paths)
    killed = _run(resumed, kill_at=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "out-resumed").exists()
    again = _run(resumed)
    assert again.returncode == 0, again.stderr[-3000:]

    rows_clean, rows_res = _rows(tmp_path, "clean"), _rows(tmp_path, "resumed")
    assert [r["teacher/step"] for r in rows_res] == [0, 0, 2]
    assert rows_clean[1]["kl_loss"] > 0
    for a, b in zip(rows_clean, rows_res, strict=True):
        for key in DETERMINISTIC:
            assert a[key] == b[key], (a["step"], key)
    wa = load_file(tmp_path / "out-clean" / lora.ADAPTER_WEIGHTS)
    wb = load_file(tmp_path / "out-resumed" / lora.ADAPTER_WEIGHTS)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = load_trainer_state(tmp_path / "out-clean")["optimizer"]["state"]
    sb = load_trainer_state(tmp_path / "out-resumed")["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)

    # round 1 cold from the adapter checkpoint: step 3 still uses the step-2 teacher snapshot,
    # handed over in the checkpoint as an adapter (megabytes), then re-syncs at step 4
    meta = read_teacher_meta(tmp_path / "out-clean")
    assert meta is not None and meta[0] == 2 and lora.is_adapter_dir(meta[2])
    nxt = _run(_args(tmp_path, "next", tmp_path / "out-clean", paths, round_index=1))
    assert nxt.returncode == 0, nxt.stderr[-3000:]
    assert [r["teacher/step"] for r in _rows(tmp_path, "next")] == [2, 4, 4]
    assert [r["step"] for r in _rows(tmp_path, "next")] == [3, 4, 5]
