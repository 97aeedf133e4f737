"""benchmarks/gpu_check.sh rehearsed on CPU (`--device cpu --tiny`): the script the GPU machine
runs, with the packages that machine lacks refused, prints its one JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "build" / "gpu_wheels"


def test_gpu_check_rehearsal_on_cpu_prints_one_json_report():
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    step, gen, agree = report["train_step"], report["generation"], report["bf16_vs_fp32"]
    assert step["tokens_per_s"] > 0 and step["params"] > 0
    assert gen["tokens_per_s"] > 0 and gen["new_tokens"] == 8
    # one bf16-autocast step moves (almost) every float32 master weight, in the fp32 direction
    assert agree["moved_frac"]["bfloat16"] > 0.99
    assert 0.9 < agree["update_cosine"] <= 1.0 + 1e-9 and agree["update_rel_err"] < 0.5
    if WHEELS.is_dir():  # made by `gpu_check.sh prepare`: pydantic must come from them
        assert any(w.startswith("pydantic-") for w in report["wheels"])
        assert report["pydantic_from_wheels"]
    else:
        pytest.skip("no build/gpu_wheels (benchmarks/gpu_check.sh prepare): wheels not checked")
