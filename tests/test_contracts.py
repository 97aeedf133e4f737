"""Contracts that cross rooms: each has one definition, and these tests hold every user to it.

- run layout and checkpoint numbering (pipeline/layout.py) as the stages, evaluate and plots use it
- the stage registry (pipeline/layout.py) as the CLI, the stage loader and the flows use it
- stage fingerprints: runtime-only fields never make a stage stale, result-affecting ones do
- the teacher prompt (trainer/teacher_prompt.py) that the testbed warm-starts on and trains with
- the chat encoding (pipeline/chat.py) of engines, trainer and testbed
- testbed grading: the build's accuracy is the `testbed` verifier's reward
- one generation loop (pipeline/generation.py): the hf engine and the testbed sample alike
- the train stage's inputs, read through the run store in-process and under `accelerate launch`
"""

from __future__ import annotations

import random

import pytest
from tiny import TINY_TESTBED_FIELDS

from trace_rl.data_schemas import ANNOTATIONS, PROMPTS, ROLLOUTS, VERDICTS, rows_to_table
from trace_rl.data_schemas.errors import ConfigError, StageError
from trace_rl.pipeline import layout
from trace_rl.pipeline.chat import encode_chat_prompt
from trace_rl.pipeline.fingerprint import fingerprint, result_fields
from trace_rl.pipeline.store import RunStore
from trace_rl.stages.common import RUNTIME_ONLY, open_store, stage_config, start_checkpoint
from trace_rl.stages.config import load_config
from trace_rl.testbed.config import TestbedConfig
from trace_rl.testbed.task import grade, is_correct, make_prompts
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.teacher_prompt import DEFAULT_TEACHER_TEMPLATE, teacher_message

# --- layout and checkpoint numbering -----------------------------------------------------------


def _write(store: RunStore, name: str, schema, rows, stage: str = "test"):
    with store.writer(name, schema, stage=stage, config_fingerprint="cfg") as w:
        w.write_rows(rows)
    return w.manifest


def test_round_k_starts_from_the_checkpoint_round_k_minus_1_trained(tmp_path):
    from trace_rl.data_schemas import TRAIN_METRICS

    (tmp_path / "base").mkdir()
    cfg = load_config("demo", [f"run.root={tmp_path / 'run'}", f"model.path={tmp_path / 'base'}"])
    store = open_store(cfg)
    assert start_checkpoint(cfg, store, 0)[0] == str(tmp_path / "base")
    with pytest.raises(StageError, match="round 0's train stage"):
        start_checkpoint(cfg, store, 1)
    m = _write(store, layout.dataset_name("train", 0), TRAIN_METRICS, [])
    model_dir, inputs = start_checkpoint(cfg, store, 1)
    # What round 0's train stage writes (stages/train.py: start_checkpoint_dir(k + 1)) is what
    # round 1 samples and trains from.
    assert model_dir == str(store.local_path(layout.start_checkpoint_dir(1)))
    assert model_dir.endswith("checkpoints/round-0001")
    assert inputs == {"round-0000/train": m.fingerprint}
    # evaluate's "round-K" and plots' policy axis name the same checkpoint.
    from trace_rl.stages.evaluate import resolve_checkpoint

    ckpt = resolve_checkpoint(cfg, store, "round-1")
    assert (ckpt.name, ckpt.model_dir) == (layout.checkpoint_name(1), model_dir)
    assert resolve_checkpoint(cfg, store, "latest").model_dir == model_dir
    for k in range(4):
        assert layout.policy_index(layout.checkpoint_name(k)) == k
    assert layout.policy_index("my-model") is None


def test_stage_registry_is_the_one_the_cli_and_loader_use():
    from trace_rl.flows import cli, stage_task
    from trace_rl.stages import get_stage

    assert cli.STAGE_NAMES is layout.STAGE_NAMES
    for name in layout.STAGE_NAMES:
        assert get_stage(name).__module__ == f"trace_rl.stages.{name}"
        assert stage_task._want_isolation(name) in (False, layout.STAGES[name].gpu)
    with pytest.raises(Exception, match="valid: \\['prepare'"):
        get_stage("rolout")
    assert [layout.dataset_name(s, 2) for s in layout.ROUND_STAGES] == [
        "round-0002/rollouts", "round-0002/verdicts", "round-0002/annotations", "round-0002/train"]
    assert layout.dataset_name("prepare") == "prompts"
    with pytest.raises(StageError, match="needs a round"):
        layout.dataset_name("verify")


