"""Parquet contracts and the run store: typed round trips, clear errors, crash-safe writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trace_rl.data_schemas import (ANNOTATIONS, PROMPTS, ROLLOUTS, SCHEMA_VERSION, VERDICTS, read_parquet,
                                   rows_to_table)
from trace_rl.data_schemas.errors import SchemaError, StageError
from trace_rl.pipeline.store import RunStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rollout(i: int) -> dict:
    return {
        "rollout_id": f"r{i}", "round": 0, "prompt_id": f"p{i // 2}", "sample_index": i % 2,
        "checkpoint": "ckpt", "prompt_token_ids": [1, 2, 3], "response_text": f"answer {i}",
        "response_token_ids": [4, 5], "response_logprobs": [-0.5, -1.25], "finish_reason": "stop",
        "engine": "hf", "sampling": json.dumps({"temperature": 1.0}),
    }


def _annotation(i: int) -> dict:
    span = {"segment_ids": [1, 2], "char_start": 0, "char_end": 5, "token_start": 0, "token_end": 1, "label": "carry"}
    return {"rollout_id": f"r{i}", "route": "key", "annotator": "rule", "spans": [span] if i % 2 else [],
            "coverage": 0.5 if i % 2 else 0.0, "status": "ok" if i % 2 else "no_spans",
            "raw_response": None, "error": None, "latency_s": 0.01}


def test_round_trip_through_pyarrow_datasets_and_pandas(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    with store.writer("round-0000/rollouts", ROLLOUTS, stage="rollout", config_fingerprint="c") as w:
        w.write_rows([_rollout(i) for i in range(4)])
        w.write_rows([_rollout(i) for i in range(4, 6)])
    with store.writer("round-0000/annotations", ANNOTATIONS, stage="annotate", config_fingerprint="c") as w:
        w.write_rows([_annotation(i) for i in range(6)])

    m = store.manifest("round-0000/annotations")
    assert m.rows == 6 and m.counts == {"ok": 3, "no_spans": 3}
    directory = tmp_path / "run" / "round-0000" / "rollouts"
    table = pq.read_table(directory / "part-00000.parquet")
    assert table.schema.field("response_logprobs").type == pa.list_(pa.float32())
    assert table.schema.metadata[b"schema_version"] == SCHEMA_VERSION.encode()

    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(directory / "part-*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 6
    assert ds.features["round"].dtype == "int32"
    assert ds.features["response_token_ids"].feature.dtype == "int32"
    ann = datasets.load_dataset("parquet", data_files=str(tmp_path / "run/round-0000/annotations/*.parquet"),
                                split="train", cache_dir=str(tmp_path / "hf"))
    assert ann[1]["spans"][0]["label"] == "carry"

    df = store.read("round-0000/rollouts", ROLLOUTS).to_pandas()
    assert list(df["rollout_id"]) == [f"r{i}" for i in range(6)]
    assert str(df["sample_index"].dtype) == "int32"


def test_missing_and_mistyped_columns_name_file_column_and_types(tmp_path):
    good = rows_to_table([{"rollout_id": "r", "round": 0, "reward": 1.0, "correct": True, "extracted_answer": "3",
                           "status": "ok", "detail": None}], VERDICTS)
    path = tmp_path / "bad.parquet"
    pq.write_table(good.drop_columns(["correct"]).replace_schema_metadata(VERDICTS.metadata), path)
    with pytest.raises(SchemaError, match=r"bad\.parquet.*missing column 'correct'.*bool"):
        read_parquet(str(path), VERDICTS)

    mistyped = good.set_column(good.schema.get_field_index("reward"), "reward", pa.array(["1.0"])).replace_schema_metadata(VERDICTS.metadata)
    pq.write_table(mistyped, path)
    with pytest.raises(SchemaError, match=r"column 'reward' has type string, expected float"):
        read_parquet(str(path), VERDICTS)

    with pytest.raises(SchemaError, match="column 'reward' cannot be stored as float"):
        rows_to_table([{"rollout_id": "r", "round": 0, "reward": "high", "correct": True, "status": "ok"}],
                      VERDICTS)


def test_truncated_file_is_a_clear_error(tmp_path):
    store = RunStore(str(tmp_path))
    with store.writer("prompts", PROMPTS, stage="prepare", config_fingerprint="c") as w:
        w.write_rows([{"prompt_id": str(i), "problem": "1+1?" * 50, "answer": "2", "solution": None,
                       "source": "t", "meta": "{}"} for i in range(100)])
    part = tmp_path / "prompts" / "part-00000.parquet"
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    with pytest.raises(SchemaError, match=r"part-00000\.parquet: not a readable Parquet file"):
        read_parquet(str(part), PROMPTS)
    # the store compares sizes before it reads: it says what changed
    with pytest.raises(StageError, match=rf"part-00000\.parquet: {len(data) // 2} bytes, the manifest "
                                         rf"recorded {len(data)}"):
        store.read("prompts", PROMPTS)


def test_incomplete_dataset_is_refused(tmp_path):
    store = RunStore(str(tmp_path))
    with pytest.raises(RuntimeError):
        with store.writer("prompts", PROMPTS, stage="prepare", config_fingerprint="c") as w:
            w.write_rows([{"prompt_id": "1", "problem": "x", "answer": "1", "solution": None,
                           "source": "t", "meta": "{}"}])
            raise RuntimeError("crash in the middle")
    assert store.manifest("prompts") is None
    with pytest.raises(StageError, match="missing or incomplete"):
        store.read("prompts", PROMPTS)


WRITER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from trace_rl.data_schemas import PROMPTS
    from trace_rl.pipeline.store import RunStore
    store = RunStore({run!r})
    rows = [{{"prompt_id": str(i), "problem": "p" * 200, "answer": "1", "solution": None,
              "source": "t", "meta": "{{}}"}} for i in range(2000)]
    with store.writer("prompts", PROMPTS, stage="prepare", config_fingerprint="c2") as w:
        for k in range(10):
            w.write_rows(rows[k * 200:(k + 1) * 200])
            if k == {kill_after}:
                os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("kill_after", [0, 5])
def test_sigkill_mid_write_leaves_no_complete_dataset(tmp_path, kill_after):
    run = str(tmp_path / "run")
    store = RunStore(run)
    # A complete earlier version exists: the rewrite must not leave it looking complete either.
    with store.writer("prompts", PROMPTS, stage="prepare", config_fingerprint="c1") as w:
        w.write_rows([{"prompt_id": "old", "problem": "x", "answer": "1", "solution": None,
                       "source": "t", "meta": "{}"}])
    proc = subprocess.run([sys.executable, "-c", WRITER.format(root=ROOT, run=run, kill_after=kill_after)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert store.manifest("prompts") is None
    assert not store.is_current("prompts", "c2", {})
    with pytest.raises(StageError):
        store.read("prompts", PROMPTS)
    # A rerun completes and holds exactly its own rows.
    with store.writer("prompts", PROMPTS, stage="prepare", config_fingerprint="c2") as w:
        w.write_rows([{"prompt_id": str(i), "problem": "x", "answer": "1", "solution": None,
                       "source": "t", "meta": "{}"} for i in range(3)])
    assert store.read("prompts", PROMPTS).num_rows == 3
    assert sorted(os.listdir(tmp_path / "run" / "prompts")) == [".manifest.json", "part-00000.parquet"]


def test_fsspec_memory_filesystem(tmp_path):
    store = RunStore("memory://trace-test/run")
    with store.writer("round-0001/verdicts", VERDICTS, stage="verify", config_fingerprint="c") as w:
        w.write_rows([{"rollout_id": "a", "reward": 0.0, "correct": False, "extracted_answer": None,
                       "status": "no_answer", "detail": None}])
    assert store.read("round-0001/verdicts", VERDICTS).num_rows == 1
    assert store.manifest("round-0001/verdicts").counts == {"no_answer": 1}


def _prompts(store: RunStore, n: int) -> None:
    with store.writer("prompts", PROMPTS, stage="prepare", config_fingerprint="c") as w:
        w.write_rows([{"prompt_id": str(i), "problem": "x", "answer": "1", "solution": None,
                       "source": "t", "meta": "{}"} for i in range(n)])


def test_a_part_the_manifest_does_not_list_is_refused_by_readers(tmp_path):
    """Issue 26: an extra part in a dataset directory read 3 rows through the store and 6
    through pandas; now the store refuses it, naming the file and what to do."""
    import shutil

    import pandas as pd

    store = RunStore(str(tmp_path))
    _prompts(store, 3)
    directory = tmp_path / "prompts"
    (directory / ".part-00001.parquet.ab12cd34.tmp").write_bytes(b"half")  # hidden: no reader sees it
    assert store.read("prompts", PROMPTS).num_rows == 3
    shutil.copy(directory / "part-00000.parquet", directory / "part-00001.parquet")
    assert len(pd.read_parquet(directory)) == 6  # what a directory reader would take as the data
    with pytest.raises(StageError, match=r"prompts is damaged: part-00001\.parquet: not listed in the "
                                         r"manifest.*Remove the files it does not list, or recompute it"):
        store.read("prompts", PROMPTS)
    assert not store.is_current("prompts", "c", {})
    (directory / "part-00001.parquet").unlink()
    assert store.read("prompts", PROMPTS).num_rows == 3


def test_digest_missing_from_a_recording_manifest_is_damage_but_an_old_manifest_is_not(tmp_path):
    from trace_rl.pipeline.integrity import recorded, verify_dataset

    store = RunStore(str(tmp_path))
    _prompts(store, 2)
    path = tmp_path / "prompts" / ".manifest.json"
    written = json.loads(path.read_text())
    for edit in ({"digest": ""}, {"digest": None}, {"rows": 5, "digest": ""}):
        path.write_text(json.dumps({**written, **edit}))
        assert "digest is missing" in str(verify_dataset(store, "prompts")), edit
        with pytest.raises(StageError, match="digest is missing"):
            store.read("prompts", PROMPTS)
    path.write_text(json.dumps({k: v for k, v in written.items() if k != "digest"}))
    assert "digest is missing" in str(verify_dataset(store, "prompts"))
    stripped = {**written, "files": [{k: v for k, v in written["files"][0].items() if k != "sha256"}]}
    path.write_text(json.dumps(stripped))  # a hash removed under an intact-looking digest
    assert "sha256 of part-00000.parquet was removed" in str(verify_dataset(store, "prompts"))
    # A manifest from before sizes and hashes were recorded: unrecorded, read as it always was.
    old = {k: v for k, v in written.items() if k != "digest"}
    old["files"] = [{"name": f["name"], "rows": f["rows"]} for f in written["files"]]
    path.write_text(json.dumps(old))
    assert verify_dataset(store, "prompts", deep=True) == [] and not recorded(store.manifest("prompts"))
    assert store.read("prompts", PROMPTS).num_rows == 2


def _stripped(written: dict) -> dict:
    """A manifest with its whole record removed: no digest, no sizes, no hashes."""
    old = {k: v for k, v in written.items() if k != "digest"}
    old["files"] = [{"name": f["name"], "rows": f["rows"]} for f in written["files"]]
    return old


def test_a_wholly_stripped_record_is_damage_when_an_input_of_the_run_records_one(tmp_path):
    """Removing the digest and every size and hash made a manifest read as one of a version
    before records (unverifiable, so never damaged), and a part then replaced by other rows was
    trained on. Its input, written earlier in the same run, does record them: so did the version
    that wrote it. Stripped without such an input (prepare's) it stays unrecorded."""
    from trace_rl.pipeline.integrity import verify_dataset

    store = RunStore(str(tmp_path))
    _prompts(store, 2)
    with store.writer("rollouts", ROLLOUTS, stage="rollout", config_fingerprint="c",
                      inputs={"prompts": store.manifest("prompts").fingerprint}) as w:
        w.write_rows([_rollout(i) for i in range(2)])
    path = tmp_path / "rollouts" / ".manifest.json"
    path.write_text(json.dumps(_stripped(json.loads(path.read_text()))))
    assert "input prompts, written before it, records them" in str(verify_dataset(store, "rollouts"))
    with pytest.raises(StageError, match="rollouts is damaged: .manifest.json: its digest, sizes"):
        store.read("rollouts", ROLLOUTS)
    assert not store.is_current("rollouts", "c", json.loads(path.read_text())["inputs"])
    prompts = tmp_path / "prompts" / ".manifest.json"
    prompts.write_text(json.dumps(_stripped(json.loads(prompts.read_text()))))
    assert verify_dataset(store, "prompts") == [] and verify_dataset(store, "rollouts") == []


def test_readers_refuse_a_part_of_another_size_or_a_listed_part_that_is_missing(tmp_path):
    """`status` called a part replaced by other valid Parquet (same rows, other values: 669 bytes
    where 683 were recorded) damaged, but `RunStore.read` returned its rows; and a listed part
    that is gone read as "not a readable Parquet file (truncated or corrupt?)"."""
    store = RunStore(str(tmp_path))
    _prompts(store, 2)
    part = tmp_path / "prompts" / "part-00000.parquet"
    table = store.read("prompts", PROMPTS)
    pq.write_table(table.set_column(1, "problem", pa.array(["a much longer problem"] * 2)), part)
    with pytest.raises(StageError, match=r"prompts is damaged: part-00000\.parquet: \d+ bytes, the "
                                         r"manifest recorded \d+"):
        store.read("prompts", PROMPTS)
    part.unlink()
    with pytest.raises(StageError, match=r"part-00000\.parquet: missing"):
        store.read("prompts", PROMPTS)
