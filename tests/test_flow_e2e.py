"""The training flow end to end on the testbed, under Prefect's test harness; then a forced
rerun of one stage."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tiny import TINY_RUN
from trace_rl.data_schemas import ANNOTATIONS, PROMPTS, ROLLOUTS, TRAIN_METRICS, VERDICTS
from trace_rl.stages.common import dataset_name, open_store
from trace_rl.stages.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_testbed_dir, prefect_harness):
    from trace_rl.flows.training import trace_training

    root = tmp_path_factory.mktemp("e2e") / "run"
    overrides = TINY_RUN + [f"run.root={root}", f"model.testbed_dir={tiny_testbed_dir}", "run.rounds=2"]
    result = trace_training("demo", overrides)
    return load_config("demo", overrides), overrides, result


def test_two_rounds_every_shard_reads_back(finished_run):
    cfg, _, result = finished_run
    assert result["rounds"] == 2
    store = open_store(cfg)
    prompts = store.read("prompts", PROMPTS)
    assert prompts.num_rows == 64
    per_round = cfg.rollout.prompts_per_round * cfg.rollout.n
    seen_prompts = []
    for k in range(2):
        rollouts = store.read(dataset_name("rollout", k), ROLLOUTS)
        verdicts = store.read(dataset_name("verify", k), VERDICTS)
        annotations = store.read(dataset_name("annotate", k), ANNOTATIONS)
        metrics = store.read(dataset_name("train", k), TRAIN_METRICS, allow_extra=True)
        ids = rollouts.column("rollout_id").to_pylist()
        assert len(ids) == len(set(ids)) == per_round
        assert sorted(verdicts.column("rollout_id").to_pylist()) == sorted(ids)
        assert sorted(annotations.column("rollout_id").to_pylist()) == sorted(ids)
        assert metrics.num_rows == per_round // cfg.train.mini_batch_size
        for col in ("loss", "pg_loss", "kl_loss", "kl_weight", "entropy", "grad_norm", "tokens_per_s"):
            assert metrics.column(col).null_count == 0, col
        seen_prompts.append(set(rollouts.column("prompt_id").to_pylist()))
        ckpt = set(rollouts.column("checkpoint").to_pylist())
        if k == 0:
            assert ckpt == {cfg.model.testbed_dir}
        else:
            # The second round samples the policy the first round's train stage wrote, named
            # relative to the run (schema version 2)
            assert ckpt == {"checkpoints/round-0001"}
        for table in (rollouts, verdicts, annotations, metrics):  # every round dataset says its round
            assert set(table.column("round").to_pylist()) == {k}
    assert not seen_prompts[0] & seen_prompts[1], "no prompt repeats within an epoch"
    steps = store.read(dataset_name("train", 1), TRAIN_METRICS, allow_extra=True).column("step").to_pylist()
    assert steps[0] == per_round // cfg.train.mini_batch_size, "the global step continues across rounds"
    assert (store.local_path("checkpoints", "round-0002") / "config.json").exists()
    assert store.exists("eval", "round-0002", "summary.json")


def test_annotations_have_spans_on_the_error_route(finished_run):
    cfg, _, _ = finished_run
    store = open_store(cfg)
    rows = store.read(dataset_name("annotate", 0), ANNOTATIONS).to_pylist()
    routed = [r for r in rows if r["route"] != "none"]
    assert routed, "with both routes on every rollout is routed"
    for r in rows:
        for span in r["spans"]:
            assert 0 <= span["token_start"] < span["token_end"]
            assert span["char_start"] < span["char_end"]
        # coverage: NULL exactly where nothing was distilled (no spans), else within the cap
        assert (r["coverage"] is None) == (not r["spans"])
        assert r["coverage"] is None or 0.0 < r["coverage"] <= cfg.annotate.coverage_cap + 1e-6


def test_forced_stage_rewrites_only_its_dataset_and_marks_train_stale(finished_run):
    """Staleness by content: the real annotate stage forced with the same settings writes the
    same bytes (same fingerprint), so round 1's train stays current; forced with a changed
    setting it writes other annotations and the train stage that read them is stale."""
    from trace_rl.stages import get_stage
    from trace_rl.stages.status import stage_states

    cfg, overrides, _ = finished_run
    store = open_store(cfg)
    names = {s: dataset_name(s, 1) for s in ("rollout", "verify", "annotate", "train")}
    before = {s: store.manifest(n) for s, n in names.items()}
    assert stage_states(cfg)["train"][1].state == "complete"
    get_stage("annotate")(cfg, 1, force=True, progress=False)
    same = store.manifest(names["annotate"])
    assert same.finished_at > before["annotate"].finished_at  # it did run again
    assert same.files == before["annotate"].files and same.fingerprint == before["annotate"].fingerprint
    assert {s: st.state for s, st in ((s, stage_states(cfg)[s][1]) for s in names)} == dict.fromkeys(names, "complete")
    changed = load_config("demo", overrides + ["annotate.coverage_cap=0.2"])
    get_stage("annotate")(changed, 1, force=True, progress=False)
    after = {s: store.manifest(n) for s, n in names.items()}
    assert after["annotate"].fingerprint != before["annotate"].fingerprint
    for s in ("rollout", "verify", "train"):
        assert after[s].fingerprint == before[s].fingerprint and after[s].finished_at == before[s].finished_at
    # Judged by the run's own config: the train stage that read the old annotations is stale
    # (and the annotations themselves, made under another setting); round 0 is untouched.
    states = stage_states(cfg)
    assert states["annotate"][1].state == "stale" and states["train"][1].state == "stale"
    assert states["train"][1].reason == f"its input {names['annotate']} was rewritten with different content"
    assert states["train"][0].state == "complete"
    # Content-addressed: annotating again with the run's settings writes the first bytes back,
    # and the train stage is current again without retraining.
    get_stage("annotate")(cfg, 1, force=True, progress=False)
    assert store.manifest(names["annotate"]).fingerprint == before["annotate"].fingerprint
    assert {stage_states(cfg)[s][1].state for s in names} == {"complete"}
    assert store.manifest(names["train"]).finished_at == before["train"].finished_at


def test_the_prefect_run_reads_like_the_experiment(finished_run):
    """Run names carry run and round, each stage's figures are in the run's Prefect log, and the
    parent run holds a per-round table and the summary with the plots embedded (not a path)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter, LogFilter

    cfg, _, _ = finished_run
    store = open_store(cfg)
    name = cfg.run.name
    # the initial policy is evaluated too, and the plots were redrawn after the last evaluation
    assert store.exists("eval", "initial", "summary.json")
    assert store.exists("plots", "accuracy.png")
    summary_md = store.read_text(store.path("plots", "summary.md"))
    assert "| initial |" in summary_md and "| round-0002 |" in summary_md
    with get_client(sync_client=True) as client:
        # The session's Prefect server holds other tests' runs named "demo" too: select this
        # run's parent by its run root, its rounds as subflows of the parent's tasks.
        parent, ids = _this_run(client, name, str(cfg.run.root))
        tasks = {t.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": ids}))}
        assert {"prepare", "rollout r0", "verify r1", "annotate r1", "train r1",
                "evaluate initial", "evaluate round-0002"} <= tasks, tasks
        logs = _all_logs(client, LogFilter(flow_run_id={"any_": ids}), until="eval round-0002: testbed avg@")
        assert "verify r1: " in logs and "accuracy (reward rate) " in logs
        assert "mean coverage " in logs and " rows with spans (NULL on rows without" in logs
        assert "train r0: " in logs and "λ " in logs and "pg_loss " in logs
        assert "eval round-0002: testbed avg@" in logs and "95% CI" in logs
        by_task = {t.name: t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": ids}))}
        own = _task_logs(client, by_task["train r0"].id)
        # progress lines from inside the stage, in the train task's own log (issue 28)
        assert re.search(r"train r0: \d+/\d+ steps · step \d+ · loss -?[\d.]+ · reward [\d.]+ · "
                         r"λ [\d.]+ · KL (-|[\d.]+) · \d+ tok/s", own), own
        assert re.search(r"hf sampling: \d+/\d+ sequences · \d+ tok/s", _task_logs(client, by_task["rollout r0"].id))
        # the parent run: one line per finished round with its headline numbers; the testbed
        # build is a task of its own, its SFT steps are not in the parent's log
        parent_logs = _all_logs(client, LogFilter(flow_run_id={"any_": [parent.id]}),
                                until="policy 2: eval round-0002: testbed avg@")
        for k in (0, 1):
            assert re.search(rf"round {k} done \(policy {k} sampled, policy {k + 1} written\): reward "
                             r"rate [\d.]+", parent_logs), parent_logs
        assert "policy 2: eval round-0002: testbed avg@" in parent_logs
        assert "testbed build" in by_task and "sft step" not in parent_logs
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id={"any_": [parent.id]}))
    kinds = {a.type for a in arts}
    assert {"table", "markdown"} <= kinds, kinds
    table = max((a for a in arts if a.type == "table"), key=lambda a: a.created)
    assert "reward_rate" in str(table.data) and "coverage" in str(table.data)
    md = max((a for a in arts if a.type == "markdown"), key=lambda a: a.created)
    assert "data:image/png;base64," in md.data and "accuracy.png" in md.data
    assert "file://" not in md.data


