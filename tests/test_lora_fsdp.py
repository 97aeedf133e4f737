"""LoRA under FSDP2 full sharding (2 CPU processes, gloo): the frozen base and the float32
adapters sharded together, the lagged teacher's adapter snapshot taken from the shards and copied
back into them, the adapter checkpoint gathered whole. The round must match the single-process
round, and a replay of it must equal its checkpoint on both processes (adapter names)."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from test_trainer_fsdp_passes import REPLAY
from test_trainer_fsdp_resume import SCRIPT
from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint
from trace_rl.trainer import lora
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.round import train_round

import test_trainer_fsdp_passes as passes

# 16 rollouts, 8 per step: step 0 snapshots the teacher, step 1 distils from that lagged snapshot
CONFIG = {"method": "trace", "route": {"key_forward": True, "error_reverse": True},
          "mini_batch_size": 8, "micro_batch_size": 2, "lr": 1e-2, "logprob_chunk": 16,
          "teacher_sync_every": 2, "tensorboard": False, "report_to": [],
          "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lora_round_under_fsdp2_matches_single_process(tmp_path, monkeypatch):
    init = save_tiny_checkpoint(tmp_path / "ckpt0", seed=0)
    paths = {}
    for name, table in make_round_tables(make_tokenizer(), seed=5).items():
        paths[name] = str(tmp_path / f"{name}.parquet")
        pq.write_table(table, paths[name])
    monkeypatch.setattr(passes, "CONFIG", CONFIG)
    assert SCRIPT and REPLAY  # the launch script is the full-weight FSDP tests'
    passes._launch(tmp_path, init, paths)
    rows_fsdp = json.loads((tmp_path / "metrics-fsdp.json").read_text())
    replays = [json.loads((tmp_path / f"metrics-fsdp.json.replay{r}").read_text()) for r in (0, 1)]
    assert replays == [0.0, 0.0], replays

    tables = {k: pq.read_table(v) for k, v in paths.items()}
    rows_single = train_round(TrainConfig(**CONFIG), **tables, init_checkpoint=init,
                              output_checkpoint=str(tmp_path / "out-single"),
                              work_dir=str(tmp_path / "work-single"), round_index=0,
                              progress=False)
    assert [r["teacher/step"] for r in rows_fsdp] == [0, 0]
    for a, b in zip(rows_single, rows_fsdp, strict=True):
        for key in ("loss", "pg_loss", "kl_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), (a["step"], key)
    assert rows_fsdp[1]["kl_loss"] > 0  # the lagged teacher's divergence was in use
    single = load_file(tmp_path / "out-single" / lora.ADAPTER_WEIGHTS)
    fsdp = load_file(tmp_path / "out-fsdp" / lora.ADAPTER_WEIGHTS)
    assert fsdp.keys() == single.keys() and lora.is_adapter_dir(tmp_path / "out-fsdp")
    for k, v in single.items():
        torch.testing.assert_close(fsdp[k], v, rtol=1e-4, atol=1e-5)
    state = torch.load(tmp_path / "out-fsdp/trainer_state/state.pt", weights_only=False)
    assert state["state_layout"] == "full_fqn"
    moments = state["optimizer"]["state"]  # gathered by name: the adapter's tensors only
    assert moments and all(".lora_" in name and ".default." in name for name in moments)
