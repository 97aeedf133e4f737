"""`trace-rl inspect PATH`: what a run wrote, at a glance, in the terminal (and as HTML).

PATH may be one Parquet file, a dataset directory (`part-*.parquet` + `.manifest.json`), a round
directory (`round-0003/`) or a run directory; every dataset found is summarised, by round. The
kind of each dataset comes from the `schema_name` in its Parquet metadata, never from its path,
so a renamed or copied shard is still read against the right contract.

Annotations are shown joined with the rollouts (text, token ids), verdicts (correct, reward)
and prompts (problem) of the same round, found as sibling directories when they exist.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections import Counter
from collections.abc import Callable
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from trace_rl.data_schemas import SCHEMAS, read_parquet
from trace_rl.data_schemas.errors import TraceError

from .html_view import write_html
from .inspect_summaries import SUMMARIZERS, Dataset
from .inspect_terminal import print_report
from .layout import CHECKPOINTS, ROUND_RE, SCHEMA_ORDER, STAGES
from .store import MANIFEST, read_manifest

MAX_DEPTH = 4  # run/eval/round-0004/<benchmark>/ is the deepest dataset of a run
SKIP_DIRS = {CHECKPOINTS}


# discovery and reading ---------------------------------------------------------------------
def _basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))


def _parquet_files(fs, directory: str) -> list[str]:
    # Files only: a dataset directory may itself be named `*.parquet` (eval samples).
    return sorted(e["name"] for e in fs.ls(directory, detail=True)
                  if e["type"] == "file" and e["name"].endswith(".parquet")
                  and not _basename(e["name"]).startswith("."))


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
    incomplete, when there is no manifest) against the contract its metadata names."""
    complete = True
    if fs.isfile(path):
        files, name = [path], None
    else:
        m = read_manifest(fs, path)
        if m is not None:
            files, name = [posixpath.join(path, f["name"]) for f in m.files], m.schema
        else:
            files, name = _parquet_files(fs, path), None
            complete = False
    name = _schema_name(fs, files[0]) if files else name
    if name is None:
        raise TraceError(f"{path}: an empty directory without {MANIFEST} is not a dataset")
    schema = SCHEMAS[name]
    extra = name == "train_metrics"  # metrics may carry namespaced columns (`kl_forward`)
    tables = [read_parquet(f, schema, fs, allow_extra=extra) for f in files]
    table = pa.concat_tables(tables, promote_options="default") if tables else schema.empty_table()
    return Dataset(label, path, name, table, complete)


def _position(d: Dataset) -> int:
    """Prompts first, then the rounds in order, then the evaluations (after every round)."""
    if d.schema == "eval_samples":
        return 1 << 30
    return -1 if d.round is None else d.round


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
    round_path = posixpath.dirname(directory.rstrip("/"))
    run_path = posixpath.dirname(round_path)

    def sibling(stage: str, parent: str) -> pa.Table | None:
        spec = STAGES[stage]
        assert spec.dataset is not None and spec.schema is not None  # the round stages have both
        return reader.get(posixpath.join(parent, spec.dataset), spec.schema)

    rollouts = _by_id(ds.table if ds.schema == "rollouts" else sibling("rollout", round_path), "rollout_id")
    verdicts = _by_id(sibling("verify", round_path), "rollout_id")
    prompts = _by_id(sibling("prepare", run_path), "prompt_id")
    rows = (ds.table.to_pylist() if ds.schema == "annotations"
            else [_blank_annotation(rid) for rid in rollouts])
    records = []
    for a in rows:
        ro = rollouts.get(a["rollout_id"], {})
        v = verdicts.get(a["rollout_id"], {})
        p = prompts.get(ro.get("prompt_id") or "", {})
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


def across_prompts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records reordered so that consecutive ones come from different prompts: the first
    rollout of every prompt (prompts in a fixed pseudo-random order), then the second, ..."""
    seen: Counter[Any] = Counter()
    keyed: list[tuple[int, str, int, dict[str, Any]]] = []
    for r in records:
        pid = r.get("prompt_id")
        keyed.append((seen[pid], hashlib.sha256(str(pid).encode()).hexdigest(), len(keyed), r))
        seen[pid] += 1
    return [r for *_, r in sorted(keyed, key=lambda x: x[:3])]


def pick_examples(records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to n records sampled across prompts (never two rollouts of one prompt while another
    prompt has one left), alternating key-span and error-span rows, then the rest."""
    records = across_prompts(records)
    key = [r for r in records if r["spans"] and r["route"] == "key"]
    err = [r for r in records if r["spans"] and r["route"] == "error"]
    picked = [r for pair in zip(key, err) for r in pair]
    others = [r for r in records if not (r["spans"] and r["route"] in ("key", "error"))]
    rest = key[len(err):] + err[len(key):] + others
    return (picked + rest)[:max(n, 0)]


