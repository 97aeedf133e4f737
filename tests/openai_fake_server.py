"""A real HTTP server on 127.0.0.1 speaking OpenAI chat completions, with injected faults.

The reply to a request is decided by a marker inside the response under annotation:
    FAULT:429      first try -> 429 with Retry-After: 1, then a normal reply
    FAULT:500      first two tries -> 500, then a normal reply
    FAULT:500ALL   always 500
    FAULT:400      400 (not retried)
    FAULT:SLOW     every try sleeps `slow_s` before replying (longer than the client timeout)
    FAULT:BADJSON  a reply that is not JSON
    FAULT:RANGE    ids [99, 1] (99 out of range)
    FAULT:ALLRANGE ids [99]
    FAULT:EMPTY    ids []
    FAULT:ECHO     what a small model does unprompted: the numbered segments echoed back (not
                   JSON), unless the request constrains the reply by a JSON schema
otherwise: the ids of segments containing "KEY" (or [1]) with label "fake label".
Structured outputs: a request's `response_format` (OpenAI json_schema) or `structured_outputs`
(vLLM) is checked like a real endpoint does (a malformed one is a 400), recorded in `schemas`
(the other faults keep their replies, so parsing is still exercised).
`FakeOpenAI(structured=False)` answers any schema field with a 400
naming `response_format`, as an endpoint without the feature does.
GET /health answers 200. Run as `python -m tests.openai_fake_server --model M --port P` it
mimics a vLLM OpenAI server (used to test the self annotator's server lifecycle).
Also holds small test helpers shared by the annotator tests and the benchmark.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

_DATA = re.compile(r"<<<BEGIN_RESPONSE_DATA>>>\n(.*?)\n<<<END_RESPONSE_DATA>>>", re.DOTALL)
_SEG = re.compile(r"^\[(\d+)\] (.*)$", re.MULTILINE)
_FAULT = re.compile(r"FAULT:([A-Z0-9]+)")


class _Server(ThreadingHTTPServer):
    # The stdlib default backlog of 5 drops connections under 32 concurrent clients.
    request_queue_size = 512
    daemon_threads = True
    block_on_close = False


class FakeOpenAI:
    """The server plus what it saw: requests (bodies, headers, times) and tries per fault key."""

    def __init__(self, latency_s: float = 0.0, slow_s: float = 3.0, model: str | None = None,
                 structured: bool = True):
        self.latency_s, self.slow_s, self.model = latency_s, slow_s, model
        self.structured = structured
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.schemas: list[dict] = []  # the schema of each accepted constrained request
        self.tries: Counter[str] = Counter()
        self.httpd = _Server(("127.0.0.1", 0), _handler_for(self))
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def decide(self, body: dict) -> tuple[int, dict, dict]:
        """(HTTP status, JSON body, extra headers) for one chat request."""
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        data = _DATA.search(user)
        segments = _SEG.findall(data.group(1)) if data else []
        fault = _FAULT.search(data.group(1)) if data else None
        name = fault.group(1) if fault else ""
        with self.lock:
            self.tries[user] += 1
            n = self.tries[user]
        if self.model is not None and body.get("model") != self.model:
            return 404, _error(f"model {body.get('model')!r} not served"), {}
        try:
            schema = _request_schema(body)
        except ValueError as e:
            return 400, _error(str(e)), {}
        if schema is not None and not self.structured:
            return 400, _error("response_format is not supported by this endpoint"), {}
        if schema is not None:
            with self.lock:
                self.schemas.append(schema)
        if name == "429" and n == 1:
            return 429, _error("rate limited"), {"Retry-After": "1"}
        if (name == "500" and n <= 2) or name == "500ALL":
            return 500, _error("internal error"), {}
        if name == "400":
            return 400, _error("bad request"), {}
        if name == "SLOW":
            time.sleep(self.slow_s)
        content = {
            "BADJSON": 'Segments 1 and 2 {"segment_ids": [1,',
            "RANGE": json.dumps({"segment_ids": [99, 1], "label": "range"}),
            "ALLRANGE": json.dumps({"segment_ids": [99], "label": "range"}),
            "EMPTY": json.dumps({"segment_ids": [], "label": ""}),
            "ECHO": "\n".join(f"[{i}] {text}" for i, text in segments),
        }.get(name)
        if content is None or (schema is not None and name == "ECHO"):
            ids = [int(i) for i, text in segments if "KEY" in text] or [1]
            content = json.dumps({"segment_ids": ids, "label": "fake label"})
        return 200, _completion(body.get("model", "fake"), content), {}


def _request_schema(body: dict) -> dict | None:
    """The JSON schema a request constrains its reply by (None when unconstrained); ValueError
    for a malformed field, as real endpoints reject them."""
    fmt, vllm = body.get("response_format"), body.get("structured_outputs")
    if fmt is not None and vllm is not None:
        raise ValueError("give response_format or structured_outputs, not both")
    if vllm is not None:
        if not isinstance(vllm, dict) or not isinstance(vllm.get("json"), dict):
            raise ValueError("structured_outputs.json must be a JSON schema object")
        return vllm["json"]
    if fmt is None or fmt.get("type") in ("text", "json_object"):
        return None
    spec = fmt.get("json_schema") if fmt.get("type") == "json_schema" else None
    if not (isinstance(spec, dict) and spec.get("name") and isinstance(spec.get("schema"), dict)):
        raise ValueError("response_format json_schema needs json_schema.name and .schema")
    return spec["schema"]



def _error(message: str) -> dict:
    return {"error": {"message": message, "type": "fake_error", "code": None}}


def _completion(model: str, content: str) -> dict:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _handler_for(server: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints
        # Headers and body go out in two writes; with Nagle on, the body waits for the client's
        # delayed ACK (~40 ms a reply). Real servers (uvicorn, vLLM's) set TCP_NODELAY too.
        disable_nagle_algorithm = True

        def log_message(self, *args) -> None:  # quiet: tests capture output
            pass

        def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
            blob = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(blob)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(blob)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._send(404, _error("not found"))

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            with server.lock:
                server.requests.append(
                    {
                        "t": time.monotonic(),
                        "body": body,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                    }
                )
            if server.latency_s:
                time.sleep(server.latency_s)
            if not self.path.endswith("/chat/completions"):
                self._send(404, _error("not found"))
                return
            self._send(*server.decide(body))

    return Handler


def local_rule(prompt: dict, segments: list[str], route: str) -> tuple[list[int], str]:
    """A tiny rule for tests: key = segments equal to 'six'; error = segments starting 'one'."""
    if route == "key":
        return [i + 1 for i, s in enumerate(segments) if s == "six"], "key step"
    return [i + 1 for i, s in enumerate(segments) if s.startswith("one")], "first error"


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in a blink, with a Qwen-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "Step 1: add the units. KEY carry the one.",
        "The answer is \\boxed{42}.",
        '{"segment_ids": [1, 2], "label": "carry"}',
        "system user assistant",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    template = (
        "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
        "{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=template,
    )


def make_item(tokenizer, rollout_id: str, route: str, text: str) -> dict:
    """An annotate item whose ids are the tokenizer's encoding of `text` plus the eos token."""
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return {
        "rollout_id": rollout_id,
        "route": route,
        "problem": "What is 40 + 2?",
        "answer": "42",
        "solution": "40 + 2 = 42.",
        "meta": "{}",
        "response_text": tokenizer.decode(ids, skip_special_tokens=True),
        "response_token_ids": ids,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="fake OpenAI-compatible server (tests only)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    args, _ = parser.parse_known_args()
    fake = FakeOpenAI(model=args.model, latency_s=args.latency)
    fake.httpd.server_close()
    fake.httpd = _Server((args.host, args.port), _handler_for(fake))
    fake.httpd.serve_forever()


if __name__ == "__main__":
    main()
