"""``opd-plugins serve-teacher``: a small OpenAI-compatible scoring server for a transformers causal LM.

(The client side that spawns one for a teacher is :mod:`opd_plugins.teachers._local_server`.)

It implements the part of vLLM's OpenAI API that a served teacher needs, with vLLM's shapes:

* ``GET /health`` → 200 (no key needed);
* ``GET /v1/models`` → ``{"object": "list", "data": [{"id": NAME, ...}]}``;
* ``POST /v1/completions`` with ``{"model", "prompt": [ids] | [[ids], ...], "max_tokens": 0 | 1,
  "prompt_logprobs": k, "temperature": T}`` → one choice per prompt whose ``prompt_logprobs`` is
  ``[null, {"<id>": {"logprob", "rank", "decoded_token"}, ...}, ...]``: position ``i`` holds
  ``log softmax(logits_{i-1} / T)`` of the actual token ``ids[i]`` (with its 1-based rank in the vocabulary)
  plus the top ``k`` tokens, as vLLM returns them. Nothing is generated: ``text`` is ``""``.

Requests are micro-batched: one worker thread runs the model; concurrent requests queued while it works are
scored together (up to ``--max-batch`` sequences per forward pass). Only the standard library serves HTTP.
Heavy imports (torch, transformers) happen in :func:`run`, so importing this module is cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from opd_plugins.errors import OPDError

logger = logging.getLogger("opd_plugins.serve")

MAX_BODY_BYTES = 64 * 1024 * 1024
VLLM_EQUIVALENT = (
    "vllm serve MODEL --port P --max-logprobs K --logprobs-mode processed_logprobs\n"
    "  (K >= the teacher's top_k; with an API key: VLLM_API_KEY=... vllm serve ...)"
)
HELP_EPILOG = (
    "On a GPU, serve the same API with vLLM instead (same teacher params; see docs/served_teacher.md):\n  "
    + VLLM_EQUIVALENT
)


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------


class BadRequest(Exception):
    """A malformed request: answered with HTTP 400 (or ``status``) and this message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class ScoreJob:
    """One request: its sequences, how many top log-probs per position, and the scoring temperature."""

    seqs: list[list[int]]
    k: int
    temperature: float
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: list[list[dict[str, dict[str, Any]] | None]] | None = None
    error: BaseException | None = None


class Scorer:
    """Computes vLLM-style ``prompt_logprobs`` for token sequences with a causal LM (no generation)."""

    def __init__(self, model: Any, tokenizer: Any, *, device: Any = "cpu") -> None:
        import torch

        self.torch = torch
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_len = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self._decoded: dict[int, str] = {}

    def decode(self, token_id: int) -> str:
        text = self._decoded.get(token_id)
        if text is None:
            text = self._decoded[token_id] = self.tokenizer.decode([token_id])
        return text

    def score(self, seqs: list[list[int]], ks: list[int], temperatures: list[float]):
        """``prompt_logprobs`` for each sequence (right-padded into one forward pass)."""
        torch = self.torch
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        out = []
        for i, s in enumerate(seqs):
            n, k = len(s), ks[i]
            entries: list[dict[str, dict[str, Any]] | None] = [None]
            if n > 1:
                logps = torch.log_softmax(logits[i, : n - 1].float() / temperatures[i], dim=-1)
                target = torch.tensor(s[1:], device=logps.device)
                actual = logps.gather(-1, target[:, None])
                ranks = ((logps > actual).sum(-1) + 1).tolist()
                actual_l = actual[:, 0].tolist()
                top_v, top_i = logps.topk(k, dim=-1) if k > 0 else (None, None)
                top_vl = top_v.tolist() if k > 0 else None
                top_il = top_i.tolist() if k > 0 else None
                for j in range(n - 1):
                    tok = s[j + 1]
                    d = {str(tok): {"logprob": actual_l[j], "rank": ranks[j], "decoded_token": self.decode(tok)}}
                    if k > 0:
                        for r, (t, v) in enumerate(zip(top_il[j], top_vl[j]), start=1):
                            if t != tok:
                                d[str(t)] = {"logprob": v, "rank": r, "decoded_token": self.decode(t)}
                    entries.append(d)
            out.append(entries)
        return out


