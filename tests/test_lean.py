"""The memory-lean forward equals the dense full-logits reference: loss and gradients.

Tolerance: float32 on CPU, atol 1e-5 on per-token values and loss, rtol 1e-4 / atol 1e-6 on
gradients (the two paths sum the same terms in a different order).
"""

import copy

import pytest
import torch

from trace_rl.trainer.batch import build_examples, collate, to_bt
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.lean import KLSpec, LeanCausalLM, SpanGroup, dense_policy_outputs
from trace_rl.trainer.losses import grpo_advantages
from trace_rl.trainer.methods import LossInputs, get_method
from tiny import make_model, make_round_tables, make_tokenizer


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()
    student = make_model(len(tok), seed=1)
    teacher = copy.deepcopy(student)
    with torch.no_grad():  # a teacher that differs from the student, so every KL is non-zero
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tables = make_round_tables(tok, n_prompts=2, samples=4, seed=3)
    return tok, student, teacher, tables


def _run(path, cfg, tok, student, teacher, tables):
    examples = build_examples(cfg, tok, **tables)
    adv = grpo_advantages([e.reward for e in examples], [e.group for e in examples]).tolist()
    old = [torch.full((len(e.response_ids),), -5.0) for e in examples]
    mb = collate(examples, old, adv, tok.pad_token_id, with_teacher=True)
    assert mb.teacher is not None and mb.span_BT.any()
    spec = KLSpec.of(cfg)
    s, t = mb.student, mb.teacher
    student.zero_grad()
    if path == "lean":
        lean, lean_t = LeanCausalLM(student, 5, spec), LeanCausalLM(teacher, 5, spec)
        with torch.no_grad():
            t_h = lean_t(mode="hidden", input_ids_BL=t.input_ids_BL,
                         attention_mask_BL=t.attention_mask_BL, pos_S=t.resp_pos_N)
        groups = [SpanGroup(d, i, t_h[sel]) for d, i, sel in mb.span_dirs]
        out = lean(mode="policy", input_ids_BL=s.input_ids_BL,
                   attention_mask_BL=s.attention_mask_BL, resp_pos_N=s.resp_pos_N,
                   target_N=s.target_N, span_groups=groups,
                   teacher_weight_VH=lean_t.head_weight())
    else:
        batch = {"input_ids_BL": s.input_ids_BL, "attention_mask_BL": s.attention_mask_BL,
                 "resp_pos_N": s.resp_pos_N, "target_N": s.target_N,
                 "dense_span_groups": [(d, i, t.input_ids_BL, t.attention_mask_BL,
                                        t.resp_pos_N[sel]) for d, i, sel in mb.span_dirs]}
        out = dense_policy_outputs(student, teacher, batch, spec)
    inputs = LossInputs(to_bt(out["logp_N"], mb.mask_BT), mb.old_logp_BT, mb.adv_B, mb.mask_BT,
                        mb.span_BT, to_bt(out["kl_N"], mb.mask_BT), float(mb.mask_BT.sum()))
    loss, _ = get_method(cfg.method).loss(inputs, cfg, 0.3)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return out, loss.detach(), grads


BOTH = {"key_forward": True, "error_reverse": True}
CASES = {
    "fkl+rkl": dict(method="trace", route=BOTH),
    # a cap below the testbed's divergences, so that the bound is active on most span tokens
    "token_scale_active": dict(method="trace", route=BOTH, kl_token_cap=1e-3),
    "noclip": dict(method="trace", route=BOTH, kl_bound="none"),
    "per_term_clip": dict(method="trace", route=BOTH, kl_bound="per_term_clip"),
    "topk": dict(method="trace", kl_support="topk", topk=7),
    "topk_active": dict(method="trace", kl_support="topk", topk=7, kl_token_cap=1e-3),
    "jsd": dict(method="self_opd", self_opd={"direction": "jsd"}),
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_lean_equals_dense(setup, overrides):
    tok, student, teacher, tables = setup
    cfg = TrainConfig(**overrides)
    lean_out, lean_loss, lean_g = _run("lean", cfg, tok, student, teacher, tables)
    dense_out, dense_loss, dense_g = _run("dense", cfg, tok, student, teacher, tables)
    for key in ("logp_N", "entropy_N", "kl_N", "kl_raw_N"):
        torch.testing.assert_close(lean_out[key], dense_out[key], atol=1e-5, rtol=1e-5)
    assert (dense_out["kl_N"] != 0).any()
    if cfg.kl_bound == "token_scale" and cfg.kl_token_cap < 1e-2:
        assert (dense_out["kl_raw_N"] > cfg.kl_token_cap).any()  # the bound did act
        assert dense_out["kl_N"].max() <= cfg.kl_token_cap + 1e-7
    torch.testing.assert_close(lean_loss, dense_loss, atol=1e-5, rtol=1e-5)
    assert lean_g.keys() == dense_g.keys() and len(lean_g) > 0
    for name in dense_g:
        torch.testing.assert_close(lean_g[name], dense_g[name], atol=1e-6, rtol=1e-4, msg=name)


def test_spans_cover_first_and_last_token_and_span_free_rows(setup):
    tok, _, _, tables = setup
    cfg = TrainConfig(method="trace", route={"key_forward": True, "error_reverse": True})
    examples = build_examples(cfg, tok, **tables)
    masks = [e.plan.mask_R for e in examples]
    assert any(m[0] for m in masks) and any(m[-1] for m in masks)
    assert any(not m.any() for m in masks)
