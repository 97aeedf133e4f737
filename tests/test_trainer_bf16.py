"""Mixed precision: a bf16 config computes in bf16 (autocast) but steps float32 master weights, so
the small updates of paper-scale learning rates land (pure-bf16 AdamW dropped ~98% of them)."""

import json

import torch
from safetensors.torch import load_file
from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.lean import LeanCausalLM
from trace_rl.trainer.round import train_round
from trace_rl.trainer.round_setup import load_model


def _train(dtype, tables, init, root):
    cfg = TrainConfig(method="trace", route={"key_forward": True, "error_reverse": True},
                      mini_batch_size=4, micro_batch_size=4, lr=1e-6, logprob_chunk=64,
                      dtype=dtype, tensorboard=False, report_to=[], teacher_sync_every=0)
    out = root / f"out-{dtype}"
    rows = train_round(cfg, **tables, init_checkpoint=str(init), output_checkpoint=str(out),
                       work_dir=str(root / f"work-{dtype}"), round_index=0, progress=False)
    assert len(rows) == 10
    return out


def _master(out):
    """The float32 weights AdamW stepped: the trainer state's master copy under mixed precision,
    the checkpoint's own weights in float32."""
    state = torch.load(out / "trainer_state" / "state.pt", weights_only=False)
    if "master" not in state:
        return load_file(str(out / "model.safetensors"))
    return {k.removeprefix("hf."): v for k, v in state["master"].items()}


def test_bf16_config_moves_the_weights_and_tracks_fp32(tmp_path):
    init = save_tiny_checkpoint(tmp_path / "init", seed=0)
    tables = make_round_tables(make_tokenizer(), n_prompts=10, samples=4, seed=1)  # 10 steps
    before = load_file(f"{init}/model.safetensors")
    names = [n for n in before if n != "lm_head.weight"]  # tied to the embedding
    updates = {}
    for dtype in ("float32", "bfloat16"):
        out = _train(dtype, tables, init, tmp_path)
        after = _master(out)
        assert all(after[n].dtype == torch.float32 for n in names)
        moved = sum(int((after[n] != before[n]).sum()) for n in names)
        total = sum(before[n].numel() for n in names)
        assert moved / total >= 0.99, (dtype, moved / total)
        updates[dtype] = torch.cat([(after[n] - before[n]).double().flatten() for n in names])
        # the checkpoint the rollout engine reads: the master weights rounded to the compute dtype
        disk = load_file(str(out / "model.safetensors"))
        assert json.loads((out / "config.json").read_text())["dtype"] == dtype
        for n in names:
            assert torch.equal(disk[n], after[n].to(getattr(torch, dtype))), n
    u32, u16 = updates["float32"], updates["bfloat16"]
    rel = float((u16 - u32).norm() / u32.norm())
    # bf16 compute: not the float32 run (autocast was on), but its update within bf16 noise
    assert 0 < rel < 0.1, rel
    assert float(torch.nn.functional.cosine_similarity(u16, u32, dim=0)) > 0.99


def test_bf16_compute_runs_under_autocast_on_float32_parameters(tmp_path):
    init = save_tiny_checkpoint(tmp_path / "init", seed=0)
    cfg = TrainConfig(dtype="bfloat16", tensorboard=False, report_to=[])
    _, model = load_model(cfg, init)
    assert isinstance(model, LeanCausalLM) and model.compute_dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    seen = []
    layer = model.hf.model.layers[0].mlp.down_proj
    layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model(mode="policy", input_ids_BL=ids, attention_mask_BL=torch.ones_like(ids),
                resp_pos_N=torch.tensor([1, 2]), target_N=torch.tensor([7, 8]))
    assert seen == [torch.bfloat16]
    assert out["logp_N"].dtype == torch.float32  # log-softmax in float32
    out["logp_N"].sum().backward()
    assert layer.weight.grad.dtype == torch.float32


def test_bf16_resident_cold_and_replayed_rounds_continue_the_same_master(tmp_path):
    """Round 1 of a bf16 run ends bitwise the same whether it starts from memory, cold from
    checkpoint 1's full state (float32 master restored, not its bf16 weights) or after replaying
    round 0 in memory (checked against the bf16 checkpoint at zero difference)."""
    from trace_rl.trainer.resident import Resident
    from trace_rl.trainer.round_io import check_replayed

    init = save_tiny_checkpoint(tmp_path / "init", seed=0)
    tables = make_round_tables(make_tokenizer(), n_prompts=2, samples=4, seed=1)
    cfg = TrainConfig(method="trace", route={"key_forward": True, "error_reverse": True},
                      mini_batch_size=4, micro_batch_size=2, lr=1e-3, logprob_chunk=16,
                      dtype="bfloat16", tensorboard=False, report_to=[], teacher_sync_every=3)

    def step(src, dst, k, resident=None, **kw):
        train_round(cfg, **tables, init_checkpoint=str(src), output_checkpoint=str(tmp_path / dst),
                    work_dir=str(tmp_path / f"w-{dst}-{k}"), round_index=k, progress=False,
                    resident=resident, **kw)
        return tmp_path / dst

    res = Resident()
    a1 = step(init, "a1", 0, res, save_state=False)
    warm = step(a1, "a2", 1, res)
    cold = step(step(init, "b1", 0), "b2", 1)
    res = Resident()
    step(init, "a1", 0, res, write_output=False)
    assert check_replayed(res) == 0.0
    replayed = step(a1, "c2", 1, res)
    ref_master, ref_disk = _master(warm), load_file(str(warm / "model.safetensors"))
    for other in (cold, replayed):
        master, disk = _master(other), load_file(str(other / "model.safetensors"))
        for n in ref_master:
            assert torch.equal(master[n], ref_master[n]), (other.name, n)
        for n in ref_disk:
            assert torch.equal(disk[n], ref_disk[n]), (other.name, n)
