"""Testbed builds are reproducible: the same fingerprint gives the same bytes in fresh environments,
and the fingerprint changes with what else the bytes depend on (docs/testbed_results.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from trace_rl.testbed.build import MANIFEST, build_testbed, read_manifest
from trace_rl.testbed.config import BUILD_LIBRARIES, TestbedConfig, build_environment

# The default model size (hidden 128), where a CPU matmul splits across threads and so a build on
# 2 threads would train other weights than one on 1 thread; few steps and problems keep it fast.
SMALL = {"sft_steps": 30, "sft_num_problems": 400, "tokenizer_corpus_size": 200,
         "eval_size": 4, "eval_max_new_tokens": 48, "seed": 3}
# Manifest fields that measure the build rather than describe it.
TIMING_FIELDS = {"wall_s", "timings", "created_unix"}

_BUILD = """
import sys, torch
torch.set_num_threads(int(sys.argv[2]))
from trace_rl.testbed.build import build_testbed
from trace_rl.testbed.config import TestbedConfig
build_testbed(TestbedConfig.model_validate_json(sys.argv[3]), sys.argv[1], progress=False)
"""


def _fresh_build(root: Path, threads: int) -> Path:
    """Build SMALL in a subprocess with its own cwd, HOME, caches and temp dir and `threads`
    torch (and OpenMP) threads; the build directory."""
    for sub in ("home", "cache", "tmp", "cwd"):
        (root / sub).mkdir(parents=True)
    env = {**os.environ, "HOME": str(root / "home"), "XDG_CACHE_HOME": str(root / "cache"),
           "HF_HOME": str(root / "cache" / "hf"), "TRACE_RL_CACHE": str(root / "cache" / "trace"),
           "TMPDIR": str(root / "tmp"), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "PYTHONHASHSEED": str(threads)}
    out = root / "build"
    cfg_json = TestbedConfig(**SMALL).model_dump_json()
    subprocess.run([sys.executable, "-c", _BUILD, str(out), str(threads), cfg_json],
                   cwd=root / "cwd", env=env, check=True, timeout=300)
    return out


def test_two_fresh_builds_are_byte_identical(tmp_path):
    a = _fresh_build(tmp_path / "a", threads=1)
    b = _fresh_build(tmp_path / "b", threads=2)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert Path("model.safetensors") in files_a and Path("tokenizer.json") in files_a
    for rel in files_a:
        if rel.name != MANIFEST:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs"
    ma, mb = read_manifest(str(a)), read_manifest(str(b))
    assert {k: v for k, v in ma.items() if k not in TIMING_FIELDS} == {
        k: v for k, v in mb.items() if k not in TIMING_FIELDS}
    cfg = TestbedConfig(**SMALL)
    assert ma["fingerprint"] == cfg.fingerprint()
    assert ma["config_fingerprint"] == cfg.config_fingerprint()
    assert ma["environment"] == build_environment()
    # the build measured its own accuracy, so the eval (sampling) is covered by the equality too
    assert ma["accuracy"]["student"] is not None


def test_fingerprint_covers_the_build_environment():
    cfg = TestbedConfig(**SMALL)
    env = build_environment()
    assert set(BUILD_LIBRARIES) <= set(env) and {"cpu_capability", "build_threads"} <= set(env)
    assert cfg.fingerprint() == cfg.fingerprint(dict(env)) == TestbedConfig(**SMALL).fingerprint()
    changed = {cfg.fingerprint({**env, key: env[key] + "x"}) for key in env}
    assert len(changed) == len(env) and cfg.fingerprint() not in changed
    # the config part alone does not see the environment; other configs differ either way
    other = TestbedConfig(**{**SMALL, "seed": 4})
    assert other.fingerprint() != cfg.fingerprint()
    assert other.config_fingerprint() != cfg.config_fingerprint()


def test_a_build_from_another_environment_is_rebuilt_not_reused(tmp_path):
    cfg = TestbedConfig(**{**SMALL, "hidden_size": 32, "num_heads": 2, "num_kv_heads": 1,
                           "intermediate_size": 64, "sft_steps": 2, "eval_size": 0})
    out = str(tmp_path / "tb")
    build_testbed(cfg, out, progress=False)
    path = Path(out) / MANIFEST
    manifest = json.loads(path.read_text())
    # as if built under another transformers: same config, other environment
    other_env = {**manifest["environment"], "transformers": "0.0.1"}
    manifest.update(fingerprint=cfg.fingerprint(other_env), environment=other_env)
    path.write_text(json.dumps(manifest))
    build_testbed(cfg, out, progress=False)
    rebuilt = read_manifest(out)
    assert rebuilt["fingerprint"] == cfg.fingerprint()
    assert rebuilt["environment"] == build_environment()
    assert rebuilt["created_unix"] > manifest["created_unix"]
