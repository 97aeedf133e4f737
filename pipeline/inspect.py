"""`trace-rl inspect PATH`: what a run wrote, at a glance, in the terminal (and as HTML).

PATH may be one Parquet file, a dataset directory (`part-*.parquet` + `_manifest.json`), a round
directory (`round-0003/`) or a run directory; every dataset found is summarised, by round. The
kind of each dataset comes from the `schema_name` in its Parquet metadata, never from its path,
so a renamed or copied shard is still read against the right contract.

Annotations are shown joined with the rollouts (text, token ids), verdicts (correct, reward)
and prompts (problem) of the same round, found as sibling directories when they exist.
"""

from __future__ import annotations

import posixpath
import re
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table
from rich.text import Text

from trace_rl.data_schemas import SCHEMAS, read_parquet

from trace_rl.data_schemas.errors import TraceError
from .html_view import split_spans, write_html
from .store import MANIFEST, Manifest

ROUND_RE = re.compile(r"round-(\d+)")
EVAL_SUMMARY = "summary.json"
MAX_DEPTH = 3  # run/eval/round-0004/<benchmark>/ is the deepest dataset of a run
SKIP_DIRS = {"checkpoints"}
ROUTE_STYLE = {"key": "bold green", "error": "bold red"}
# Datasets are listed in the order the pipeline writes them.
STAGE_ORDER = ["prompts", "rollouts", "verdicts", "annotations", "train_metrics", "eval_samples"]


@dataclass
class Dataset:
    """One dataset as read: `label` is its path relative to what the user named."""

    label: str
    path: str
    schema: str
    table: pa.Table
    complete: bool

    @property
    def round(self) -> int | None:
        m = ROUND_RE.search(self.path)
        return int(m.group(1)) if m else None


# discovery and reading ---------------------------------------------------------------------
def _basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))


def _parquet_files(fs, directory: str) -> list[str]:
    return sorted(p for p in fs.ls(directory, detail=False)
                  if p.endswith(".parquet") and not _basename(p).startswith("."))


def _is_dataset_dir(fs, directory: str) -> bool:
    return fs.exists(posixpath.join(directory, MANIFEST)) or bool(_parquet_files(fs, directory))


def _schema_name(fs, file: str) -> str:
    try:
        meta = pq.read_schema(file, filesystem=fs).metadata or {}
    except (pa.ArrowInvalid, OSError) as exc:
        raise TraceError(f"{file}: not a readable Parquet file ({exc})") from None
    name = meta.get(b"schema_name", b"").decode()
    if name not in SCHEMAS:
        raise TraceError(
            f"{file}: schema_name {name or None!r} in its Parquet metadata is not a trace-rl "
            f"dataset (known: {sorted(SCHEMAS)}); inspect a file written by a trace-rl stage"
        )
    return name


def read_dataset(fs, path: str, label: str) -> Dataset:
    """Read a Parquet file or a dataset directory (the parts its manifest lists; all parts, marked
    incomplete, when there is no manifest) against the contract its metadata names. Evaluation
    outputs have `summary.json` in place of a manifest."""
    complete = True
    if fs.isfile(path):
        files, name = [path], None
    else:
        manifest_path = posixpath.join(path, MANIFEST)
        if fs.exists(manifest_path):
            with fs.open(manifest_path, "r") as fh:
                m = Manifest.from_json(fh.read())
            files, name = [posixpath.join(path, f["name"]) for f in m.files], m.schema
        else:
            files, name = _parquet_files(fs, path), None
            complete = fs.exists(posixpath.join(path, EVAL_SUMMARY))
    name = _schema_name(fs, files[0]) if files else name
    if name is None:
        raise TraceError(f"{path}: an empty directory without {MANIFEST} is not a dataset")
    schema = SCHEMAS[name]
    extra = name == "train_metrics"  # metrics may carry namespaced columns (`kl/forward`)
    tables = [read_parquet(f, schema, fs, allow_extra=extra) for f in files]
    table = pa.concat_tables(tables, promote_options="default") if tables else schema.empty_table()
    return Dataset(label, path, name, table, complete)