def _task_logs(client, task_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter

    return _all_logs(client, LogFilter(task_run_id={"any_": [task_run_id]}))


def _all_logs(client, log_filter, until: str | None = None, wait_s: float = 60.0) -> str:
    """Every log line the filter selects, page by page (the API returns at most 200 a call).

    Log lines reach the server in batches from a background worker of this process: its queue
    is drained first, and with `until` the server is read again (up to `wait_s`) until that
    text has arrived, so that a late batch is not taken for a missing line."""
    import time

    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=wait_s)
    deadline = time.monotonic() + wait_s
    while True:
        lines, offset = [], 0
        while page := client.read_logs(log_filter=log_filter, limit=200, offset=offset, sort=LogSort.TIMESTAMP_ASC):
            lines += [x.message for x in page]
            offset += len(page)
        text = "\n".join(lines)
        if until is None or until in text or time.monotonic() > deadline:
            return text
        time.sleep(1.0)


def _this_run(client, name: str, root: str):
    """The parent flow run of the run rooted at `root`, and its id with those of its subflows."""
    from prefect.client.schemas.filters import FlowRunFilter, TaskRunFilter

    parents = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(name={"any_": [f"{name} · training"]}))
               if f"run.root={root}" in (r.parameters.get("overrides") or [])]
    assert len(parents) == 1, [p.parameters for p in parents]
    parent = parents[0]
    own_tasks = {t.id for t in client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id={"any_": [parent.id]}))}
    subflows = [r.id for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_task_run_id={"any_": list(own_tasks)}))]
    names = {r.name for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(id={"any_": subflows}))}
    assert {f"{name} · round 0", f"{name} · round 1"} <= names, names
    return parent, [parent.id, *subflows]


