"""Per-token teacher-vs-student log-probs for the span view's heat strip (`inspect --teacher`).

For a rollout of round k, the student is policy k (the checkpoint that sampled it) reading the
rollout's own prompt; the privileged teacher is the same weights reading the trainer's teacher
prompt (trainer/teacher.py: the problem with its reference solution). Each gets the log-prob of
every sampled response token (temperature 1), so the strip shows where seeing the solution
changes the model's mind, and whether the annotated spans sit there. (The trainer's teacher
may be a lagged snapshot of the policy; the strip uses the round's own checkpoint.)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trace_rl.data_schemas import PROMPTS, ROLLOUTS
from trace_rl.pipeline.layout import RESOLVED_CONFIG, dataset_name
from trace_rl.pipeline.store import RunStore
from trace_rl.stages.config import load_config

from .common import start_checkpoint

log = logging.getLogger("trace_rl.stages.token_view")


def _sampled_logprobs(model: Any, prompt: list[int], response: list[int]) -> list[float]:
    import torch

    ids = torch.tensor([prompt + response], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(1, torch.tensor(response).unsqueeze(1)).squeeze(1).tolist()


def run_root_of(path: str) -> str | None:
    """The run directory holding `path` (a run, round, dataset or file inside one), or None."""
    p = Path(path).resolve()
    for candidate in (p, *p.parents):
        if (candidate / RESOLVED_CONFIG).is_file():
            return str(candidate)
    return None


class TeacherStudentScorer:
    """Scores rollouts of one run, loading each round's checkpoint once."""

    def __init__(self, run_root: str):
        self.cfg = load_config(str(Path(run_root) / RESOLVED_CONFIG), [f"run.root={run_root}"])
        self.store = RunStore(run_root)
        self._prompts: dict[str, dict[str, Any]] | None = None

    def __call__(self, round_index: int, rollout_ids: list[str]) -> dict[str, dict[str, Any]]:
        import torch
        from trace_rl.stages.annotators.align import token_char_offsets
        from trace_rl.trainer.teacher import enable_thinking_of, teacher_prompt_ids
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir, _ = start_checkpoint(self.cfg, self.store, round_index)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        if self._prompts is None:
            self._prompts = {r["prompt_id"]: r for r in self.store.read("prompts", PROMPTS).to_pylist()}
        wanted = set(rollout_ids)
        rows = [r for r in self.store.read(dataset_name("rollout", round_index), ROLLOUTS).to_pylist()
                if r["rollout_id"] in wanted]
        out = {}
        for ro in rows:
            response = list(ro["response_token_ids"])
            if not response:
                continue
            teacher_prompt = teacher_prompt_ids(tokenizer, self.cfg.train.teacher_template,
                                                self._prompts[ro["prompt_id"]], [],
                                                enable_thinking_of(ro["sampling"]))
            out[ro["rollout_id"]] = {
                "offsets": [list(p) for p in token_char_offsets(tokenizer, response, ro["response_text"])],
                "student": _sampled_logprobs(model, list(ro["prompt_token_ids"]), response),
                "teacher": _sampled_logprobs(model, teacher_prompt, response),
                "source": f"policy {round_index}: {Path(model_dir).name}",
            }
        log.info("heat strip: scored %d rollouts of round %d with %s", len(out), round_index, model_dir)
        return out