def inspect_path(path: str, *, html: str | None = None, examples: int = 3,
                 scorer: Scorer | None = None) -> dict:
    """Summarise every dataset under `path` on stdout; with `html`, also write the HTML view of
    every annotated response found. Returns {"path", "kind", "datasets": {label: summary},
    "examples": {label: [rollout_id, ...]}, "html": page summary or None}."""
    fs, root = fsspec.core.url_to_fs(path)
    kind, found = discover(fs, root)
    datasets = sorted((read_dataset(fs, p, label) for label, p in found),
                      key=lambda d: (_position(d), SCHEMA_ORDER.index(d.schema), d.label))
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
        result["html"] = _write_view(html, path, datasets, records, reader, scorer)
        Console().print(f"[green]wrote[/] {html}  ({result['html']['responses']} responses, "
                        f"{result['html']['spans']} spans)")
    return result


def _write_view(html: str, source: str, datasets: list[Dataset],
                records: dict[str, list[dict[str, Any]]], reader: _Reader,
                scorer: Scorer | None = None) -> dict[str, Any]:
    """The annotated responses of every round (a round picker on the page selects one; the
    latest first); without annotations, the rollouts, with their verdicts; for a verdicts
    dataset, its round's rollouts. With `scorer`, the examples of each round also get the
    teacher-vs-student heat strip."""
    every: list[dict[str, Any]] = []
    chosen: list[Dataset] = []
    for schema in ("annotations", "rollouts", "verdicts", "eval_samples"):
        chosen = [d for d in datasets if d.schema == schema]
        if not chosen:
            continue
        for d in chosen:
            if schema == "annotations":
                every += records[d.label]
            elif schema == "rollouts":
                every += view_records(d, reader)
            elif schema == "eval_samples":
                every += eval_records(d)
            else:
                rollouts = _sibling_rollouts(d, reader)
                every += view_records(rollouts, reader) if rollouts is not None else []
        if every:
            break
    if not every:
        raise TraceError(
            f"--html shows responses, and {source} holds no annotations, rollouts, verdicts with "
            "their rollouts or evaluation samples (train metrics have no responses); name a run, "
            "round, annotations or eval directory")
    if scorer is not None:
        add_token_scores(every, scorer)
    where = ", ".join(d.label for d in chosen)
    return write_html(html, every, title=f"trace-rl inspect: {where}", source=f"{source} · {where}")


def eval_records(ds: Dataset) -> list[dict[str, Any]]:
    """View records of an evaluation's samples (no spans; the label is the dataset's)."""
    return [{"rollout_id": f"{r['benchmark']}:{r['problem_id']}#{r['sample_index']}", "round": None,
             "prompt_id": r["problem_id"], "problem": None, "answer": None,
             "response_text": r["response_text"], "finish_reason": None, "n_tokens": r["num_tokens"],
             "correct": r["correct"], "reward": None, "verdict_status": None,
             "extracted_answer": r["extracted_answer"], "route": None, "annotator": None,
             "status": None, "coverage": None, "spans": [], "error": None}
            for r in ds.table.to_pylist()]


def _sibling_rollouts(ds: Dataset, reader: _Reader) -> Dataset | None:
    directory = posixpath.dirname(ds.path) if reader.fs.isfile(ds.path) else ds.path
    path = posixpath.join(posixpath.dirname(directory.rstrip("/")), STAGES["rollout"].dataset or "")
    table = reader.get(path, "rollouts")
    return None if table is None else Dataset(_basename(path), path, "rollouts", table, True)


# A scorer maps (round, [rollout_id]) to {rollout_id: token_scores} (see html_view).
Scorer = Callable[[int, list[str]], dict[str, dict[str, Any]]]


def add_token_scores(records: list[dict[str, Any]], scorer: Scorer, per_round: int | None = None) -> None:
    """Heat-strip scores, written into the records in place: for every annotated record (its
    annotator ran: any status but skipped), or, with `per_round`, for up to that many records
    of each round sampled across prompts (annotated ones first)."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("round") is not None and r.get("response_text") is not None:
            by_round.setdefault(int(r["round"]), []).append(r)
    for k, recs in by_round.items():
        picked = (pick_examples(recs, per_round) if per_round is not None else
                  [r for r in recs if r.get("status") not in (None, "skipped")])
        scores = scorer(k, [r["rollout_id"] for r in picked])
        for r in picked:
            if r["rollout_id"] in scores:
                r["token_scores"] = scores[r["rollout_id"]]
