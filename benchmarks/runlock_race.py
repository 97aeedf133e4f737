"""Pairs of processes racing for one run's lock (issue 26): how many pairs end with two holders.

    python benchmarks/runlock_race.py [--pairs 200]

Each trial forks two processes that wait on one pipe and, woken together, call
`trace_rl.pipeline.runlock.acquire` on a fresh run directory and keep whatever they got until
both have answered (nobody releases and nobody exits, so a late racer can neither take a lock
released meanwhile nor take over a lock whose holder has legitimately died). Mode
`free`: no lock exists. Mode `stale`: the run holds the lock of a process that has exited, so
both racers judge it stale and try to take it over. Prints, per mode, the pairs with exactly
one holder, with two, and with none (the lock must never be lost either). Run it against an
older tree with PYTHONPATH pointing at a `trace_rl` package made of that tree's folders.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from trace_rl.pipeline import runlock

HELD, REFUSED, FAILED = 1, 2, 3


def _racer(run: Path, go: int, report: int, release: int) -> None:
    """In a forked child: acquire once the parent closes the `go` pipe (both racers wake at that
    instant, without spinning on busy cores), report HELD or REFUSED on the `report` pipe, then
    stay alive (keeping what it got) until the parent closes the `release` pipe."""
    os.environ.pop(runlock.ENV, None)
    code = FAILED
    try:
        os.read(go, 1)
        runlock.acquire(run, "race")
        code = HELD
    except runlock.RunLocked:
        code = REFUSED
    except BaseException as err:  # noqa: BLE001  (reported as FAILED)
        print(f"racer {os.getpid()}: {type(err).__name__}: {err}", file=sys.stderr)
    os.write(report, bytes([code]))
    os.read(release, 1)  # EOF once the parent has both answers: a holder is alive until then
    os._exit(0)


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _stale_lock(run: Path) -> None:
    """The lock of an exited process, in the fields every version reads."""
    run.mkdir(parents=True)
    (run / runlock.LOCK_FILE).write_text(json.dumps({
        "pid": _dead_pid(), "host": socket.gethostname(), "started_at": time.time() - 5,
        "command": "trace-rl run (killed)", "token": f"stale-{time.time_ns()}"}))


def trial(run: Path, stale: bool) -> list[int]:
    """One race; returns the two racers' answers."""
    if stale:
        _stale_lock(run)
    go_r, go_w = os.pipe()
    report_r, report_w = os.pipe()
    release_r, release_w = os.pipe()
    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            os.close(release_w)
            _racer(run, go_r, report_w, release_r)
        pids.append(pid)
    for fd in (go_r, report_w, release_r):
        os.close(fd)
    time.sleep(0.002)  # both racers reach their read of `go`
    os.close(go_w)  # ... and wake together
    codes = [os.read(report_r, 1) for _ in pids]
    os.close(release_w)
    os.close(report_r)
    for p in pids:
        os.waitpid(p, 0)
    return [c[0] if c else FAILED for c in codes]


def race(pairs: int, stale: bool, root: Path) -> dict[str, int]:
    counts = {"one holder": 0, "two holders": 0, "no holder": 0, "failed": 0}
    for i in range(pairs):
        codes = trial(root / f"{'stale' if stale else 'free'}-{i}", stale)
        if FAILED in codes or any(c not in (HELD, REFUSED) for c in codes):
            counts["failed"] += 1
        else:
            counts[{1: "one holder", 2: "two holders", 0: "no holder"}[codes.count(HELD)]] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=200)
    args = ap.parse_args()
    logging.getLogger("trace_rl.runlock").setLevel(logging.ERROR)  # the takeover warnings
    print(f"runlock: {runlock.__file__}  load average: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        for stale in (False, True):
            t = time.monotonic()
            counts = race(args.pairs, stale, Path(tmp))
            print(f"{'stale' if stale else 'free'}: {args.pairs} pairs -> {counts} "
                  f"({time.monotonic() - t:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
