"""One optimizer update per mini-batch under every accelerate backend, however it is split.

Runs here on CPU: DDP (gloo) and FSDP2 with 2 processes under `accelerate launch` (FSDP2 forced
in the launched script: accelerate 1.15 silently falls back to DDP on CPU), each splitting
the same mini-batches into 1, 2 or 4 micro-batches per process, against the single-process round.
DeepSpeed is not installed here: its path is exercised through accelerate's own
DeepSpeedEngineWrapper in front of a recording engine (what `Accelerator.backward` does under
DistributedType.DEEPSPEED: no loss division, engine.backward, engine.step when sync_gradients).
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
from accelerate import Accelerator
from accelerate.utils.deepspeed import DeepSpeedEngineWrapper
from safetensors.torch import load_file

from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.round import train_round
from tiny import LEAVE_GROUP, make_round_tables, make_tokenizer, save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("step", "loss", "pg_loss", "kl_loss", "kl_weight", "entropy", "grad_norm",
            "response_len_mean", "span_token_frac", "clip_frac")
CONFIG = dict(method="trace", route={"key_forward": True, "error_reverse": True},
              mini_batch_size=8, lr=1e-3, logprob_chunk=16, tensorboard=False)

# One process group, one round per micro-batch size (per process: 4 rollouts of each mini-batch).
SCRIPT = r"""
import json, sys
from pathlib import Path
import pyarrow.parquet as pq
from accelerate import Accelerator
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.round import train_round

args = json.loads(Path(sys.argv[1]).read_text())
acc = Accelerator()
if args["fsdp2"]:
    # accelerate ignores --use_fsdp on CPU (MULTI_CPU, DDP-wrapped): mark the state FSDP with an
    # FSDP2 plugin so its own fsdp2 preparation (fully_shard, DTensor parameters) runs on gloo
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Qwen3DecoderLayer"], reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT")
tables = {k: pq.read_table(v) for k, v in args["tables"].items()}
for micro in args["micro"]:
    cfg = TrainConfig(**{**args["config"], "micro_batch_size": micro,
                         "tensorboard": args["tensorboard"]})
    tag = f"{args['tag']}-micro{micro}"
    rows = train_round(cfg, **tables, init_checkpoint=args["init"],
                       output_checkpoint=str(Path(args["out"]) / f"out-{tag}"),
                       work_dir=str(Path(args["out"]) / f"work-{tag}"), round_index=0,
                       accelerator=acc, progress=False)
    if acc.is_main_process:
        (Path(args["out"]) / f"metrics-{tag}.json").write_text(json.dumps(rows))
    # forget this round's model: under FSDP, clip_grad_norm_ compares the parameters with every
    # prepared model's, and a previous round's (same shapes) makes that comparison ambiguous
    acc.free_memory()
"""

BACKENDS = {
    # --cpu alone selects accelerate's MPI launcher; torchrun + ACCELERATE_USE_CPU gives gloo
    "ddp": ["--multi_gpu"],
    # the script itself turns FSDP2 on (accelerate would fall back to DDP on CPU)
    "fsdp": ["--multi_gpu"],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Inputs on disk and the single-process round (one micro-batch per mini-batch)."""
    tmp = tmp_path_factory.mktemp("acc")
    init = save_tiny_checkpoint(tmp / "ckpt0", seed=0)
    paths = {}
    for name, table in make_round_tables(make_tokenizer(), seed=5).items():
        paths[name] = str(tmp / f"{name}.parquet")
        pq.write_table(table, paths[name])
    tables = {k: pq.read_table(v) for k, v in paths.items()}
    rows = train_round(TrainConfig(**CONFIG, micro_batch_size=8), **tables, init_checkpoint=init,
                       output_checkpoint=str(tmp / "out-single"), work_dir=str(tmp / "w-single"),
                       round_index=0, progress=False)
    return tmp, init, paths, rows, load_file(tmp / "out-single/model.safetensors")


