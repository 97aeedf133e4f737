"""The tiny Qwen3-architecture policy of the testbed, built from config with a seed."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from trace_rl.testbed.config import TestbedConfig


def qwen3_config(cfg: TestbedConfig, tokenizer: PreTrainedTokenizerFast) -> Qwen3Config:
    """A Qwen3Config sized by cfg; vocab, eos and pad come from the testbed tokenizer.

    Embeddings are untied so the saved checkpoint carries its own lm_head (vLLM loads it
    without special-casing).
    """
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


def build_model(cfg: TestbedConfig, tokenizer: PreTrainedTokenizerFast) -> Qwen3ForCausalLM:
    """Freshly initialised tiny Qwen3 (float32), deterministic in cfg.seed."""
    torch.manual_seed(cfg.seed)
    model = Qwen3ForCausalLM(qwen3_config(cfg, tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
