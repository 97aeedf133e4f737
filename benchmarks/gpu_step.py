"""One optimizer step of a Qwen3-1.7B-shaped random model on one GPU: TRACE warm-up vs GRPO.

    python benchmarks/gpu_step.py [--shapes 4x4096,4x16384] [--layers 28] [--chunk 1024]

The trainer's precision path: float32 master weights and AdamW state, bf16 compute under autocast
(LeanCausalLM's compute_dtype), a bf16 teacher snapshot; gradient checkpointing, the memory-lean
path. Prints step time, tokens/s, MFU
(6·params·tokens + causal attention FLOPs of the student's training pass, over the GPU's dense
bf16 peak) and peak allocated memory. The TRACE step adds the teacher forward (a weight snapshot)
and full-vocabulary forward KL on 25% of the response tokens. Exits with a message without CUDA.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
PROMPT_LEN = 256


def _model(layers: int, device: str):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=151_936, hidden_size=2048, intermediate_size=6144,
                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                      head_dim=128, max_position_embeddings=40_960, tie_word_embeddings=True,
                      rope_theta=1_000_000)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg)  # float32: the master weights AdamW steps
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, cfg


def _trainer(model, chunk: int):
    """As train_round sets it up: the policy in float32 under bf16 autocast, AdamW over the
    float32 parameters, the teacher snapshot in bf16."""
    import torch

    from trace_rl.trainer.lean import KLSpec, LeanCausalLM

    lean = LeanCausalLM(model, chunk, KLSpec(), compute_dtype=torch.bfloat16)
    lean_t = copy.deepcopy(lean).to(torch.bfloat16).requires_grad_(False)
    lean_t.compute_dtype = None  # bf16 weights compute in bf16 natively
    return lean, lean_t, torch.optim.AdamW(lean.parameters(), lr=1e-5)


def _flops(n_params: int, cfg, batch: int, seq: int) -> float:
    tokens = batch * seq
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq * tokens / 2
    return 6 * n_params * tokens + attn


def _step(variant, lean, lean_t, opt, batch: int, seq: int, dev: str = "cuda"):
    import torch

    from trace_rl.trainer.config import TrainConfig
    from trace_rl.trainer.lean import SpanGroup
    from trace_rl.trainer.methods import LossInputs, get_method

    ids_BL = torch.randint(0, 151_936, (batch, seq), device=dev)
    attn_BL = torch.ones_like(ids_BL)
    resp = seq - PROMPT_LEN
    pos_N = (torch.arange(batch, device=dev)[:, None] * seq + PROMPT_LEN - 1
             + torch.arange(resp, device=dev)[None]).flatten()
    target_N = ids_BL.flatten()[pos_N + 1]
    mask_BT = torch.ones(batch, resp, dtype=torch.bool, device=dev)
    span_BT = torch.zeros_like(mask_BT)
    span_BT[:, : resp // 4] = True  # 25% of the response tokens
    lam = 0.5 if variant == "trace" else 0.0
    groups, t_w = [], None
    if lam > 0:
        idx_S = span_BT.flatten().nonzero().squeeze(-1)
        with torch.no_grad():
            t_h = lean_t(mode="hidden", input_ids_BL=ids_BL, attention_mask_BL=attn_BL,
                         pos_S=pos_N[idx_S])
        groups, t_w = [SpanGroup("forward", idx_S, t_h)], lean_t.head_weight()
    out = lean(mode="policy", input_ids_BL=ids_BL, attention_mask_BL=attn_BL, resp_pos_N=pos_N,
               target_N=target_N, span_groups=groups, teacher_weight_VH=t_w)
    cfg = TrainConfig(method="trace" if lam else "grpo")
    x = LossInputs(out["logp_N"].view(batch, resp), out["logp_N"].detach().view(batch, resp),
                   torch.ones(batch, device=dev), mask_BT, span_BT if lam else span_BT & False,
                   out["kl_N"].view(batch, resp), float(batch * resp))
    loss, _ = get_method(cfg.method).loss(x, cfg, lam)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lean.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="TRACE vs GRPO step on one GPU")
    ap.add_argument("--shapes", default="4x4096,4x16384")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run the same code on CPU (use with --layers 1 --shapes 1x512)")
    a = ap.parse_args()
    import torch

    if a.cpu_smoke:
        return _cpu_smoke(a)
    if not torch.cuda.is_available():
        print("gpu_step.py: no CUDA device found; this benchmark needs one GPU. Nothing to do.")
        return

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    model, cfg = _model(a.layers, "cuda")
    n_params = sum(p.numel() for p in model.parameters())
    lean, lean_t, opt = _trainer(model, a.chunk)
    print(f"{name}: Qwen3-1.7B shape, {a.layers} layers, {n_params / 1e9:.2f} B params, fp32 "
          f"master + bf16 autocast, gradient checkpointing, chunk {a.chunk}")
    print(f"{'shape':>9s} {'variant':>6s} {'step s':>8s} {'tok/s':>9s} {'MFU':>6s} {'peak GiB':>9s}")
    for shape in a.shapes.split(","):
        batch, seq = (int(x) for x in shape.split("x"))
        for variant in ("grpo", "trace"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                _step(variant, lean, lean_t, opt, batch, seq)  # warm-up (allocates Adam state)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(a.repeats):
                    _step(variant, lean, lean_t, opt, batch, seq)
                torch.cuda.synchronize()
            except torch.OutOfMemoryError:
                print(f"{shape:>9s} {variant:>6s}  out of memory")
                continue
            dt = (time.perf_counter() - t0) / a.repeats
            mfu = _flops(n_params, cfg, batch, seq) / dt / peak if peak else float("nan")
            print(f"{shape:>9s} {variant:>6s} {dt:8.3f} {batch * seq / dt:9.0f} {mfu:6.1%} "
                  f"{torch.cuda.max_memory_allocated() / 2**30:9.1f}")


def _cpu_smoke(a) -> None:
    """Checks the code path without a GPU: one GRPO and one TRACE step, loss finite."""
    model, _ = _model(a.layers, "cpu")
    lean, lean_t, opt = _trainer(model, a.chunk)
    for shape in a.shapes.split(","):
        batch, seq = (int(x) for x in shape.split("x"))
        for variant in ("grpo", "trace"):
            t0 = time.perf_counter()
            _step(variant, lean, lean_t, opt, batch, seq, "cpu")
            print(f"cpu smoke {shape} {variant}: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
