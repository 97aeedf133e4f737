"""Quiet by default: weight load/save bars only on a terminal, the missing 5-column mean said once
per run, and one loss per summary line, named for what it is."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

from conftest import ROOT

# A tiny model saved and loaded again, as a stage does, in a fresh process that imports trace-rl
# the way every command does (`trace_rl.flows`).
SAVE_AND_LOAD = """
import sys, trace_rl.flows
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2)
LlamaForCausalLM(cfg).save_pretrained(sys.argv[1])
LlamaForCausalLM.from_pretrained(sys.argv[1])
print("done", file=sys.stderr)
"""


def _run(tmp_path, stderr) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    proc = subprocess.run([sys.executable, "-c", SAVE_AND_LOAD, str(tmp_path / "m")], cwd=ROOT,
                          env=env, stdout=subprocess.DEVNULL, stderr=stderr, timeout=300, check=False)
    assert proc.returncode == 0


def test_weight_bars_only_on_a_terminal(tmp_path):
    log = tmp_path / "worker.log"
    with open(log, "wb") as fh:  # a worker's log file: no bars
        _run(tmp_path, fh)
    text = log.read_text(errors="replace")
    assert "done" in text
    assert "Loading weights" not in text and "Writing model shards" not in text, text
    parent, child = pty.openpty()  # a terminal (80 columns: tqdm draws nothing in 0): bars stay
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        _run(tmp_path, child)
        os.close(child)
        seen = b""
        while True:
            try:
                chunk = os.read(parent, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(parent)
    assert b"Loading weights" in seen and b"Writing model shards" in seen, seen[-2000:]


def test_missing_five_column_mean_is_said_once_per_run(capsys):
    from trace_rl.stages import eval_summary

    eval_summary._SAID.clear()
    entry = {"n_problems": 4, "k": 2, "avg@k": 0.5, "ci95": [0.25, 0.75], "mean_response_tokens": 9.0}
    five = eval_summary.five_column_mean({"testbed": entry}, {})
    assert five["reason"].startswith("not evaluated: math500")
    for checkpoint in ("initial", "round-0001", "round-0002"):
        eval_summary.print_summary({"checkpoint": checkpoint, "benchmarks": {"testbed": entry},
                                    "five_column_mean": five})
    err = capsys.readouterr().err
    assert err.count("not evaluated") == 1 and err.count("eval round-0002") == 1
    later = err[err.index("eval round-0001"):]
    assert "5-column" not in later  # its row of dashes goes with the reason: once, the first time
