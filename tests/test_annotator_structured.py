"""Structured outputs of the annotators: the reply schema, its token cap, and the requests that
carry it, against the fake OpenAI server (which checks and records what it is sent)."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from tests.openai_fake_server import FakeOpenAI, make_item, tiny_tokenizer
from trace_rl.stages.annotators import AnnotateConfig, annotate_rows
from trace_rl.stages.annotators.parse import MAX_LABEL_CHARS, parse_reply
from trace_rl.stages.annotators.schema import reply_schema, reply_token_cap, uses_schema

KEY = "sk-structured-test"
BODY = "Step 1: add the units.\nKEY carry the one.\nThe answer is \\boxed{42}."
ECHO = "FAULT:ECHO\n" + BODY
REPEATS = "dropped repeated segment ids"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _cfg(base_url: str, **api) -> AnnotateConfig:
    opts = {"base_url": base_url, "model": "fake-model", "api_key_env": "TRACE_TEST_KEY",
            "max_retries": 1, "timeout_s": 5.0, "backoff_base_s": 0.01, "concurrency": 4, **api}
    return AnnotateConfig(backend="api", coverage_cap=1.0, api=opts)


def _random_reply(rng: random.Random, n: int) -> object:
    ids = [rng.choice([rng.randint(1, n), rng.randint(-2, n + 3), True, 1.5, "2"])
           for _ in range(rng.randint(0, n + 2))]
    obj: dict = {"segment_ids": ids if rng.random() < 0.9 else "1",
                 "label": "x" * rng.choice([0, 5, MAX_LABEL_CHARS, MAX_LABEL_CHARS + 1])}
    if rng.random() < 0.1:
        obj["extra"] = 1
    if rng.random() < 0.1:
        obj.pop("label")
    return obj


def test_schema_admits_only_replies_that_parse_cleanly():
    """Property: whatever a schema-constrained decoder may emit parses as ok or no_spans with no
    id out of range (a repeated id is admitted and kept once); and the clean replies of the
    parser are admitted by the schema."""
    rng = random.Random(0)
    admitted = 0
    for _ in range(3000):
        n = rng.randint(1, 12)
        reply = _random_reply(rng, n)
        valid = jsonschema.Draft202012Validator(reply_schema(n)).is_valid(reply)
        parsed = parse_reply(json.dumps(reply), n)
        clean = parsed.status in ("ok", "no_spans") and parsed.note in (None, REPEATS)
        if valid:
            admitted += 1
            assert clean, (reply, parsed)
        elif clean and set(reply) == {"segment_ids", "label"}:
            assert len(reply["label"]) > MAX_LABEL_CHARS or len(reply["segment_ids"]) > n, reply
    assert admitted > 300  # the property was exercised on admitted replies, not vacuously


@pytest.mark.parametrize("n", [1, 9, 10, 99, 100, 400])
def test_token_cap_fits_the_longest_valid_reply(tok, n):
    longest = json.dumps({"segment_ids": [n] * n, "label": "~" * MAX_LABEL_CHARS})
    assert jsonschema.Draft202012Validator(reply_schema(n)).is_valid(json.loads(longest))
    assert len(tok.encode(longest, add_special_tokens=False)) <= reply_token_cap(n)
    # One character per token is the worst case of a byte-level tokenizer on ASCII.
    assert len(longest) <= reply_token_cap(n)


def test_auto_mode_when_thinking():
    assert uses_schema("auto") and uses_schema("json_schema") and uses_schema("vllm")
    assert not uses_schema("auto", thinking=True) and not uses_schema("off")


def test_schema_by_default_turns_an_echo_into_json(tok, tmp_path, monkeypatch):
    """Default `auto`: each request carries its own schema (ids up to its segment count) and the
    capped budget; the reply a small model echoes without one becomes a parse error with `off`."""
    monkeypatch.setenv("TRACE_TEST_KEY", KEY)
    items = [make_item(tok, f"e{i}", "key", ECHO + "\nmore line " * i) for i in range(3)]
    items.append(make_item(tok, "plain", "error", BODY))
    with FakeOpenAI() as fake:
        cfg = _cfg(fake.base_url)
        rows = annotate_rows(cfg, items, tok, cache_dir=str(tmp_path / "c"), progress=False)
        assert [r["status"] for r in rows] == ["ok"] * 4
        assert len(fake.schemas) == 4
        for req in fake.requests:
            body = req["body"]
            schema = body["response_format"]["json_schema"]["schema"]
            n = schema["properties"]["segment_ids"]["maxItems"]
            assert body["response_format"]["type"] == "json_schema"
            assert body["max_tokens"] == min(cfg.api.max_tokens, reply_token_cap(n))
        maxima = sorted(s["properties"]["segment_ids"]["items"]["maximum"] for s in fake.schemas)
        assert maxima == [3, 4, 5, 6]  # 4 segments for e0..., 3 for the plain body

        off = _cfg(fake.base_url, structured_output="off")
        before = len(fake.requests)
        rows_off = annotate_rows(off, items, tok, cache_dir=str(tmp_path / "c"), progress=False)
        # Another request shape is another cache key: every item is asked again.
        assert len(fake.requests) - before == 4
        assert all("response_format" not in r["body"] for r in fake.requests[before:])
        assert all(r["body"]["max_tokens"] == off.api.max_tokens for r in fake.requests[before:])
    assert [r["status"] for r in rows_off] == ["parse_error"] * 3 + ["ok"]
    assert rows_off[0]["raw_response"].startswith("[1] FAULT:ECHO")


def test_auto_falls_back_when_the_endpoint_rejects_schemas(tok, monkeypatch, caplog):
    monkeypatch.setenv("TRACE_TEST_KEY", KEY)
    items = [make_item(tok, f"r{i}", "key", f"line {i}\nKEY step {i}") for i in range(12)]
    with FakeOpenAI(structured=False) as fake:
        rows = annotate_rows(_cfg(fake.base_url), items, tok, progress=False)
        with_schema = [r for r in fake.requests if "response_format" in r["body"]]
        without = [r for r in fake.requests if "response_format" not in r["body"]]
    assert [r["status"] for r in rows] == ["ok"] * 12
    assert 1 <= len(with_schema) <= 4  # only requests already in flight (concurrency 4)
    assert len(without) == 12  # each item answered once, without the schema
    assert "rejects structured outputs" in caplog.text

    with FakeOpenAI(structured=False) as fake:  # json_schema demands it: no silent fallback
        forced = annotate_rows(_cfg(fake.base_url, structured_output="json_schema"), items[:3],
                               tok, progress=False)
        assert len(fake.requests) == 3  # a 400 is not retried
    assert [r["status"] for r in forced] == ["api_error"] * 3
    assert "HTTP 400" in forced[0]["error"] and "response_format" in forced[0]["error"]


def test_vllm_mode_sends_vllms_own_field(tok, monkeypatch):
    monkeypatch.setenv("TRACE_TEST_KEY", KEY)
    items = [make_item(tok, "v", "key", ECHO)]
    with FakeOpenAI() as fake:
        rows = annotate_rows(_cfg(fake.base_url, structured_output="vllm"), items, tok,
                             progress=False)
        body = fake.requests[0]["body"]
    assert rows[0]["status"] == "ok" and "response_format" not in body
    assert body["structured_outputs"]["disable_any_whitespace"] is True
    assert body["structured_outputs"]["json"] == reply_schema(4)
