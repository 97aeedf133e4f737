"""The annotator's chat messages: a system prompt plus a route-specific user message.

Templates are plain text files (templates/system.txt, key.txt, error.txt, or a configured
directory). Fields {problem}, {answer}, {reference}, {segments} are substituted by name only,
so LaTeX braces in templates or data need no escaping.

Prompt-injection stance: the response under annotation is data. It is placed between fixed
markers that the system prompt declares inert, and any copy of those markers inside the data
is defanged first, so a response cannot close the data block and speak as the operator.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from trace_rl.stages.annotators.config import TEMPLATE_NAMES, AnnotateConfig
from trace_rl.stages.annotators.segments import Segment, render_segments

PACKAGED_TEMPLATES = Path(__file__).with_name("templates")
DATA_BEGIN, DATA_END = "<<<BEGIN_RESPONSE_DATA>>>", "<<<END_RESPONSE_DATA>>>"
_FIELD = re.compile(r"\{(problem|answer|reference|segments)\}")
_MARKER = re.compile(r"<<<\s*(BEGIN|END)_RESPONSE_DATA\s*>>>", re.IGNORECASE)


@lru_cache(maxsize=8)
def load_templates(template_dir: str | None) -> dict[str, str]:
    """name -> template text for system, key and error."""
    root = Path(template_dir) if template_dir else PACKAGED_TEMPLATES
    return {n: (root / f"{n}.txt").read_text(encoding="utf-8").strip() for n in TEMPLATE_NAMES}


def defang(text: str) -> str:
    """Break any copy of the data markers so it cannot end or restart the data block."""
    return _MARKER.sub(lambda m: f"<< {m.group(1).upper()}-OF-DATA (quoted) >>", text)


def fill(template: str, fields: dict[str, str]) -> str:
    """Substitute {name} fields; other braces are left alone."""
    return _FIELD.sub(lambda m: fields[m.group(1)], template)


def reference_block(cfg: AnnotateConfig, item: dict) -> str:
    """The reference the annotator may consult: the solution when shown, else nothing."""
    solution = item.get("solution")
    if not cfg.show_solution or not solution:
        return ""
    text = (
        solution
        if len(solution) <= cfg.max_reference_chars
        else (solution[: cfg.max_reference_chars] + "\n[... reference solution cut ...]")
    )
    return "Reference solution:\n" + text


def build_messages(cfg: AnnotateConfig, item: dict, segments: list[Segment]) -> list[dict]:
    """OpenAI-style messages asking for the key (route 'key') or error (route 'error') segments."""
    route = item["route"]
    if route not in ("key", "error"):
        raise ValueError(f"route={route!r} has no annotator prompt; use 'key' or 'error'")
    templates = load_templates(cfg.template_dir)
    fields = {
        "problem": defang(str(item.get("problem", ""))),
        "answer": defang(str(item.get("answer", ""))),
        "reference": defang(reference_block(cfg, item)),
        "segments": defang(render_segments(segments)),
    }
    return [
        {"role": "system", "content": templates["system"]},
        {"role": "user", "content": fill(templates[route], fields)},
    ]