def _launch(reference, backend: str, micro: list[int], tensorboard: bool) -> None:
    tmp, init, paths, _, _ = reference
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert launcher, "accelerate's CLI must be installed next to the Python interpreter"
    script, args_file = tmp / "multi_micro.py", tmp / f"args-{backend}.json"
    script.write_text(SCRIPT + LEAVE_GROUP)
    args_file.write_text(json.dumps({"config": CONFIG, "tables": paths, "init": init,
                                     "out": str(tmp), "micro": micro, "tag": backend, "fsdp2": backend == "fsdp",
                                     "tensorboard": tensorboard}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true"}
    cmd = [launcher, "launch", *BACKENDS[backend], "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(args_file)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]


def _assert_same_update(reference, tag: str) -> None:
    tmp, _, _, rows_ref, w_ref = reference
    rows = json.loads((tmp / f"metrics-{tag}.json").read_text())
    assert len(rows) == len(rows_ref) == 2
    for a, b in zip(rows_ref, rows):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (tag, key)
    assert rows[0]["kl_loss"] > 0
    w = load_file(tmp / f"out-{tag}/model.safetensors")
    assert w.keys() == w_ref.keys()
    for k in w:
        torch.testing.assert_close(w[k], w_ref[k], atol=2e-5, rtol=1e-4, msg=f"{tag} {k}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ddp_one_update_per_mini_batch_however_split(reference):
    _launch(reference, "ddp", [4, 2, 1], tensorboard=True)
    tmp = reference[0]
    for micro in (4, 2, 1):  # 1, 2 and 4 micro-batches per process and mini-batch
        _assert_same_update(reference, f"ddp-micro{micro}")
    # each rank recomputes the old log-probs of its own shard: two files prove two processes
    assert (tmp / "work-ddp-micro1/old_logprobs-rank1.pt").exists()
    assert any((tmp / "work-ddp-micro4/tensorboard").rglob("events.out.tfevents*"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fsdp2_cpu_one_update_per_mini_batch_however_split(reference):
    _launch(reference, "fsdp", [4, 1], tensorboard=False)
    for micro in (4, 1):
        _assert_same_update(reference, f"fsdp-micro{micro}")
        # the optimizer state was gathered from shards: the model really was sharded
        state = torch.load(reference[0] / f"out-fsdp-micro{micro}/trainer_state/state.pt",
                           weights_only=False)
        assert state["state_layout"] == "full_fqn"


class _RecordingEngine:
    """Stands in for deepspeed.DeepSpeedEngine behind accelerate's real DeepSpeedEngineWrapper."""

    def __init__(self) -> None:
        self.boundary_at_backward: list[bool | None] = []
        self.steps = 0
        self._boundary: bool | None = None

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        self._boundary = is_boundary

    def backward(self, loss, **kwargs) -> None:
        self.boundary_at_backward.append(self._boundary)
        loss.backward(**kwargs)

    def step(self) -> None:  # the real engine's optimizer update
        self.steps += 1


class _DeepSpeedBackwardAccelerator(Accelerator):
    """`Accelerator.backward`'s DistributedType.DEEPSPEED branch, on CPU without deepspeed."""

    def __init__(self) -> None:
        super().__init__(cpu=True)
        self.engine = _RecordingEngine()
        self.engine_wrapped = DeepSpeedEngineWrapper(self.engine)

    def backward(self, loss, **kwargs) -> None:
        self.engine_wrapped.backward(loss, sync_gradients=self.sync_gradients, **kwargs)


def test_deepspeed_engine_steps_once_per_mini_batch(reference):
    tmp, init, paths, rows_ref, _ = reference
    tables = {k: pq.read_table(v) for k, v in paths.items()}
    acc = _DeepSpeedBackwardAccelerator()
    rows = train_round(TrainConfig(**CONFIG, micro_batch_size=2), **tables, init_checkpoint=init,
                       output_checkpoint=str(tmp / "out-ds"), work_dir=str(tmp / "w-ds"),
                       round_index=0, accelerator=acc, progress=False)
    # 16 rollouts, 8 per mini-batch, 2 per micro-batch: 4 backwards and ONE engine step each
    assert acc.engine.boundary_at_backward == [False, False, False, True] * 2
    assert acc.engine.steps == len(rows) == 2
    assert acc.sync_gradients  # left as accelerate expects outside an accumulation
    for a, b in zip(rows_ref, rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_accelerator_with_its_own_accumulation_is_refused(reference):
    tmp, init, paths, _, _ = reference
    tables = {k: pq.read_table(v) for k, v in paths.items()}
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    try:
        with pytest.raises(ValueError, match="gradient_accumulation_steps: 1"):
            train_round(TrainConfig(**CONFIG, micro_batch_size=8), **tables, init_checkpoint=init,
                        output_checkpoint=str(tmp / "out-gas"), work_dir=str(tmp / "w-gas"),
                        round_index=0, accelerator=acc, progress=False)
    finally:
        acc.gradient_accumulation_steps = 1  # GradientState is shared by every Accelerator