class Batcher:
    """One worker thread runs the model; requests that queue up while it works are scored together."""

    def __init__(self, scorer: Scorer, max_batch: int) -> None:
        self.scorer = scorer
        self.max_batch = max_batch
        self.queue: queue.Queue[ScoreJob | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="opd-scorer", daemon=True)
        self.thread.start()

    def submit(self, job: ScoreJob, timeout_s: float) -> list:
        self.queue.put(job)
        if not job.done.wait(timeout_s):
            raise BadRequest(f"scoring did not finish within {timeout_s:.0f} s (server overloaded)", status=503)
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def stop(self) -> None:
        self.queue.put(None)

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            jobs, n = [job], len(job.seqs)
            while n < self.max_batch:  # take whatever else is already waiting
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                jobs.append(nxt)
                n += len(nxt.seqs)
            self._run(jobs)

    def _run(self, jobs: list[ScoreJob]) -> None:
        rows = [(j, i) for j in jobs for i in range(len(j.seqs))]
        rows.sort(key=lambda r: len(r[0].seqs[r[1]]))  # similar lengths share a forward pass: less padding
        results: dict[int, list] = {id(j): [None] * len(j.seqs) for j in jobs}
        failed: dict[int, BaseException] = {}
        for start in range(0, len(rows), self.max_batch):
            chunk = [r for r in rows[start:start + self.max_batch] if id(r[0]) not in failed]
            if not chunk:
                continue
            try:
                scored = self.scorer.score([j.seqs[i] for j, i in chunk], [j.k for j, _ in chunk],
                                           [j.temperature for j, _ in chunk])
            except Exception as exc:  # answered as HTTP 500 to the requests in this chunk
                logger.exception("scoring failed")
                for j, _ in chunk:
                    failed[id(j)] = exc
                continue
            for (j, i), entries in zip(chunk, scored):
                results[id(j)][i] = entries
        for j in jobs:
            j.error = failed.get(id(j))
            j.result = results[id(j)]
            j.done.set()


# ---------------------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ServerConfig:
    served_model_name: str
    root: str
    max_logprobs: int
    max_batch: int
    api_key: str | None = None
    request_timeout_s: float = 600.0
    log_requests: bool = False


def parse_completion_request(body: Any, cfg: ServerConfig, vocab_size: int, max_len: int | None):
    """Validate a ``/v1/completions`` body; returns ``(sequences, k, temperature)`` or raises :class:`BadRequest`."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != cfg.served_model_name:
        raise BadRequest(f"The model `{model}` does not exist. This server serves {cfg.served_model_name!r}.", 404)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        seqs = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        seqs = prompt
    else:
        raise BadRequest("'prompt' must be a non-empty list of token ids or a list of such lists "
                         "(this server scores token ids; it does not tokenize text)")
    for i, s in enumerate(seqs):
        if not s:
            raise BadRequest(f"prompt {i} is empty")
        bad = next((t for t in s if not _is_int(t) or not 0 <= t < vocab_size), None)
        if bad is not None:
            raise BadRequest(f"prompt {i} has token id {bad!r}, outside the vocabulary [0, {vocab_size})")
        if max_len is not None and len(s) > max_len:
            raise BadRequest(f"prompt {i} has {len(s)} tokens; the model takes at most {max_len}")
    max_tokens = body.get("max_tokens", 1)
    if max_tokens not in (0, 1) or isinstance(max_tokens, bool):
        raise BadRequest(f"'max_tokens' must be 0 or 1 (this server only scores prompts), got {max_tokens!r}")
    k = body.get("prompt_logprobs")
    if not _is_int(k) or k < 0:
        raise BadRequest(f"'prompt_logprobs' must be an integer >= 0 (this server only returns prompt log-probs), "
                         f"got {k!r}")
    if k > cfg.max_logprobs:
        raise BadRequest(f"Requested prompt logprobs of {k}, which is greater than max allowed: {cfg.max_logprobs} "
                         "(restart the server with a larger --max-logprobs)")
    temperature = body.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise BadRequest(f"'temperature' must be a number > 0 (the scoring temperature), got {temperature!r}")
    return seqs, int(k), float(temperature)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Handler(BaseHTTPRequestHandler):
    server_version = "opd-plugins-serve-teacher"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms delayed-ACK stalls

    # set by make_server on a subclass
    cfg: ServerConfig
    batcher: Batcher

    def log_message(self, format: str, *args: Any) -> None:  # request lines only; never headers (the key)
        if self.cfg.log_requests:
            logger.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                413: "BadRequestError", 503: "ServiceUnavailableError"}.get(status, "InternalServerError")
        self._send(status, {"error": {"message": message, "type": kind, "code": status}})

    def _authorized(self) -> bool:
        if self.cfg.api_key is None:
            return True
        given = self.headers.get("Authorization", "")
        expected = f"Bearer {self.cfg.api_key}"
        if hmac.compare_digest(given.encode(), expected.encode()):
            return True
        self._error(401, "Unauthorized: send the header 'Authorization: Bearer <key>'")
        return False

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            self._send(200, {})
        elif path == "/v1/models":
            if self._authorized():
                self._send(200, {"object": "list", "data": [{
                    "id": self.cfg.served_model_name, "object": "model", "created": int(time.time()),
                    "owned_by": "opd_plugins", "root": self.cfg.root, "max_model_len": self.batcher.scorer.max_len,
                }]})
        else:
            self._error(404, f"no route GET {path}; this server has GET /health, GET /v1/models, "
                        "POST /v1/completions")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != "/v1/completions":
            self._error(404, f"no route POST {path}; this server has POST /v1/completions")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._error(400, "a Content-Length header is required")
            return
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._error(413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES}; send fewer sequences "
                        "per request")
            return
        raw = self.rfile.read(length)
        if not self._authorized():
            return
        try:
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise BadRequest(f"the request body is not valid JSON: {exc}") from None
            scorer = self.batcher.scorer
            seqs, k, temperature = parse_completion_request(body, self.cfg, scorer.vocab_size, scorer.max_len)
            result = self.batcher.submit(ScoreJob(seqs, k, temperature), self.cfg.request_timeout_s)
        except BadRequest as exc:
            self._error(exc.status, str(exc))
            return
        except Exception as exc:
            self._error(500, f"scoring failed: {type(exc).__name__}: {exc}")
            return
        n_tokens = sum(map(len, seqs))
        self._send(200, {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.cfg.served_model_name,
            "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": "length", "stop_reason": None,
                         "prompt_logprobs": entries} for i, entries in enumerate(result)],
            "usage": {"prompt_tokens": n_tokens, "completion_tokens": 0, "total_tokens": n_tokens},
        })


def make_server(scorer: Scorer, cfg: ServerConfig, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving: call ``serve_forever``) scoring with ``scorer``; ``port=0`` picks a free one."""
    batcher = Batcher(scorer, cfg.max_batch)
    handler = type("Handler", (_Handler,), {"cfg": cfg, "batcher": batcher})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        batcher.stop()
        raise OPDError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (is the port in use?)") from None
    server.daemon_threads = True
    server.batcher = batcher  # type: ignore[attr-defined]
    return server


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve-teacher`` arguments (shared by ``opd-plugins serve-teacher`` and the teacher's spawner)."""
    p.add_argument("model", help="local checkpoint directory, hub id, or 'smollm2-135m-instruct'")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default 8000)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--max-logprobs", type=int, default=64,
                   help="largest prompt_logprobs a request may ask for (default 64; vLLM's flag of the same name)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: MODEL)")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="require 'Authorization: Bearer <key>' with the key read from environment variable VAR")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the checkpoint")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may wait (default 600)")
    p.add_argument("--log-requests", action="store_true", help="log every request line (never headers or keys)")
    # For the teacher's spawner: write {"url", "pid"} here once serving; exit when stdin closes (parent gone).
    p.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--exit-on-stdin-eof", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Load the model, then serve until interrupted (SIGINT/SIGTERM, or stdin EOF with --exit-on-stdin-eof)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s serve-teacher: %(message)s", stream=sys.stderr)
    if args.max_batch < 1 or args.max_logprobs < 0:
        raise OPDError("--max-batch must be >= 1 and --max-logprobs >= 0")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise OPDError(f"--api-key-env {args.api_key_env}: the environment variable {args.api_key_env} is not "
                           "set (or empty); export it with the key clients will send")
    import torch

    from opd_plugins.models import load_causal_lm, load_tokenizer, resolve_model_path

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path, trust_remote_code=args.trust_remote_code)
    model = load_causal_lm(path, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    cfg = ServerConfig(served_model_name=args.served_model_name or args.model, root=path,
                       max_logprobs=args.max_logprobs, max_batch=args.max_batch, api_key=api_key,
                       request_timeout_s=args.request_timeout, log_requests=args.log_requests)
    server = make_server(Scorer(model, tokenizer, device=device), cfg, args.host, args.port)
    host, port = server.server_address[:2]
    url = f"http://{host}:{port}"
    stop = threading.Event()

    def shutdown(*_: Any) -> None:
        if not stop.is_set():
            stop.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    if args.exit_on_stdin_eof:
        threading.Thread(target=lambda: (sys.stdin.read(), shutdown()), daemon=True).start()
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        logger.warning("listening on %s without --api-key-env: anyone who can reach this address can use it", host)
    logger.info("serving %s as %r on %s (device %s, dtype %s, max batch %d, max logprobs %d%s)", args.model,
                cfg.served_model_name, url, device, args.dtype, args.max_batch, args.max_logprobs,
                ", API key required" if api_key else "")
    if args.ready_file:
        tmp = Path(args.ready_file + ".tmp")
        tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
        os.replace(tmp, args.ready_file)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.batcher.stop()  # type: ignore[attr-defined]
        server.server_close()
        logger.info("stopped")
    return 0


__all__ = ["Scorer", "Batcher", "ServerConfig", "make_server", "add_arguments", "run", "parse_completion_request",
           "HELP_EPILOG", "VLLM_EQUIVALENT"]
