"""Accuracy of a testbed checkpoint by batched HF generate (left padding), student or teacher."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from trace_rl.testbed.config import DEFAULT_TEACHER_TEMPLATE
from trace_rl.testbed.task import is_correct, privileged_message
from trace_rl.testbed.tokenizer import chat_prompt


def user_messages(
    prompts: list[dict], *, privileged: bool, template: str = DEFAULT_TEACHER_TEMPLATE
) -> list[str]:
    """The student message (problem) or the teacher message (problem + reference solution)."""
    if not privileged:
        return [p["problem"] for p in prompts]
    return [
        privileged_message(
            p["problem"], solution=p.get("solution"), answer=p["answer"], template=template
        )
        for p in prompts
    ]


@torch.no_grad()
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
    """n sampled (or greedy when temperature == 0) responses per message, special tokens cut."""
    tokenizer.padding_side = "left"
    texts = [chat_prompt(tokenizer, m, enable_thinking) for m in messages for _ in range(n)]
    gen = torch.Generator().manual_seed(seed)
    out: list[str] = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            add_special_tokens=False,
            padding=True,
            return_tensors="pt",
        )
        # generate() draws from the global RNG; seed it per batch so results do not depend
        # on what ran before in the process.
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        sample_kw = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
        ids_BT = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            **(sample_kw if temperature > 0 else {"do_sample": False}),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_BT = ids_BT[:, enc["input_ids"].shape[1] :]
        out.extend(tokenizer.batch_decode(new_BT, skip_special_tokens=True))
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
    """Mean correctness over prompts x n samples, for an already loaded model."""
    if not prompts:
        raise ValueError("accuracy needs at least one prompt; got an empty list")
    messages = user_messages(prompts, privileged=privileged, template=template)
    responses = generate_responses(
        model,
        tokenizer,
        messages,
        temperature=temperature,
        n=n,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        enable_thinking=enable_thinking,
    )
    hits = [is_correct(r, p["answer"]) for p, rs in zip(prompts, responses) for r in rs]
    return sum(hits) / len(hits)


def measure_accuracy(
    model_dir: str,
    prompts: list[dict],
    *,
    privileged: bool,
    temperature: float = 1.0,
    n: int = 1,
    max_new_tokens: int = 192,
    batch_size: int = 64,
    seed: int = 0,
    enable_thinking: bool = False,
) -> float:
    """Accuracy of the checkpoint in model_dir on prompts rows (student or privileged format)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return accuracy_of(
        model,
        tokenizer,
        prompts,
        privileged=privileged,
        temperature=temperature,
        n=n,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        enable_thinking=enable_thinking,
    )
