"""Build (or reuse) the testbed checkpoint: tokenizer + tiny Qwen3 warm-started by SFT.

The build is deterministic (seeded, deterministic torch kernels on CPU, always BUILD_THREADS torch
threads) and cached: a complete build is a directory holding `testbed_manifest.json`, and a build
with the same fingerprint is returned at once. The fingerprint covers the config and the build
environment (library versions, CPU kernel set, thread count: `build_environment`), so equal
fingerprints give byte-identical weights, tokenizer and manifest (bar its timing fields) on any
machine, and a changed environment builds afresh instead of reusing weights it would not produce.
Everything is written to a temporary sibling directory, the manifest last, then renamed into
place, so a crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from trace_rl.testbed.accuracy import accuracy_of
from trace_rl.testbed.config import BUILD_THREADS, TestbedConfig, build_environment
from trace_rl.testbed.model import build_model
from trace_rl.testbed.sft import run_sft
from trace_rl.testbed.task import make_prompts
from trace_rl.testbed.tokenizer import build_tokenizer

MANIFEST = "testbed_manifest.json"


def read_manifest(out_dir: str) -> dict | None:
    """The manifest of a complete build in out_dir, or None."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def is_complete(cfg: TestbedConfig, out_dir: str) -> bool:
    """True when out_dir holds a finished build of exactly this config."""
    manifest = read_manifest(out_dir)
    return manifest is not None and manifest.get("fingerprint") == cfg.fingerprint()


def _log(progress: bool):
    def log(msg: str) -> None:
        if progress:
            print(f"[testbed] {msg}", file=sys.stderr, flush=True)

    return log


def _train_and_save(cfg: TestbedConfig, tmp_dir: str, log) -> dict:
    """Everything but the manifest; returns the manifest's measured fields."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    tokenizer = build_tokenizer(cfg)
    tokenizer.save_pretrained(tmp_dir)
    timings["tokenizer_s"] = time.perf_counter() - t
    model = build_model(cfg, tokenizer)
    log(f"tokenizer {len(tokenizer)} tokens; model {model.num_parameters():,} parameters")

    t = time.perf_counter()
    losses = run_sft(model, tokenizer, cfg, log=log)
    timings["sft_s"] = time.perf_counter() - t
    model.save_pretrained(tmp_dir)

    t = time.perf_counter()
    accuracy: dict[str, float | None] = {"student": None, "privileged": None}
    if cfg.eval_size:
        heldout = make_prompts(cfg, cfg.eval_size, cfg.seed, "heldout")
        for name, privileged in (("student", False), ("privileged", True)):
            accuracy[name] = accuracy_of(
                model,
                tokenizer,
                heldout,
                privileged=privileged,
                temperature=1.0,
                max_new_tokens=cfg.eval_max_new_tokens,
                batch_size=cfg.eval_batch_size,
                seed=cfg.seed,
                enable_thinking=cfg.enable_thinking,
                template=cfg.teacher_template,
            )
        log(f"held-out accuracy at T=1 on {cfg.eval_size}: {accuracy}")
    timings["eval_s"] = time.perf_counter() - t
    return {
        "accuracy": accuracy,
        "eval": {"split": "heldout", "n": cfg.eval_size, "seed": cfg.seed, "temperature": 1.0},
        "sft_loss_first": losses[0],
        "sft_loss_last": sum(losses[-10:]) / len(losses[-10:]),
        "num_parameters": model.num_parameters(),
        "vocab_size": len(tokenizer),
        "timings": timings,
    }


def build_testbed(
    cfg: TestbedConfig, out_dir: str, *, force: bool = False, progress: bool = True
) -> str:
    """Build the testbed into out_dir (HF save_pretrained layout) unless already built; the path.

    A directory that exists but holds no testbed manifest is refused rather than overwritten.
    """
    log = _log(progress)
    out = Path(out_dir)
    if not force and is_complete(cfg, out_dir):
        log(f"reusing {out_dir} (fingerprint {cfg.fingerprint()})")
        return str(out)
    if out.exists() and any(out.iterdir()) and read_manifest(out_dir) is None:
        raise FileExistsError(
            f"{out_dir} exists and is not a testbed build (no {MANIFEST}); "
            "choose an empty or new directory"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp_dir = tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    try:
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(BUILD_THREADS)
        measured = _train_and_save(cfg, tmp_dir, log)
        manifest = {
            "fingerprint": cfg.fingerprint(),
            "config_fingerprint": cfg.config_fingerprint(),
            "environment": build_environment(),
            "config": cfg.model_dump(mode="json"),
            **measured,
            "wall_s": time.perf_counter() - t0,
            "created_unix": time.time(),
        }
        (Path(tmp_dir) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _replace_dir(tmp_dir, out)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log(f"built {out_dir} in {time.perf_counter() - t0:.1f}s: fingerprint {cfg.fingerprint()} "
        f"(config {cfg.config_fingerprint()}, environment {build_environment()})")
    return str(out)


def _replace_dir(tmp_dir: str, out: Path) -> None:
    """Move the finished build into place, retiring an old build (different config) first."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "build")
        shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp_dir, out)
