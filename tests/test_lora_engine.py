"""Rollouts from a LoRA checkpoint: the engine samples from the merged model (peft's own merge
of base + adapter), so outputs and log-probs equal those of a merged reference model; the
log-probs are the trainer's LoRA policy's (unmerged) within float tolerance."""

import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tiny import PROMPTS, build_model_dir, teacher_forced_logprobs
from trace_rl.stages.engines import generate
from trace_rl.stages.engines.config import RolloutConfig
from trace_rl.stages.lora_weights import engine_weights
from trace_rl.trainer import lora
from trace_rl.trainer.config import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

LC = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-engine")
    base = build_model_dir(root / "base", p_eos=0.02)
    policy = lora.load_policy(LC, base, torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for name, p in policy.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    ckpt = root / "checkpoints" / "round-0001"
    lora.save_checkpoint(policy, AutoTokenizer.from_pretrained(base), ckpt, lora.gathered(policy))
    # the reference: peft's own loading and merge, saved as a plain model folder
    ref = root / "merged-ref"
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(ckpt))
    merged.merge_and_unload().save_pretrained(ref)
    AutoTokenizer.from_pretrained(base).save_pretrained(ref)
    (ref / "generation_config.json").write_text((base / "generation_config.json").read_text())
    return base, ckpt, ref, policy


def _cfg():
    return RolloutConfig(engine="hf", n=3, max_tokens=24, seed=5, enable_thinking=False,
                         hf={"num_threads": 1})


def test_hf_engine_on_a_lora_checkpoint_equals_the_merged_model(dirs):
    base, ckpt, ref, policy = dirs
    rows = generate(_cfg(), str(ckpt), PROMPTS, progress=False)
    want = generate(_cfg(), str(ref), PROMPTS, progress=False)
    assert [r["response_token_ids"] for r in rows] == [r["response_token_ids"] for r in want]
    for a, b in zip(rows, want, strict=True):
        torch.testing.assert_close(torch.tensor(a["response_logprobs"]),
                                   torch.tensor(b["response_logprobs"]), atol=1e-5, rtol=1e-5)
    # the adapter matters: the base model samples something else
    plain = generate(_cfg(), str(base), PROMPTS, progress=False)
    assert [r["response_token_ids"] for r in plain] != [r["response_token_ids"] for r in rows]
    # the merged model is cached in the run's scratch, once per adapter
    merged = engine_weights(str(ckpt))
    assert merged.startswith(str(ckpt.parent.parent / "scratch" / "lora-merged"))
    assert engine_weights(str(ckpt)) == merged and engine_weights(str(base)) == str(base)


def test_engine_logprobs_are_the_trainer_lora_policy_logprobs(dirs):
    _, ckpt, _, policy = dirs
    rows = generate(_cfg(), str(ckpt), PROMPTS[:1], progress=False)
    policy.eval()
    for r in rows:
        trainer = teacher_forced_logprobs(policy, r["prompt_token_ids"], r["response_token_ids"])
        torch.testing.assert_close(torch.tensor(r["response_logprobs"]), trainer,
                                   atol=1e-4, rtol=1e-4)


def test_a_changed_adapter_under_the_same_name_is_merged_again_and_a_raced_merge_is_kept(
        dirs, tmp_path, monkeypatch):
    _, ckpt, _, _ = dirs
    mine = tmp_path / "checkpoints" / "round-0001"
    shutil.copytree(ckpt, mine)
    first = engine_weights(str(mine))
    policy = lora.load_policy(LC, mine, torch.float32)
    with torch.no_grad():  # the next round rewrites round-0001's adapter (e.g. a rerun)
        for name, p in policy.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.mul_(-1.0)
    lora.save_adapter(policy, mine)
    # another process finishes the same merge while this one merges: its copy is taken
    real_merge = lora.merge

    def raced(src, out, dtype=None):
        real_merge(src, out, dtype)
        real_merge(src, out.parent / Path(out).name.split(".tmp-")[0], dtype)
        return out

    monkeypatch.setattr(lora, "merge", raced)
    second = engine_weights(str(mine))
    assert second != first and not Path(first).exists()  # the stale merge is gone
    assert [p.name for p in Path(second).parent.iterdir()] == [Path(second).name]
    ids = torch.tensor([[3, 7, 11, 5, 2]])
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(second)(input_ids=ids).logits,
                                   policy(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
