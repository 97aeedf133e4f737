"""A cold round under FSDP2 (2 CPU processes, gloo) reads the trainer state's moments and float32
master on the main process only; the other receives its shards by broadcast (issue 26, item 8:
8 processes on one host each loaded the whole ~12 B/param file). The round must end exactly where
the same round ends when every process reads the whole file.

The launch is tests/test_trainer_fsdp_resume.py's (accelerate's FSDP2 preparation forced on CPU).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from tiny import LEAVE_GROUP, make_round_tables, make_tokenizer, save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"method": "grpo", "mini_batch_size": 8, "micro_batch_size": 2, "lr": 1e-3,
          "logprob_chunk": 16, "dtype": "bfloat16", "tensorboard": False, "report_to": []}

SCRIPT = r"""
import json, os, sys
from pathlib import Path
import pyarrow.parquet as pq
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
import trace_rl.trainer.round as R
from trace_rl.trainer.config import TrainConfig

a = json.loads(Path(sys.argv[1]).read_text())
load = R.load_trainer_state
def counted(path, *args, **kw):
    if os.environ.get("EVERY_RANK_READS"):
        kw["receives_shards"] = False
    state = load(path, *args, **kw)
    if state is not None:
        size = lambda d: sum(t.numel() * t.element_size() for t in _tensors(d))
        Path(a["out"] + f".read{acc.process_index}").write_text(json.dumps(
            {"optimizer": size(state["optimizer"]), "master": size(state.get("master", {}))}))
    return state
def _tensors(d):
    if torch.is_tensor(d):
        yield d
    elif isinstance(d, dict):
        for v in d.values():
            yield from _tensors(v)
R.load_trainer_state = counted
acc = Accelerator()
PartialState._shared_state["distributed_type"] = DistributedType.FSDP
acc.state.distributed_type = DistributedType.FSDP
acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
    fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
    transformer_cls_names_to_wrap=["Qwen3DecoderLayer"], reshard_after_forward=True,
    state_dict_type="FULL_STATE_DICT")
tables = {k: pq.read_table(v) for k, v in a["tables"].items()}
rows = R.train_round(TrainConfig(**a["config"]), **tables, init_checkpoint=a["init"],
                     output_checkpoint=a["out"], work_dir=a["work"], round_index=a["round"],
                     accelerator=acc, progress=False)
if acc.is_main_process:
    Path(a["out"] + ".rows").write_text(json.dumps(rows))
"""


def _launch(tmp: Path, tag: str, init: str, round_index: int, paths: dict, **env_extra) -> Path:
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert launcher, "accelerate's CLI must be installed next to the Python interpreter"
    script, args_file = tmp / "fsdp_cold.py", tmp / f"args-{tag}.json"
    script.write_text(SCRIPT + LEAVE_GROUP)
    out = tmp / f"out-{tag}"
    args_file.write_text(json.dumps({"config": CONFIG, "tables": paths, "init": init,
                                     "out": str(out), "work": str(tmp / f"work-{tag}"),
                                     "round": round_index}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true", **env_extra}
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(args_file)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fsdp_cold_round_reads_the_state_on_the_main_process_only(tmp_path):
    init = save_tiny_checkpoint(tmp_path / "ckpt0", seed=0)
    paths = {}
    for name, table in make_round_tables(make_tokenizer(), seed=5).items():
        paths[name] = str(tmp_path / f"{name}.parquet")
        pq.write_table(table, paths[name])
    c1 = _launch(tmp_path, "c1", init, 0, paths)
    assert torch.load(c1 / "trainer_state" / "state.pt", weights_only=False)["state_layout"] == "full_fqn"

    shards = _launch(tmp_path, "shards", str(c1), 1, paths)
    every = _launch(tmp_path, "every", str(c1), 1, paths, EVERY_RANK_READS="1")
    read = {tag: [json.loads(Path(f"{out}.read{r}").read_text()) for r in (0, 1)]
            for tag, out in (("shards", shards), ("every", every))}
    print("bytes of moments / master each process read:", read)
    assert read["every"][0] == read["every"][1] and read["every"][1]["master"] > 0
    assert read["shards"][0] == read["every"][0]  # the main process reads it all
    assert read["shards"][1] == {"optimizer": 0, "master": 0}  # the other none of it
    rows = {tag: json.loads(Path(f"{out}.rows").read_text()) for tag, out in
            (("shards", shards), ("every", every))}
    assert [r["step"] for r in rows["shards"]] == [2, 3]
    for a, b in zip(rows["shards"], rows["every"], strict=True):
        for key in ("loss", "pg_loss", "grad_norm", "entropy"):
            assert a[key] == b[key], key
    s_state = torch.load(shards / "trainer_state" / "state.pt", weights_only=False)
    e_state = torch.load(every / "trainer_state" / "state.pt", weights_only=False)
    for name, tensor in e_state["master"].items():
        assert torch.equal(s_state["master"][name], tensor), name
