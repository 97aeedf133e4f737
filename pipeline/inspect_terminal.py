"""`inspect`'s terminal output: one table per dataset, and example responses with their spans
coloured by route (key spans green, error spans red) and labelled."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .html_view import split_spans
from .inspect_summaries import Dataset

ROUTE_STYLE = {"key": "bold green", "error": "bold red"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        if set(value) == {"first", "last"}:
            return f"{_fmt(value['first'])} → {_fmt(value['last'])}"
        if set(value) == {"mean", "min", "median", "max"}:
            return (f"mean {_fmt(value['mean'])} · min {_fmt(value['min'])} · "
                    f"median {_fmt(value['median'])} · max {_fmt(value['max'])}")
        return " · ".join(f"{k} {_fmt(v)}" for k, v in value.items()) or "–"
    if isinstance(value, list):
        return " – ".join(_fmt(v) for v in value)
    return "–" if value is None else str(value)


def _summary_table(ds: Dataset, summary: dict[str, Any]) -> Table:
    state = "" if ds.complete else "  [yellow](incomplete: no manifest)[/]"
    table = Table(title=f"[bold]{ds.label}[/]  [dim]{ds.schema}[/]{state}", title_justify="left",
                  show_header=False, box=None, padding=(0, 2))
    table.add_column(style="cyan", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in summary.items():
        if key == "metrics":
            for name, fl in value.items():
                table.add_row(f"  {name}", Text(_fmt(fl)))
        elif key == "benchmarks":
            for name, b in value.items():
                table.add_row(f"  {name}", Text(_fmt(b)))
        elif key not in ("schema", "round", "complete"):  # already in the title
            table.add_row(key, Text(_fmt(value)))
    return table


SPAN_OPEN, SPAN_CLOSE = "⟪", "⟫"


def _elide(text: str, head: bool, tail: bool, context: int) -> str:
    """Shorten a plain run of text, keeping `context` chars next to the spans around it."""
    if len(text) <= 2 * context + 5:
        return text
    if head and tail:
        return text[:context] + " … " + text[-context:]
    return text[:context] + " …" if head else "… " + text[-context:]


def example_text(record: dict[str, Any], *, context: int = 160, max_chars: int = 1500) -> Text:
    """The response with key spans in green and error spans in red, each between ⟪ and ⟫ and
    followed by its label; a long response is cut to the text around its spans."""
    text = record.get("response_text")
    if text is None:
        return Text("(response text unavailable: no rollouts dataset in this round)", style="dim")
    pieces = split_spans(text, record["spans"])
    style = ROUTE_STYLE.get(record["route"], "bold yellow")
    out = Text()
    for i, piece in enumerate(pieces):
        chunk = text[piece.start:piece.end]
        if piece.span is None:
            if len(text) > max_chars:
                chunk = _elide(chunk, head=i > 0, tail=i < len(pieces) - 1, context=context)
            out.append(chunk)
        else:
            # Both ends are marked in text, so a piped (unstyled) output still shows the span.
            dim = style.replace("bold ", "") + " dim"
            out.append(SPAN_OPEN, style=dim)
            out.append(chunk, style=style + " underline")
            label = piece.span["label"] or record["route"]
            out.append(f"{SPAN_CLOSE}⟦{label}⟧", style=dim)
    return out


def _example_header(r: dict[str, Any]) -> Text:
    verdicts = {True: ("correct", "green"), False: ("incorrect", "red")}
    verdict = verdicts.get(r["correct"], ("no verdict", "dim"))
    head = Text()
    head.append(str(r["rollout_id"]), style="bold")
    head.append("  ")
    head.append(verdict[0], style=verdict[1])
    if r["reward"] is not None:
        head.append(f" (reward {r['reward']:g})")
    cov = "–" if r["coverage"] is None else f"{100 * r['coverage']:.1f}%"
    n = len(r["spans"])
    plural = "" if n == 1 else "s"
    head.append(f"  route {r['route']} · {n} span{plural} · coverage {cov} · {r['status']}",
                style="dim")
    return head


def print_report(console: Console, datasets: list[Dataset], summaries: list[dict[str, Any]],
                 examples: dict[str, list[dict[str, Any]]]) -> None:
    current: str | None = None
    for ds, summary in zip(datasets, summaries):
        if ds.heading is not None and ds.heading != current and len(datasets) > 1:
            console.rule(ds.heading, style="dim")
            current = ds.heading
        console.print(_summary_table(ds, summary))
        shown = examples.get(ds.label, [])
        if shown:
            console.print(Text(f"examples ({len(shown)} of {ds.table.num_rows})", style="bold"))
        for r in shown:
            console.print(_example_header(r))
            console.print(example_text(r))
        console.print()
