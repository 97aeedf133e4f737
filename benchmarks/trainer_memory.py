"""Peak memory and time of one training step at Qwen3's vocabulary (151,936) on CPU.

    python benchmarks/trainer_memory.py [--resp-len 2048] [--hidden 64] [--chunk 1024]

Each variant runs in a fresh subprocess; memory = peak RSS during the steps minus RSS before them
(psutil / getrusage; tracemalloc does not see torch's allocator). Variants:
  grpo         lean path, GRPO term only
  trace        lean path, TRACE warm-up (λ = 0.5, teacher snapshot, 25% span tokens, forward KL)
  trace_after  lean path, TRACE after λ reached 0 (teacher skipped)
  dense        naive: full [L, V] logits for student and teacher, then the same TRACE loss
Targets: trace <= 1.25x grpo memory and <= 1.5x time; trace <= 0.5x dense memory;
trace_after <= 1.05x grpo.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("grpo", "trace", "trace_after", "dense")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _inputs(resp_len: int, vocab: int, prompt_len: int = 64, span_frac: float = 0.25):
    import torch

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=g)
    resp = torch.randint(0, vocab, (resp_len,), generator=g)
    ids_BL = torch.cat([prompt, resp])[None]
    resp_pos_N = torch.arange(prompt_len - 1, prompt_len - 1 + resp_len)
    # spans: 8 contiguous blocks covering span_frac of the response
    span = torch.zeros(resp_len, dtype=torch.bool)
    block = int(resp_len * span_frac) // 8
    for k in range(8):
        start = k * resp_len // 8
        span[start : start + block] = True
    return ids_BL, resp_pos_N, resp, span


def _random_qwen3(vocab_size: int, hidden: int, layers: int, seed: int):
    """A random tiny Qwen3 with tied embeddings (the shape, not the weights, matters here)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden // 4, max_position_embeddings=4096, tie_word_embeddings=True,
    ))


def run_variant(variant: str, resp_len: int, hidden: int, chunk: int, steps: int) -> dict:
    import torch

    from trace_rl.trainer.config import TrainConfig
    from trace_rl.trainer.lean import KLSpec, LeanCausalLM, SpanGroup, dense_policy_outputs
    from trace_rl.trainer.methods import LossInputs, get_method

    torch.manual_seed(0)
    vocab = 151_936
    hf = _random_qwen3(vocab, hidden=hidden, layers=2, seed=0)
    teacher_hf = copy.deepcopy(hf).requires_grad_(False)
    spec = KLSpec()
    lean, lean_t = LeanCausalLM(hf, chunk, spec), LeanCausalLM(teacher_hf, chunk, spec)
    ids_BL, resp_pos_N, target_N, span_N = _inputs(resp_len, vocab)
    mask_BT = torch.ones(1, resp_len, dtype=torch.bool)
    old_BT = torch.full((1, resp_len), -12.0)
    adv_B = torch.tensor([1.0])
    cfg = TrainConfig(method="grpo" if variant == "grpo" else "trace")
    lam = 0.0 if variant in ("grpo", "trace_after") else 0.5
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)
    span_idx_S = span_N.nonzero().squeeze(-1)
    attn_BL = torch.ones_like(ids_BL)

    def step() -> None:
        if variant == "dense":
            batch = {"input_ids_BL": ids_BL, "attention_mask_BL": attn_BL, "resp_pos_N": resp_pos_N,
                     "target_N": target_N, "dense_span_groups": [
                         ("forward", span_idx_S, ids_BL, attn_BL, resp_pos_N[span_idx_S])]}
            out = dense_policy_outputs(hf, teacher_hf, batch, spec)
        else:
            groups, t_w = [], None
            if lam > 0:
                with torch.no_grad():
                    t_h = lean_t(mode="hidden", input_ids_BL=ids_BL, attention_mask_BL=attn_BL,
                                 pos_S=resp_pos_N[span_idx_S])
                groups, t_w = [SpanGroup("forward", span_idx_S, t_h)], lean_t.head_weight()
            out = lean(mode="policy", input_ids_BL=ids_BL, attention_mask_BL=attn_BL,
                       resp_pos_N=resp_pos_N, target_N=target_N, span_groups=groups,
                       teacher_weight_VH=t_w)
        span_BT = span_N[None] if lam > 0 else torch.zeros_like(mask_BT)
        x = LossInputs(out["logp_N"][None], old_BT, adv_B, mask_BT, span_BT, out["kl_N"][None],
                       float(resp_len))
        loss, _ = get_method(cfg.method).loss(x, cfg, lam)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    base = _peak_rss()
    import psutil

    rss_before = psutil.Process().memory_info().rss
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _peak_rss()
    return {"variant": variant, "peak_delta_bytes": peak - max(base, rss_before),
            "peak_rss_bytes": peak, "step_s": min(times), "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resp-len", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variant", choices=VARIANTS, help="internal: run one variant and print JSON")
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a.resp_len, a.hidden, a.chunk, a.steps)))
        return
    results = {}
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", v, "--resp-len", str(a.resp_len),
               "--hidden", str(a.hidden), "--chunk", str(a.chunk), "--steps", str(a.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[v] = json.loads(out.stdout.strip().splitlines()[-1])
    g, t, ta, d = (results[v] for v in VARIANTS)
    mib = lambda b: b / 2**20
    print(f"vocab 151936, response {a.resp_len} tokens, hidden {a.hidden}, chunk {a.chunk}")
    print(f"{'variant':12s} {'peak ΔRSS MiB':>14s} {'step s (min)':>13s}")
    for v in VARIANTS:
        r = results[v]
        print(f"{v:12s} {mib(r['peak_delta_bytes']):14.0f} {r['step_s']:13.3f}")
    ratio = lambda x, y, k: x[k] / y[k]
    checks = [
        ("trace / grpo memory", ratio(t, g, "peak_delta_bytes"), 1.25),
        ("trace / grpo time", ratio(t, g, "step_s"), 1.5),
        ("trace / dense memory", ratio(t, d, "peak_delta_bytes"), 0.5),
        ("trace_after / grpo memory", ratio(ta, g, "peak_delta_bytes"), 1.05),
        ("trace_after / grpo time", ratio(ta, g, "step_s"), 1.05),
    ]
    for name, value, target in checks:
        print(f"{name:28s} {value:6.2f}  (target <= {target}) {'OK' if value <= target else 'MISS'}")


if __name__ == "__main__":
    main()
