"""LoRA adapters on the policy (`train.lora`): build, save, load, teacher snapshots, merge.

The adapters are injected in place into the Hugging Face model (peft's `inject_adapter_in_model`),
so `LeanCausalLM`, accelerate's wrapping (DDP / FSDP) and every loss see the same module tree as
under full fine-tuning: only which parameters train differs. The frozen base is loaded in the
compute dtype (`train.dtype`: bf16 on GPU); the adapters are float32, so AdamW's master weights
and moments are float32 as on the full-weight path, and autocast runs the adapters' matmuls in
the compute dtype.

Two adapters live in the model: `default`, the trained one, and `teacher`, a frozen copy of it
taken at each teacher sync (TRACE's lagged teacher = the shared base + the adapter of step
sync * floor(s / sync)). A snapshot costs the adapter's size (megabytes), not a model copy.

A LoRA checkpoint is peft's own format (`adapter_config.json` + `adapter_model.safetensors`,
loadable by `PeftModel.from_pretrained(base, ckpt)`) beside the tokenizer; its
`base_model_name_or_path` names the base weights, which are never rewritten.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from trace_rl.trainer.config import LoraConfig

ADAPTER = "default"  # the trained adapter (peft's default name)
TEACHER = "teacher"  # the frozen lagged-teacher snapshot
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # how peft names a saved adapter's tensors


def peft_config(lc: LoraConfig, base_path: str) -> Any:
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                          target_modules=list(lc.target_modules), bias="none",
                          task_type="CAUSAL_LM", base_model_name_or_path=base_path)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).exists()


def base_of(path: str | Path) -> str:
    """The base model a checkpoint stands on: itself (full weights) or its adapter's base."""
    if not is_adapter_dir(path):
        return str(path)
    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path}/{ADAPTER_CONFIG} names no base_model_name_or_path: the "
                         "adapter cannot be applied; set it to the base model's directory")
    return str(base)


def is_lora(hf: torch.nn.Module) -> bool:
    return getattr(hf, "trace_lora", None) is not None


def attach(hf: torch.nn.Module, lc: LoraConfig, base_path: str) -> torch.nn.Module:
    """Inject the trained and the teacher adapter into `hf` (in place): the base frozen in its
    loaded dtype, the adapters float32 and trainable (the teacher's frozen). Under the caller's
    seed the trained adapter's init is deterministic (A: kaiming, B: 0, so W = W0 at start)."""
    from peft import inject_adapter_in_model

    missing = [m for m in lc.target_modules
               if not any(n.split(".")[-1] == m for n, _ in hf.named_modules())]
    if missing:
        raise ValueError(f"lora.target_modules {missing} name no module of this model "
                         f"({type(hf).__name__}); list its linear layers' names")
    # a local base is recorded by its absolute path (the checkpoint is read from other working
    # directories); a hub id stays as it is
    local = Path(base_path)
    config = peft_config(lc, str(local.resolve()) if local.exists() else base_path)
    hf.requires_grad_(False)
    inject_adapter_in_model(config, hf, adapter_name=ADAPTER)
    inject_adapter_in_model(config, hf, adapter_name=TEACHER)
    for name, p in hf.named_parameters():
        if ".lora_" in name:
            p.data = p.data.float()  # float32 master weights whatever the base's dtype
            p.requires_grad_(f".{ADAPTER}." in name)
    activate(hf, ADAPTER)
    object.__setattr__(hf, "trace_lora", config)  # not a submodule: a plain attribute
    return hf


