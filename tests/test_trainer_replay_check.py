"""A replayed round is checked against the checkpoint it once wrote, relative to the round's own
update (REPLAY_MAX_RELATIVE): on every process, refused beyond the bound, its max |Δ| recorded in
the train manifest.

- In one process: an untouched checkpoint gives Δ = 0; a replay on other rollouts is refused even
  at lr 1e-6; bf16-ulp noise in a few elements is accepted and the model keeps the replayed
  float32 master (not the checkpoint's bf16 rounding); a difference the size of the update is
  refused.
- Through the train stage under `accelerate launch` (2 CPU processes, gloo, DDP): round 1 starts
  from a weights-only checkpoint, replays round 0 inside the launch, checks it on both processes
  and records Δ = 0 in its manifest.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import TINY_RUN, make_round_tables, make_tokenizer, save_tiny_checkpoint
from trace_rl.data_schemas import TRAIN_METRICS
from trace_rl.pipeline.layout import dataset_name
from trace_rl.stages import get_stage
from trace_rl.stages.common import open_store
from trace_rl.stages.config import load_config
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.resident import Resident
from trace_rl.trainer.round import train_round
from trace_rl.trainer import lora
from trace_rl.trainer.round_io import (REPLAY_MAX_RELATIVE, _gaps, _safetensors_index,
                                       _worst_ratio, check_replayed)


def _round(cfg, tables, init, out, work, resident=None, **kw):
    train_round(cfg, **tables, init_checkpoint=str(init), output_checkpoint=str(out),
                work_dir=str(work), round_index=0, progress=False, resident=resident, **kw)


def _replay(cfg, tables, init, c1, work) -> Resident:
    res = Resident()
    _round(cfg, tables, init, c1, work, res, write_output=False)
    return res


def _cfg(**kw):
    return TrainConfig(**{**dict(method="grpo", mini_batch_size=4, micro_batch_size=4, lr=1e-3,
                                 logprob_chunk=16, tensorboard=False, report_to=[]), **kw})


def test_replay_on_other_rollouts_is_refused_at_a_small_learning_rate(tmp_path):
    """At lr 1e-6 a round moves each weight by ~1e-6: an absolute tolerance (1e-2 before) took a
    replay on entirely different rollouts. Measured against the round's own update it is far out."""
    tok = make_tokenizer()
    tables = make_round_tables(tok, n_prompts=2, samples=4, seed=1)
    other = make_round_tables(tok, n_prompts=2, samples=4, seed=7)  # same ids, other rollouts
    init = save_tiny_checkpoint(tmp_path / "init", seed=0)
    cfg = _cfg(lr=1e-6)
    c1 = tmp_path / "c1"
    _round(cfg, tables, init, c1, tmp_path / "w", save_state=False)
    assert check_replayed(_replay(cfg, tables, init, c1, tmp_path / "w-same")) == 0.0
    with pytest.raises(RuntimeError, match="round's own update") as refused:
        check_replayed(_replay(cfg, other, init, c1, tmp_path / "w-other"))
    print(refused.value)


