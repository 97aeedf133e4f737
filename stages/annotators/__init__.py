"""Annotators: segment a response, ask for key/error segment ids, map them to token spans.

Entry point: `annotate_rows(cfg, items, tokenizer, *, cache_dir, progress, model_path)`.
"""

from stages.annotators.config import AnnotateConfig
from stages.annotators.run import annotate_rows

__all__ = ["AnnotateConfig", "annotate_rows"]