def discover(fs, root: str) -> tuple[str, list[tuple[str, str]]]:
    """(kind, [(label, path)]) for PATH: kind is file | dataset | round | run."""
    if fs.isfile(root):
        return "file", [(_basename(root), root)]
    if not fs.isdir(root):
        raise TraceError(f"{root}: no such file or directory")
    if _is_dataset_dir(fs, root):
        return "dataset", [(_basename(root), root)]
    found: list[tuple[str, str]] = []

    def walk(directory: str, depth: int) -> None:
        for sub in sorted(fs.ls(directory, detail=False)):
            name = _basename(sub)
            if name.startswith(".") or name in SKIP_DIRS or not fs.isdir(sub):
                continue
            if _is_dataset_dir(fs, sub):
                found.append((posixpath.relpath(sub, root), sub))
            elif depth < MAX_DEPTH:
                walk(sub, depth + 1)

    walk(root, 1)
    if not found:
        raise TraceError(
            f"{root} holds no trace-rl dataset: name a Parquet file, a dataset directory "
            f"(part-*.parquet + {MANIFEST}), a round directory (round-0003/) or a run directory"
        )
    return ("round" if ROUND_RE.fullmatch(_basename(root)) else "run"), found


# summaries (pure: table in, dict out) -------------------------------------------------------
def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "min": min(values),
            "median": statistics.median(values), "max": max(values)}


def _counts(table: pa.Table, column: str) -> dict[str, int]:
    return dict(Counter(table.column(column).to_pylist()).most_common())


def summarize_rollouts(t: pa.Table) -> dict[str, Any]:
    lengths = pc.list_value_length(t.column("response_token_ids")).to_pylist()
    return {"rows": t.num_rows, "prompts": len(set(t.column("prompt_id").to_pylist())),
            "finish_reasons": _counts(t, "finish_reason"), "engines": _counts(t, "engine"),
            "response_tokens": _stats(lengths)}


def summarize_verdicts(t: pa.Table) -> dict[str, Any]:
    rewards = t.column("reward").to_pylist()
    correct = sum(t.column("correct").to_pylist())
    return {"rows": t.num_rows, "status": _counts(t, "status"), "correct": correct,
            "correct_rate": correct / t.num_rows if t.num_rows else None,
            "reward_mean": statistics.fmean(rewards) if rewards else None}


def summarize_annotations(t: pa.Table) -> dict[str, Any]:
    routes = t.column("route").to_pylist()
    spans = t.column("spans").to_pylist()
    coverage = t.column("coverage").to_pylist()
    spans_by_route: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    for route, row_spans in zip(routes, spans):
        spans_by_route[route] += len(row_spans)
        labels.update(s["label"] or "(no label)" for s in row_spans)
    with_spans = [c for c, s in zip(coverage, spans) if s]
    return {"rows": t.num_rows, "status": _counts(t, "status"), "route": _counts(t, "route"),
            "spans": sum(spans_by_route.values()), "spans_by_route": dict(spans_by_route),
            "labels": dict(labels.most_common()), "rows_without_spans": sum(not s for s in spans),
            "coverage": _stats(coverage), "coverage_of_annotated": _stats(with_spans),
            "annotators": _counts(t, "annotator")}


def summarize_train_metrics(t: pa.Table) -> dict[str, Any]:
    t = t.sort_by("step")
    metrics = {}
    for name in t.column_names:
        if name in ("step", "round") or not pa.types.is_floating(t.schema.field(name).type) \
                and not pa.types.is_integer(t.schema.field(name).type):
            continue
        values = [v for v in t.column(name).to_pylist() if v is not None]
        if values:
            metrics[name] = {"first": values[0], "last": values[-1]}
    steps = t.column("step").to_pylist()
    return {"rows": t.num_rows, "steps": [steps[0], steps[-1]] if steps else None,
            "metrics": metrics}


def summarize_prompts(t: pa.Table) -> dict[str, Any]:
    return {"rows": t.num_rows, "sources": _counts(t, "source"),
            "with_solution": t.num_rows - t.column("solution").null_count}


