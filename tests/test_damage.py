"""Damage detection: manifests record each file's size and sha256 (checkpoints too, in their
train manifest); `status` marks damaged data with what to do; `run` recomputes it instead of
skipping it as current; nothing trains from or replays against a damaged checkpoint.

The five cases of issue 23 (a half-truncated part, a foreign-schema file, a deleted final model,
deleted intermediate weights, an edited row count), issue 26's emptied manifest digest and extra
part file, plus a same-size byte flip, which only the deep check (`status --verify`, sha256) can
see."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from tiny import TINY_TESTBED
from tiny_runs import cli, copy_run, finish, reference_run  # noqa: F401  (fixture)
from trace_rl.data_schemas import ROLLOUTS, TRAIN_METRICS, VERDICTS, read_parquet, rows_to_table
from trace_rl.data_schemas.errors import SchemaError, StageError
from trace_rl.pipeline import layout
from trace_rl.pipeline.integrity import checkpoint_record, verify_dataset
from trace_rl.stages.common import open_store, start_checkpoint
from trace_rl.stages.config import load_config
from trace_rl.stages.status import stage_state


def _rollout(i: int, prompt_id: str = "p0") -> dict:
    return {"rollout_id": f"r{i}", "prompt_id": prompt_id, "round": 0, "sample_index": i,
            "prompt": "Add 2 and 3.", "response": f"answer {i}" * 5, "prompt_token_ids": [1, 2, 3],
            "response_token_ids": [4, 5, 6 + i], "response_logprobs": [-0.5, -0.25, -0.125],
            "finish_reason": "stop", "checkpoint": "initial", "sampling": "{}", "meta": "{}"}


def _verdict(i: int) -> dict:
    return {"rollout_id": f"r{i}", "prompt_id": "p0", "reward": float(i % 2), "status": "ok",
            "extracted": "5", "detail": "{}"}


def _fill(rows: list[dict], schema) -> list[dict]:
    """Rows completed with the schema's other columns (typed defaults), so the tests do not
    restate the whole contract."""
    import pyarrow as pa

    defaults = {pa.string(): "", pa.int64(): 0, pa.int32(): 0, pa.float64(): 0.0, pa.bool_(): False}
    out = []
    for row in rows:
        full = {}
        for f in schema:
            if f.name in row:
                full[f.name] = row[f.name]
            elif f.nullable:
                full[f.name] = None
            else:
                full[f.name] = [] if pa.types.is_list(f.type) else defaults.get(f.type, "")
        out.append(full)
    return out


@pytest.fixture()
def run(tmp_path):
    cfg = load_config("demo", [f"run.root={tmp_path / 'run'}", *TINY_TESTBED])
    store = open_store(cfg)
    for k in range(2):
        with store.writer(layout.dataset_name("rollout", k), ROLLOUTS, stage="rollout",
                          config_fingerprint="cfg") as w:
            w.write_rows(_fill([_rollout(i) for i in range(8)], ROLLOUTS))
            w.write_rows(_fill([_rollout(i) for i in range(8, 12)], ROLLOUTS))
        with store.writer(layout.dataset_name("verify", k), VERDICTS, stage="verify",
                          config_fingerprint="cfg") as w:
            w.write_rows(_fill([_verdict(i) for i in range(12)], VERDICTS))
    return cfg, store


def test_manifest_records_each_part_size_and_sha256(run):
    _, store = run
    m = store.manifest("round-0000/rollouts")
    assert [f["name"] for f in m.files] == ["part-00000.parquet", "part-00001.parquet"]
    for f in m.files:
        data = Path(store.path("round-0000/rollouts", f["name"])).read_bytes()
        assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert m.digest and verify_dataset(store, "round-0000/rollouts", deep=True) == []


def _damage(store, case: str) -> str:
    """Damage one dataset as the issue's cases do; returns the dataset's name."""
    def part(name: str) -> str:
        return store.path(name, "part-00000.parquet")

    if case == "truncated":
        os.truncate(part("round-0000/rollouts"), os.path.getsize(part("round-0000/rollouts")) // 2)
        return "round-0000/rollouts"
    if case == "foreign":  # another schema's file in its place
        shutil.copy(part("round-0001/rollouts"), part("round-0001/verdicts"))
        return "round-0001/verdicts"
    if case == "deleted":
        os.remove(part("round-0000/verdicts"))
        return "round-0000/verdicts"
    if case == "rows_edited":
        path = Path(store.path("round-0001/rollouts", ".manifest.json"))
        m = json.loads(path.read_text())
        m["rows"] += 1
        path.write_text(json.dumps(m))
        return "round-0001/rollouts"
    if case == "digest_emptied":  # issue 26: an emptied digest let any edit pass as unrecorded
        path = Path(store.path("round-0000/verdicts", ".manifest.json"))
        m = json.loads(path.read_text())
        m["digest"], m["counts"] = "", {"ok": 99}
        path.write_text(json.dumps(m))
        return "round-0000/verdicts"
    if case == "extra_part":  # a part the manifest does not list: directory readers see its rows
        shutil.copy(part("round-0001/rollouts"), store.path("round-0001/rollouts", "part-00002.parquet"))
        return "round-0001/rollouts"
    if case == "byteflip":  # same size: only the hash shows it
        path = Path(part("round-0000/rollouts"))
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        return "round-0000/rollouts"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["truncated", "foreign", "deleted", "rows_edited", "digest_emptied",
                                  "extra_part", "byteflip"])
def test_damage_is_found_marked_and_never_current(run, case):
    cfg, store = run
    name = _damage(store, case)
    fast, deep = verify_dataset(store, name), verify_dataset(store, name, deep=True)
    assert deep, f"{case}: not found even by hashing"
    if case == "byteflip":
        assert fast == [] and "sha256" in str(deep[0])
    else:
        assert fast, f"{case}: not found by the size check"
        m = store.manifest(name)
        assert not store.is_current(name, m.config_fingerprint, m.inputs)  # `run` recomputes it
    stage, k = layout.STAGES[store.manifest(name).stage].name, layout.parse_round(name.split("/")[0])
    state = stage_state(cfg, store, stage, k) if case != "byteflip" else None
    if state is not None:
        assert state.state == "damaged"
        assert f"trace-rl stage {stage} CONFIG --round {k} --force" in state.reason
    # Undamaged neighbours stay undamaged.
    for other in ("round-0000/rollouts", "round-0001/rollouts", "round-0000/verdicts", "round-0001/verdicts"):
        if other != name:
            assert verify_dataset(store, other, deep=True) == [], other


def test_damaged_checkpoint_is_refused_before_training(run, tmp_path):
    cfg, store = run
    ckpt = store.local_path(layout.start_checkpoint_dir(1))
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"\0" * 64)
    with store.writer(layout.dataset_name("train", 0), TRAIN_METRICS, stage="train",
                      config_fingerprint="cfg") as w:
        w.write_table(rows_to_table([], TRAIN_METRICS), part="metrics.parquet")
        w.extra = {"checkpoint_files": checkpoint_record(store, layout.start_checkpoint_dir(1))}
    assert start_checkpoint(cfg, store, 1)[0] == str(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(StageError, match=r"damaged \(checkpoints/round-0001/model.safetensors: "
                                         r"missing\).*--round 0 --force"):
        start_checkpoint(cfg, store, 1)
    assert stage_state(cfg, store, "train", 0).state == "damaged"


def test_foreign_schema_file_is_named_as_such(run):
    _, store = run
    with pytest.raises(SchemaError, match="holds rollouts rows where verdicts rows belong"):
        read_parquet(store.path("round-0000/rollouts", "part-00000.parquet"), VERDICTS)


def test_control_characters_in_ids_are_refused(run):
    _, store = run
    for bad in ("p\x00", "p\n1", "p\x1b[31m"):
        with pytest.raises(SchemaError, match="control character"), \
                store.writer("round-0002/rollouts", ROLLOUTS, stage="rollout", config_fingerprint="c") as w:
            w.write_rows(_fill([_rollout(0, prompt_id=bad)], ROLLOUTS))
    with store.writer("round-0002/rollouts", ROLLOUTS, stage="rollout", config_fingerprint="c") as w:
        w.write_rows(_fill([_rollout(0, prompt_id="problème-7 (a/b)")], ROLLOUTS))


@pytest.mark.slow
def test_damaged_checkpoints_in_a_real_run(tmp_path, tiny_testbed_dir, reference_run):  # noqa: F811
    """A deleted final model: status says damaged with the remedy, `run` recomputes round 1's
    train stage and the weights equal the uninterrupted run's. Deleted intermediate weights:
    `stage train --round 1 --force` (which would replay against them) refuses."""
    import torch
    from safetensors.torch import load_file

    root = copy_run(reference_run, tmp_path / "run")
    home = tmp_path / "prefect"
    final = root / "checkpoints" / "round-0002" / "model.safetensors"
    final.unlink()
    proc = cli(root, tiny_testbed_dir, home, command="status")
    out = finish(proc, 120)
    assert proc.returncode == 0, out[-3000:]
    assert "damaged" in out and "round-0002/model.safetensors: missing" in out
    assert "trace-rl stage train CONFIG --round 1 --force" in " ".join(out.split())
    proc = cli(root, tiny_testbed_dir, home)
    out = finish(proc, 600)
    assert proc.returncode == 0, out[-3000:]
    assert "round-0001/train is damaged" in out and "recomputing" in out
    ref = load_file(str(reference_run / "checkpoints" / "round-0002" / "model.safetensors"))
    got = load_file(str(final))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)

    (root / "checkpoints" / "round-0001" / "model.safetensors").unlink()
    proc = cli(root, tiny_testbed_dir, home, "--round", "1", "--force", command="stage train")
    out = finish(proc, 300)
    assert proc.returncode == 2, out[-3000:]
    assert "start checkpoint is damaged" in out and "--round 0 --force" in " ".join(out.split())


def test_run_verify_marks_a_same_size_corruption_for_recomputing(run):
    """`trace-rl run --verify`: the byte flip the size check misses is found by hashing, and the
    dataset is marked incomplete, so the run recomputes it; the others are left as they were."""
    from trace_rl.stages.damage import invalidate_damaged

    _, store = run
    name = _damage(store, "byteflip")
    assert invalidate_damaged(store, deep=False) == []
    found = invalidate_damaged(store)
    assert len(found) == 1 and found[0].startswith(f"{name}: part-00000.parquet: content differs")
    assert store.manifest(name) is None
    assert all(store.manifest(n) is not None for n in
               ("round-0001/rollouts", "round-0000/verdicts", "round-0001/verdicts"))
