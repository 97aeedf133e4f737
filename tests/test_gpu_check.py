"""benchmarks/gpu_check.sh rehearsed on CPU (`--device cpu --tiny`): the script the GPU machine
runs, with the packages that machine lacks refused, prints its one JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "build" / "gpu_wheels"


def test_gpu_check_rehearsal_on_cpu_prints_one_json_report():
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    step, gen, agree = report["train_step"], report["generation"], report["bf16_vs_fp32"]
    assert step["tokens_per_s"] > 0 and step["params"] > 0
    assert gen["tokens_per_s"] > 0 and gen["new_tokens"] == 8
    # one bf16-autocast step moves (almost) every float32 master weight, in the fp32 direction
    assert agree["moved_frac"]["bfloat16"] > 0.99
    assert 0.9 < agree["update_cosine"] <= 1.0 + 1e-9 and agree["update_rel_err"] < 0.5
    if WHEELS.is_dir():  # made by `gpu_check.sh prepare`: pydantic must come from them
        assert any(w.startswith("pydantic-") for w in report["wheels"])
        assert report["pydantic_from_wheels"]
    else:
        pytest.skip("no build/gpu_wheels (benchmarks/gpu_check.sh prepare): wheels not checked")


def test_step_flops_match_the_flops_torch_counts_in_a_train_step():
    """The MFU's numerator: a forward + backward of the tiny Qwen3 under torch's FLOP counter.
    Eager attention is counted without the causal mask (twice the causal half), so the
    counter's total is step_flops plus one more attention term; the head is taken over every
    position here (resp = seq)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen3ForCausalLM

    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    cfg = gpu_check.shape(tiny=True)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    batch, seq = 2, 64
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.logsumexp(-1).sum().backward()
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq * batch * seq
    flops = gpu_check.step_flops(cfg, gpu_check.matmul_params(model), batch, seq, seq)
    assert flops + attn == counter.get_total_flops()
    # the head over a quarter fewer positions: 6 * V * H per token dropped
    fewer = gpu_check.step_flops(cfg, gpu_check.matmul_params(model), batch, seq, seq - 16)
    assert flops - fewer == 6 * cfg.vocab_size * cfg.hidden_size * batch * 16