def summarize_eval_samples(t: pa.Table) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for bench in sorted(set(t.column("benchmark").to_pylist())):
        sub = t.filter(pc.equal(t.column("benchmark"), bench))
        correct = sum(sub.column("correct").to_pylist())
        out[bench] = {"samples": sub.num_rows, "accuracy": correct / sub.num_rows,
                      "mean_tokens": statistics.fmean(sub.column("num_tokens").to_pylist())}
    return {"rows": t.num_rows, "benchmarks": out}


SUMMARIZERS: dict[str, Callable[[pa.Table], dict[str, Any]]] = {
    "rollouts": summarize_rollouts, "verdicts": summarize_verdicts,
    "annotations": summarize_annotations, "train_metrics": summarize_train_metrics,
    "prompts": summarize_prompts, "eval_samples": summarize_eval_samples,
}


# joining annotations with their round ------------------------------------------------------
class _Reader:
    """Reads sibling datasets once, reusing the ones already loaded for the summary."""

    def __init__(self, fs, loaded: list[Dataset]):
        self.fs = fs
        self.cache = {d.path.rstrip("/"): d for d in loaded}

    def get(self, path: str, schema: str) -> pa.Table | None:
        path = path.rstrip("/")
        if path not in self.cache:
            if not (self.fs.isdir(path) and _is_dataset_dir(self.fs, path)):
                return None
            self.cache[path] = read_dataset(self.fs, path, _basename(path))
        d = self.cache[path]
        return d.table if d.schema == schema else None


def _by_id(table: pa.Table | None, key: str) -> dict[str, dict[str, Any]]:
    return {} if table is None else {r[key]: r for r in table.to_pylist()}


def _blank_annotation(rollout_id: str) -> dict[str, Any]:
    return {"rollout_id": rollout_id, "route": "none", "annotator": None, "status": None,
            "coverage": None, "spans": [], "error": None}


def view_records(ds: Dataset, reader: _Reader) -> list[dict[str, Any]]:
    """One view record (see html_view) per row of an annotations dataset, joined with its round's
    rollouts and verdicts and the run's prompts where those exist; a rollouts dataset gives
    records without spans."""
    directory = posixpath.dirname(ds.path) if reader.fs.isfile(ds.path) else ds.path
    round_dir = posixpath.dirname(directory.rstrip("/"))
    rollout_table = (ds.table if ds.schema == "rollouts"
                     else reader.get(posixpath.join(round_dir, "rollouts"), "rollouts"))
    rollouts = _by_id(rollout_table, "rollout_id")
    verdicts = _by_id(reader.get(posixpath.join(round_dir, "verdicts"), "verdicts"), "rollout_id")
    prompts = _by_id(reader.get(posixpath.join(posixpath.dirname(round_dir), "prompts"), "prompts"),
                     "prompt_id")
    rows = (ds.table.to_pylist() if ds.schema == "annotations"
            else [_blank_annotation(rid) for rid in rollouts])
    records = []
    for a in rows:
        ro = rollouts.get(a["rollout_id"], {})
        v = verdicts.get(a["rollout_id"], {})
        p = prompts.get(ro.get("prompt_id"), {})
        records.append({
            "rollout_id": a["rollout_id"], "round": ro.get("round", ds.round),
            "prompt_id": ro.get("prompt_id"), "problem": p.get("problem"),
            "answer": p.get("answer"),
            "response_text": ro.get("response_text"), "finish_reason": ro.get("finish_reason"),
            "n_tokens": len(ro["response_token_ids"]) if ro else None,
            "correct": v.get("correct"), "reward": v.get("reward"),
            "verdict_status": v.get("status"),
            "extracted_answer": v.get("extracted_answer"), "route": a["route"],
            "annotator": a["annotator"], "status": a["status"], "coverage": a["coverage"],
            "spans": a["spans"], "error": a["error"],
        })
    return records


