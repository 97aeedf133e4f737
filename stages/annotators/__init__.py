"""Annotators: segment a response, ask for key/error segment ids, map them to token spans.

Entry point: `annotate_rows(cfg, items, tokenizer, *, cache_dir, progress, model_path)`.
"""

from trace_rl.stages.annotators.config import AnnotateConfig
from trace_rl.stages.annotators.run import annotate_rows

__all__ = ["AnnotateConfig", "annotate_rows"]