def _layers(model: torch.nn.Module) -> Iterator[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return (m for m in model.modules() if isinstance(m, BaseTunerLayer))


def activate(model: torch.nn.Module, name: str) -> None:
    """Make `name` the adapter every LoRA layer applies, leaving requires_grad as it was (peft's
    set_adapter would also freeze the other adapter)."""
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    flags = [p.requires_grad for p in params]
    for layer in _layers(model):
        layer.set_adapter(name, inference_mode=True)
    for p, flag in zip(params, flags, strict=True):
        p.requires_grad_(flag)


@contextmanager
def teacher_adapter(model: torch.nn.Module) -> Iterator[None]:
    """Forwards inside the block use the lagged teacher's adapter."""
    activate(model, TEACHER)
    try:
        yield
    finally:
        activate(model, ADAPTER)


@torch.no_grad()
def sync_teacher(hf: torch.nn.Module) -> None:
    """teacher adapter := trained adapter, element by element (FSDP shards copy shard-wise)."""
    params = dict(hf.named_parameters())
    for name, p in params.items():
        if f".{ADAPTER}." in name and ".lora_" in name:
            params[name.replace(f".{ADAPTER}.", f".{TEACHER}.")].copy_(p)


def to_peft_names(state_dict: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The tensors of adapter `name` in a model state dict, keyed as peft saves them."""
    tag = f".{name}."
    return {_PEFT_PREFIX + k.replace(tag, "."): v for k, v in state_dict.items()
            if ".lora_" in k and tag in k}


def from_peft_names(peft_sd: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Inverse of `to_peft_names`: model parameter names of adapter `name`."""
    out = {}
    for k, v in peft_sd.items():
        k = k.removeprefix(_PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            k = k.replace(f".{part}.weight", f".{part}.{name}.weight")
        out[k] = v
    return out


def gathered(hf: torch.nn.Module, name: str = ADAPTER) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors, whole and on CPU, by model parameter name. Collective under FSDP
    (every process calls it; each shard is all-gathered): only the adapter moves, not the base."""
    from torch.distributed.tensor import DTensor

    out = {}
    for n, p in hf.named_parameters():  # the same order on every process
        if ".lora_" in n and f".{name}." in n:
            whole = p.full_tensor() if isinstance(p, DTensor) else p
            out[n] = whole.detach().cpu()
    return out


def save_adapter(hf: torch.nn.Module, path: str | Path, name: str = ADAPTER,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Adapter `name` in peft's format into `path` (float32). `state_dict`: a gathered full
    model state dict (FSDP); else the model's own."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else hf.state_dict()
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in to_peft_names(sd, name).items()}
    save_file(tensors, path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config: Any = getattr(hf, "trace_lora")  # set by attach
    config.save_pretrained(str(path))


@torch.no_grad()
def load_adapter(hf: torch.nn.Module, path: str | Path, name: str = ADAPTER) -> None:
    """Copy a peft-format adapter from `path` into adapter `name` of `hf` (sharded or not)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(hf.named_parameters())
    _check_settings(hf, path)
    saved = from_peft_names(load_file(str(Path(path) / ADAPTER_WEIGHTS)), name)
    wanted = {n for n in params if ".lora_" in n and f".{name}." in n}
    if set(saved) != wanted:
        raise ValueError(f"the adapter in {path} does not fit this model's train.lora "
                         f"(target modules or layers differ: {len(saved)} tensors saved, "
                         f"{len(wanted)} expected); use the lora settings it was trained with")
    # copy_ broadcasts: a rank-1 tensor would fill a rank-r one silently, so shapes are compared
    # (a DTensor's shape is the whole tensor's)
    shape = {n: tuple(saved[n].shape) for n in wanted
             if tuple(saved[n].shape) != tuple(params[n].shape)}
    if shape:
        n = min(shape)
        raise ValueError(f"the adapter in {path} has other shapes than this model's train.lora "
                         f"({n}: {shape[n]} saved, {tuple(params[n].shape)} expected; "
                         f"{len(shape)} tensors differ): use the lora rank it was trained with")
    for n in sorted(wanted):
        live, value = params[n], saved[n].to(dtype=params[n].dtype)
        if isinstance(live, DTensor):
            value = distribute_tensor(value.to(live.device), live.device_mesh, live.placements)
        live.copy_(value.to(live.device))


def _check_settings(hf: torch.nn.Module, path: str | Path) -> None:
    """Refuse an adapter saved under other LoRA settings than the model's: the rank and alpha set
    the update's scale (alpha / rank), which the tensors' names and shapes do not show."""
    live: Any = hf.trace_lora  # set by attach
    saved = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    diff = {k: (saved.get(k), getattr(live, k)) for k in ("r", "lora_alpha")
            if saved.get(k) != getattr(live, k)}
    if set(saved.get("target_modules") or []) != set(live.target_modules or []):
        diff["target_modules"] = (sorted(saved.get("target_modules") or []),
                                  sorted(live.target_modules or []))
    if diff:
        said = ", ".join(f"{k}: {a} saved, {b} now" for k, (a, b) in diff.items())
        raise ValueError(f"the adapter in {path} was trained with other LoRA settings than "
                         f"train.lora ({said}); resume with the settings it was trained with, "
                         "or start a new run")


def disk_named_parameters(hf: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trained parameters under the names a checkpoint stores them by: peft's adapter names
    under LoRA, the model's own otherwise (what a replay is checked against)."""
    params = dict(hf.named_parameters())
    if not is_lora(hf):
        return params
    return {_PEFT_PREFIX + n.replace(f".{ADAPTER}.", "."): p for n, p in params.items()
            if ".lora_" in n and f".{ADAPTER}." in n}


def merge(adapter_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """A merged Hugging Face model (W0 + scale * B @ A in every adapted layer) from a LoRA
    checkpoint, with its tokenizer: what rollout engines and other tools read."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_of(adapter_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    if dtype is not None:
        merged = merged.to(dtype)
    out = Path(out_dir)
    merged.config.use_cache = True
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(out)
    return out


def refuse_adapter_without_lora(path: str | Path) -> None:
    """A full-weight config (no `train.lora`) cannot train from a LoRA checkpoint: transformers
    would load base + adapter with every parameter frozen and the round fail on an empty
    optimizer (or, merged, silently drop the adapter on the next save)."""
    if is_adapter_dir(path):
        raise ValueError(f"{path} is a LoRA adapter checkpoint, but train.lora is not set: set "
                         "train.lora as the run that wrote it had it, or merge it (`trace-rl "
                         "export RUN --checkpoint K --merge DIR`) and start a new run from DIR")


def load_policy(lc: LoraConfig, path: str | Path, dtype: torch.dtype) -> Any:
    """The policy to train from checkpoint `path` under `train.lora`: its base in the compute
    dtype `dtype`, adapters attached, the trained one read from `path` when it is a LoRA
    checkpoint (a full-weight `path`, e.g. model.path at round 0, starts a fresh adapter)."""
    from transformers import AutoModelForCausalLM

    base = base_of(path)
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    attach(hf, lc, base)
    if is_adapter_dir(path):
        load_adapter(hf, path, ADAPTER)
    return hf


def save_checkpoint(hf: torch.nn.Module, tokenizer: Any, path: str | Path,
                    tensors: dict[str, torch.Tensor]) -> None:
    """A round's LoRA checkpoint: the trained adapter (peft format) and the tokenizer."""
    save_adapter(hf, path, ADAPTER, state_dict=tensors)
    tokenizer.save_pretrained(str(path))
