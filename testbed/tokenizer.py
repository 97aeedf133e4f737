"""A byte-level BPE tokenizer trained locally on testbed text, with a Qwen3-style chat template.

Digits are split one per token before BPE (as Qwen does), so column arithmetic works on
single-digit tokens; byte-level coding makes every string encodable and decoding exact. Unlike
Qwen, merges may cross word boundaries (no regex pre-split), so the fixed phrases of the task
("Step ", ", write ", the instruction) become a few tokens: sequences are short and the CPU warm
start is cheap.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from trace_rl.testbed.config import TestbedConfig
from trace_rl.testbed.task import (
    ERROR_LABELS,
    KEY_LABEL,
    corrupt_steps,
    make_prompt_row,
    render_solution,
    sample_pairs,
)
from trace_rl.trainer.teacher_prompt import teacher_message

PAD, EOS, IM_START = "<|endoftext|>", "<|im_end|>", "<|im_start|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPECIAL_TOKENS = [PAD, IM_START, EOS]

# Mirrors Qwen3's template for the parts the pipeline uses: plain role/content turns and the
# generation prompt, where enable_thinking=false pre-fills an empty think block.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def _corpus(cfg: TestbedConfig) -> Iterator[str]:
    """Texts in every format the model will see (student, teacher, corrupted, chat wrapper)."""
    rng = random.Random(f"tokenizer|{cfg.seed}")
    if cfg.task == "digit_chain":
        yield from _chain_corpus(cfg, rng)
        return
    pairs = sample_pairs(cfg, cfg.tokenizer_corpus_size, cfg.seed + 7919, "train")
    for i, (a, b) in enumerate(pairs):
        row = make_prompt_row(a, b, f"tok-{i}", cfg.step_layout)
        label = rng.choice([*ERROR_LABELS, KEY_LABEL])
        teacher = teacher_message(cfg.teacher_template, row, [label])
        wrong, _, _ = corrupt_steps(a, b, rng)
        yield f"user\n{teacher}\nassistant\n\n\n\n{row['solution']}\n"
        yield render_solution(wrong, cfg.step_layout)
    # Every digit and common symbol must exist as a token even in a tiny corpus.
    yield "0123456789 +-=*/()[]{}\\,.:;!?'\"\n The final answer is"


def _chain_corpus(cfg: TestbedConfig, rng: random.Random) -> Iterator[str]:
    """The digit chain's texts (testbed.chain), student, teacher and slipped."""
    from trace_rl.testbed.chain import (
        SLIPS,
        chain_prompt_row,
        corrupt_chain,
        render_chain,
        sample_problems,
    )

    pool = sample_problems(cfg, min(cfg.tokenizer_corpus_size, 2000), cfg.seed + 7919, "train")
    for i, p in enumerate(pool):
        row = chain_prompt_row(p, f"tok-{i}")
        teacher = teacher_message(cfg.teacher_template, row, [rng.choice(SLIPS)])
        yield f"user\n{teacher}\nassistant\n\n\n\n{row['solution']}\n"
        yield render_chain(corrupt_chain(p, rng)[0])
    yield "0123456789 +-=*/()[]{}\\,.:;!?'\"\n The final answer is"


def build_tokenizer(cfg: TestbedConfig) -> PreTrainedTokenizerFast:
    """Train the BPE on generated testbed text (seconds); deterministic for a given cfg."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(cfg), trainer=trainer)
    # <think> tags are ordinary added tokens (kept by skip_special_tokens), as in Qwen3.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        padding_side="left",
        model_max_length=cfg.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens([THINK_OPEN, THINK_CLOSE], special_tokens=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast

