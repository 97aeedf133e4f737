"""`trace-rl inspect`: terminal summary values and the HTML view, rendered in headless Chromium.

The run directory is written with the real RunStore and schemas. Span ranges, coverage and
counts below are hand-computed from the texts, so each assertion can fail.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from trace_rl.data_schemas import ANNOTATIONS, PROMPTS, ROLLOUTS, VERDICTS, extend_metrics
from trace_rl.data_schemas.errors import TraceError
from trace_rl.pipeline.html_view import render_page
from trace_rl.pipeline.inspect import inspect_path
from trace_rl.pipeline.inspect_terminal import example_text
from trace_rl.pipeline.store import RunStore

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent

T1 = "Step 1: 7 + 5 = 12, write 2 carry 1.\nStep 2: 1 + 2 + 1 = 4.\nSo the answer is \\boxed{42}."
XSS = "<script>alert(1)</script>"
IMG = "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">"
T2 = f"Step 1: 7 + 5 = 11 {XSS} oops.\n{IMG} Step 2: so \\boxed{{41}}."
T3 = "答案是 😀 42。计算：十七加二十五等于四十二 🚀 \\boxed{42}"
T4 = "I think it is \\boxed{40}."
T5 = "Step 1: 7 + 5 = 12 and then the response was cut off because it ran out of"
EVIL_LABEL = 'wrong "sum" <b>bold</b>'


def _span(text: str, piece: str, label: str, *, at_end: bool = False) -> dict:
    start = text.rindex(piece) if at_end else text.index(piece)
    # Token positions are not used by the view; give each span a distinct, valid range.
    return {"segment_ids": [1], "char_start": start, "char_end": start + len(piece),
            "token_start": start // 4, "token_end": (start + len(piece)) // 4 + 1, "label": label}


SPANS = {
    "r1": [_span(T1, "Step 1: 7 + 5 = 12, write 2 carry 1.", "carry"),          # very start
           _span(T1, "\\boxed{42}.", "final answer", at_end=True)],              # very end
    "r2": [_span(T2, f"7 + 5 = 11 {XSS}", EVIL_LABEL), _span(T2, " oops.", "")],  # adjacent spans
    "r3": [_span(T3, "十七加二十五等于四十二 🚀", "单位换算 ✓")],
    "r4": [],
    "r5": [],
}
# rollout_id: (prompt, text, n_tokens, finish, correct, route, status, coverage)
ROWS = {
    "r1": ("p1", T1, 20, "stop", True, "key", "ok", 0.25),
    "r2": ("p1", T2, 16, "stop", False, "error", "ok", 0.125),
    "r3": ("p2", T3, 10, "stop", True, "key", "ok", 0.2),
    "r4": ("p2", T4, 8, "stop", False, "error", "no_spans", None),  # nothing distilled: NULL
    "r5": ("p2", T5, 32, "length", False, "none", "skipped", None),  # not annotated: NULL
}


def _write_run(root: Path) -> RunStore:
    store = RunStore(str(root))
    common = {"stage": "test", "config_fingerprint": "cfg"}
    with store.writer("prompts", PROMPTS, **common) as w:
        w.write_rows([
            {"prompt_id": "p1", "problem": "What is 17 + 25? <b>not bold</b> & more",
             "answer": "42",
             "solution": "17 + 25 = 42", "source": "test", "meta": "{}"},
            {"prompt_id": "p2", "problem": "十七加二十五是多少？", "answer": "42", "solution": None,
             "source": "test", "meta": "{}"},
        ])
    rollouts, verdicts, annotations = [], [], []
    for i, (rid, (pid, text, n, finish, correct, route, status, cov)) in enumerate(ROWS.items()):
        rollouts.append({
            "rollout_id": rid, "round": 3, "prompt_id": pid, "sample_index": i, "checkpoint": "c3",
            "prompt_token_ids": [1, 2, 3], "response_text": text,
            "response_token_ids": list(range(n)),
            "response_logprobs": [-0.5] * n, "finish_reason": finish, "engine": "hf",
            "sampling": json.dumps({"enable_thinking": True, "temperature": 1.0}),
        })
        verdicts.append({"rollout_id": rid, "reward": float(correct), "correct": correct,
                         "extracted_answer": "42" if correct else None,
                         "status": "ok" if rid != "r5" else "no_answer", "detail": None})
        annotations.append({"rollout_id": rid, "route": route, "annotator": "rule",
                            "spans": SPANS[rid],
                            "coverage": cov, "status": status, "raw_response": None, "error": None,
                            "latency_s": 0.01})
    # Two parts for rollouts: the reader must follow the manifest across parts.
    with store.writer("round-0003/rollouts", ROLLOUTS, **common) as w:
        w.write_rows(rollouts[:2])
        w.write_rows(rollouts[2:])
    with store.writer("round-0003/verdicts", VERDICTS, **common) as w:
        w.write_rows(verdicts)
    with store.writer("round-0003/annotations", ANNOTATIONS, **common) as w:
        w.write_rows(annotations)
    metrics = extend_metrics(["kl/forward"])
    steps = [2, 0, 1]  # written out of order: first/last must follow the step column
    with store.writer("round-0003/train", metrics, allow_extra=True, **common) as w:
        w.write_rows([{"step": s, "round": 3, "loss": 1.0 - 0.25 * s, "pg_loss": 0.5,
                       "kl_loss": 0.1 * s,
                       "kl_weight": 0.5, "entropy": 1.5 - 0.5 * s, "response_len_mean": 20.0,
                       "span_token_frac": 0.2, "clip_frac": 0.0, "grad_norm": 1.0, "lr": 1e-5,
                       "tokens_per_s": 100.0, "peak_mem_bytes": 1000 + s, "kl/forward": 0.01 * s}
                      for s in steps])
    return store


@pytest.fixture(scope="module")
def run_dir() -> Path:
    root = Path(tempfile.mkdtemp(prefix="inspect-run-")) / "demo"
    _write_run(root)
    return root


def test_run_summary_values(run_dir: Path, capsys) -> None:
    out = inspect_path(str(run_dir), examples=2)
    assert out["kind"] == "run"
    ds = out["datasets"]
    assert list(ds) == ["prompts", "round-0003/rollouts", "round-0003/verdicts",
                        "round-0003/annotations", "round-0003/train"]
    ann = ds["round-0003/annotations"]
    assert ann["rows"] == 5 and ann["round"] == 3 and ann["schema"] == "annotations"
    assert ann["status"] == {"ok": 3, "no_spans": 1, "skipped": 1}
    assert ann["route"] == {"key": 2, "error": 2, "none": 1}
    assert ann["spans"] == 5 and ann["spans_by_route"] == {"key": 3, "error": 2, "none": 0}
    assert ann["labels"] == {"carry": 1, "final answer": 1, EVIL_LABEL: 1, "(no label)": 1,
                             "单位换算 ✓": 1}
    assert ann["rows_without_spans"] == 2
    # one meaning of coverage: the mean over rows with spans (r4 no_spans, r5 skipped: NULL)
    assert ann["coverage"]["mean"] == pytest.approx((0.25 + 0.125 + 0.2) / 3)
    assert ann["coverage"]["max"] == pytest.approx(0.25) and ann["not_annotated"] == 1  # r5 skipped
    assert ann["coverage_of_rows_with_spans"]["mean"] == pytest.approx((0.25 + 0.125 + 0.2) / 3)
    ver = ds["round-0003/verdicts"]
    assert ver["correct"] == 2 and ver["correct_rate"] == pytest.approx(0.4)
    assert ver["reward_mean"] == pytest.approx(0.4) and ver["status"] == {"ok": 4, "no_answer": 1}
    ro = ds["round-0003/rollouts"]
    assert ro["rows"] == 5 and ro["prompts"] == 2
    assert ro["finish_reasons"] == {"stop": 4, "length": 1}
    assert ro["response_tokens"] == {"mean": 17.2, "min": 8, "median": 16, "max": 32}
    tr = ds["round-0003/train"]
    assert tr["steps"] == [0, 2]
    assert tr["metrics"]["loss"] == {"first": 1.0, "last": 0.5}
    assert tr["metrics"]["kl_forward"] == {"first": 0.0, "last": pytest.approx(0.02)}
    assert tr["metrics"]["peak_mem_bytes"] == {"first": 1000, "last": 1002}
    assert ds["prompts"]["with_solution"] == 1
    # Examples alternate a key-span row and an error-span row.
    # one key-span and one error-span example, from two different prompts (r1 and r2 share p1)
    (picked,) = out["examples"].values()
    assert [ROWS[r][5] for r in picked] == ["key", "error"]
    assert len({ROWS[r][0] for r in picked}) == 2
    text = capsys.readouterr().out
    assert "round-0003/annotations" in text and "no_spans 1" in text and "length 1" in text
    assert "十七加二十五等于四十二 🚀⟫⟦单位换算 ✓⟧" in text and f"⟫⟦{EVIL_LABEL}⟧" in text  # r3's, r2's spans
    assert XSS in text  # the terminal shows the raw text, not rich markup interpretations of it


def test_eval_samples_of_a_run_are_found_and_summarised(tmp_path: Path, capsys) -> None:
    # evaluate writes eval/<ckpt>/<benchmark>/ as a store dataset whose one part is the file
    # samples.parquet.
    from trace_rl.data_schemas import EVAL_SAMPLES, rows_to_table
    from trace_rl.pipeline.layout import eval_samples_dataset

    root = tmp_path / "run"
    _write_run(root)
    rows = [{"benchmark": "math500", "problem_id": f"p{i}", "sample_index": 0, "response_text": "x",
             "extracted_answer": None, "correct": i < 3, "num_tokens": 10 + i} for i in range(4)]
    with RunStore(str(root)).writer(eval_samples_dataset("initial", "math500"), EVAL_SAMPLES,
                                    stage="evaluate", config_fingerprint="c") as w:
        w.write_table(rows_to_table(rows, EVAL_SAMPLES), part="samples.parquet")
    assert (root / "eval" / "initial" / "math500" / "samples.parquet").is_file()
    out = inspect_path(str(root), examples=0)
    got = out["datasets"]["eval/initial/math500"]
    assert got["benchmarks"]["math500"] == {"samples": 4, "accuracy": 0.75, "mean_tokens": 11.5}
    assert got["complete"] is True


def test_an_evaluation_is_headed_by_its_policy_not_a_round(tmp_path: Path, capsys) -> None:
    """eval/round-0004/ is policy 4 (what sampled round 4), listed after every round, never
    under a "round 4" rule; round data is headed by the round and the policy that sampled it."""
    from trace_rl.data_schemas import EVAL_SAMPLES, rows_to_table
    from trace_rl.pipeline.layout import eval_samples_dataset

    root = tmp_path / "run"
    _write_run(root)  # round-0003
    rows = [{"benchmark": "testbed", "problem_id": "p0", "sample_index": 0, "response_text": "x",
             "extracted_answer": None, "correct": True, "num_tokens": 3}]
    for ckpt in ("initial", "round-0004"):
        with RunStore(str(root)).writer(eval_samples_dataset(ckpt, "testbed"), EVAL_SAMPLES,
                                        stage="evaluate", config_fingerprint="c") as w:
            w.write_table(rows_to_table(rows, EVAL_SAMPLES), part="samples.parquet")
    out = inspect_path(str(root), examples=0)
    labels = list(out["datasets"])
    assert labels[-2:] == ["eval/initial/testbed", "eval/round-0004/testbed"]
    assert out["datasets"]["eval/round-0004/testbed"]["round"] is None
    printed = capsys.readouterr().out
    assert "round 3 (sampled by policy 3)" in printed
    assert "policy 0 (initial, the initial model; it sampled round 0)" in printed
    # round 3 is the run's last: policy 4 sampled nothing, and no line says it did
    assert "policy 4 (round-0004, what round 3's train wrote)" in printed
    assert "round 4" not in printed


def test_example_text_styles_exact_span_ranges() -> None:
    rec = {"response_text": T1, "spans": SPANS["r1"], "route": "key"}
    rendered = example_text(rec)
    styled = [(s.start, s.end, str(s.style)) for s in rendered.spans if "green" in str(s.style)
              and "underline" in str(s.style)]
    label1 = "⟫⟦carry⟧"
    end1 = len("Step 1: 7 + 5 = 12, write 2 carry 1.")
    # shifted by the first span's opening mark, its closing mark and label, and its own opening
    start2 = len(T1) - len("\\boxed{42}.") + 1 + len(label1) + 1
    assert styled == [(1, 1 + end1, "bold green underline"),
                      (start2, start2 + 11, "bold green underline")]
    cut = len(T1) - len("\\boxed{42}.")
    assert rendered.plain == "⟪" + T1[:end1] + label1 + T1[end1:cut] + "⟪" + T1[cut:] + "⟫⟦final answer⟧"
    err = example_text({"response_text": T2, "spans": SPANS["r2"], "route": "error"})
    assert {str(s.style) for s in err.spans} >= {"bold red underline", "red dim"}


def test_dataset_file_and_round_paths(run_dir: Path, capsys) -> None:
    ann_dir = run_dir / "round-0003" / "annotations"
    assert inspect_path(str(ann_dir), examples=0)["kind"] == "dataset"
    one = inspect_path(str(ann_dir / "part-00000.parquet"), examples=1)
    assert one["kind"] == "file" and one["datasets"]["part-00000.parquet"]["spans"] == 5
    (picked,) = one["examples"].values()  # a key-span example (r1 of p1 or r3 of p2)
    assert len(picked) == 1 and ROWS[picked[0]][5] == "key"
    rnd = inspect_path(str(run_dir / "round-0003"), examples=0)
    assert rnd["kind"] == "round"
    assert list(rnd["datasets"]) == ["rollouts", "verdicts", "annotations", "train"]
    capsys.readouterr()


def test_lone_shard_without_manifest_or_siblings(run_dir: Path, tmp_path: Path, capsys) -> None:
    lone = tmp_path / "copied" / "annotations"
    lone.mkdir(parents=True)
    shard = run_dir / "round-0003" / "annotations" / "part-00000.parquet"
    shutil.copy(shard, lone / "shard.parquet")
    page = tmp_path / "lone.html"
    out = inspect_path(str(lone), html=str(page), examples=1)
    assert out["kind"] == "dataset" and out["datasets"]["annotations"]["complete"] is False
    assert "incomplete: no manifest" in capsys.readouterr().out
    dom = _Dom()
    dom.feed(page.read_text(encoding="utf-8"))
    # No rollouts to take the text from: each span is still one mark, showing its char range.
    assert len(dom.marks) == 5 and dom.marks[0]["text"] == f"[chars 0–{len(T1.splitlines()[0])}]"
    assert {c["data-correct"] for c in dom.cards} == {"unknown"}


def test_html_falls_back_to_rollouts(run_dir: Path, tmp_path: Path, capsys) -> None:
    page = tmp_path / "rollouts.html"
    out = inspect_path(str(run_dir / "round-0003" / "rollouts"), html=str(page), examples=0)
    assert out["html"]["responses"] == 5 and out["html"]["spans"] == 0
    assert out["html"]["correct"] == 2  # verdicts joined from the sibling directory
    capsys.readouterr()


def test_two_rounds_listed_by_round_and_html_shows_every_round(run_dir: Path, tmp_path: Path,
                                                                capsys) -> None:
    run2 = tmp_path / "run2"
    shutil.copytree(run_dir, run2)
    shutil.copytree(run2 / "round-0003", run2 / "round-0004")
    shutil.rmtree(run2 / "round-0004" / "train")
    page = tmp_path / "two.html"
    out = inspect_path(str(run2), html=str(page), examples=1)
    assert [s["round"] for s in out["datasets"].values()] == [None, 3, 3, 3, 3, 4, 4, 4]
    assert out["html"]["responses"] == 10  # both rounds; the page's picker selects one
    text = page.read_text(encoding="utf-8")
    assert "round-0003/annotations, round-0004/annotations" in text
    printed = capsys.readouterr().out
    assert printed.index("round 3") < printed.index("round 4")


def test_not_a_dataset_gives_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(TraceError, match="holds no trace-rl dataset"):
        inspect_path(str(tmp_path))
    with pytest.raises(TraceError, match="no such file"):
        inspect_path(str(tmp_path / "missing"))
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1]}), plain)
    with pytest.raises(TraceError, match="not a trace-rl dataset"):
        inspect_path(str(plain))
    bogus = tmp_path / "bogus.parquet"
    bogus.write_bytes(b"PAR1 not really")
    with pytest.raises(TraceError, match="not a readable Parquet file"):
        inspect_path(str(bogus))


def test_cli_inspect_exit_codes(run_dir: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120")
    cmd = [sys.executable, "-m", "trace_rl.flows.cli", "inspect"]
    run = {"capture_output": True, "text": True, "env": env, "cwd": tmp_path,
           "timeout": 120}
    ok = subprocess.run(cmd + [str(run_dir), "--examples", "1"], check=False, **run)
    assert ok.returncode == 0, ok.stderr
    # piped: no styles, so both ends of the span are marked in the text
    assert "round-0003/annotations" in ok.stdout and "⟪" in ok.stdout and "⟫⟦" in ok.stdout
    bad = subprocess.run(cmd + [str(tmp_path)], check=False, **run)
    assert bad.returncode == 2 and "holds no trace-rl dataset" in bad.stderr


# the HTML view -------------------------------------------------------------------------------
class _Dom(HTMLParser):
    """What the tests check in a rendered DOM: marks (with their text), cards, tag counts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.marks: list[dict] = []
        self.cards: list[dict] = []
        self.tags: dict[str, int] = {}
        self.body: dict = {}
        self._in_mark = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "body":
            self.body = a
        if tag == "article":
            self.cards.append(a)
        if tag == "mark":
            self.marks.append({"class": a.get("class", ""), "label": a.get("data-label"),
                               "title": a.get("title", ""), "text": ""})
            self._in_mark += 1

    def handle_endtag(self, tag):
        if tag == "mark":
            self._in_mark -= 1

    def handle_data(self, data):
        if self._in_mark:
            self.marks[-1]["text"] += data


def _expected_marks() -> list[tuple[str, str, str]]:
    out = []
    for rid, spans in SPANS.items():
        text, route = ROWS[rid][1], ROWS[rid][5]
        out += [(route, s["label"], text[s["char_start"]:s["char_end"]]) for s in spans]
    return sorted(out)


def _check_marks(dom: _Dom) -> None:
    spans = [m for m in dom.marks if "span" in m["class"].split()]
    got = sorted((m["class"].split()[1], m["label"], m["text"]) for m in spans)
    assert got == _expected_marks()
    assert len(spans) == len(dom.marks) == 5
    assert all(m["label"] in m["title"] for m in spans)


def test_html_page_source(run_dir: Path, tmp_path: Path, capsys) -> None:
    page = tmp_path / "view.html"
    out = inspect_path(str(run_dir / "round-0003" / "annotations"), html=str(page), examples=0)
    assert out["html"]["responses"] == 5 and out["html"]["spans"] == 5
    assert out["html"]["correct"] == 2 and out["html"]["incorrect"] == 3
    source = page.read_text(encoding="utf-8")
    dom = _Dom()
    dom.feed(source)
    _check_marks(dom)
    assert dom.tags.get("script") == 1 and "img" not in dom.tags and "b" not in dom.tags
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in source
    assert "http://" not in source and "https://" not in source  # self-contained
    assert [c["data-correct"] for c in dom.cards] == ["true", "false", "true", "false", "false"]
    assert "What is 17 + 25? &lt;b&gt;not bold&lt;/b&gt; &amp; more" in source
    capsys.readouterr()


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}"]
    return subprocess.run([CHROMIUM, *flags, *args], check=False, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason=f"{CHROMIUM} absent: run scripts/install_chromium.sh to render the page")
def test_html_rendered_in_headless_chromium(run_dir: Path, tmp_path: Path, capsys) -> None:
    page = tmp_path / "view.html"
    inspect_path(str(run_dir), html=str(page), examples=0)
    capsys.readouterr()
    rendered = _chromium(["--dump-dom", page.as_uri()], tmp_path)
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    dom = _Dom()
    dom.feed(rendered.stdout)
    _check_marks(dom)
    # The page's own script ran (so its CSP hash is right), and nothing from the data did.
    assert dom.body.get("data-ready") == "1"
    assert "data-pwned" not in dom.body and dom.tags.get("script") == 1 and "img" not in dom.tags
    # The page leads with spans: it opens on the responses that have spans (r1-r3), the
    # no_spans and skipped ones hidden until "All" or their status is chosen.
    assert dom.body.get("data-filter") == "spans" and "showing 3 of 5" in rendered.stdout
    assert [("hidden" in c) for c in dom.cards] == [c["data-spans"] != "true" for c in dom.cards]
    assert [c["data-spans"] for c in dom.cards] == ["true", "true", "true", "false", "false"]
    assert "Has spans (3)" in rendered.stdout
    # counts per status, each a filter: #filter=status-no_spans shows only r4
    by_status = _Dom()
    by_status.feed(_chromium(["--dump-dom", page.as_uri() + "#filter=status-no_spans"], tmp_path).stdout)
    assert [c["data-status"] for c in by_status.cards if "hidden" not in c] == ["no_spans"]
    every = _Dom()
    every.feed(_chromium(["--dump-dom", page.as_uri() + "#filter=all"], tmp_path).stdout)
    assert not any("hidden" in c for c in every.cards)
    # The filter: opened as #filter=incorrect, exactly the correct rollouts are hidden.
    filtered = _chromium(["--dump-dom", page.as_uri() + "#filter=incorrect"], tmp_path)
    fdom = _Dom()
    fdom.feed(filtered.stdout)
    assert fdom.body.get("data-filter") == "incorrect"
    hidden = [("hidden" in c) for c in fdom.cards]
    assert hidden == [c["data-correct"] != "false" for c in fdom.cards]
    assert sum("hidden" not in c for c in fdom.cards) == 3 and "showing 3 of 5" in filtered.stdout
    shot = Path(os.environ.get("TRACE_INSPECT_SCREENSHOT", tmp_path / "inspect.png"))
    snap = _chromium([f"--screenshot={shot}", "--window-size=1200,900", "--hide-scrollbars",
                      page.as_uri()], tmp_path)
    assert snap.returncode == 0, snap.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1200, 900)


