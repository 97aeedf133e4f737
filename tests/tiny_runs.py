"""A whole `trace-rl run` on the tiny testbed, as a user starts it, for the reliability tests
(signals, damage, run lock): the command line, an uninterrupted reference run built once per
session, and byte-level comparisons of two runs' committed files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from tiny import TINY_RUN

ROUNDS = 2
RUN_ARGS = [*TINY_RUN, f"run.rounds={ROUNDS}", "eval.benchmarks=[]", "train.save_every=0"]


def cli(root: Path, testbed: str, home: Path, *args: str, command: str = "run") -> subprocess.Popen:
    """`trace-rl <command> demo ...` on `root` (`command` may carry the stage name: "stage train")
    in a session of its own (a terminal's process group); $PREFECT_HOME names the run's
    processes. Its output goes to a file (`proc.log`, also `output(proc)`), so a chatty run
    never blocks on a full pipe."""
    env = dict(os.environ, PREFECT_HOME=str(home), TRACE_ISOLATE_STAGES="never", OMP_NUM_THREADS="1")
    env.pop("TRACE_RL_RUN_LOCK", None)
    cmd = [sys.executable, "-m", "trace_rl.flows.cli", *command.split(), "demo", *RUN_ARGS,
           f"run.root={root}", f"model.testbed_dir={testbed}", *args]
    home.mkdir(parents=True, exist_ok=True)
    log = home / f"{command.replace(' ', '-')}-{time.time_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log.read_text(errors="replace")


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    """Wait for the command; its output."""
    proc.wait(timeout=timeout)
    return output(proc)


def processes_of(home: Path) -> list[int]:
    """Live processes whose environment names `home` as $PREFECT_HOME: the run's own process,
    its workers and Prefect's temporary server (in a session of its own)."""
    needle = f"PREFECT_HOME={home}".encode() + b"\0"
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes()
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in env + b"\0" and state != "Z":
            found.append(int(p.name))
    return found


def in_stage(root: Path, stage: str, k: int) -> bool:
    """True while `stage` of round k runs: its input is complete, its output is not."""
    rd = root / f"round-{k:04d}"
    upstream = {"rollout": root / "prompts", "verify": rd / "rollouts", "annotate": rd / "verdicts",
                "train": rd / "annotations"}[stage]
    own = {"rollout": rd / "rollouts", "verify": rd / "verdicts", "annotate": rd / "annotations",
           "train": rd / "train"}[stage]
    return (upstream / ".manifest.json").exists() and not (own / ".manifest.json").exists()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def committed(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every committed file: the parts of each complete dataset and
    the checkpoint files its train manifest recorded (what the manifests vouch for)."""
    out = {}
    for man in root.rglob(".manifest.json"):
        m = json.loads(man.read_text())
        for f in m["files"]:
            p = man.parent / f["name"]
            out[str(p.relative_to(root))] = sha256(p) if p.exists() else "missing"
        ckpt = (m.get("extra") or {}).get("checkpoint_files")
        for f in (ckpt or {}).get("files", []):
            p = root / ckpt["dir"] / f["name"]
            out[str(p.relative_to(root))] = sha256(p) if p.exists() else "missing"
    return out


# Columns that legitimately differ between two runs of the same data: throughput and memory.
TIMING_COLUMNS = ("tokens_per_s", "peak_mem_bytes")


def _content(path: Path, root: Path):
    """A Parquet file's rows with the run's own path written as <run> and timings dropped."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    table = table.drop_columns([c for c in TIMING_COLUMNS if c in table.column_names])
    cols = [pc.replace_substring(c, str(root), "<run>") if pa.types.is_string(c.type) else c
            for c in table.columns]
    return pa.table(cols, names=table.column_names).to_pylist()


def assert_same_bytes(got: Path, reference: Path, require_all: bool = False) -> None:
    """Every committed file of `got` equals the reference run's file of the same name: the same
    bytes, or for a Parquet part that names its run's own path (rollouts name their checkpoint)
    or holds timings, the same rows once those are normalised. `require_all`: and `got` has
    every file the reference has."""
    ref, mine = committed(reference), committed(got)
    if require_all:
        assert sorted(mine) == sorted(ref), set(mine) ^ set(ref)
    for name, digest in mine.items():
        assert name in ref, f"{name} is not in the uninterrupted run"
        if digest != ref[name]:
            assert name.endswith(".parquet"), f"{name} differs from the uninterrupted run"
            assert _content(got / name, got) == _content(reference / name, reference), \
                f"{name} differs from the uninterrupted run"


_REFERENCES: dict[str, Path] = {}


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_testbed_dir) -> Path:
    """The uninterrupted run every reliability test compares against: built once a session
    (each test module imports this fixture, so the cache lives here, not in pytest's)."""
    if tiny_testbed_dir not in _REFERENCES:
        root = tmp_path_factory.mktemp("reference") / "run"
        proc = cli(root, tiny_testbed_dir, root.parent / "prefect")
        out = finish(proc)
        assert proc.returncode == 0, out[-3000:]
        _REFERENCES[tiny_testbed_dir] = root
    return _REFERENCES[tiny_testbed_dir]


def copy_run(reference: Path, dest: Path) -> Path:
    """A copy of a finished run (its own resolved config points at the copy via run.root)."""
    shutil.copytree(reference, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest
