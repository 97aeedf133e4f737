"""The GPU check: one JSON report from a GPU machine that has torch, transformers and accelerate
but none of this project's other dependencies and no registry (benchmarks/gpu_check.sh runs it).

    python benchmarks/gpu_check.py [--wheels build/gpu_wheels] [--device cuda|cpu] [--tiny]

Reports:
  - train_step: one optimizer step of a random Qwen3-1.7B-shaped model as the trainer takes it
    (float32 master weights and AdamW state, bf16 autocast, gradient checkpointing, the GRPO
    loss of trainer/methods.py): tokens/s, MFU (model FLOPs of `step_flops`: 6 per weight per
    token, the head over response tokens only, plus causal attention; over 989 TFLOP/s, H100/H200
    dense bf16), peak memory;
  - bf16_vs_fp32: the same steps from the same weights and batches, once in float32 and once
    under bf16 autocast: cosine and relative error of the bf16 update against the float32 one,
    and the fraction of weights each run moved;
  - generation: tokens/s of the hf engine's sampling loop (pipeline/generation.sample_batch,
    what stages/engines/hf.py runs per batch) on the same model in bf16.
`--tiny --device cpu` runs the same code on a model of a few thousand parameters (the test).

The project's packages are not installed there: `trace_rl` is mapped onto this checkout in a
temporary directory, and the pure-Python wheels of `--wheels` (pydantic and its few
dependencies; pydantic-core per Python version) are unpacked beside it, those matching this
interpreter only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data_schemas", "pipeline", "trainer", "testbed", "stages", "flows", "configs")
PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM dense bf16
LR = 1e-5


def bootstrap(wheels: str | None) -> dict:
    """`trace_rl` importable from this checkout, and the wheels that fit this interpreter
    unpacked first on sys.path; returns what was used, for the report."""
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    (root / "trace_rl").mkdir()
    for name in PACKAGES:  # a namespace package, as the editable install lays it out
        os.symlink(REPO / name, root / "trace_rl" / name)
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    used = []
    for wheel in sorted(Path(wheels).glob("*.whl")) if wheels else []:
        python_tag = wheel.name.split("-")[-3]
        if python_tag.startswith("cp") and python_tag != tag:
            continue  # a binary wheel for another Python version
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(root)
        used.append(wheel.name)
    sys.path.insert(0, str(root))
    sys.meta_path.insert(0, _Absent())
    return {"python": sys.version.split()[0], "wheels": used, "root": str(root)}


class _Absent:
    """Refuses the packages the GPU machine lacks (beyond the wheels), so that a rehearsal on a
    machine that has them fails where the GPU machine would."""

    ABSENT = ("pyarrow", "datasets", "prefect", "vllm")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.ABSENT:
            raise ImportError(f"{name} is not on the GPU machine: gpu_check must not need it")
        return None


def shape(tiny: bool):
    from transformers import Qwen3Config

    if tiny:
        return Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True)
    return Qwen3Config(vocab_size=151_936, hidden_size=2048, intermediate_size=6144,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, max_position_embeddings=40_960, tie_word_embeddings=True,
                       rope_theta=1_000_000)


def build(cfg, device: str, seed: int = 0):
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg)  # float32: the master weights AdamW steps
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def grpo_step(lean, opt, cfg, batch: int, seq: int, prompt: int, device: str, seed: int) -> float:
    """One GRPO micro-batch = mini-batch step through the trainer's policy pass and loss."""
    import torch

    from trace_rl.trainer.config import TrainConfig
    from trace_rl.trainer.methods import LossInputs, get_method

    g = torch.Generator(device="cpu").manual_seed(seed)
    ids_BL = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    adv_B = torch.randn(batch, generator=g).to(device)
    resp = seq - prompt
    pos_N = (torch.arange(batch, device=device)[:, None] * seq + prompt - 1
             + torch.arange(resp, device=device)[None]).flatten()
    out = lean(mode="policy", input_ids_BL=ids_BL, attention_mask_BL=torch.ones_like(ids_BL),
               resp_pos_N=pos_N, target_N=ids_BL.flatten()[pos_N + 1], span_groups=[],
               teacher_weight_VH=None)
    mask_BT = torch.ones(batch, resp, dtype=torch.bool, device=device)
    logp = out["logp_N"].view(batch, resp)
    x = LossInputs(logp, logp.detach(), adv_B, mask_BT, mask_BT & False,
                   torch.zeros_like(logp), float(batch * resp))
    loss, _ = get_method("grpo").loss(x, TrainConfig(method="grpo"), 0.0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lean.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def trainer(model, compute_dtype, chunk: int):
    import torch

    from trace_rl.trainer.lean import KLSpec, LeanCausalLM

    lean = LeanCausalLM(model, chunk, KLSpec(), compute_dtype=compute_dtype)
    return lean, torch.optim.AdamW(lean.parameters(), lr=LR)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def step_flops(cfg, matmul_params: int, batch: int, seq: int, resp: int) -> float:
    """Model FLOPs of one step (forward + backward; checkpoint recomputation not counted): 6 per
    matrix weight per token it multiplies, plus causal attention's scores and values.
    `matmul_params` counts the 2-D weights (norms are not matmuls); the input embedding is a
    lookup, and tied, its matrix is the head's, which runs only over the `resp` response
    positions (trainer/lean.py gathers them before lm_head). 6 * all params * all tokens
    overstated a Qwen3-1.7B step by ~4%."""
    head = cfg.vocab_size * cfg.hidden_size
    body = matmul_params - (1 if cfg.tie_word_embeddings else 2) * head
    tokens = batch * seq
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq * tokens / 2
    return 6 * body * tokens + 6 * head * batch * resp + attn


def matmul_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.ndim == 2)


