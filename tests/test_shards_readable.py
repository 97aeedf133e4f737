"""Every dataset directory of a run reads as plain Parquet in the usual tools: Hugging Face
`datasets.load_dataset("parquet", data_dir=...)`, pyarrow's directory reader, and the eval samples
as one `samples.parquet` file. The store's manifest is hidden (`.manifest.json`), so readers
that take every file of a directory skip it; runs written with the old `_manifest.json` still
read."""

from __future__ import annotations

import os

import datasets
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from test_store import _rollout
from trace_rl.data_schemas import EVAL_SAMPLES, ROLLOUTS
from trace_rl.data_schemas.errors import StageError
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
    rows = [make_row(items[0], "a", "ok", coverage=0.3), make_row(items[1], "a", "no_spans", coverage=0.0),
            make_row(items[2], "a", "skipped"), make_row(items[3], "a", "api_error", error="503")]
    assert [r["coverage"] for r in rows] == [0.3, 0.0, None, None]
    store = RunStore(str(tmp_path / "run"))
    with store.writer("round-0000/annotations", ANNOTATIONS, stage="annotate", config_fingerprint="c") as w:
        w.write_rows(rows)
    table = store.read("round-0000/annotations", ANNOTATIONS)
    assert table.column("coverage").null_count == 2
    summary = inspect_path(str(tmp_path / "run" / "round-0000" / "annotations"), html=str(tmp_path / "v.html"),
                           examples=0)
    got = summary["datasets"]["annotations"]
    assert got["coverage"]["mean"] == pytest.approx(0.15) and got["not_annotated"] == 2
    assert summary["html"]["coverage_mean"] == pytest.approx(got["coverage"]["mean"])
    assert page_summary([{"coverage": None, "spans": []}])["coverage_mean"] is None
