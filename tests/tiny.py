"""The tests' shared tiny models, offline and built in seconds.

- Tiny Qwen3 checkpoints (`build_model_dir`): a BPE tokenizer trained locally with `tokenizers`
  (Qwen special tokens, a Qwen3-style chat template with enable_thinking) and a random Qwen3
  saved with save_pretrained. Embedding column 0 is a constant, so after the final norm hidden
  dim 0 is nearly constant too; giving the eos row of lm_head weight only on that dim makes
  p(eos) per step a tunable constant, so tests see both "stop" and "length" endings without any
  training.
- Trainer fixtures (`make_tokenizer`, `make_model`, `save_tiny_checkpoint`, `make_round_tables`):
  a tokenizer trained on a few sentences, a random tied-embedding Qwen3 and synthetic round
  tables (prompts / rollouts / verdicts / annotations) in the shared contracts' shape.
- Tiny testbeds: `TINY_TESTBED_FIELDS` (a TestbedConfig that builds in seconds, for the testbed's
  own tests) and `TINY_TESTBED` / `TINY_RUN` (config overrides for a testbed that builds in well
  under a minute and a small run on it; conftest's `tiny_testbed_dir` builds it once a session).
"""

from __future__ import annotations

import json
import math
import random
import string
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]

# Qwen3's template reduced to one-turn use: the no-thinking generation prompt carries an empty
# think block, exactly as the shared chat contract states.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def _corpus(random_words: int = 0) -> list[str]:
    """Arithmetic-flavoured lines, plus random letter words when a large vocabulary is wanted."""
    rng = random.Random(0)
    lines = [
        " ".join(
            "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))
            for _ in range(12)
        )
        for _ in range(random_words // 12)
    ]
    for a in range(0, 200, 7):
        for b in range(3, 120, 11):
            lines.append(
                f"Add {a} and {b}. Step 1: units {a % 10}+{b % 10}. Step 2: carry. "
                f"The answer is \\boxed{{{a + b}}}. <think> so {a}+{b}={a + b} </think>"
            )
    return lines


def build_tokenizer(out_dir: str | Path, vocab_size: int = 400):
    """Train a byte-level BPE tokenizer and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(random_words=8 * vocab_size), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    # Qwen3 keeps the think tags as added *non-special* tokens: one id each, kept by decode.
    fast.add_tokens(THINK_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_model_dir(
    out_dir: str | Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 2,
    kv_heads: int = 1,
    vocab_size: int = 400,
    p_eos: float = 0.03,
    seed: int = 0,
    generation_defaults: bool = True,
) -> Path:
    """Save tokenizer + random Qwen3 (untied lm_head, for vLLM) into out_dir; returns it.

    p_eos: approximate per-step probability of eos at temperature 1.
    generation_defaults: also write Qwen3's shipped sampling defaults (temperature 0.6,
    top_k 20, top_p 0.95) to generation_config.json, which engines must ignore.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir, vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    head_dim = hidden // heads
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=pad_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        # After RMSNorm, dim 0 is about sqrt(hidden) / sqrt(1 + hidden * 0.02**2 ...) ~ sqrt(hidden).
        eos_logit = math.log(p_eos / (1 - p_eos) * (len(tokenizer) - 1))
        model.lm_head.weight[eos_id] = 0.0
        model.lm_head.weight[eos_id, 0] = eos_logit / math.sqrt(hidden)
    model.save_pretrained(str(out_dir))
    gen = {"eos_token_id": [eos_id, pad_id], "pad_token_id": pad_id}
    if generation_defaults:
        gen.update({"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95})
    (out_dir / "generation_config.json").write_text(json.dumps(gen))
    return out_dir


def teacher_forced_logprobs(
    model,
    prompt_ids: list[int],
    response_ids: list[int],
    *,
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Log-probs [T] of response_ids under the sampling distribution, from one forward pass.

    Written independently of the engines: logits / T, keep the k largest, then the smallest set
    whose probability reaches top_p (sorted descending, a token is kept while the mass before
    it is < top_p), renormalise.
    """
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits_TV = model(ids).logits[0, len(prompt_ids) - 1 : -1].float() / temperature
    if top_k > 0:
        kth_T1 = logits_TV.topk(top_k, dim=-1).values[:, -1:]
        logits_TV = logits_TV.masked_fill(logits_TV < kth_T1, float("-inf"))
    if top_p < 1.0:
        sorted_TV, order_TV = logits_TV.sort(dim=-1, descending=True)
        probs_TV = sorted_TV.softmax(-1)
        mass_before_TV = probs_TV.cumsum(-1) - probs_TV
        drop_TV = torch.zeros_like(logits_TV, dtype=torch.bool)
        drop_TV.scatter_(1, order_TV, mass_before_TV >= top_p)
        logits_TV = logits_TV.masked_fill(drop_TV, float("-inf"))
    logp_TV = logits_TV.log_softmax(-1)
    return logp_TV.gather(1, torch.tensor(response_ids)[:, None]).squeeze(1)


# ---- trainer fixtures ---------------------------------------------------------------------

_TRAINER_CORPUS = [
    ("Compute 123 + 456. Step 1: add the units 3 + 6 = 9. Step 2: tens 2 + 5 = 7. "
     "The final answer is \\boxed{579}."),
    "Here is a reference solution: carry the one. Watch out for: missing carry.",
    "Let me think step by step about the digits 0 1 2 3 4 5 6 7 8 9 and the sum.",
]


def make_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few sentences (milliseconds, offline); the think
    tags are special tokens here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + THINK_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_TRAINER_CORPUS * 5, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(vocab_size: int, hidden: int = 64, layers: int = 2, seed: int = 0,
               tie: bool = True):
    """A random tiny Qwen3ForCausalLM."""
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
            verdicts.append({"rollout_id": rid, "round": 0, "reward": float(correct), "correct": correct,
                             "extracted_answer": None, "status": "ok", "detail": None})
            annotations.append({**_annotation(rid, n, correct, s), "round": 0})
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
    # the contract's label is a string, "" when the annotator gave none
    rows = [{"segment_ids": [i + 1], "char_start": 0, "char_end": 0, "token_start": a,
             "token_end": b, "label": "missing carry" if i == 0 else ""}
            for i, (a, b) in enumerate(spans)]
    cov = sum(b - a for a, b in spans) / n
    return {"rollout_id": rid, "route": route, "annotator": "rule", "spans": rows,
            "coverage": cov, "status": "ok", "raw_response": "{}", "error": None,
            "latency_s": 0.1}


PROMPTS = [
    {"prompt_id": "p0", "problem": "Add 12 and 30."},
    {"prompt_id": "p1", "problem": "Add 7 and 118. Show the steps."},
    {"prompt_id": "p2", "problem": "What is 45+9?"},
]


# A TestbedConfig small enough to build in seconds (the testbed's unit tests).
TINY_TESTBED_FIELDS = {
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "num_kv_heads": 1,
    "intermediate_size": 64,
    "sft_steps": 4,
    "sft_batch_size": 4,
    "sft_warmup_steps": 1,
    "sft_num_problems": 40,
    "tokenizer_corpus_size": 60,
    "eval_size": 4,
    "eval_max_new_tokens": 12,
    "eval_batch_size": 4,
}

# Overrides for a testbed small enough to build in well under a minute: it samples mostly wrong
# answers, which is enough for the plumbing tests (the error route gives them spans to distil on).
TINY_TESTBED = [
    "model.testbed.sft_steps=30",
    "model.testbed.sft_num_problems=500",
    "model.testbed.tokenizer_corpus_size=200",
    "model.testbed.eval_size=8",
    "model.testbed.hidden_size=64",
    "model.testbed.intermediate_size=128",
]
# A small run on it: 4 prompts x 4 samples a round, both routes on so spans exist.
TINY_RUN = TINY_TESTBED + [
    "data.testbed_prompts=64",
    "rollout.prompts_per_round=4",
    "rollout.n=4",
    "rollout.max_tokens=64",
    "train.mini_batch_size=8",
    "train.micro_batch_size=4",
    "train.route.error_reverse=true",
    "eval.limit=8",
    "eval.max_tokens=64",
]

# The last lines of every `accelerate launch` script in the tests: the ranks leave the process
# group and end the way the product's trainer processes do (a gloo group still held at
# interpreter exit can abort there, after the work was written).
LEAVE_GROUP = ("\nfrom trace_rl.trainer.watchdog import exit_process, leave_group\nleave_group(acc)\n"
               "exit_process(0)\n")
