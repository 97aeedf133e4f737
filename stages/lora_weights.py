"""What a rollout engine reads for a LoRA checkpoint (`train.lora`): the merged model.

A LoRA round checkpoint holds only the adapter (peft's format) and the tokenizer. The engines
(hf, vLLM) load Hugging Face model folders, so `engine_weights` hands them a merged copy
(W0 + scale * B @ A, written by peft's `merge_and_unload` in the base's dtype), built once per
adapter and cached under the run's `scratch/lora-merged/<adapter hash>`; only the newest merged
model is kept, so the cache costs one model's size, not one per round. A resident engine then
loads it in place like any other checkpoint. Full-weight folders pass through unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("trace_rl.stages.lora_weights")

MERGED_DIR = "lora-merged"
TMP_TAG = ".tmp-"
STALE_TMP_S = 3600.0  # a merge writes a model's size once (16 GB for 8B): minutes, not an hour


def _cache_root(model_dir: Path) -> Path:
    """`RUN/scratch/lora-merged` for a run's checkpoint (RUN/checkpoints/round-k), else a
    folder in the system's temporary directory."""
    if model_dir.parent.name == "checkpoints":
        return model_dir.parent.parent / "scratch" / MERGED_DIR
    return Path(tempfile.gettempdir()) / f"trace-rl-{MERGED_DIR}"


def _adapter_key(model_dir: Path) -> str:
    from trace_rl.trainer import lora

    h = hashlib.sha256()
    for name in (lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS):
        with open(model_dir / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _base_dtype(base: str):
    import torch

    config = Path(base) / "config.json"
    if not config.exists():
        return None
    data = json.loads(config.read_text())
    name = data.get("dtype") or data.get("torch_dtype")
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else None


def _sweep(root: Path, keep: Path) -> None:
    """One merged model at a time: drop the older ones, and temporaries left by a killed merge
    (not a merge in progress elsewhere: its temporary is younger than STALE_TMP_S)."""
    for old in root.iterdir():
        if old == keep:
            continue
        try:
            if TMP_TAG in old.name and time.time() - old.stat().st_mtime < STALE_TMP_S:
                continue
        except FileNotFoundError:  # its own process has just renamed or removed it
            continue
        shutil.rmtree(old, ignore_errors=True)


def engine_weights(model_dir: str) -> str:
    """`model_dir` itself, or for a LoRA checkpoint the folder of its merged model."""
    from trace_rl.trainer import lora

    src = Path(model_dir)
    if not lora.is_adapter_dir(src):
        return model_dir
    root = _cache_root(src.resolve())
    out = root / _adapter_key(src)
    if (out / "config.json").exists():
        return str(out)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + TMP_TAG, dir=root))
    lora.merge(src, tmp, dtype=_base_dtype(lora.base_of(src)))
    try:
        os.replace(tmp, out)
    except OSError:  # another process (an evaluation beside the run) merged the same adapter
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():
            raise
    _sweep(root, keep=out)
    log.info("LoRA checkpoint %s merged into %s for the rollout engine", model_dir, out)
    return str(out)


def export_merged(cfg, checkpoint: int, out_dir: str) -> Path:
    """`trace-rl export RUN --checkpoint K --merge DIR`: policy K (the start checkpoint of round
    K, checked byte by byte against its train manifest) as a standalone Hugging Face
    model folder: a LoRA checkpoint merged into its base, full weights copied without their
    trainer state."""
    from trace_rl.data_schemas.errors import StageError
    from trace_rl.pipeline.integrity import verify_dataset
    from trace_rl.pipeline.layout import dataset_name
    from trace_rl.stages.common import open_store, start_checkpoint
    from trace_rl.trainer import lora

    from .prune import require_weights

    if checkpoint < 1:
        raise StageError("--checkpoint K names policy K >= 1 (round K-1's train stage wrote it); "
                         "policy 0 is model.path itself")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise StageError(f"{out} exists and is not empty; name a new folder for the merged model")
    store = open_store(cfg)
    src, _ = start_checkpoint(cfg, store, checkpoint)  # refuses a missing or resized checkpoint
    # what is exported gets published: every byte is checked against the train stage's record
    # (start_checkpoint compares sizes only; a flipped byte in the adapter kept its size)
    damage = verify_dataset(store, dataset_name("train", checkpoint - 1), deep=True)
    if damage:
        raise StageError(f"checkpoint {checkpoint} is damaged ({'; '.join(map(str, damage))}); "
                         f"recreate it with `trace-rl stage train CONFIG --round {checkpoint - 1} "
                         "--force` before exporting it")
    require_weights(src)  # and a pruned one, with the way out (was: FileNotFoundError from copytree)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    if lora.is_adapter_dir(src):
        lora.merge(src, tmp, dtype=_base_dtype(lora.base_of(src)))
    else:
        shutil.rmtree(tmp)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("trainer_state"))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out