def pick_examples(records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to n records, alternating key-span and error-span rows, then the rest, in order."""
    key = [r for r in records if r["spans"] and r["route"] == "key"]
    err = [r for r in records if r["spans"] and r["route"] == "error"]
    picked = [r for pair in zip(key, err) for r in pair]
    others = [r for r in records if not (r["spans"] and r["route"] in ("key", "error"))]
    rest = key[len(err):] + err[len(key):] + others
    return (picked + rest)[:max(n, 0)]


# terminal output -----------------------------------------------------------------------------
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


def _elide(text: str, head: bool, tail: bool, context: int) -> str:
    """Shorten a plain run of text, keeping `context` chars next to the spans around it."""
    if len(text) <= 2 * context + 5:
        return text
    if head and tail:
        return text[:context] + " … " + text[-context:]
    return text[:context] + " …" if head else "… " + text[-context:]


def example_text(record: dict[str, Any], *, context: int = 160, max_chars: int = 1500) -> Text:
    """The response with key spans in green and error spans in red, each followed by its label;
    a long response is cut to the text around its spans."""
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
            out.append(chunk, style=style + " underline")
            label = piece.span["label"] or record["route"]
            out.append(f"⟦{label}⟧", style=style.replace("bold ", "") + " dim")
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
    current: int | None = None
    for ds, summary in zip(datasets, summaries):
        if ds.round is not None and ds.round != current and len(datasets) > 1:
            console.rule(f"round {ds.round}", style="dim")
            current = ds.round
        console.print(_summary_table(ds, summary))
        shown = examples.get(ds.label, [])
        if shown:
            console.print(Text(f"examples ({len(shown)} of {ds.table.num_rows})", style="bold"))
        for r in shown:
            console.print(_example_header(r))
            console.print(example_text(r))
        console.print()


def inspect_path(path: str, *, html: str | None = None, examples: int = 3) -> dict:
    """Summarise every dataset under `path` on stdout; with `html`, also write the HTML view of
    every annotated response found. Returns {"path", "kind", "datasets": {label: summary},
    "examples": {label: [rollout_id, ...]}, "html": page summary or None}."""
    fs, root = fsspec.core.url_to_fs(path)
    kind, found = discover(fs, root)
    datasets = sorted((read_dataset(fs, p, label) for label, p in found),
                      key=lambda d: (d.round if d.round is not None else -1,
                                     STAGE_ORDER.index(d.schema), d.label))
    summaries = [dict(SUMMARIZERS[d.schema](d.table), schema=d.schema, round=d.round,
                      complete=d.complete) for d in datasets]
    reader = _Reader(fs, datasets)
    records = {d.label: view_records(d, reader) for d in datasets if d.schema == "annotations"}
    shown = {label: pick_examples(recs, examples) for label, recs in records.items()}
    print_report(Console(), datasets, summaries, shown)
    result: dict[str, Any] = {
        "path": path, "kind": kind, "datasets": {d.label: s for d, s in zip(datasets, summaries)},
        "examples": {label: [r["rollout_id"] for r in recs] for label, recs in shown.items()},
        "html": None,
    }
    if html is not None:
        result["html"] = _write_view(html, path, datasets, records, reader)
        Console().print(f"[green]wrote[/] {html}  ({result['html']['responses']} responses, "
                        f"{result['html']['spans']} spans)")
    return result


def _write_view(html: str, source: str, datasets: list[Dataset],
                records: dict[str, list[dict[str, Any]]], reader: _Reader) -> dict[str, Any]:
    """The annotated responses of the latest round that has annotations (one round keeps the
    page small for a long run; name a round directory to see another); without annotations, the
    rollouts of the latest round, with their verdicts."""
    for schema in ("annotations", "rollouts"):
        candidates = [d for d in datasets if d.schema == schema]
        if candidates:
            latest = max(d.round if d.round is not None else -1 for d in candidates)
            chosen = [d for d in candidates if (d.round if d.round is not None else -1) == latest]
            every = [r for d in chosen
                     for r in (records[d.label] if schema == "annotations"
                               else view_records(d, reader))]
            where = ", ".join(d.label for d in chosen)
            return write_html(html, every, title=f"trace-rl inspect: {where}",
                              source=f"{source} · {where}")
    raise TraceError(
        f"--html shows responses, and {source} holds no annotations or rollouts dataset; "
        "name a run, round or annotations directory"
    )
