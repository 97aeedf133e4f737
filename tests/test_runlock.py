"""One run per directory: a second command on a run refuses at once and names the holder; a lock
left by a killed process, or a pid since reused, is stale and taken over; children of the holder
pass through; a command releases only its own lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from trace_rl.pipeline.runlock import ENV, LOCK_FILE, RunLocked, acquire, read_holder, release, run_lock

HOLD = ("import sys, time; from trace_rl.pipeline.runlock import acquire; "
        "acquire(sys.argv[1], 'trace-rl run demo'); print('held', flush=True); time.sleep(120)")


@pytest.fixture()
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE,
                            env=env, cwd=ROOT)
    assert proc.stdout.readline().strip() == b"held"
    yield proc
    proc.kill()
    proc.wait()


def test_second_process_refuses_naming_the_holder(tmp_path, holder, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(RunLocked) as err:
        acquire(tmp_path / "run")
    msg = str(err.value)
    assert f"pid {holder.pid} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d')}" in msg
    assert "trace-rl run demo" in msg and f"kill {holder.pid}" in msg


def test_cli_stage_refuses_at_once(tmp_path, holder):
    env = {k: v for k, v in os.environ.items() if k != ENV}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "trace_rl.flows.cli", "stage", "prepare", "demo",
                           f"run.root={tmp_path / 'run'}"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    seconds = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"in use by pid {holder.pid}" in " ".join(proc.stderr.split())
    assert not (tmp_path / "run" / "prompts").exists()  # refused before any work
    assert seconds < 30, seconds


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(ENV, raising=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                              "started_at": time.time() - 5, "command": "trace-rl run",
                                              "token": "old"}))
    with run_lock(run) as me:
        assert me.pid == os.getpid() and read_holder(run / LOCK_FILE).token == me.token
        assert os.environ[ENV] == me.token
    assert "stale lock" in caplog.text and f"pid {dead.pid}" in caplog.text
    assert not (run / LOCK_FILE).exists() and ENV not in os.environ


def test_reused_pid_and_half_written_locks_are_stale(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    run = tmp_path / "run"
    run.mkdir()
    # This process is alive but started long after the lock was taken: its pid was reused.
    (run / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                              "started_at": 1000.0, "command": "x", "token": "t"}))
    release(run, acquire(run))
    (run / LOCK_FILE).write_text('{"pid": 12')  # killed while writing it
    release(run, acquire(run))
    assert not (run / LOCK_FILE).exists()


def test_children_pass_through_and_only_the_owner_releases(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    run = tmp_path / "run"
    me = acquire(run)
    try:
        assert acquire(run) is None  # a stage child of the holder ($TRACE_RL_RUN_LOCK inherited)
        child = subprocess.run([sys.executable, "-c", "import sys; from trace_rl.pipeline.runlock import "
                                "acquire; print(acquire(sys.argv[1]))", str(run)],
                               capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert child.stdout.strip() == "None", child.stderr
        other = json.loads((run / LOCK_FILE).read_text())
        release(run, type(me)(**{**other, "token": "someone else"}))
        assert (run / LOCK_FILE).exists()
    finally:
        release(run, me)
    assert not (run / LOCK_FILE).exists()
