"""Throughput of the api annotator against a local OpenAI-compatible server.

The server (tests/openai_fake_server.py, a real HTTP server on 127.0.0.1) waits `latency` s
per request; with `concurrency` requests in flight the ceiling is concurrency / latency
annotations per second (32 / 0.2 s = 160/s). Target: at least 80% of it. By default the
server runs in its own process, as a remote endpoint would (`--server inproc` shares ours).
The clock covers all of annotate_rows: per job, segmentation and the token check, the
request, parsing and span mapping (pipelined: each job's CPU work overlaps others' requests).
It also prints the client's CPU per annotation (one event loop does all of it, so the rate
falls as that approaches 1 / rate) and the mean request latency the rows record.

    python benchmarks/annotate_throughput.py [--n 640] [--latency 0.2] [--concurrency 32]
        [--http-client aiohttp|httpx] [--server subprocess|inproc] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trace_rl.stages.annotators import AnnotateConfig, annotate_rows
from trace_rl.stages.annotators.base import prepare
from tests.openai_fake_server import FakeOpenAI, make_item, tiny_tokenizer

MODEL = "fake-model"
RESPONSE = "\n".join(
    [f"Step {i}: add column {i}, write the digit, carry the one." for i in range(1, 30)]
    + ["KEY the carry into the hundreds column decides it.", "The answer is \\boxed{42}."]
)


@contextlib.contextmanager
def server(kind: str, latency: float) -> Iterator[str]:
    """Base URL of a fake server, in this process or in a child process."""
    if kind == "inproc":
        with FakeOpenAI(latency_s=latency, model=MODEL) as fake:
            yield fake.base_url
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.openai_fake_server",
            "--model",
            MODEL,
            "--port",
            str(port),
            "--latency",
            str(latency),
        ],
        cwd=REPO,
    )
    try:
        for _ in range(600):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=640, help="rollouts to annotate")
    parser.add_argument("--latency", type=float, default=0.2, help="server seconds per request")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--server", choices=("subprocess", "inproc"), default="subprocess")
    parser.add_argument("--cache-dir", default=None, help="reply cache (default: none)")
    parser.add_argument("--http-client", choices=("aiohttp", "httpx"), default="aiohttp")
    args = parser.parse_args()

    tok = tiny_tokenizer()
    # Distinct texts, so every rollout is a distinct request.
    items = [make_item(tok, f"r{i}", "key", f"Rollout {i}.\n{RESPONSE}") for i in range(args.n)]
    os.environ["TRACE_BENCH_KEY"] = "sk-bench-not-a-real-key"
    # The per-job CPU work before a request (segmentation, token check), timed alone.
    t0 = time.perf_counter()
    prepare(AnnotateConfig(), items, tok, "bench")
    prep_wall = time.perf_counter() - t0
    with server(args.server, args.latency) as base_url:
        cfg = AnnotateConfig(
            backend="api",
            api={
                "base_url": base_url,
                "model": MODEL,
                "api_key_env": "TRACE_BENCH_KEY",
                "concurrency": args.concurrency,
                "timeout_s": 30.0,
                "http_client": args.http_client,
            },
        )
        t0, c0 = time.perf_counter(), time.process_time()
        rows = annotate_rows(cfg, items, tok, cache_dir=args.cache_dir, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ok = sum(r["status"] == "ok" for r in rows)
    ideal = args.concurrency / args.latency
    rate = len(rows) / wall
    sent = [r["latency_s"] for r in rows if r["latency_s"] > 0]
    print(
        f"server={args.server} http_client={args.http_client} rollouts={len(rows)} ok={ok} "
        f"tokens/rollout="
        f"{len(items[0]['response_token_ids'])} wall={wall:.2f}s client_cpu={cpu:.2f}s "
        f"load1={os.getloadavg()[0]:.1f} cores={os.cpu_count()}"
    )
    print(f"annotations/s={rate:.1f} ideal={ideal:.0f}/s ratio={rate / ideal:.1%} (target >= 80%)")
    if sent:
        print(
            f"request latency: mean {sum(sent) / len(sent) * 1e3:.0f} ms, max "
            f"{max(sent) * 1e3:.0f} ms (server waits {args.latency * 1e3:.0f} ms)"
        )
    print(
        f"per-job prep (segmentation + token check), timed alone: "
        f"{prep_wall / len(rows) * 1e3:.2f} ms/rollout"
    )
    cpu_ms = cpu / len(rows) * 1e3
    print(
        f"client cpu/annotation={cpu_ms:.2f} ms: the event loop was busy {cpu / wall:.0%} of the "
        "wall time (its queueing is what adds to the request latency above)"
    )


if __name__ == "__main__":
    main()