def test_one_continuous_tensorboard_run_with_rollout_figures(finished_run):
    """After two rounds and a forced retrain of round 1 (the test above): one TensorBoard run,
    each optimizer step once, and each round's rollout figures at its first step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _, _ = finished_run
    store = open_store(cfg)
    root = store.local_path("tensorboard")
    assert {p.parent for p in store.local_path("").rglob("events.out.tfevents*")} == {root / "train", root / "eval"}
    acc = EventAccumulator(str(root / "train"))
    acc.Reload()
    per_round = cfg.rollout.prompts_per_round * cfg.rollout.n // cfg.train.mini_batch_size
    assert [e.step for e in acc.Scalars("train/kl_weight")] == list(range(2 * per_round))
    tags = set(acc.Tags()["scalars"])
    assert {t.split("/")[0] for t in tags} == {"train", "rollout"}  # grouped tags
    evals = EventAccumulator(str(root / "eval"))
    evals.Reload()
    assert {t.split("/")[0] for t in evals.Tags()["scalars"]} == {"eval"}
    assert {e.step for e in evals.Scalars("eval/testbed/avg@k")} == {0, 2}  # policies 0 and 2
    for name in ("reward_mean", "reward_std", "accuracy", "zero_variance_group_frac", "truncation_rate"):
        assert f"rollout/{name}" in tags, tags
        assert [e.step for e in acc.Scalars(f"rollout/{name}")] == [0, per_round], name
    rewards = store.read(dataset_name("verify", 0), VERDICTS).column("reward").to_pylist()
    assert acc.Scalars("rollout/reward_mean")[0].value == pytest.approx(sum(rewards) / len(rewards))
    finish = store.read(dataset_name("rollout", 0), ROLLOUTS).column("finish_reason").to_pylist()
    assert acc.Scalars("rollout/truncation_rate")[0].value == pytest.approx(finish.count("length") / len(finish))


def test_span_view_of_the_run_has_every_round_and_teacher_heat_strips(finished_run, tmp_path):
    """`inspect RUN --html --teacher`: all rounds with a picker, and per token the privileged
    teacher's and the student's log-prob of the sampled token under the spans."""
    import math
    import re

    from trace_rl.pipeline.inspect import inspect_path
    from trace_rl.stages.token_view import TeacherStudentScorer, run_root_of

    cfg, _, _ = finished_run
    root = cfg.run.run_root
    assert run_root_of(f"{root}/round-0001/annotations") == str(Path(root).resolve())
    scorer = TeacherStudentScorer(root)
    scores = scorer(1, [r["rollout_id"] for r in open_store(cfg).read(
        dataset_name("rollout", 1), ROLLOUTS).slice(0, 2).to_pylist()])
    rows = {r["rollout_id"]: r for r in open_store(cfg).read(dataset_name("rollout", 1), ROLLOUTS).to_pylist()}
    for rid, s in scores.items():
        n = len(rows[rid]["response_token_ids"])
        assert len(s["student"]) == len(s["teacher"]) == len(s["offsets"]) == n
        assert "".join(rows[rid]["response_text"][a:b] for a, b in s["offsets"]) == rows[rid]["response_text"]
        assert all(v <= 0 for v in s["student"] + s["teacher"])
        if cfg.rollout.temperature == 1.0:  # the student's are the log-probs the engine sampled with
            assert max(abs(a - b) for a, b in zip(s["student"], rows[rid]["response_logprobs"])) < 1e-3
        assert any(not math.isclose(a, b, abs_tol=1e-4) for a, b in zip(s["student"], s["teacher"]))
    page_path = tmp_path / "view.html"
    out = inspect_path(root, html=str(page_path), examples=0, scorer=scorer)
    page = page_path.read_text()
    assert out["html"]["responses"] == 2 * cfg.rollout.prompts_per_round * cfg.rollout.n
    assert '<option value="0">round 0</option>' in page and '<option value="1" selected>round 1</option>' in page
    assert set(re.findall(r'data-round="(\d)"', page)) == {"0", "1"}
    annotated = sum(r["status"] != "skipped" for k in (0, 1)
                    for r in open_store(cfg).read(dataset_name("annotate", k), ANNOTATIONS).to_pylist())
    assert page.count('<div class="heat">') == annotated  # a strip on every annotated rollout
    assert page.count('<div class="strip-legend">') == annotated  # each with its legend beside it
    assert "teacher − student log-prob per sampled token" in page and 'class="tok' in page


def test_a_forced_retrain_that_writes_the_same_weights_leaves_later_rounds_current(finished_run):
    """Staleness by content for the train stage: what later rounds read of it is its checkpoint.
    Retraining round 0 rewrites bitwise-identical weights (its metrics' tokens/s differ), so
    round 1 stays current; the checkpoint's weights id is their content hash, not a fresh id."""
    from trace_rl.stages import get_stage
    from trace_rl.stages.status import stage_states

    cfg, _, _ = finished_run
    store = open_store(cfg)
    train0 = dataset_name("train", 0)
    before = store.manifest(train0)
    get_stage("train")(cfg, 0, force=True, progress=False)
    after = store.manifest(train0)
    assert after.finished_at > before.finished_at  # it did retrain
    assert after.extra["checkpoint_files"] == before.extra["checkpoint_files"], "weights differ"
    states = stage_states(cfg)
    assert {states[s][1].state for s in ("rollout", "verify", "annotate", "train")} == {"complete"}
