"""Rollout engines: `hf` (transformers generate; CPU, tests) and `vllm` (a vLLM child process).

`generate(cfg, model_dir, prompts)` samples with the configured engine; each engine module is
imported only when chosen, so choosing `hf` never imports vLLM's client side.
"""

from __future__ import annotations

from collections.abc import Callable

from trace_rl.stages.engines.config import ENGINE_NAMES, RolloutConfig


def get_engine(name: str) -> Callable[..., list[dict]]:
    """The engine's `generate` function by name; imports lazily (vLLM's parent is light too)."""
    if name == "hf":
        from trace_rl.stages.engines.hf import generate as hf_generate

        return hf_generate
    if name == "vllm":
        from trace_rl.stages.engines.vllm_engine import generate as vllm_generate

        return vllm_generate
    raise ValueError(f"unknown rollout engine {name!r}; valid engines: {list(ENGINE_NAMES)}")


def generate(
    cfg: RolloutConfig, model_dir: str, prompts: list[dict], *, progress: bool = True
) -> list[dict]:
    """Sample cfg.n responses per prompt with the configured engine (see module docstring)."""
    from trace_rl.stages.lora_weights import engine_weights  # a LoRA checkpoint: merged

    return get_engine(cfg.engine)(cfg, engine_weights(model_dir), prompts, progress=progress)