def train_step_report(cfg, device: str, batch: int, seq: int, repeats: int) -> tuple[dict, object]:
    import torch

    model = build(cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    lean, opt = trainer(model, torch.bfloat16, 1024)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    grpo_step(lean, opt, cfg, batch, seq, seq // 4, device, 0)  # warm-up; allocates Adam state
    sync(device)
    t0 = time.perf_counter()
    for i in range(repeats):
        grpo_step(lean, opt, cfg, batch, seq, seq // 4, device, 1 + i)
    sync(device)
    step_s = (time.perf_counter() - t0) / repeats
    tokens = batch * seq
    flops = step_flops(cfg, matmul_params(model), batch, seq, seq - seq // 4)
    report = {"params": n_params, "batch": batch, "seq": seq, "step_s": round(step_s, 4),
              "tokens_per_s": round(tokens / step_s, 1), "model_flops_per_step": flops,
              "mfu": round(flops / step_s / PEAK_BF16_FLOPS, 4) if device == "cuda" else None,
              "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
              if device == "cuda" else None}
    return report, model


def agreement_report(cfg, device: str, batch: int, seq: int, steps: int) -> dict:
    """The bf16-autocast update against the float32 one, from the same start and batches."""
    import torch

    updates, moved = {}, {}
    for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
        model = build(cfg, device, seed=1)
        before = [p.detach().clone() for p in model.parameters()]
        lean, opt = trainer(model, dtype, 1024)
        for i in range(steps):
            grpo_step(lean, opt, cfg, batch, seq, seq // 4, device, 100 + i)
        delta = [(p.detach() - b).double().flatten() for p, b in zip(model.parameters(), before)]
        updates[name] = torch.cat(delta)
        moved[name] = float((updates[name] != 0).double().mean())
        del model, lean, opt
    u32, u16 = updates["float32"], updates["bfloat16"]
    return {"steps": steps, "lr": LR, "update_cosine": float(torch.nn.functional.cosine_similarity(
                u32, u16, dim=0)), "update_rel_err": float((u16 - u32).norm() / u32.norm()),
            "moved_frac": moved}


def generation_report(model, cfg, device: str, seqs: int, prompt: int, new: int) -> dict:
    import torch

    from trace_rl.pipeline.generation import sample_batch

    model = model.to(torch.bfloat16).eval()
    model.config.use_cache = True
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, cfg.vocab_size, (prompt,), generator=g).tolist() for _ in range(seqs)]
    kw = dict(temperature=1.0, top_k=-1, top_p=1.0, max_new_tokens=new, stop_ids=[cfg.vocab_size + 1],
              pad_id=0, device=device)
    sample_batch(model, prompts[:2], seed=0, **{**kw, "max_new_tokens": 4})  # warm-up
    sync(device)
    t0 = time.perf_counter()
    gen_BT, _ = sample_batch(model, prompts, seed=1, **kw)
    sync(device)
    took = time.perf_counter() - t0
    return {"sequences": seqs, "prompt_tokens": prompt, "new_tokens": int(gen_BT.shape[1]),
            "seconds": round(took, 3), "tokens_per_s": round(gen_BT.numel() / took, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", default=None, help="folder of wheels made by gpu_check.sh prepare")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a model of a few thousand parameters")
    a = ap.parse_args()
    env = bootstrap(a.wheels)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: use --device cpu --tiny to rehearse"}))
        return 2
    cfg = shape(a.tiny)
    big = not a.tiny
    root = env.pop("root")  # a temporary folder: no place in the report
    report = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
              "torch": torch.__version__, **env, "tiny": a.tiny}
    t0 = time.perf_counter()
    report["train_step"], model = train_step_report(cfg, a.device, 4 if big else 2,
                                                    2048 if big else 64, 3 if big else 1)
    report["generation"] = generation_report(model, cfg, a.device, 32 if big else 4,
                                             256 if big else 8, 128 if big else 8)
    del model
    if a.device == "cuda":
        torch.cuda.empty_cache()
    small = shape(a.tiny)
    if big:
        small.num_hidden_layers = 4  # the agreement needs the numerics, not the depth
    report["bf16_vs_fp32"] = agreement_report(small, a.device, 2, 1024 if big else 64, 5 if big else 3)
    import pydantic

    report["pydantic_from_wheels"] = pydantic.__file__.startswith(root)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
