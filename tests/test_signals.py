"""Ctrl-C and SIGTERM: `trace-rl run` interrupted inside rollout and train, rerun each time. Each
interrupted command exits promptly with 128 + the signal, leaves no process behind (its workers
and Prefect's temporary server included), leaves every committed file byte-identical to the
uninterrupted run's, and the finished run equals the uninterrupted one bitwise.

SIGINT goes to the whole process group, as a terminal's Ctrl-C does; SIGTERM to the main
process only, as `kill PID` or a scheduler does."""

from __future__ import annotations

import signal
import time

import pytest

from tiny_runs import (
    assert_same_bytes,
    cli,
    committed,
    finish,
    in_stage,
    output,
    processes_of,
    reference_run,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.slow

# (stage, round, signal): the stages that last long enough on the tiny run to land inside.
POINTS = [("rollout", 0, signal.SIGINT), ("train", 0, signal.SIGTERM), ("train", 1, signal.SIGINT)]


def _interrupt(proc, sig) -> float:
    """Send `sig` as a terminal (SIGINT: the process group) or `kill` (SIGTERM: the process)
    would; the seconds until the command exited."""
    sent = time.monotonic()
    if sig == signal.SIGINT:
        import os

        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    proc.wait(timeout=120)
    return time.monotonic() - sent


def test_sigint_and_sigterm_inside_stages_then_resume(tmp_path, tiny_testbed_dir, reference_run):  # noqa: F811
    root, home = tmp_path / "run", tmp_path / "prefect"
    landed = []
    for stage, k, sig in POINTS:
        proc = cli(root, tiny_testbed_dir, home)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not in_stage(root, stage, k):
            time.sleep(0.02)
        if proc.poll() is not None:
            continue  # the run finished this stage before we could look
        before = committed(root)
        seconds = _interrupt(proc, sig)
        err = output(proc)
        assert proc.returncode == 128 + sig, (stage, k, sig, proc.returncode, err[-3000:])
        assert "interrupted" in err and "Rerun" in err, err[-2000:]
        assert seconds < 30, f"{sig.name} in {stage} {k}: exited after {seconds:.1f}s"
        time.sleep(0.5)
        assert processes_of(home) == [], f"processes left behind after {sig.name}"
        after = committed(root)
        for name, digest in before.items():  # nothing committed before the signal changed
            assert after.get(name) == digest, f"{name} changed by {sig.name} in {stage} {k}"
        assert_same_bytes(root, reference_run)
        assert not (root / ".lock").exists(), "the run lock was not released"
        landed.append((stage, k, sig.name, round(seconds, 1)))
    assert len(landed) >= 2, f"only {landed} landed inside the run"
    print("interrupted:", landed)

    proc = cli(root, tiny_testbed_dir, home)
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert_same_bytes(root, reference_run, require_all=True)  # every dataset and checkpoint
