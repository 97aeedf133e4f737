"""Accuracy of a testbed checkpoint, student or privileged teacher: sampled through the one
generation loop (`pipeline/generation.py`), prompts encoded by the one chat encoder
(`pipeline/chat.py`), teacher messages from the trainer's template (`trainer/teacher_prompt.py`)
and graded by the testbed's reward (`testbed.task.grade`)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from trace_rl.pipeline.chat import encode_chat_prompt
from trace_rl.pipeline.generation import cut_at_stop, sample_batch
from trace_rl.testbed.task import is_correct
from trace_rl.trainer.teacher_prompt import DEFAULT_TEACHER_TEMPLATE, teacher_message


def user_messages(
    prompts: list[dict], *, privileged: bool, template: str = DEFAULT_TEACHER_TEMPLATE
) -> list[str]:
    """The student message (problem) or the teacher message (problem + reference solution)."""
    if not privileged:
        return [p["problem"] for p in prompts]
    return [teacher_message(template, p, []) for p in prompts]


def generate_responses(
    model: PreTrainedModel,
    tokenizer,
    messages: list[str],
    *,
    temperature: float,
    n: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    enable_thinking: bool = False,
) -> list[list[str]]:
    """n sampled (greedy when temperature == 0) responses per message, special tokens cut."""
    prompts = [encode_chat_prompt(tokenizer, m, enable_thinking) for m in messages for _ in range(n)]
    stop_ids = [tokenizer.eos_token_id]
    out: list[str] = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        gen_BT, logp_BT = sample_batch(
            model, prompts[start : start + batch_size], temperature=temperature, top_k=0, top_p=1.0,
            max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=tokenizer.pad_token_id,
            seed=seed * 100_003 + b,
        )
        for ids_T, logp_T in zip(gen_BT.tolist(), logp_BT.tolist(), strict=True):
            ids, _, _ = cut_at_stop(ids_T, logp_T, set(stop_ids), max_new_tokens)
            out.append(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    return [out[i * n : (i + 1) * n] for i in range(len(messages))]


def accuracy_of(
    model: PreTrainedModel,
    tokenizer,
    prompts: list[dict],
    *,
    privileged: bool,
    temperature: float = 1.0,
    n: int = 1,
    max_new_tokens: int = 192,
    batch_size: int = 64,
    seed: int = 0,
    enable_thinking: bool = False,
    template: str = DEFAULT_TEACHER_TEMPLATE,
) -> float:
    """Mean reward over prompts x n samples, for an already loaded model."""
    if not prompts:
        raise ValueError("accuracy needs at least one prompt; got an empty list")
    messages = user_messages(prompts, privileged=privileged, template=template)
    responses = generate_responses(
        model, tokenizer, messages, temperature=temperature, n=n, max_new_tokens=max_new_tokens,
        batch_size=batch_size, seed=seed, enable_thinking=enable_thinking,
    )
    hits = [is_correct(r, p["answer"]) for p, rs in zip(prompts, responses) for r in rs]
    return sum(hits) / len(hits)


def measure_accuracy(model_dir: str, prompts: list[dict], *, privileged: bool, **kw) -> float:
    """Accuracy of the checkpoint in model_dir on prompts rows (student or privileged format);
    `kw` as for `accuracy_of`."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return accuracy_of(model, tokenizer, prompts, privileged=privileged, **kw)
