"""LoRA adapters (`train.lora`): a frozen base in the compute dtype, float32 adapters trained by
the same round, checkpoints in peft's format, and the lagged teacher as an adapter snapshot."""

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint
from trace_rl.trainer import lora
from trace_rl.trainer.checkpoint import load_trainer_state
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.round import train_round

LORA = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}


def _cfg(**kw):
    defaults = dict(method="trace", route={"key_forward": True, "error_reverse": True},
                    mini_batch_size=4, micro_batch_size=2, lr=1e-2, logprob_chunk=16,
                    teacher_sync_every=10, tensorboard=False, lora=LORA,
                    schedule={"hold_steps": 30, "zero_step": 40})
    return TrainConfig(**{**defaults, **kw})


@pytest.mark.parametrize("bad, says", [
    ({"rank": 0}, "lora.rank"), ({"alpha": 0}, "lora.alpha"), ({"dropout": 1.0}, "lora.dropout"),
    ({"target_modules": []}, "target_modules is empty"),
    ({"target_modules": ["q_proj", "lm_head"]}, "may not include ['lm_head']"),
    ({"ranks": 4}, "ranks"),
])
def test_lora_config_is_validated_with_a_message_that_says_how_to_fix(bad, says):
    with pytest.raises(ValidationError, match=None) as err:
        TrainConfig(lora=bad)
    assert says in str(err.value)


def test_lora_is_off_by_default():
    assert TrainConfig().lora is None


def test_target_modules_that_name_nothing_are_refused(tmp_path):
    base = save_tiny_checkpoint(tmp_path / "base")
    cfg = TrainConfig(lora={"target_modules": ["query_key_value"]}).lora
    with pytest.raises(ValueError, match="name no module"):
        lora.load_policy(cfg, base, torch.float32)


def _train(tmp_path, cfg, tables, k, init, tag="run"):
    out = tmp_path / f"{tag}-ckpt-{k + 1}"
    rows = train_round(cfg, **tables, init_checkpoint=str(init), output_checkpoint=str(out),
                       work_dir=str(tmp_path / f"{tag}-work-{k}"), round_index=k, progress=False)
    return rows, out


def test_a_lora_round_trains_only_the_adapter_and_saves_it_in_peft_format(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    base = save_tiny_checkpoint(tmp_path / "base")
    tables = make_round_tables(tok, n_prompts=2, samples=4, seed=4)  # 8 rollouts = 2 steps
    rows, out = _train(tmp_path, _cfg(), tables, 0, base)
    assert [r["step"] for r in rows] == [0, 1] and all(r["grad_norm"] > 0 for r in rows)
    # the checkpoint: adapter (float32) and tokenizer, no base weights
    assert lora.is_adapter_dir(out) and not list(out.glob("model*.safetensors"))
    saved = load_file(out / lora.ADAPTER_WEIGHTS)
    assert saved and all(v.dtype == torch.float32 for v in saved.values())
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)  # B moved
    # optimizer state covers the adapter's tensors only
    state = load_trainer_state(out)
    assert len(state["optimizer"]["state"]) == len(saved)
    # peft loads it, and the policy it defines is the trainer's (base unchanged + adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out))
    policy = lora.load_policy(_cfg().lora, out, torch.float32)
    ids = torch.tensor([tok.encode("Compute 123 + 456. Step 1")])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, policy(input_ids=ids).logits)
        plain = AutoModelForCausalLM.from_pretrained(base)(input_ids=ids).logits
    assert not torch.allclose(plain, policy(input_ids=ids).logits.detach())
    for name, p in policy.named_parameters():  # frozen base, float32 trained adapter
        assert p.requires_grad == (".lora_" in name and ".default." in name), name


def test_the_frozen_base_stays_in_the_compute_dtype_and_adapters_are_float32(tmp_path):
    base = save_tiny_checkpoint(tmp_path / "base")
    hf = lora.load_policy(_cfg().lora, base, torch.bfloat16)
    dtypes = {(".lora_" in n): p.dtype for n, p in hf.named_parameters()}
    assert dtypes == {False: torch.bfloat16, True: torch.float32}


def test_teacher_is_an_adapter_snapshot_with_zero_kl_at_the_sync_step(tmp_path):
    tok = make_tokenizer()
    base = save_tiny_checkpoint(tmp_path / "base")
    tables = make_round_tables(tok, n_prompts=3, samples=4, seed=4)  # 12 rollouts = 3 steps
    # the teacher sees the student's own prompt: then the divergence measures weights alone
    cfg = _cfg(teacher_sync_every=2, teacher_template="{problem}")
    rows, out = _train(tmp_path, cfg, tables, 0, base)
    # steps 0 and 2 are sync steps: teacher == policy, so the divergence is 0 there
    assert [r["teacher/step"] for r in rows] == [0, 0, 2]
    assert rows[0]["kl_loss"] == pytest.approx(0.0, abs=1e-7)
    assert rows[2]["kl_loss"] == pytest.approx(0.0, abs=1e-7)
    assert rows[1]["kl_loss"] > 1e-6  # lagged by one update
    # the snapshot on disk is the adapter, a small fraction of the model
    snap = next((tmp_path / "run-work-0").glob("progress-teacher-step*"), None)
    snaps = [snap] if snap else []
    model_bytes = sum(f.stat().st_size for f in (tmp_path / "base").glob("*.safetensors"))
    for s in snaps:
        assert lora.is_adapter_dir(s)
        assert (s / lora.ADAPTER_WEIGHTS).stat().st_size < model_bytes / 5


@pytest.mark.parametrize("other, says", [
    ({"rank": 2, "alpha": 4}, "r: 1 saved, 2 now"),  # rank-1 tensors would broadcast into rank 2
    ({"rank": 1, "alpha": 16}, "lora_alpha: 2 saved, 16 now"),  # same shapes, another scale
    ({"rank": 1, "alpha": 2, "target_modules": ["q_proj", "v_proj"]}, "target_modules"),
])
def test_an_adapter_trained_with_other_lora_settings_is_refused(tmp_path, other, says):
    base = save_tiny_checkpoint(tmp_path / "base")
    trained = lora.load_policy(TrainConfig(lora={"rank": 1, "alpha": 2}).lora, base, torch.float32)
    lora.save_adapter(trained, tmp_path / "adapter")
    with pytest.raises(ValueError, match="other LoRA settings") as err:
        lora.load_policy(TrainConfig(lora=other).lora, tmp_path / "adapter", torch.float32)
    assert says in str(err.value)


def test_a_lora_checkpoint_is_refused_by_a_full_weight_round(tmp_path):
    # transformers alone would load base + adapter with every parameter frozen
    tok = make_tokenizer()
    base = save_tiny_checkpoint(tmp_path / "base")
    tables = make_round_tables(tok, n_prompts=1, samples=4, seed=4)
    _, out = _train(tmp_path, _cfg(), tables, 0, base)
    with pytest.raises(ValueError, match="LoRA adapter checkpoint, but train.lora is not set"):
        _train(tmp_path, _cfg(lora=None), tables, 1, out, tag="full")
