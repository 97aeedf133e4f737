"""The self-contained HTML page of `trace-rl inspect --html`: every response of a shard with its
annotated spans coloured by route and labelled, the problem, the verdict and the coverage.

The page is rendered server-side from escaped text, so nothing in a response (a model may well
write `<script>`) can become markup; the only script on the page is the static filter code of
the template. No external resource is referenced: the file opens offline and can be mailed.

A "view record" is one rollout as the page shows it (built by `pipeline.inspect`):
    rollout_id, round, prompt_id, problem, answer, response_text, finish_reason, n_tokens,
    correct (bool | None), reward, verdict_status, extracted_answer,
    route, annotator, status, coverage, spans (list of span dicts, DESIGN.md annotations contract)
Every key but rollout_id and spans may be None when the dataset holding it was not found.
Optional `token_scores` ({"offsets": [[c0, c1]] per response token, "student": [T], "teacher":
[T] log-probs of the sampled token, "source": str}) adds the heat strip under the response.
A page of several rounds has a round picker (the latest round selected first).
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections import Counter
from importlib import resources
from string import Template
from typing import Any, NamedTuple

import fsspec

ROUTES = ("key", "error")


class Piece(NamedTuple):
    """A run of response characters [start, end); `span` is the span covering it, or None."""

    start: int
    end: int
    span: dict[str, Any] | None


def split_spans(text: str, spans: list[dict[str, Any]]) -> list[Piece]:
    """Cut `text` into plain and span pieces, one span piece per span, in text order.

    Spans are half-open char ranges (`char_start`, `char_end`). Ranges outside the text are
    clamped, and a span overlapping the one before it starts where that one ends (possibly
    empty), so every span still yields exactly one piece and the text is never duplicated.
    """
    pieces: list[Piece] = []
    pos = 0
    for span in sorted(spans, key=lambda s: (s["char_start"], s["char_end"])):
        start = min(max(int(span["char_start"]), pos), len(text))
        end = min(max(int(span["char_end"]), start), len(text))
        if start > pos:
            pieces.append(Piece(pos, start, None))
        pieces.append(Piece(start, end, span))
        pos = end
    if pos < len(text) or not pieces:
        pieces.append(Piece(pos, len(text), None))
    return pieces


def span_problems(text: str, spans: list[dict[str, Any]]) -> list[str]:
    """Human-readable reasons a span set cannot be shown exactly (out of range, overlapping)."""
    problems = []
    prev_end = 0
    for s in sorted(spans, key=lambda s: (s["char_start"], s["char_end"])):
        a, b = int(s["char_start"]), int(s["char_end"])
        if a < 0 or b > len(text) or a > b:
            problems.append(f"span [{a}, {b}) outside the response (0..{len(text)} chars)")
        elif a < prev_end:
            problems.append(f"span [{a}, {b}) overlaps the previous span (ends at {prev_end})")
        prev_end = max(prev_end, b)
    return problems


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _mark(shown: str, span: dict[str, Any], route: str) -> str:
    """One span as ONE `<mark>` element; the label badge is drawn by CSS from `data-label`, so
    the element's text is exactly the span's text."""
    label = span.get("label") or ""
    cls = route if route in ROUTES else "other"
    segments = ", ".join(str(i) for i in span.get("segment_ids") or [])
    title = " · ".join(x for x in (
        f"{route} span", label, f"tokens {span.get('token_start')}–{span.get('token_end')}",
        f"segments {segments}" if segments else "") if x)
    return (f'<mark class="span {cls}" data-label="{_esc(label)}" title="{_esc(title)}">'
            f"{_esc(shown)}</mark>")


def render_response(text: str | None, spans: list[dict[str, Any]], route: str) -> str:
    """The escaped response with one `<mark class="span ROUTE">` element per span."""
    if text is None:
        # Without the rollouts dataset the text is unknown; the spans are still listed, so the
        # page keeps one mark per span.
        marks = " ".join(_mark(f"[chars {s['char_start']}–{s['char_end']}]", s, route)
                         for s in spans)
        missing = '<span class="missing">response text unavailable (no rollouts dataset)</span>'
        return f"{missing} {marks}"
    return "".join(_esc(text[p.start:p.end]) if p.span is None
                   else _mark(text[p.start:p.end], p.span, route)
                   for p in split_spans(text, spans))


def page_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The counts shown at the top of the page (and returned to callers)."""
    spans_by_route: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    for r in records:
        for s in r["spans"]:
            spans_by_route[r.get("route") or "none"] += 1
            labels[s.get("label") or "(no label)"] += 1
    coverages = [r["coverage"] for r in records if r.get("coverage") is not None]
    return {
        "responses": len(records),
        "correct": sum(r.get("correct") is True for r in records),
        "incorrect": sum(r.get("correct") is False for r in records),
        "unverified": sum(r.get("correct") is None for r in records),
        "spans": sum(spans_by_route.values()),
        "spans_by_route": dict(spans_by_route),
        "labels": dict(labels.most_common()),
        "status": dict(Counter(r.get("status") or "n/a" for r in records)),
        "with_spans": sum(bool(r["spans"]) for r in records),
        "coverage_mean": sum(coverages) / len(coverages) if coverages else None,
    }


def _verdict_badge(r: dict[str, Any]) -> str:
    if r.get("correct") is None:
        return '<span class="badge verdict unknown">no verdict</span>'
    ok = bool(r["correct"])
    reward = r.get("reward")
    reward_txt = f" · reward {reward:g}" if reward is not None else ""
    return (f'<span class="badge verdict {"ok" if ok else "bad"}">'
            f'{"✓ correct" if ok else "✗ incorrect"}{_esc(reward_txt)}</span>')


def _meta_line(r: dict[str, Any]) -> str:
    bits = [("round", r.get("round")), ("prompt", r.get("prompt_id")),
            ("tokens", r.get("n_tokens")),
            ("finish", r.get("finish_reason")), ("extracted", r.get("extracted_answer")),
            ("answer", r.get("answer")), ("annotator", r.get("annotator")),
            ("annotation", r.get("status"))]
    return " ".join(f'<span class="kv"><strong>{k}</strong> {_esc(v)}</span>'
                    for k, v in bits if v is not None)


def _card(r: dict[str, Any]) -> str:
    correct = {True: "true", False: "false"}.get(r["correct"], "unknown") if r.get("correct") is not None else "unknown"
    route = r.get("route") or "none"
    cov = r.get("coverage")
    cov_txt = "–" if cov is None else f"{100 * cov:.1f}%"
    cov_w = 0 if cov is None else min(100.0, 100 * cov)
    n_spans = f"{len(r['spans'])} span" + ("" if len(r["spans"]) == 1 else "s")
    problem = (f'<div class="problem"><div class="h">Problem</div>{_esc(r["problem"])}</div>'
               if r.get("problem") is not None else "")
    warnings = "".join(f'<div class="warn">{_esc(p)}</div>'
                       for p in span_problems(r.get("response_text") or "", r["spans"])
                       if r.get("response_text") is not None)
    error = f'<div class="warn">{_esc(r["error"])}</div>' if r.get("error") else ""
    heat = (render_heat_strip(r["response_text"], r["token_scores"], r["spans"], route)
            if r.get("token_scores") and r.get("response_text") is not None else "")
    rnd = "" if r.get("round") is None else str(r["round"])
    status = r.get("status") or "n/a"
    return f"""<article class="card" data-correct="{correct}" data-route="{_esc(route)}" data-round="{_esc(rnd)}" data-spans="{str(bool(r['spans'])).lower()}" data-status="{_esc(status)}">
<header><code class="rid">{_esc(r["rollout_id"])}</code>{_verdict_badge(r)}
<span class="badge route {_esc(route)}">{_esc(route)} · {n_spans}</span>
<span class="cov" title="fraction of response tokens inside spans">
<span class="bar"><i style="width:{cov_w:.1f}%"></i></span>{cov_txt}</span></header>
<div class="meta">{_meta_line(r)}</div>{problem}{warnings}{error}
<pre class="response">{render_response(r.get("response_text"), r["spans"], route)}</pre>{heat}
</article>"""


def _heat_colour(delta: float, scale: float) -> str:
    """teacher − student log-prob of the sampled token: orange where the privileged teacher
    finds the token less likely than the student did (it disagrees), blue where more likely;
    full colour at |Δ| >= `scale`."""
    alpha = min(abs(delta) / scale, 1.0) * 0.85
    rgb = "230,110,20" if delta < 0 else "40,100,220"
    return f"rgba({rgb},{alpha:.2f})"


