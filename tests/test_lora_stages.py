"""LoRA through the run's stages on the tiny testbed: two rounds of rollout -> verify ->
annotate -> train with `train.lora`, each a cold stage run (round 1 samples from the merged
adapter checkpoint and trains from it and its trainer state); status, damage detection and
`trace-rl export --merge` work on adapter checkpoints."""

import pytest
import torch
from peft import PeftModel
from tiny import TINY_RUN
from trace_rl.data_schemas.errors import StageError
from trace_rl.stages import get_stage
from trace_rl.stages.common import initial_model_dir, open_store
from trace_rl.stages.config import load_config
from trace_rl.stages.lora_weights import export_merged
from trace_rl.stages.status import stage_states
from trace_rl.trainer import lora
from transformers import AutoModelForCausalLM


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_lora_rounds_through_the_stages_status_damage_and_export(tmp_path, tiny_testbed_dir):
    cfg = load_config("demo", [*TINY_RUN, "run.rounds=2", "eval.benchmarks=[]",
                               f"run.root={tmp_path}/run", f"model.testbed_dir={tiny_testbed_dir}",
                               "train.lora={rank: 4, alpha: 8}"])
    get_stage("prepare")(cfg, None, progress=False)
    for k in (0, 1):
        for stage in ("rollout", "verify", "annotate", "train"):
            get_stage(stage)(cfg, k, progress=False)
    store = open_store(cfg)
    ckpt = store.local_path("checkpoints/round-0002")
    assert lora.is_adapter_dir(ckpt) and not list(ckpt.glob("model*.safetensors"))
    states = stage_states(cfg, store, deep=True)
    assert {s.state for st in states.values() for s in st.values()} == {"complete"}

    # the round checkpoint loads with peft, and the export is its merge
    base = initial_model_dir(cfg)
    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(ckpt))
    out = export_merged(cfg, 2, str(tmp_path / "export"))
    got = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 17, 33, 8, 90]])
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=ids).logits, want(input_ids=ids).logits)
        assert not torch.allclose(got(input_ids=ids).logits,
                                  AutoModelForCausalLM.from_pretrained(base)(input_ids=ids).logits)

    # a flipped byte in the adapter is found by a deep check and named
    f = ckpt / lora.ADAPTER_WEIGHTS
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    train1 = stage_states(cfg, store, deep=True)["train"][1]
    assert train1.state == "damaged" and lora.ADAPTER_WEIGHTS in (train1.reason or "")
    # ... and export refuses it (its size is the recorded one: a size check would export it)
    with pytest.raises(StageError, match="content differs"):
        export_merged(cfg, 2, str(tmp_path / "export-damaged"))
    assert not (tmp_path / "export-damaged").exists()