def test_render_page_escapes_every_field() -> None:
    rec = {"rollout_id": "<u>id</u>", "spans": [], "route": "none", "response_text": "a & b",
           "problem": None, "correct": None, "status": "<x>", "coverage": None}
    page = render_page([rec], title="<t>", source="</h1><script>bad()</script>")
    dom = _Dom()
    dom.feed(page)
    assert dom.tags.get("script") == 1 and "u" not in dom.tags and "x" not in dom.tags
    assert "&lt;u&gt;id&lt;/u&gt;" in page and "a &amp; b" in page


def test_html_of_verdicts_and_eval_samples_shows_their_responses(run_dir: Path, tmp_path: Path) -> None:
    from trace_rl.data_schemas import EVAL_SAMPLES, rows_to_table
    from trace_rl.pipeline.layout import eval_samples_dataset

    out = inspect_path(str(run_dir / "round-0003" / "verdicts"), html=str(tmp_path / "v.html"), examples=0)
    assert out["html"]["responses"] == len(ROWS) and out["html"]["correct"] == 2
    rows = [{"benchmark": "math500", "problem_id": f"p{i}", "sample_index": 0, "response_text": f"answer {i}",
             "extracted_answer": str(i), "correct": i == 0, "num_tokens": 3} for i in range(3)]
    with RunStore(str(run_dir)).writer(eval_samples_dataset("initial", "math500"), EVAL_SAMPLES,
                                       stage="evaluate", config_fingerprint="c") as w:
        w.write_table(rows_to_table(rows, EVAL_SAMPLES), part="samples.parquet")
    out = inspect_path(str(run_dir / "eval" / "initial" / "math500"), html=str(tmp_path / "e.html"), examples=0)
    assert out["html"]["responses"] == 3 and out["html"]["correct"] == 1
    assert "answer 2" in (tmp_path / "e.html").read_text()
    with pytest.raises(TraceError, match="train metrics have no responses"):
        inspect_path(str(run_dir / "round-0003" / "train"), html=str(tmp_path / "t.html"), examples=0)
