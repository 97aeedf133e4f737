"""Tiny offline fixtures for trainer tests and benchmarks: a locally trained byte-level BPE
tokenizer with a Qwen3-style chat template (enable_thinking switch), a random tiny Qwen3 model,
and synthetic round tables with the shared contracts' columns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3's generation prompt: with thinking off the empty think block is pre-filled.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\n\n</think>\n\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)

_CORPUS = [
    ("Compute 123 + 456. Step 1: add the units 3 + 6 = 9. Step 2: tens 2 + 5 = 7. "
     "The final answer is \\boxed{579}."),
    "Here is a reference solution: carry the one. Watch out for: missing carry.",
    "Let me think step by step about the digits 0 1 2 3 4 5 6 7 8 9 and the sum.",
]


def make_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few sentences (milliseconds, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 5, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(vocab_size: int, hidden: int = 64, layers: int = 2, seed: int = 0,
               tie: bool = True):
    """A random tiny Qwen3ForCausalLM."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden // 4, max_position_embeddings=4096, tie_word_embeddings=tie,
    )
    return Qwen3ForCausalLM(cfg)


def save_tiny_checkpoint(path: str | Path, seed: int = 0, hidden: int = 64) -> str:
    """Write a tiny model + tokenizer with save_pretrained; returns the path."""
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), hidden=hidden, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_round_tables(tokenizer, n_prompts: int = 4, samples: int = 4, resp_len=(6, 20),
                      seed: int = 0, thinking: bool = True) -> dict[str, pa.Table]:
    """Synthetic prompts/rollouts/verdicts/annotations with every annotation status exercised,
    spans touching the first and the last response token, and rollouts without spans."""
    rng = np.random.default_rng(seed)
    prompts, rollouts, verdicts, annotations = [], [], [], []
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for p in range(n_prompts):
        pid = f"p{p}"
        problem = f"Compute {p + 12} + {p * 7 + 5}."
        prompts.append({"prompt_id": pid, "problem": problem, "answer": str(2 * p + 17),
                        "solution": None if p % 2 else f"Add the units, then the tens: {2*p+17}.",
                        "source": "synthetic", "meta": "{}"})
        text = tokenizer.apply_chat_template([{"role": "user", "content": problem}],
                                             add_generation_prompt=True,
                                             enable_thinking=thinking, tokenize=False)
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
        for s in range(samples):
            rid = f"r{p}-{s}"
            n = int(rng.integers(resp_len[0], resp_len[1] + 1))
            resp = rng.integers(10, len(tokenizer) - 10, size=n - 1).tolist() + [eos]
            correct = bool(rng.random() < 0.5)
            rollouts.append({
                "rollout_id": rid, "round": 0, "prompt_id": pid, "sample_index": s,
                "checkpoint": "init", "prompt_token_ids": prompt_ids,
                "response_text": tokenizer.decode(resp), "response_token_ids": resp,
                "response_logprobs": (-rng.random(n)).tolist(),
                "finish_reason": "stop", "engine": "synthetic",
                "sampling": json.dumps({"enable_thinking": thinking, "temperature": 1.0}),
            })
            verdicts.append({"rollout_id": rid, "reward": float(correct), "correct": correct,
                             "extracted_answer": None, "status": "ok", "detail": None})
            annotations.append(_annotation(rid, n, correct, s))
    return {"prompts": pa.Table.from_pylist(prompts), "rollouts": pa.Table.from_pylist(rollouts),
            "verdicts": pa.Table.from_pylist(verdicts),
            "annotations": pa.Table.from_pylist(annotations)}


def _annotation(rid: str, n: int, correct: bool, s: int) -> dict:
    route = "key" if correct else "error"
    if s % 4 == 3:  # a failed annotation: trained as if it had no spans
        return {"rollout_id": rid, "route": route, "annotator": "rule", "spans": [],
                "coverage": 0.0, "status": "api_error", "raw_response": None, "error": "503",
                "latency_s": 0.1}
    # the first annotated rollout of a prompt has a span at the first token, the next at the last
    spans = ([(0, 2)] if s % 2 == 0 else [(n - 2, n)]) + [(n // 2, n // 2 + 1)]
    rows = [{"segment_ids": [i + 1], "char_start": 0, "char_end": 0, "token_start": a,
             "token_end": b, "label": "missing carry" if i == 0 else None}
            for i, (a, b) in enumerate(spans)]
    cov = sum(b - a for a, b in spans) / n
    return {"rollout_id": rid, "route": route, "annotator": "rule", "spans": rows,
            "coverage": cov, "status": "ok", "raw_response": "{}", "error": None,
            "latency_s": 0.1}