# --- fingerprints -----------------------------------------------------------------------------


def _train_fp(*overrides: str) -> str:
    return fingerprint(stage_config(load_config("demo", list(overrides)), "train", 0))


def test_runtime_only_train_fields_do_not_change_the_fingerprint():
    base = _train_fp()
    for runtime in ("train.tensorboard=false", "train.num_processes=4", "train.save_every=3",
                    "train.accelerate_config=configs/accelerate/ddp.yaml",
                    "train.gradient_checkpointing=true"):
        assert _train_fp(runtime) == base, runtime
    for result in ("train.lr=3e-4", "train.route.error_reverse=true", "train.eps_high=0.3",
                   "train.teacher_sync_every=5"):
        assert _train_fp(result) != base, result


def test_verify_runtime_fields_are_one_list_for_verify_and_evaluate():
    from trace_rl.stages.evaluate import samples_job
    from trace_rl.stages.benchmarks import load_benchmark

    def fps(*overrides):
        cfg = load_config("demo", ["run.root=/tmp/unused", *overrides])
        job = samples_job(cfg, type("C", (), {"name": "initial", "inputs": {}})(),
                          load_benchmark(cfg, "testbed", {}))
        return fingerprint(stage_config(cfg, "verify", 0)), job.config_fingerprint

    base = fps()
    assert fps("verify.workers=7", "verify.kill_grace_s=9", "verify.chunk_size=3") == base
    changed = fps("verify.timeout_s=1")
    assert changed[0] != base[0] and changed[1] != base[1]


def test_every_runtime_only_path_names_a_field():
    cfg = load_config("demo")
    for section, paths in RUNTIME_ONLY.items():
        kept = result_fields(cfg.section(section), paths, where=section)
        assert kept and all(p.split(".")[0] in cfg.section(section) for p in paths)
    with pytest.raises(KeyError, match="'nope' is not a field"):
        result_fields(cfg.section("train"), ["nope"], where="train")


def test_status_compares_config_fingerprints_and_says_why(tmp_path):
    from trace_rl.data_schemas import TRAIN_METRICS
    from trace_rl.stages.status import stage_state

    root = f"run.root={tmp_path / 'run'}"
    cfg = load_config("demo", [root])
    store = open_store(cfg)
    name = layout.dataset_name("train", 0)
    with store.writer(name, TRAIN_METRICS, stage="train",
                      config_fingerprint=fingerprint(stage_config(cfg, "train", 0)),
                      inputs=start_checkpoint_inputs(cfg)) as w:
        w.write_rows([])
    assert stage_state(cfg, store, "train", 0).state == "complete"
    assert stage_state(load_config("demo", [root, "train.tensorboard=false", "train.num_processes=2"]),
                       store, "train", 0).state == "complete"
    stale = stage_state(load_config("demo", [root, "train.lr=1e-3"]), store, "train", 0)
    assert (stale.state, stale.reason) == ("stale", "the train config changed since it ran")
    stale = stage_state(load_config("demo", [root, "model.testbed.seed=3"]), store, "train", 0)
    assert stale.reason == "the model config (the initial policy) changed"
    assert stage_state(cfg, store, "train", 1).state == "missing"


def start_checkpoint_inputs(cfg):
    from trace_rl.stages.common import initial_model_inputs

    return initial_model_inputs(cfg)


# --- teacher prompt, chat encoding, grading -----------------------------------------------------


def test_testbed_warm_starts_on_the_trainers_teacher_prompt():
    from trace_rl.testbed.accuracy import user_messages
    from trace_rl.testbed.sft import make_sft_texts

    assert TestbedConfig().teacher_template == TrainConfig().teacher_template == DEFAULT_TEACHER_TEMPLATE
    cfg = TestbedConfig(**TINY_TESTBED_FIELDS)
    rows = make_prompts(cfg, 5, seed=0, split="train")
    assert user_messages(rows, privileged=True) == [teacher_message(DEFAULT_TEACHER_TEMPLATE, r, [])
                                                    for r in rows]
    # Every privileged SFT message is a teacher message of its problem, with at most one label.
    by_problem = {r["problem"]: r for r in make_prompts(cfg, 40, seed=0, split="train")}
    privileged = [u for u, _ in make_sft_texts(cfg, 200, 0) if u not in by_problem]
    assert privileged
    for u in privileged:
        row = by_problem[u.split("\n\nHere is a reference solution:")[0]]
        label = u.split("Watch out for: ")[1] if "Watch out for: " in u else None
        assert u == teacher_message(cfg.teacher_template, row, [label] if label else [])
    with pytest.raises(ConfigError, match="teacher_template differ"):
        load_config("demo", ["train.teacher_template={context} then {problem}"])


