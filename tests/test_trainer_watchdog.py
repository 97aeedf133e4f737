"""A trainer process answers only a flow that still runs (trainer/watchdog.py).

The watchdog thread polls every WATCH seconds, so a round that ends within that time of its
flow's death would still write its answer (CI: the orphan of a SIGKILLed flow answered after
1.8 s); the check right before an answer is written closes that window."""

import subprocess
import sys
import textwrap

from trace_rl.trainer.watchdog import ORPHANED

ANSWER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from trace_rl.trainer.watchdog import end_if_orphaned
    end_if_orphaned(int(sys.argv[1]), None, os.getppid(), "0001-round-1")
    Path(sys.argv[2]).write_text("answered")
""")


def _answer(flow_pid: int, out) -> int:
    return subprocess.run([sys.executable, "-c", ANSWER, str(flow_pid), str(out)], check=False,
                          capture_output=True, text=True, timeout=60).returncode


def test_a_dead_flow_gets_no_answer_and_a_live_one_does(tmp_path):
    flow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _answer(flow.pid, tmp_path / "live") == 0
        assert (tmp_path / "live").read_text() == "answered"
    finally:
        flow.kill()
    # killed but not yet reaped (a zombie): gone all the same
    assert _answer(flow.pid, tmp_path / "zombie") == ORPHANED
    flow.wait()
    assert _answer(flow.pid, tmp_path / "dead") == ORPHANED
    assert not (tmp_path / "zombie").exists() and not (tmp_path / "dead").exists()
