"""Progress as log lines at a steady cadence: every N units or every S seconds, always the last,
each with the rate and an ETA (pipeline/progress_lines.py)."""

from __future__ import annotations

import logging
import re

from trace_rl.pipeline.progress_lines import PROGRESS_LOGGER, ProgressLines


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER]


def test_every_n_units_and_always_the_last(caplog):
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        lines = ProgressLines("hf sampling", 10, "sequences", every_s=1e9, every_n=4)
        for done in range(1, 11):
            lines.update(done, tokens=100 * done)
    got = _lines(caplog)
    assert [int(re.match(r"hf sampling: (\d+)/10 sequences", g).group(1)) for g in got] == [4, 8, 10]
    assert all("tok/s" in g for g in got)
    assert "ETA" in got[0] and got[-1].endswith(tuple(f"done in {n} s" for n in range(60)))


def test_seconds_cadence_says_nothing_in_between(caplog):
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        lines = ProgressLines("train r0", 50, "steps", every_s=1e9)
        for done in range(1, 50):
            lines.update(done, "loss 0.1")
        assert _lines(caplog) == []
        lines = ProgressLines("train r0", 50, "steps", every_s=0.0)
        lines.update(1, "loss 0.1")
    assert _lines(caplog)[0].startswith("train r0: 1/50 steps · loss 0.1 · ETA ")


def test_train_progress_lines_carry_step_loss_reward_lambda_kl_and_rate(caplog, monkeypatch):
    """The trainer's reporter off a terminal: no bar, lines with the step's figures (KL of the
    direction the method reports), the last one always."""
    from trace_rl.trainer.progress import progress_bar

    monkeypatch.setenv("TRACE_PROGRESS_EVERY_S", "1e9")
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        bar = progress_bar(2, 0, enabled=True, round_index=3)
        for step in (12, 13):
            bar.update({"step": step, "loss": 0.5, "kl_weight": 0.25, "kl/reverse": 0.0123,
                        "response_len_mean": 40.0, "tokens": 640, "reward": 0.375})
        bar.close()
    (line,) = _lines(caplog)  # the cadence holds back step 12; the last is always said
    assert re.fullmatch(r"train r3: 2/2 steps · step 13 · loss 0\.5000 · reward 0\.375 · λ 0\.250 · "
                        r"KL 0\.0123 · \d+ tok/s · done in \d+ s", line), line


# A trainer process's side, as trace_rl.trainer.launch and the worker group set it up: its
# progress lines go to stderr (lines_to_stderr), then it answers with the launch's nonce.
LAUNCHED = r"""
import json, sys
from pathlib import Path
from trace_rl.pipeline.progress_lines import ProgressLines, lines_to_stderr
lines_to_stderr()
print("a line that is not progress", file=sys.stderr)
lines = ProgressLines("train r3", 2, "steps", every_s=0.0)
for done in (1, 2):
    lines.update(done, f"step {done} · loss 0.5000")
args = json.loads(Path(sys.argv[sys.argv.index("--args-json") + 1]).read_text())
Path(args["work_dir"], "answer.json").write_text(json.dumps(
    {"nonce": args["nonce"], "rows": [], "replay_max_abs_delta": None}))
"""


def test_a_launched_trainers_progress_lines_reach_the_stage_log(tmp_path, monkeypatch, caplog):
    """The multi-process train path (stages/train.py's own launch): rank 0's lines, printed to
    the launch's stderr, are logged again in the stage's thread, where a flow forwards them."""
    import sys

    from trace_rl.stages import train
    from trace_rl.stages.config import load_config

    (tmp_path / "launched.py").write_text(LAUNCHED)
    monkeypatch.setattr(train, "launch_prefix", lambda _t: [sys.executable, str(tmp_path / "launched.py")])
    work = tmp_path / "work"
    work.mkdir()
    args = {"round_index": 3, "replay": [], "work_dir": str(work)}
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        train._launch_accelerate(load_config("demo", ["train.num_processes=2"]), args, work)
    got = _lines(caplog)
    assert [g.split(" · ")[:2] for g in got] == [["train r3: 1/2 steps", "step 1"],
                                                 ["train r3: 2/2 steps", "step 2"]], got


# A worker group's side of one request: progress lines while the round runs, then the answer.
GROUP = r"""
import json, os, sys, time
from pathlib import Path
from trace_rl.pipeline.progress_lines import ProgressLines, lines_to_stderr
lines_to_stderr()
d = Path(sys.argv[sys.argv.index("--dir") + 1])
nonce = sys.argv[sys.argv.index("--nonce") + 1]
while not (reqs := sorted(d.glob(f"0001-{nonce}-round-*.json"))):
    time.sleep(0.02)
lines = ProgressLines("train r0", 3, "steps", every_s=0.0)
for done in (1, 2, 3):
    lines.update(done, f"step {done}")
(d / (reqs[0].stem + ".done.json")).write_text(json.dumps({"nonce": nonce, "rows": []}))
"""


def test_a_worker_groups_progress_lines_reach_the_waiting_task(tmp_path, monkeypatch, caplog):
    """The flow's TrainerGroup reads the group's stderr; the lines are logged by the thread that
    waits for the round (the task's: a Prefect run context is per thread)."""
    import sys
    import threading

    import trace_rl.trainer.group_handle as handle
    from trace_rl.stages.config import load_config

    (tmp_path / "group.py").write_text(GROUP)
    monkeypatch.setattr(handle, "launch_prefix", lambda _t: [sys.executable])
    group = handle.TrainerGroup(load_config("demo", ["train.num_processes=2"]).train, tmp_path / "cmd",
                                program=[str(tmp_path / "group.py")])
    threads: set[str] = set()
    handler = logging.Handler()
    handler.emit = lambda record: threads.add(record.threadName)  # type: ignore[method-assign]
    logging.getLogger(PROGRESS_LOGGER).addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
            group.request("round-0", {"args": {}})
            group.proc.wait(10)
            group.forward.thread.join(5)
            group._drain()
    finally:
        logging.getLogger(PROGRESS_LOGGER).removeHandler(handler)
        if group.proc.poll() is None:
            group.proc.kill()
    got = _lines(caplog)
    assert [g.split(" · ")[:2] for g in got] == [[f"train r0: {n}/3 steps", f"step {n}"] for n in (1, 2, 3)]
    assert threads == {threading.current_thread().name}


def test_vllm_worker_bar_prints_a_line_per_finished_request_at_most_each_second(capsys, monkeypatch):
    """vllm_worker.progress_bar used as vLLM's _run_engine uses `use_tqdm`: total = requests,
    update(n) per finished request with its n samples, the output speed in the postfix."""
    import json

    from trace_rl.stages.engines import vllm_worker

    clock = iter([0.0, 0.2, 0.4, 1.5, 1.6, 1.7, 1.8])
    monkeypatch.setattr(vllm_worker.time, "monotonic", lambda: next(clock))
    request = {"prompts": [{}] * 5, "sampling": {"n": 4}, "progress_id": "1-0"}
    bar = vllm_worker.progress_bar(request)(total=5, desc="Processed prompts", postfix="output: 0.00 toks/s")
    for _ in range(5):
        bar.postfix = "est. speed input: 9.00 toks/s, output: 100.00 toks/s"
        bar.update(4)
    bar.close()
    out = capsys.readouterr()
    said = [json.loads(line.removeprefix(vllm_worker.PROGRESS_TAG)) for line in out.out.splitlines()]
    # the start (t=0), nothing within its second (0.2, 0.4), the request done at 1.5 s, nothing
    # within that one's second (1.7), the last always
    assert [s["sequences"] for s in said] == [0, 12, 20] and {s["id"] for s in said} == {"1-0"}
    assert said[-1]["tokens"] >= 0 and out.err == ""  # no bar drawn


def test_vllm_progress_sums_requests_and_says_the_last_line_once(caplog, monkeypatch):
    """The parent side: workers' lines handed in by reader threads, logged by the waiting one."""
    from trace_rl.stages.engines.vllm_engine import PROGRESS_TAG, VllmProgress

    monkeypatch.setenv("TRACE_PROGRESS_EVERY_S", "0")
    lines = VllmProgress(total=12, enabled=True)
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        assert not lines.seen("INFO vllm loading weights\n")
        lines.tick()  # the engine still starts: nothing to say
        assert _lines(caplog) == []
        assert lines.seen(PROGRESS_TAG + '{"id": "0", "sequences": 4, "tokens": 80}\n')
        assert lines.seen(PROGRESS_TAG + '{"id": "1", "sequences": 2, "tokens": 30}\n')
        lines.tick()
        lines.seen(PROGRESS_TAG + '{"id": "0", "sequences": 6, "tokens": 120}\n')
        lines.seen(PROGRESS_TAG + '{"id": "1", "sequences": 6, "tokens": 90}\n')
        lines.finish()
        lines.tick()
    got = _lines(caplog)
    assert [g.split(" · ")[0] for g in got] == ["vllm sampling: 6/12 sequences", "vllm sampling: 12/12 sequences"]
    assert "ETA" in got[0] and "done in" in got[1] and all("tok/s" in g for g in got)
