"""Every dataset directory of a run reads as plain Parquet in the usual tools: Hugging Face
`datasets.load_dataset("parquet", data_dir=...)`, pyarrow's directory reader, and the eval samples
as one `samples.parquet` file. The store's manifest is hidden (`.manifest.json`), so readers
that take every file of a directory skip it; runs written with the old `_manifest.json` still
read."""

from __future__ import annotations

import os
import re

import datasets
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from test_store import _rollout
from trace_rl.data_schemas import EVAL_SAMPLES, ROLLOUTS
from trace_rl.data_schemas.errors import SchemaError, StageError
from trace_rl.pipeline.store import LEGACY_MANIFEST, MANIFEST, RunStore
from trace_rl.stages.benchmarks import Benchmark
from trace_rl.stages.config import load_config
from trace_rl.stages.evaluate import Checkpoint, samples_job, write_samples


def _load(directory, tmp_path):
    return datasets.load_dataset("parquet", data_dir=str(directory), split="train",
                                 cache_dir=str(tmp_path / "hf"))


def test_load_dataset_data_dir_reads_a_multi_part_dataset(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    with store.writer("round-0000/rollouts", ROLLOUTS, stage="rollout", config_fingerprint="c") as w:
        w.write_rows([_rollout(i) for i in range(4)])
        w.write_rows([_rollout(i) for i in range(4, 6)])
    directory = tmp_path / "run" / "round-0000" / "rollouts"
    assert sorted(os.listdir(directory)) == [MANIFEST, "part-00000.parquet", "part-00001.parquet"]
    ds = _load(directory, tmp_path)
    assert sorted(ds["rollout_id"]) == [f"r{i}" for i in range(6)]
    assert ds.features["response_token_ids"].feature.dtype == "int32"
    # pyarrow's directory reader (what pandas.read_parquet(dir) uses) reads the same rows
    assert pads.dataset(str(directory), format="parquet").to_table().num_rows == 6


def test_eval_samples_are_one_parquet_file(tmp_path):
    cfg = load_config("demo", [f"run.root={tmp_path / 'run'}"])
    store = RunStore(cfg.run.run_root)
    ckpt = Checkpoint("initial", "model", {"initial_model": "fp"})
    job = samples_job(cfg, ckpt, Benchmark("math500", "math", [{"prompt_id": "p0"}], "b"))
    rows = [{"benchmark": "math500", "problem_id": f"p{i}", "sample_index": 0, "response_text": "7",
             "extracted_answer": "7", "correct": i % 2 == 0, "num_tokens": 3} for i in range(5)]
    m = write_samples(store, job, ckpt, rows, {"verdict_status": {"ok": 5}}, k=1)
    path = tmp_path / "run" / "eval" / "initial" / "math500" / "samples.parquet"
    assert path.is_file() and m.files == [{"name": "samples.parquet", "rows": 5,
                                           **{k: v for k, v in m.files[0].items() if k not in ("name", "rows")}}]
    assert pq.read_table(path).column("correct").to_pylist() == [True, False, True, False, True]
    assert store.read(m.dataset, EVAL_SAMPLES).num_rows == 5
    assert _load(path.parent, tmp_path).num_rows == 5


def test_a_run_written_with_the_old_manifest_name_still_reads_and_rewrites_cleanly(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    with store.writer("round-0000/rollouts", ROLLOUTS, stage="rollout", config_fingerprint="c") as w:
        w.write_rows([_rollout(i) for i in range(2)])
    directory = tmp_path / "run" / "round-0000" / "rollouts"
    os.rename(directory / MANIFEST, directory / LEGACY_MANIFEST)
    assert store.manifest("round-0000/rollouts").rows == 2
    assert store.read("round-0000/rollouts", ROLLOUTS).num_rows == 2
    assert store.invalidate("round-0000/rollouts") is True
    assert store.manifest("round-0000/rollouts") is None
    with pytest.raises(StageError, match="missing or incomplete"):
        store.read("round-0000/rollouts", ROLLOUTS)


def test_coverage_is_null_where_a_row_was_not_annotated_and_has_one_mean(tmp_path):
    from trace_rl.data_schemas import ANNOTATIONS
    from trace_rl.pipeline.html_view import page_summary
    from trace_rl.pipeline.inspect import inspect_path
    from trace_rl.stages.annotators.base import make_row

    items = [{"rollout_id": f"r{i}", "route": route} for i, route in enumerate(["key", "error", "none", "key"])]
    span = {"segment_ids": [1], "char_start": 0, "char_end": 3, "token_start": 0, "token_end": 3,
            "label": "key"}
    rows = [make_row(items[0], "a", "ok", spans=[span], coverage=0.3),
            make_row(items[1], "a", "no_spans", coverage=0.0),
            make_row(items[2], "a", "skipped"), make_row(items[3], "a", "api_error", error="503")]
    # NULL wherever nothing was distilled: no_spans, skipped and errors alike (never 0.0)
    assert [r["coverage"] for r in rows] == [0.3, None, None, None]
    store = RunStore(str(tmp_path / "run"))
    with store.writer("round-0000/annotations", ANNOTATIONS, stage="annotate", config_fingerprint="c") as w:
        w.write_rows(rows)
    table = store.read("round-0000/annotations", ANNOTATIONS)
    assert table.column("coverage").null_count == 3
    summary = inspect_path(str(tmp_path / "run" / "round-0000" / "annotations"), html=str(tmp_path / "v.html"),
                           examples=0)
    got = summary["datasets"]["annotations"]
    # not annotated: skipped and api_error; the no_spans row was annotated (nothing to distill)
    assert got["coverage"]["mean"] == pytest.approx(0.3) and got["not_annotated"] == 2
    assert got["rows_without_spans"] == 3
    assert summary["html"]["coverage_mean"] == pytest.approx(got["coverage"]["mean"])
    assert page_summary([{"coverage": None, "spans": []}])["coverage_mean"] is None


def test_round_datasets_query_cleanly(tmp_path):
    """Schema version 2: every round dataset has an int32 `round`; metric columns are SQL-safe
    (`kl/forward` -> `kl_forward`); rollouts' `checkpoint` is relative to the run and resolves
    against it; `sampling` is a struct. Read back with load_dataset(data_dir) and pyarrow."""
    from test_store import _annotation
    from trace_rl.data_schemas import ANNOTATIONS, SAMPLING, TRAIN_METRICS, VERDICTS, extend_metrics
    from trace_rl.stages.config import load_config
    from trace_rl.stages.rollout import run_path, run_relative

    store = RunStore(str(tmp_path / "run"))
    ckpt = str(store.local_path("checkpoints", "round-0002"))
    sampling = load_config("demo").rollout.sampling_dict()
    with store.writer("round-0002/rollouts", ROLLOUTS, stage="rollout", config_fingerprint="c") as w:
        w.write_rows([{**_rollout(i), "round": 2, "checkpoint": run_relative(store, ckpt),
                       "sampling": sampling} for i in range(2)])
    with store.writer("round-0002/verdicts", VERDICTS, stage="verify", config_fingerprint="c") as w:
        w.write_rows([{"rollout_id": f"r{i}", "reward": 1.0, "correct": True, "extracted_answer": "3",
                       "status": "ok", "detail": None} for i in range(2)])  # round: the directory's
    with store.writer("round-0002/annotations", ANNOTATIONS, stage="annotate", config_fingerprint="c") as w:
        w.write_rows([_annotation(i) for i in range(2)])
    metric = {**{n: 0.5 for n in TRAIN_METRICS.names}, "step": 0, "round": 2, "peak_mem_bytes": 1}
    with store.writer("round-0002/train", extend_metrics(["kl/forward", "teacher/step"]), stage="train",
                      config_fingerprint="c", allow_extra=True) as w:
        w.write_rows([{**metric, "kl/forward": 0.25, "teacher/step": 0.0}])

    for name in ("rollouts", "verdicts", "annotations", "train"):
        directory = tmp_path / "run" / "round-0002" / name
        ds = _load(directory, tmp_path)
        assert ds.features["round"].dtype == "int32" and set(ds["round"]) == {2}, name
        table = pads.dataset(str(directory), format="parquet").to_table()
        assert table.schema.field("round").type == pa.int32(), name
        assert all(re.fullmatch(r"[a-z_][a-z0-9_]*", c) for c in table.column_names), table.column_names
    metrics = pq.read_table(tmp_path / "run" / "round-0002" / "train")
    assert metrics.column("kl_forward").type == pa.float64() and metrics.column("kl_forward")[0].as_py() == 0.25
    rollouts = pq.read_table(tmp_path / "run" / "round-0002" / "rollouts")
    assert rollouts.schema.field("sampling").type == SAMPLING
    assert rollouts.column("sampling")[0].as_py() == sampling  # every field typed, none lost
    assert rollouts.column("checkpoint").to_pylist() == ["checkpoints/round-0002"] * 2
    assert run_path(store, "checkpoints/round-0002") == ckpt and run_path(store, "/models/x") == "/models/x"
    rows = _load(tmp_path / "run" / "round-0002" / "rollouts", tmp_path)
    assert rows[0]["sampling"]["enable_thinking"] is sampling["enable_thinking"]


def _v1_schema(name: str, fields: list) -> pa.Schema:
    return pa.schema(fields, metadata={b"schema_name": name.encode(), b"schema_version": b"1"})


def test_a_version_1_run_still_reads(tmp_path):
    """Shards written with the version-1 schemas (no `round` in verdicts and annotations, JSON
    `sampling`, absolute `checkpoint`, `kl/forward`) read as version-2 tables, and what reads
    `sampling` (the trainer) takes them."""
    import json

    from trace_rl.data_schemas import ANNOTATIONS, SAMPLING, TRAIN_METRICS, VERDICTS, read_parquet
    from trace_rl.trainer.batch import sampling_of
    from trace_rl.trainer.teacher import enable_thinking_of

    run = tmp_path / "run"
    ckpt = str(run / "checkpoints" / "round-0001")
    old = {
        "rollouts": [*[f for f in ROLLOUTS if f.name != "sampling"], pa.field("sampling", pa.string(), False)],
        "verdicts": [f for f in VERDICTS if f.name != "round"],
        "annotations": [f for f in ANNOTATIONS if f.name != "round"],
        "train_metrics": [*TRAIN_METRICS, pa.field("kl/forward", pa.float64())],
    }
    rows = {
        "rollouts": {**_rollout(0), "round": 1, "checkpoint": ckpt,
                     "sampling": json.dumps({"temperature": 0.7, "top_p": 0.9, "top_k": 0,
                                             "enable_thinking": False})},
        "verdicts": {"rollout_id": "r0", "reward": 1.0, "correct": True, "extracted_answer": "3",
                     "status": "ok", "detail": None},
        "annotations": {"rollout_id": "r0", "route": "key", "annotator": "rule", "spans": [],
                        "coverage": None, "status": "no_spans", "raw_response": None, "error": None,
                        "latency_s": 0.1},
        "train_metrics": {**{f.name: 0.5 for f in TRAIN_METRICS}, "step": 3, "round": 1,
                          "peak_mem_bytes": 1, "kl/forward": 0.125},
    }
    folder = {"rollouts": "rollouts", "verdicts": "verdicts", "annotations": "annotations",
              "train_metrics": "train"}
    read = {}
    for name, fields in old.items():
        schema = _v1_schema(name, fields)
        path = run / "round-0001" / folder[name] / "part-00000.parquet"
        path.parent.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist([rows[name]], schema=schema), path)
        new = {"rollouts": ROLLOUTS, "verdicts": VERDICTS, "annotations": ANNOTATIONS,
               "train_metrics": TRAIN_METRICS}[name]
        read[name] = read_parquet(str(path), new, allow_extra=name == "train_metrics")
        assert read[name].schema.metadata[b"schema_version"] == b"2"
    assert read["verdicts"].column("round").to_pylist() == [1]
    assert read["verdicts"].schema.field("round").type == pa.int32()
    assert read["annotations"].column("round").to_pylist() == [1]
    assert read["train_metrics"].column("kl_forward").to_pylist() == [0.125]
    assert "kl/forward" not in read["train_metrics"].column_names
    ro = read["rollouts"].to_pylist()[0]
    assert read["rollouts"].schema.field("sampling").type == SAMPLING
    assert ro["checkpoint"] == "checkpoints/round-0001"
    assert sampling_of(ro["sampling"]) == (0.7, True) and enable_thinking_of(ro["sampling"]) is False
    # outside <run>/round-000k/<dataset>/ a version-1 verdicts file cannot say its round
    lone = tmp_path / "lone.parquet"
    pq.write_table(pa.Table.from_pylist([rows["verdicts"]], schema=_v1_schema("verdicts", old["verdicts"])), lone)
    with pytest.raises(SchemaError, match="says nothing of its round"):
        read_parquet(str(lone), VERDICTS)


def test_inspect_counts_add_up_to_the_rows_on_disk(tmp_path):
    """A rule-annotated round (every row read by the annotator: ok 9, no_spans 4, too_broad 3)
    was reported with `not_annotated` 7, the rows without spans; read back with pyarrow, the
    statuses, spans and NULL coverage must account for every row once."""
    from trace_rl.data_schemas import ANNOTATIONS
    from trace_rl.pipeline.inspect import inspect_path
    from trace_rl.stages.annotators.base import make_row

    span = {"segment_ids": [1], "char_start": 0, "char_end": 3, "token_start": 0, "token_end": 3,
            "label": "carry"}
    statuses = ["ok"] * 9 + ["no_spans"] * 4 + ["too_broad"] * 3 + ["skipped", "parse_error", "timeout"]
    rows = [make_row({"rollout_id": f"r{i}", "route": "error"}, "rule", st,
                     spans=[span] if st == "ok" else None, coverage=0.2 if st == "ok" else 0.0)
            for i, st in enumerate(statuses)]
    store = RunStore(str(tmp_path / "run"))
    with store.writer("round-0000/annotations", ANNOTATIONS, stage="annotate", config_fingerprint="c") as w:
        w.write_rows(rows)
    on_disk = pq.read_table(tmp_path / "run" / "round-0000" / "annotations").to_pylist()
    got = inspect_path(str(tmp_path / "run" / "round-0000" / "annotations"), examples=0)["datasets"]["annotations"]
    assert got["rows"] == len(on_disk) == 19 and sum(got["status"].values()) == 19
    assert got["not_annotated"] == sum(r["status"] in ("skipped", "parse_error", "timeout") for r in on_disk) == 3
    assert got["rows_without_spans"] == sum(not r["spans"] for r in on_disk) == 10
    assert got["rows_without_spans"] == sum(r["coverage"] is None for r in on_disk)
    assert got["spans"] == sum(len(r["spans"]) for r in on_disk) == 9
