"""The snapshot teacher computes as the student does: at a sync step, where its weights are the
student's, its divergence from the student is exactly 0 (issue 26, item 10: bf16 weights without
autocast against float32 weights under autocast gave 2.5e-6 nats/token)."""

import pytest
import torch
from accelerate import Accelerator

from tiny import make_model, make_tokenizer
from trace_rl.trainer.batch import pad_sequences
from trace_rl.trainer.lean import KLSpec, LeanCausalLM, SpanGroup
from trace_rl.trainer.teacher import TeacherHandle


def _trained_master(model: torch.nn.Module) -> torch.nn.Module:
    """Float32 weights as the optimizer leaves them: a sub-ulp step off bf16's grid (an earlier
    version of this test used bf16-exact weights, where a snapshot rounding its norms and
    embeddings to bf16 still read KL 0; in a real run it read 4e-7..6e-7 nats/token)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-4 * p.abs() * torch.randn(p.shape, generator=g))
            assert not torch.equal(p, p.to(torch.bfloat16).float())
    return model


@pytest.mark.parametrize(("layers", "tie"), [(2, True), (6, True), (2, False)])
def test_divergence_at_a_sync_step_is_zero(tmp_path, layers, tie):
    tok = make_tokenizer()
    hf = _trained_master(make_model(len(tok), layers=layers, seed=3, tie=tie)).train()
    hf.config.use_cache = False
    student = LeanCausalLM(hf, chunk=16, kl_spec=KLSpec(bound="none"),
                           compute_dtype=torch.bfloat16)
    acc = Accelerator(cpu=True)
    teacher = TeacherHandle(10, tmp_path, str(tmp_path / "none"), torch.bfloat16, 16,
                            inherit=False)
    teacher.ensure(20, student, acc)  # a sync step: the teacher is this very policy
    assert teacher.source_step == 20
    t_model = teacher.model.hf
    # matmul weights stay in the compute dtype (the memory of a bf16 teacher), the rest float32
    assert t_model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert t_model.model.norm.weight.dtype == torch.float32
    assert t_model.get_input_embeddings().weight.dtype == torch.float32
    assert t_model.get_output_embeddings().weight.dtype == (torch.float32 if tie else torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, len(tok), (n,), generator=g).tolist() for n in (5, 9)]
    responses = [torch.randint(10, len(tok), (n,), generator=g).tolist() for n in (12, 7)]
    s = pad_sequences(prompts, responses, pad_id=0)
    t_hidden = teacher.hidden(student, input_ids_BL=s.input_ids_BL,
                              attention_mask_BL=s.attention_mask_BL, pos_S=s.resp_pos_N)
    index = torch.arange(s.target_N.numel())
    for direction in ("forward", "reverse"):
        out = student(mode="policy", input_ids_BL=s.input_ids_BL,
                      attention_mask_BL=s.attention_mask_BL, resp_pos_N=s.resp_pos_N,
                      target_N=s.target_N, span_groups=[SpanGroup(direction, index, t_hidden)],
                      teacher_weight_VH=teacher.head_weight(student))
        kl = out["kl_raw_N"]
        print(f"layers {layers} {direction}: mean KL/token {float(kl.mean()):.3g}, "
              f"max {float(kl.abs().max()):.3g}")
        assert torch.equal(kl, torch.zeros_like(kl))  # the same computation, bit for bit