def test_testbed_tokenizer_encodes_prompts_as_engines_and_trainer_do():
    from trace_rl.stages.engines.protocol import encode_prompt
    from trace_rl.testbed.tokenizer import build_tokenizer
    from trace_rl.trainer.teacher import teacher_prompt_ids

    tok = build_tokenizer(TestbedConfig(**TINY_TESTBED_FIELDS))
    row = make_prompts(TestbedConfig(**TINY_TESTBED_FIELDS), 1, seed=0)[0]
    for thinking in (False, True):
        assert encode_prompt(tok, row["problem"], thinking) == encode_chat_prompt(tok, row["problem"], thinking)
        assert teacher_prompt_ids(tok, DEFAULT_TEACHER_TEMPLATE, row, ["carry dropped"], thinking) == \
            encode_chat_prompt(tok, teacher_message(DEFAULT_TEACHER_TEMPLATE, row, ["carry dropped"]), thinking)


def test_testbed_accuracy_is_the_verifier_reward():
    """Property: on random responses built from answer-like fragments, the build's accuracy
    check and the `testbed` verifier agree on every verdict."""
    from trace_rl.stages.verifiers import VerifyConfig, verify_rows

    rng = random.Random(0)
    noise = ["", " ", "\n", "x", "Answer: ", "<think>", "</think>", "\\boxed 5", "{", "}"]
    answers = ["12", "1,2", "0012", "-3", "5", "1{,}2", " 12 ", "x", "1.5", "{12}", ""]
    items = []
    for i in range(400):
        text = "".join(rng.choice(noise) for _ in range(rng.randint(0, 3)))
        for _ in range(rng.randint(0, 2)):
            text += "\\boxed{" + rng.choice(answers) + "}" + rng.choice(noise)
        answer = rng.choice(["12", "-3", "5", "seven"])
        items.append({"rollout_id": str(i), "response_text": text, "answer": answer, "meta": {}})
    verdicts = verify_rows(VerifyConfig(kind="testbed", workers=1), items)
    for item, v in zip(items, verdicts, strict=True):
        g = grade(item["response_text"], item["answer"])
        assert (v["status"], v["correct"], v["extracted_answer"]) == (g.status, g.correct, g.extracted)
        assert is_correct(item["response_text"], item["answer"]) == v["correct"]
    assert sum(v["correct"] for v in verdicts) > 10  # the fragments do form right answers


# --- one generation loop ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_testbed(tmp_path_factory) -> str:
    from trace_rl.testbed.build import build_testbed

    return build_testbed(TestbedConfig(**TINY_TESTBED_FIELDS), str(tmp_path_factory.mktemp("tb") / "b"),
                         progress=False)