def test_tiny_difference_is_accepted_and_the_master_keeps_full_precision(tmp_path):
    """GPU-like noise: the bf16 checkpoint differs from the rounded replay by one bf16 ulp in a
    few elements. Accepted, and the model keeps the replayed float32 master (never rounded to
    the checkpoint's bf16); a difference as large as the update itself is refused."""
    tables = make_round_tables(make_tokenizer(), n_prompts=2, samples=4, seed=1)
    init = save_tiny_checkpoint(tmp_path / "init", seed=0)
    cfg = _cfg(dtype="bfloat16", lr=1e-3)
    c1 = tmp_path / "c1"
    _round(cfg, tables, init, c1, tmp_path / "w", save_state=False)
    exact = _replay(cfg, tables, init, c1, tmp_path / "w-exact")
    assert check_replayed(exact) == 0.0
    name = "model.layers.0.mlp.up_proj.weight"
    master = dict(exact.held.unwrapped.hf.named_parameters())[name].detach().clone()
    weights = load_file(str(c1 / "model.safetensors"))
    noisy = dict(weights)
    noisy[name] = weights[name].clone()
    ulp = torch.finfo(torch.bfloat16).eps
    for i in range(4):  # one bf16 ulp up in four elements
        noisy[name][i, i] = (noisy[name][i, i].float() * (1 + ulp)).to(torch.bfloat16)
    save_file(noisy, str(c1 / "model.safetensors"), metadata={"format": "pt"})
    res = _replay(cfg, tables, init, c1, tmp_path / "w-noisy")
    assert 0 < check_replayed(res) < 1e-2  # accepted (the log gives the ratio)
    live = dict(res.held.unwrapped.hf.named_parameters())[name].detach()
    assert live.dtype == torch.float32
    assert torch.equal(live, master)  # the replayed master, element for element
    assert not torch.equal(live, live.to(torch.bfloat16).float())  # not rounded to bf16

    start = load_file(f"{init}/model.safetensors")[name]
    noisy[name] = (2 * weights[name].float() - start).to(torch.bfloat16)  # a whole update off
    save_file(noisy, str(c1 / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="round's own update"):
        check_replayed(_replay(cfg, tables, init, c1, tmp_path / "w-far"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_multi_process_replay_is_checked_and_recorded(tmp_path, tiny_testbed_dir, monkeypatch):
    # MULTI_GPU under ACCELERATE_USE_CPU: torchrun with gloo (use_cpu alone picks MPI)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    accel = tmp_path / "ddp_cpu.yaml"
    accel.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\n"
                     "num_machines: 1\nnum_processes: 2\nmixed_precision: 'no'\n"
                     "machine_rank: 0\n")
    cfg = load_config("demo", TINY_RUN + [
        f"run.root={tmp_path / 'run'}", f"model.testbed_dir={tiny_testbed_dir}", "run.rounds=2",
        "train.state_every=5", "eval.benchmarks=[]", "train.num_processes=2",
        f"train.accelerate_config={accel}"])
    get_stage("prepare")(cfg, None, progress=False)
    for k in range(2):
        for stage in ("rollout", "verify", "annotate", "train"):
            get_stage(stage)(cfg, k, progress=False)
    store = open_store(cfg)
    extras = [store.manifest(dataset_name("train", k)).extra for k in range(2)]
    assert [e["replayed_rounds"] for e in extras] == [0, 1]
    assert extras[0]["replay_max_abs_delta"] is None
    assert extras[1]["replay_max_abs_delta"] == 0.0
    assert store.read(dataset_name("train", 1), TRAIN_METRICS, allow_extra=True).num_rows > 0


def test_gpu_like_noise_reads_the_same_ratio_at_bf16_as_in_float32(tmp_path, monkeypatch):
    """Non-deterministic kernels add noise to the gradient (here 1% of its mean |g|, drawn
    afresh for the replay). A bf16 checkpoint quantises the replay's drift and the round's update
    to whole ulps; an L2 ratio then read √(noise/update): 0.25 at bf16 against 0.04 in float32,
    and the legitimate replay was refused. The L1 ratio reads the same at both dtypes."""
    tables = make_round_tables(make_tokenizer(), n_prompts=4, samples=4, seed=1)
    init = save_tiny_checkpoint(tmp_path / "init", seed=0)
    step = torch.optim.AdamW.step
    noise = {"on": False}

    def noisy_step(self, *args, **kw):
        if noise["on"]:
            gen = torch.Generator().manual_seed(1234)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.add_(1e-2 * p.grad.abs().mean()
                                    * torch.randn(p.grad.shape, generator=gen))
        return step(self, *args, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", noisy_step)
    ratios = {}
    for dtype in ("bfloat16", "float32"):
        cfg = _cfg(dtype=dtype, lr=1e-6)
        c1 = tmp_path / f"c1-{dtype}"
        noise["on"] = False
        _round(cfg, tables, init, c1, tmp_path / "w", save_state=False)
        noise["on"] = True
        res = _replay(cfg, tables, init, c1, tmp_path / f"w-{dtype}")
        assert check_replayed(res) > 0  # the noise moved it, and it is accepted
        params = lora.disk_named_parameters(res.held.unwrapped.hf)
        with torch.no_grad():
            _, gaps = _gaps(params, _safetensors_index(c1), _safetensors_index(init))
        ratios[dtype] = _worst_ratio(gaps)[0]
    assert 0 < ratios["bfloat16"] < REPLAY_MAX_RELATIVE
    assert 0.5 < ratios["bfloat16"] / ratios["float32"] < 2, ratios