def render_heat_strip(text: str, scores: dict[str, Any], spans: list[dict[str, Any]], route: str) -> str:
    """One cell per response token under the text: the token's characters on a background
    coloured by teacher − student log-prob (`_heat_colour`), span tokens underlined in the
    route's colour, the numbers in each cell's title."""
    deltas = [t - s for s, t in zip(scores["student"], scores["teacher"], strict=True)]
    # One response's scale (its largest |Δ|, at least 0.1 nats), stated in the strip's header.
    scale = max([0.1] + [abs(d) for d in deltas])
    covered: set[int] = set()
    for s in spans:
        covered.update(range(int(s["token_start"]), int(s["token_end"])))
    cells = []
    for t, ((c0, c1), s_lp, t_lp) in enumerate(zip(scores["offsets"], scores["student"],
                                                    scores["teacher"], strict=True)):
        delta = t_lp - s_lp
        cls = f"tok in-{route}" if t in covered else "tok"
        title = f"token {t}: student {s_lp:.2f} · teacher {t_lp:.2f} · Δ {delta:+.2f}"
        cells.append(f'<span class="{cls}" style="background:{_heat_colour(delta, scale)}" '
                     f'title="{_esc(title)}">{_esc(text[c0:c1]) or "·"}</span>')
    head = (f'<div class="h">teacher − student log-prob per sampled token '
            f'(mean Δ {sum(deltas) / max(len(deltas), 1):+.2f}, full colour at |Δ| {scale:.2f}; '
            f'{_esc(scores.get("source", ""))})</div>'
            # the legend beside the strip it explains, not at the top of the page
            '<div class="strip-legend"><span><i class="t-lo"></i>teacher finds the token less '
            'likely than the student</span><span><i class="t-hi"></i>more likely</span>'
            f'<span><i class="u-{_esc(route)}"></i>{_esc(route)} span token</span></div>')
    return f'<div class="heat">{head}<pre class="strip">{"".join(cells)}</pre></div>'


def _chip(name: str, count: int) -> str:
    return f'<span class="chip">{_esc(name)} <strong>{count}</strong></span>'


def _status_button(name: str, count: int) -> str:
    """A filter button per annotation status, with its count: a click shows only that status."""
    return (f'<button type="button" class="chip" data-filter="status-{_esc(name)}" '
            f'aria-pressed="false">{_esc(name)} <strong>{count}</strong></button>')


def _summary_html(summary: dict[str, Any]) -> str:
    cov = summary["coverage_mean"]
    tiles = [("responses", summary["responses"]), ("correct", summary["correct"]),
             ("incorrect", summary["incorrect"]),
             ("key spans", summary["spans_by_route"].get("key", 0)),
             ("error spans", summary["spans_by_route"].get("error", 0)),
             ("mean coverage", "–" if cov is None else f"{100 * cov:.1f}%")]
    tiles_html = "".join(f'<div class="tile"><div class="n">{_esc(v)}</div>'
                         f'<div class="l">{_esc(k)}</div></div>' for k, v in tiles)
    labels = "".join(_chip(k, v) for k, v in summary["labels"].items())
    status = "".join(_status_button(k, v) for k, v in summary["status"].items())
    return (f'<section class="tiles">{tiles_html}</section>'
            f'<section class="chips"><span class="h">labels</span>{labels or "–"}</section>'
            f'<section class="chips"><span class="h">annotation status</span>{status}</section>')


def _template() -> Template:
    path = resources.files("trace_rl.pipeline").joinpath("templates/inspect.html")
    return Template(path.read_text(encoding="utf-8"))


def _script_hash(page: str) -> str:
    """CSP source allowing exactly the page's own script: even if some text escaped escaping,
    an injected script or event handler would not run."""
    body = page.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = hashlib.sha256(body.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode() + "'"


def render_page(records: list[dict[str, Any]], *, title: str, source: str) -> str:
    """The whole page as a string: summary, filter buttons and one card per record."""
    summary = page_summary(records)
    template = _template()
    rounds = sorted({r["round"] for r in records if r.get("round") is not None})
    options = "".join(f'<option value="{k}"{" selected" if k == rounds[-1] else ""}>round {k}</option>'
                      for k in rounds)
    picker = ("" if len(rounds) < 2 else
              f'<label class="rounds">round <select id="round"><option value="">all rounds</option>'
              f"{options}</select></label>")
    return template.substitute(script_hash=_script_hash(template.template), round_picker=picker,
        title=_esc(title), source=_esc(source), summary=_summary_html(summary),
        n_all=summary["responses"], n_correct=summary["correct"], n_incorrect=summary["incorrect"],
        n_spans=summary["with_spans"],
        # the page opens on what it is for, the responses with spans, when there are any
        default_filter="spans" if summary["with_spans"] else "all",
        cards="\n".join(_card(r) for r in records)
        or '<p class="empty">no responses in this shard</p>',
    )


def write_html(path: str, records: list[dict[str, Any]], *, title: str,
               source: str) -> dict[str, Any]:
    """Write the page to `path` (local or fsspec URL); returns the page summary."""
    with fsspec.open(path, "w", encoding="utf-8") as fh:
        fh.write(render_page(records, title=title, source=source))
    return page_summary(records)
