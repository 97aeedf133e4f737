"""The loss properties with LoRA on: the memory-lean forward equals the dense full-logits
reference (losses and the adapters' gradients) when the student is base + trained adapter and
the teacher is the same base + the teacher adapter (the lagged snapshot) switched on in the SAME
module, as trainer/lora_teacher.py does; and descending the routed divergence through the
adapters alone moves the student toward the teacher in every direction."""

import copy

import pytest
import torch
from test_lean import CASES
from tiny import make_model, make_round_tables, make_tokenizer
from trace_rl.trainer import lora
from trace_rl.trainer.batch import build_examples, collate, to_bt
from trace_rl.trainer.config import LoraConfig, TrainConfig
from trace_rl.trainer.lean import KLSpec, LeanCausalLM, SpanGroup, dense_policy_outputs
from trace_rl.trainer.losses import grpo_advantages
from trace_rl.trainer.methods import LossInputs, get_method

LC = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"])


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()
    hf = lora.attach(make_model(len(tok), seed=1), LC, "base")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B != 0 in both adapters, and they differ: every KL is non-zero
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    tables = make_round_tables(tok, n_prompts=2, samples=4, seed=3)
    return tok, hf, tables


def _batch(cfg, tok, tables):
    examples = build_examples(cfg, tok, **tables)
    adv = grpo_advantages(torch.tensor([e.reward for e in examples]),
                          [e.group for e in examples]).tolist()
    old = [torch.full((len(e.response_ids),), -5.0) for e in examples]
    mb = collate(examples, old, adv, tok.pad_token_id, with_teacher=True)
    assert mb.teacher is not None and mb.span_BT.any()
    return mb


def _lean(hf, spec, mb, chunk=5):
    s, t = mb.student, mb.teacher
    lean = LeanCausalLM(hf, chunk, spec)
    with torch.no_grad(), lora.teacher_adapter(hf):  # the LoraTeacher's hidden-state path
        t_h = lean(mode="hidden", input_ids_BL=t.input_ids_BL,
                   attention_mask_BL=t.attention_mask_BL, pos_S=t.resp_pos_N)
    groups = [SpanGroup(d, i, t_h[sel]) for d, i, sel in mb.span_dirs]
    return lean(mode="policy", input_ids_BL=s.input_ids_BL, attention_mask_BL=s.attention_mask_BL,
                resp_pos_N=s.resp_pos_N, target_N=s.target_N, span_groups=groups,
                teacher_weight_VH=lean.head_weight().detach())


def _dense(hf, spec, mb):
    s, t = mb.student, mb.teacher
    teacher = copy.deepcopy(hf)  # an independent model that applies the teacher adapter
    lora.activate(teacher, lora.TEACHER)
    batch = {"input_ids_BL": s.input_ids_BL, "attention_mask_BL": s.attention_mask_BL,
             "resp_pos_N": s.resp_pos_N, "target_N": s.target_N,
             "dense_span_groups": [(d, i, t.input_ids_BL, t.attention_mask_BL, t.resp_pos_N[sel])
                                   for d, i, sel in mb.span_dirs]}
    return dense_policy_outputs(hf, teacher, batch, spec)


def _loss_and_grads(path, cfg, hf, mb):
    hf.zero_grad()
    out = (_lean if path == "lean" else _dense)(hf, KLSpec.of(cfg), mb)
    inputs = LossInputs(to_bt(out["logp_N"], mb.mask_BT), mb.old_logp_BT, mb.adv_B, mb.mask_BT,
                        mb.span_BT, to_bt(out["kl_N"], mb.mask_BT), float(mb.mask_BT.sum()))
    loss, _ = get_method(cfg.method).loss(inputs, cfg, 0.3)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}
    return out, loss.detach(), grads


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_lean_equals_dense_with_lora(setup, overrides):
    tok, hf, tables = setup
    cfg = TrainConfig(**overrides, lora=LC.model_dump())
    mb = _batch(cfg, tok, tables)
    lean_out, lean_loss, lean_g = _loss_and_grads("lean", cfg, hf, mb)
    dense_out, dense_loss, dense_g = _loss_and_grads("dense", cfg, hf, mb)
    for key in ("logp_N", "entropy_N", "kl_N", "kl_raw_N"):
        torch.testing.assert_close(lean_out[key], dense_out[key], atol=1e-5, rtol=1e-5)
    assert (dense_out["kl_raw_N"] > 1e-4).any()
    torch.testing.assert_close(lean_loss, dense_loss, atol=1e-5, rtol=1e-5)
    # gradients reach the trained adapter only: neither the frozen base nor the teacher's
    assert lean_g.keys() == dense_g.keys()
    assert lean_g and all(".lora_" in n and ".default." in n for n in lean_g)
    for name in dense_g:
        torch.testing.assert_close(lean_g[name], dense_g[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_descending_the_kl_through_the_adapter_moves_the_student_toward_the_teacher(
        setup, direction):
    tok, hf0, tables = setup
    hf = copy.deepcopy(hf0)
    cfg = TrainConfig(method="self_opd", self_opd={"direction": direction, "mode": "replace"},
                      kl_bound="token_scale", lora=LC.model_dump())
    mb = _batch(cfg, tok, tables)
    spec = KLSpec.of(cfg)
    opt = torch.optim.Adam([p for p in hf.parameters() if p.requires_grad], lr=1e-2)
    base = {n: p.detach().clone() for n, p in hf.named_parameters() if not p.requires_grad}
    raw = []
    for _ in range(6):
        opt.zero_grad()
        out = _lean(hf, spec, mb, chunk=512)
        raw.append(float(out["kl_raw_N"].sum()))
        out["kl_N"].sum().backward()
        opt.step()
    assert raw[-1] < 0.7 * raw[0], raw  # the true divergence falls
    for n, p in hf.named_parameters():  # the base and the teacher snapshot never move
        if n in base:
            assert torch.equal(p, base[n]), n
