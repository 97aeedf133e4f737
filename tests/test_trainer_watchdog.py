"""A trainer process answers only a flow that still runs (trainer/watchdog.py).

The watchdog thread polls every WATCH seconds, so a round that ends within that time of its
flow's death would still write its answer (CI: the orphan of a SIGKILLed flow answered after
1.8 s); the check right before an answer is written closes that window."""

import os
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


EXIT = textwrap.dedent("""
    import atexit, logging, sys
    from pathlib import Path
    from trace_rl.trainer.watchdog import run_then_exit
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    atexit.register(lambda: Path(sys.argv[2]).write_text("finalized"))
    def main():
        print("written, not flushed")
        logging.getLogger("t").info("logged")
        how = sys.argv[1]
        if how == "raise":
            raise ValueError("the round failed")
        if how != "return":
            sys.exit(int(how) if how.isdigit() else how)
    run_then_exit(main)
""")


def test_a_trainer_entry_point_ends_with_its_status_and_its_output_but_no_finalization(tmp_path):
    """run_then_exit skips the interpreter's teardown (where a process group still held by a
    model aborts the process after its work was written) and keeps the status and the output."""
    def run(how: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", EXIT, how, str(tmp_path / how)], check=False,
                              capture_output=True, text=True, timeout=60)

    for how, code in [("return", 0), ("3", 3), ("raise", 1), ("usage: bad arguments", 1)]:
        done = run(how)
        assert done.returncode == code, (how, done.stderr)
        assert done.stdout == "written, not flushed\nlogged\n", how  # flushed before the exit
        assert not (tmp_path / how).exists(), how  # atexit never ran: no finalization
    assert "ValueError: the round failed" in run("raise").stderr
    # started with stdout or stderr closed (sys.stdout / sys.stderr None): a finished round still
    # ends with 0 and without finalization
    for fd in (1, 2):
        done = subprocess.run([sys.executable, "-c", EXIT, "return", str(tmp_path / f"closed{fd}")],
                              check=False, capture_output=True, timeout=60,
                              preexec_fn=lambda fd=fd: os.close(fd))
        assert done.returncode == 0, (fd, done.stderr)
        assert not (tmp_path / f"closed{fd}").exists()
    assert "usage: bad arguments" in run("usage: bad arguments").stderr
    # the real entry points: argparse's own exit status comes through
    for module in ("trace_rl.trainer.launch", "trace_rl.trainer.worker_group"):
        done = subprocess.run([sys.executable, "-m", module, "--no-such-flag"], check=False,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "error:" in done.stderr, (module, done.stderr)


BLOCKED = textwrap.dedent("""
    import logging, sys, threading, time
    from trace_rl.trainer.watchdog import exit_process
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    def watchdog():
        time.sleep(1.0)
        exit_process(75, "the flow is gone", grace_s=1.0)
    threading.Thread(target=watchdog, daemon=True).start()
    while True:  # the flow's end of the pipe is not drained: this blocks holding the handler's lock
        logging.getLogger("t").info("x" * 1000)
""")


def test_a_process_blocked_writing_to_an_undrained_pipe_still_ends():
    """A watchdog ending its process must not wait on logging or stdio: a stderr pipe that is no
    longer drained blocks the main thread inside a handler, holding its lock."""
    import time

    proc = subprocess.Popen([sys.executable, "-c", BLOCKED], stderr=subprocess.PIPE)
    start = time.monotonic()
    try:
        assert proc.wait(20) == 75
    finally:
        proc.kill()
        proc.stderr.close()
    assert time.monotonic() - start < 10
