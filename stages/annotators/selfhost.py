"""The `self` annotator: the round's own policy answers the same prompt as the API model.

Two ways to run it:
- "vllm_server": start `<python> -m <server_module> --model CKPT --host H --port P ...` in its
  own process group, wait for GET /health, talk to it with the api transport, and stop the
  group by the PID we started (SIGTERM, then SIGKILL), also when annotation fails.
- "inprocess": the shared generation loop (pipeline/generation.py) on the checkpoint (CPU by
  default), prompts encoded by the shared chat encoder (pipeline/chat.py); greedy at
  temperature 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

from trace_rl.stages.annotators.api import CallResult
from trace_rl.stages.annotators.config import SelfOptions


def _log_tail(path: str, n_chars: int = 2000) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-n_chars:]
    except OSError:
        return ""


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, log_path: str) -> None:
    """Poll `url` until HTTP 200; raise with the server's log tail if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"annotator server exited with code {proc.returncode} before becoming healthy; "
                "check self_host.python / server_module / extra_args. Log tail:\n"
                f"{_log_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.25)
    raise TimeoutError(
        f"annotator server not healthy at {url} after {timeout_s:.0f}s; raise "
        f"self_host.startup_timeout_s or check the log tail:\n{_log_tail(log_path)}"
    )


def stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Stop the process group led by `proc` (the server and the workers it spawned)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)


def ensure_port_free(host: str, port: int) -> None:
    """Raise if something already listens there (its /health would pass for ours)."""
    with socket.socket() as s:
        if s.connect_ex((host, port)) == 0:
            raise RuntimeError(
                f"{host}:{port} is already in use; stop that server or set self_host.port "
                "to a free port"
            )


@contextlib.contextmanager
def served(opts: SelfOptions, model_path: str) -> Iterator[str]:
    """Run the OpenAI-compatible server on `model_path`; yields its base URL (…/v1)."""
    cmd = [
        opts.python,
        "-m",
        opts.server_module,
        "--model",
        model_path,
        "--host",
        opts.host,
        "--port",
        str(opts.port),
        *opts.extra_args,
    ]
    ensure_port_free(opts.host, opts.port)
    log_fd, log_path = tempfile.mkstemp(prefix="annotator-server-", suffix=".log")
    # Its own session makes the server a process-group leader, so stopping it by PID also
    # stops the engine workers it forks.
    proc = subprocess.Popen(cmd, stdout=log_fd, stderr=subprocess.STDOUT, start_new_session=True)
    os.close(log_fd)
    try:
        wait_healthy(
            f"http://{opts.host}:{opts.port}/health", proc, opts.startup_timeout_s, log_path
        )
        yield f"http://{opts.host}:{opts.port}/v1"
    finally:
        stop_group(proc)
        with contextlib.suppress(OSError):
            os.unlink(log_path)


def _stop_ids(tokenizer: Any, model: Any) -> list[int]:
    """The tokenizer's eos plus any the model's generation config declares."""
    ids = {tokenizer.eos_token_id}
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(declared if isinstance(declared, list) else [declared])
    return sorted(i for i in ids if i is not None)


def generate_inprocess(
    opts: SelfOptions,
    model_path: str,
    tokenizer: Any,
    *,
    temperature: float,
    max_new_tokens: int,
) -> Callable[[list[list[dict]], Callable[[int, CallResult], None]], list[CallResult]]:
    """A transport that answers chat requests on `model_path` through the shared generation loop
    (pipeline/generation.py) and chat encoder (pipeline/chat.py): the prompt ids are built as a
    vLLM server would build them from the same messages."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"the tokenizer of {model_path} has no chat_template; the inprocess "
            "self annotator needs one (save the policy tokenizer with its template)"
        )

    def transport(requests: list[list[dict]], on_done) -> list[CallResult]:
        from transformers import AutoModelForCausalLM

        from trace_rl.pipeline.chat import encode_chat_messages
        from trace_rl.pipeline.generation import cut_at_stop, sample_batch

        model = AutoModelForCausalLM.from_pretrained(model_path).to(opts.device).eval()
        pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        stop = _stop_ids(tokenizer, model)
        results: list[CallResult] = []
        for b0 in range(0, len(requests), opts.batch_size):
            batch = requests[b0 : b0 + opts.batch_size]
            t0 = time.perf_counter()
            prompts = [encode_chat_messages(tokenizer, m, opts.enable_thinking) for m in batch]
            gen_BT, logp_BT = sample_batch(
                model, prompts, temperature=temperature, top_k=-1, top_p=1.0,
                max_new_tokens=max_new_tokens, stop_ids=stop, pad_id=pad_id, seed=b0,
                device=opts.device,
            )
            per_item = (time.perf_counter() - t0) / len(batch)
            for k, (ids, logps) in enumerate(zip(gen_BT.tolist(), logp_BT.tolist(), strict=True)):
                ids, _, _ = cut_at_stop(ids, logps, set(stop), max_new_tokens)
                raw = tokenizer.decode(ids, skip_special_tokens=True)
                res = CallResult(raw, "ok", None, per_item)
                results.append(res)
                on_done(b0 + k, res)
        return results

    return transport
