"""One on-policy round on one GPU, engine stand-in included: rollout, train step, weight sync,
rollout again.

    python benchmarks/gpu_round.py                       # Qwen3-0.6B-shaped, CUDA
    python benchmarks/gpu_round.py --device cpu --tiny   # the same code path in seconds on CPU

The lent GPU machine has torch, transformers, safetensors, pyarrow but no vLLM, pydantic or
prefect, and the repo is not installed there. So transformers `generate` stands in for vLLM (a
second model instance, as a colocated engine holds its own copy), and only the pure-torch trainer
modules (trainer/losses.py, trainer/lean.py) are imported, by file path. Random weights from a
config; rewards are random 0/1, which is all a throughput measurement needs.

Precision as the trainer runs it: float32 master weights and AdamW state with bf16 compute
(LeanCausalLM's autocast), bf16 weights in the generating model and the teacher snapshot.

Round: rollout (sampled, every sequence runs to --response tokens) -> one optimizer step of the
routed TRACE loss (clipped policy gradient off spans, PG + full-vocabulary KL to a frozen teacher
snapshot on 25% of the response tokens) through the memory-lean path with micro-batches ->
in-place weight sync (the trainer's state dict copied into the generating model) -> rollout
again. Prints tokens/s and MFU of each phase, the share of the round spent in weight sync, and
peak memory.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def trainer_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """trace_rl.trainer.losses and .lean without installing the repo or running
    trainer/__init__.py (whose config needs pydantic): a bare package pointing at trainer/."""
    if "trace_rl.trainer.lean" not in sys.modules:
        try:
            importlib.import_module("trace_rl.trainer.lean")  # installed: use it
        except ImportError:
            for name, path in (("trace_rl", REPO), ("trace_rl.trainer", REPO / "trainer")):
                pkg = types.ModuleType(name)
                pkg.__path__ = [str(path)]
                sys.modules[name] = pkg
    return (importlib.import_module("trace_rl.trainer.losses"),
            importlib.import_module("trace_rl.trainer.lean"))


def model_config(tiny: bool):
    from transformers import Qwen3Config

    if tiny:
        return Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True)
    # Qwen3-0.6B's shape (its weights are not downloadable here, nor needed).
    return Qwen3Config(vocab_size=151_936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, max_position_embeddings=40_960, tie_word_embeddings=True,
                       rope_theta=1_000_000)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rollout(gen_model, prompts_BP: torch.Tensor, response: int, device: str) -> tuple[torch.Tensor, float]:
    """Sampled continuations [B, P + response] and the seconds taken."""
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = gen_model.generate(
            input_ids=prompts_BP, attention_mask=torch.ones_like(prompts_BP), do_sample=True,
            temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=response,
            min_new_tokens=response, pad_token_id=0, eos_token_id=None)
    sync(device)
    return out, time.perf_counter() - t0


def train_step(lean, lean_teacher, opt, losses, lean_mod, seqs_BL, prompt_len: int, groups: int,
               micro: int, device: str) -> tuple[float, dict]:
    """One optimizer step of the routed loss over all sequences, `micro` at a time."""
    B, L = seqs_BL.shape
    resp = L - prompt_len
    rewards_B = torch.randint(0, 2, (B,)).float()
    adv_B = losses.grpo_advantages(rewards_B, torch.arange(B) // (B // groups)).to(device)
    sync(device)
    t0 = time.perf_counter()
    total_tokens = float(B * resp)
    metrics = {"loss": 0.0, "kl": 0.0}
    for lo in range(0, B, micro):
        ids_bL = seqs_BL[lo:lo + micro]
        b = ids_bL.shape[0]
        attn_bL = torch.ones_like(ids_bL)
        pos_N = (torch.arange(b, device=device)[:, None] * L + prompt_len - 1
                 + torch.arange(resp, device=device)[None]).flatten()
        target_N = ids_bL.flatten()[pos_N + 1]
        span_bT = torch.zeros(b, resp, dtype=torch.bool, device=device)
        span_bT[:, : max(1, resp // 4)] = True  # 25% of the response tokens are routed to KL
        idx_S = span_bT.flatten().nonzero().squeeze(-1)
        with torch.no_grad():
            t_h_SH = lean_teacher(mode="hidden", input_ids_BL=ids_bL, attention_mask_BL=attn_bL,
                                  pos_S=pos_N[idx_S])
        out = lean(mode="policy", input_ids_BL=ids_bL, attention_mask_BL=attn_bL,
                   resp_pos_N=pos_N, target_N=target_N,
                   span_groups=[lean_mod.SpanGroup("forward", idx_S, t_h_SH)],
                   teacher_weight_VH=lean_teacher.head_weight())
        logp_bT = out["logp_N"].view(b, resp)
        kl_bT = out["kl_N"].view(b, resp)
        loss_bT = losses.routed_token_loss(logp_bT, logp_bT.detach(), adv_B[lo:lo + b], kl_bT,
                                           span_bT, lam=0.5, w0=1.0)
        mask_bT = torch.ones_like(span_bT)
        loss = losses.aggregate(loss_bT, mask_bT, "token_mean", normaliser=total_tokens)
        loss.backward()
        metrics["loss"] += float(loss.detach())
        metrics["kl"] += float(kl_bT.detach()[span_bT].sum()) / max(1, int(span_bT.sum())) * b / B
    torch.nn.utils.clip_grad_norm_(lean.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0, metrics


def weight_sync(train_model, gen_model, device: str) -> float:
    """The trainer's weights into the generating model, in place (what a colocated engine's
    weight update does); the seconds taken."""
    sync(device)
    t0 = time.perf_counter()
    gen_params = dict(gen_model.named_parameters())
    with torch.no_grad():
        for name, p in train_model.named_parameters():
            gen_params[name].copy_(p, non_blocking=True)
    sync(device)
    return time.perf_counter() - t0


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def train_flops(n_params: int, cfg, batch: int, seq: int, resp: int) -> float:
    """Policy forward + backward (6·N·tokens + causal attention) plus the teacher forward."""
    tokens = batch * seq
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq * tokens / 2
    return (6 * n_params * tokens + attn) + (2 * n_params * tokens + attn / 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model and a small batch")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (the GRPO group)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--response", type=int, default=512)
    ap.add_argument("--micro", type=int, default=16, help="sequences per micro-batch")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if args.tiny:
        args.prompts, args.n, args.prompt_len, args.response, args.micro = 2, 4, 16, 16, 4
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu --tiny")
    # the trainer's precision path: float32 master weights under bf16 autocast; the generating
    # model and the teacher snapshot hold bf16 weights (as the engine and train_round load them)
    dtype = torch.bfloat16
    losses, lean_mod = trainer_modules()
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = model_config(args.tiny)
    t0 = time.perf_counter()
    with torch.device(device):  # initialise on the device: a CPU init of 0.6B takes seconds
        train_model = Qwen3ForCausalLM(cfg)  # float32
        gen_model = Qwen3ForCausalLM(cfg).to(dtype).eval()
        teacher = Qwen3ForCausalLM(cfg).to(dtype).eval()
    gen_model.load_state_dict(train_model.state_dict())
    teacher.load_state_dict(train_model.state_dict())  # the round's frozen snapshot
    if hasattr(train_model, "activation_checkpointing_enable"):  # transformers >= 5.x
        train_model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        train_model.gradient_checkpointing_enable({"use_reentrant": False})
    train_model.config.use_cache = False
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in train_model.parameters())
    lean = lean_mod.LeanCausalLM(train_model, chunk=1024, compute_dtype=dtype)
    lean_teacher = lean_mod.LeanCausalLM(teacher, chunk=1024)
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-6, foreach=True)

    B = args.prompts * args.n
    prompts_BP = torch.randint(1, cfg.vocab_size, (args.prompts, args.prompt_len), device=device)
    prompts_BP = prompts_BP.repeat_interleave(args.n, dim=0)
    seqs_BL, gen1_s = rollout(gen_model, prompts_BP, args.response, device)
    train_s, metrics = train_step(lean, lean_teacher, opt, losses, lean_mod, seqs_BL,
                                  args.prompt_len, args.prompts, args.micro, device)
    sync_s = weight_sync(train_model, gen_model, device)
    same = all(torch.equal(a.to(b.dtype), b)
               for a, b in zip(train_model.parameters(), gen_model.parameters()))
    _, gen2_s = rollout(gen_model, prompts_BP, args.response, device)

    gen_tokens = B * args.response
    seq = args.prompt_len + args.response
    peak = next((v for k, v in PEAK_BF16_FLOPS.items()
                 if device.startswith("cuda") and k in torch.cuda.get_device_name()), None)
    tflops_train = train_flops(n_params, cfg, B, seq, args.response) / train_s / 1e12
    tflops_gen = 2 * n_params * gen_tokens / gen2_s / 1e12
    round_s = gen1_s + train_s + sync_s
    out = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "params_M": n_params / 1e6, "sequences": B, "prompt_len": args.prompt_len,
        "response": args.response, "build_s": build_s,
        "rollout1_s": gen1_s, "rollout2_s": gen2_s, "train_step_s": train_s,
        "weight_sync_s": sync_s, "weights_equal_after_sync": same,
        "rollout_tokens_per_s": gen_tokens / gen2_s,
        "train_tokens_per_s": B * seq / train_s,
        "train_tflops": tflops_train, "rollout_tflops": tflops_gen,
        "train_mfu": tflops_train * 1e12 / peak if peak else None,
        "rollout_mfu": tflops_gen * 1e12 / peak if peak else None,
        "weight_sync_share": sync_s / round_s,
        "peak_mem_gib": peak_memory_gib(device), **metrics,
    }
    for k, v in out.items():
        print(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if not same:
        sys.exit("weight sync left the generating model's weights different from the trainer's")


if __name__ == "__main__":
    main()