def test_hf_engine_and_testbed_sample_the_same_responses(micro_testbed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trace_rl.stages.engines import generate
    from trace_rl.stages.engines.config import RolloutConfig
    from trace_rl.testbed.accuracy import generate_responses

    rows = make_prompts(TestbedConfig(**TINY_TESTBED_FIELDS), 3, seed=1, split="heldout")
    rcfg = RolloutConfig(n=2, temperature=1.0, max_tokens=12, enable_thinking=False, seed=4,
                         hf={"batch_size": 4})
    engine = [r["response_text"] for r in generate(rcfg, micro_testbed, rows, progress=False)]
    model = AutoModelForCausalLM.from_pretrained(micro_testbed).eval()
    tb = generate_responses(model, AutoTokenizer.from_pretrained(micro_testbed), [r["problem"] for r in rows],
                            temperature=1.0, n=2, max_new_tokens=12, batch_size=4, seed=4)
    assert engine == [t for per_prompt in tb for t in per_prompt]


# --- the train stage's inputs -----------------------------------------------------------------


def _tiny_round(tmp_path, *overrides: str):
    """A run whose prompts and round-0 datasets are the trainer's synthetic tables, starting
    from a tiny random checkpoint."""
    from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint

    init = save_tiny_checkpoint(tmp_path / "init")
    cfg = load_config("demo", [
        f"run.root={tmp_path / 'run'}", f"model.path={init}", "train.method=trace",
        "train.route.error_reverse=true", "train.mini_batch_size=8", "train.micro_batch_size=2",
        "train.lr=1e-3", "train.logprob_chunk=16", "train.tensorboard=false", *overrides])
    store = open_store(cfg)
    tables = make_round_tables(make_tokenizer(), seed=5)
    rows = tables["annotations"].to_pylist()
    for r in rows:  # the synthetic spans leave `label` null; the contract says "" for no label
        r["spans"] = [{**sp, "label": sp["label"] or ""} for sp in r["spans"]]
        r["round"] = 0
    tables["annotations"] = rows_to_table(rows, ANNOTATIONS, where="synthetic annotations")
    for stage, key, schema in (("prepare", "prompts", PROMPTS), ("rollout", "rollouts", ROLLOUTS),
                               ("verify", "verdicts", VERDICTS), ("annotate", "annotations", ANNOTATIONS)):
        name = layout.dataset_name(stage, 0)
        with store.writer(name, schema, stage=stage, config_fingerprint="synthetic") as w:
            w.write_rows(tables[key].to_pylist())
    return cfg, store, tables


def test_train_inputs_are_read_through_the_store_and_checked(tmp_path):
    from trace_rl.trainer.launch import read_round_inputs, round_input_names

    _, store, tables = _tiny_round(tmp_path)
    names = round_input_names(0)
    expected = {n: store.manifest(n).fingerprint for n in names.values()}
    read = read_round_inputs(store, 0, expected)
    assert {k: t.num_rows for k, t in read.items()} == {k: t.num_rows for k, t in tables.items()}
    # A dataset rewritten after the stage decided what to train on is refused.
    with store.writer(names["verdicts"], VERDICTS, stage="verify", config_fingerprint="again") as w:
        w.write_rows(tables["verdicts"].to_pylist())
    with pytest.raises(StageError, match="changed after the train stage"):
        read_round_inputs(store, 0, expected)
    store.invalidate(names["rollouts"])
    with pytest.raises(StageError, match="changed after the train stage"):
        read_round_inputs(store, 0, expected)
    with pytest.raises(StageError, match="missing or incomplete"):
        read_round_inputs(store, 0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_accelerate_train_path_matches_the_in_process_stage(tmp_path):
    """The train stage under `accelerate launch` (one CPU process) reads the same store datasets
    and takes the same steps as the in-process stage."""
    from trace_rl.data_schemas import TRAIN_METRICS
    from trace_rl.stages import get_stage

    accel = tmp_path / "accelerate.yaml"
    accel.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\n"
                     "use_cpu: true\nmixed_precision: 'no'\n")
    runs = {}
    for tag, extra in (("inproc", []), ("launch", [f"train.accelerate_config={accel}"])):
        cfg, store, _ = _tiny_round(tmp_path / tag, *extra)
        m = get_stage("train")(cfg, 0, progress=False)
        assert m.extra["checkpoint"].endswith("checkpoints/round-0001")
        runs[tag] = store.read(m.dataset, TRAIN_METRICS, allow_extra=True).to_pylist()
        # The runtime-only launch settings leave the config fingerprint alone.
        runs[tag + "_fp"] = m.config_fingerprint
    assert runs["inproc_fp"] == runs["launch_fp"]
    assert len(runs["inproc"]) == len(runs["launch"]) > 0
    for a, b in zip(runs["inproc"], runs["launch"], strict=True):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("status", ["ok", "no_spans", "too_broad", "skipped", "parse_error",
                                    "api_error", "timeout"])
@pytest.mark.parametrize("with_spans", [True, False])
def test_coverage_is_null_wherever_nothing_was_distilled(status, with_spans):
    """One meaning of `coverage`: the span fraction of a row that spans were distilled from;
    every other row (whatever its status, whatever number the annotator computed) is NULL,
    and the row still fits the annotations schema."""
    from trace_rl.stages.annotators.base import make_row

    spans = [{"token_start": 0, "token_end": 3, "char_start": 0, "char_end": 9, "label": "x",
              "kind": "key_step"}] if with_spans else []
    row = make_row({"rollout_id": "r", "route": "key"}, "rule", status, spans=spans, coverage=0.3)
    assert (row["coverage"] is not None) == (status == "ok" and with_spans)
    if row["coverage"] is not None:
        assert row["coverage"] == pytest.approx(0.3)
    rows_to_table([{**row, "round": 0}], ANNOTATIONS, where="coverage contract")
