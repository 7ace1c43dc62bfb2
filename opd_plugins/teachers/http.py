"""A small JSON-over-HTTP client with retries, shared by the teachers that talk to a server.

Standard library only (``urllib``): transient failures (connection errors, timeouts, HTTP 5xx/408/429, malformed
JSON) are retried with exponential backoff; anything else is a ``TeacherError`` that names the component, the URL,
the HTTP status with the server's own message, and what to change. The API key never appears in a message.

``timeout_s`` is a total deadline per request attempt (connecting, sending, the status line, headers and the whole
body), not a per-read timeout: a server that drips a byte at a time cannot hold a request for longer (a watchdog
shuts the socket down when the deadline passes).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from opd_plugins.errors import TeacherError

RETRY_STATUSES = frozenset({408, 429})
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_base_url(url: str) -> None:
    """Raise ``ValueError`` (a recipe error) unless ``url`` is an http(s) server root without credentials."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("base_url must look like http://HOST:PORT (or https://...)")
    if parts.username or parts.password:
        raise ValueError("base_url must not contain credentials; put the key in the variable named by api_key_env")


def check_api_key_env(name: str | None) -> None:
    """Raise ``ValueError`` unless ``name`` looks like an environment variable's name (not a pasted key). The
    message never echoes the value."""
    if name is not None and not _ENV_NAME.match(name):
        raise ValueError("api_key_env must be the NAME of an environment variable that holds the key (e.g. "
                         "TEACHER_API_KEY), not the key itself; export the key in that variable")


def read_api_key(component: str, env: str | None) -> str | None:
    """The API key from the variable ``env`` (None when no variable is named); a named but unset variable is a
    ``TeacherError`` naming ``component`` and the variable, never the key."""
    if not env:
        return None
    key = os.environ.get(env)
    if not key:
        raise TeacherError(f"teacher {component}: api_key_env names the environment variable {env}, which is not "
                           f"set (or empty). Export the API key in {env} on every training process.")
    return key


class Retryable(Exception):
    """A transient failure (connection, timeout, HTTP 5xx/408/429, malformed JSON): try again after a backoff."""


@dataclass
class JSONClient:
    """Retrying JSON requests on behalf of the component ``name`` (used in every message)."""

    name: str
    timeout_s: float
    max_retries: int
    backoff_s: float
    api_key: str | None = None
    api_key_env: str | None = None
    #: Extra hints per HTTP status (added to the 401/403/404 defaults).
    status_hints: dict[int, str] = field(default_factory=dict)
    #: What to check when the server cannot be reached at all.
    unreachable_hint: str = "check that the server is running and reachable at base_url, and that base_url is right"
    #: What to change when requests time out.
    timeout_hint: str = "the server may be overloaded: raise timeout_s or lower concurrency"

    def request(self, method: str, url: str, body: Any, what: str, abort: threading.Event | None = None) -> Any:
        """Send ``body`` (JSON, or nothing when None) and return the decoded JSON answer, retrying transient
        failures up to ``max_retries`` times. ``abort`` (set by a sibling request that failed) cancels the wait."""
        attempts = self.max_retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                delay = self.backoff_s * 2 ** (attempt - 1)
                if abort is None:
                    time.sleep(delay)
                elif abort.wait(delay):
                    raise TeacherError(f"teacher {self.name}: {what} cancelled (another request failed)")
            try:
                return self._once(method, url, body, what)
            except Retryable as exc:
                last = str(exc)
        hint = self.timeout_hint if "timed out" in last else self.unreachable_hint
        raise TeacherError(f"teacher {self.name}: {method} {url} ({what}) failed after {attempts} attempt"
                           f"{'s' if attempts != 1 else ''}; last error: {self.scrub(last)}. {hint}.")

    def _once(self, method: str, url: str, body: Any, what: str) -> Any:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        with Deadline(self.timeout_s) as deadline:  # also bounds reading an error's body
            try:
                with deadline.opener().open(req, timeout=self.timeout_s) as resp:
                    raw = deadline.read(resp)
            except urllib.error.HTTPError as exc:
                detail = self.scrub(error_detail(exc))
                if deadline.expired:
                    raise Retryable(deadline.why()) from None
                if exc.code >= 500 or exc.code in RETRY_STATUSES:
                    raise Retryable(f"HTTP {exc.code}: {detail}") from None
                env = self.api_key_env
                hints = {401: "the server requires an API key: set api_key_env to the name of the variable holding "
                              "it" + (f" (now {env}, whose key was refused)" if env else ""),
                         403: "the API key was refused",
                         404: "check base_url and model",
                         **self.status_hints}
                hint = hints.get(exc.code, "the server refused the request")
                raise TeacherError(f"teacher {self.name}: {url} answered HTTP {exc.code} while {what}: {detail}. "
                                   f"{hint}.") from None
            except (TimeoutError, OSError) as exc:  # URLError is an OSError
                raise Retryable(deadline.why() or describe_network_error(exc, self.timeout_s)) from None
            except Exception as exc:  # http.client.IncompleteRead/RemoteDisconnected and friends
                raise Retryable(deadline.why() or f"{type(exc).__name__}: {exc}") from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise Retryable(f"malformed JSON in the response ({len(raw)} bytes: {self.scrub(repr(raw[:80]))})") \
                from None

    def scrub(self, text: str) -> str:
        """``text`` with the API key replaced by ``***``."""
        return text.replace(self.api_key, "***") if self.api_key else text


class Deadline:
    """A total time limit for one HTTP exchange: the sockets it opens (:meth:`opener`) are shut down by a timer
    when ``seconds`` have passed, so no sequence of slow reads can outlast it. Use as a context manager around
    the request and :meth:`read` of the body."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "Deadline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._timer.cancel()

    def opener(self) -> urllib.request.OpenerDirector:
        """An opener whose HTTP(S) connections are watched by this deadline (the timer starts now)."""
        deadline = self

        def watched(base: type) -> type:
            class Watched(base):  # type: ignore[misc, valid-type]
                def connect(self) -> None:
                    super().connect()
                    deadline.watch(self.sock)

            return Watched

        http_cls, https_cls = watched(http.client.HTTPConnection), watched(http.client.HTTPSConnection)

        class HTTPHandler(urllib.request.HTTPHandler):
            def http_open(self, req):  # noqa: ANN001, ANN201 - urllib's signature
                return self.do_open(http_cls, req)

        class HTTPSHandler(urllib.request.HTTPSHandler):
            def https_open(self, req):  # noqa: ANN001, ANN201
                return self.do_open(https_cls, req, context=self._context)

        self._timer.start()
        return urllib.request.build_opener(HTTPHandler, HTTPSHandler)

    def watch(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)

    def read(self, resp: Any) -> bytes:
        """The whole body of ``resp``, read a chunk at a time until the end or the deadline."""
        chunks = []
        while not self.expired:
            chunk = resp.read1(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        if self.expired:
            raise TimeoutError(self.why())
        return b"".join(chunks)

    def why(self) -> str:
        """The error text once the deadline has passed ('' before)."""
        return f"timed out after {self.seconds:g} s (the whole response must arrive within timeout_s)" \
            if self.expired else ""

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def error_detail(exc: urllib.error.HTTPError) -> str:
    """The server's own message from an HTTP error body (OpenAI/vLLM ``{"error": {"message"}}`` and friends)."""
    try:
        payload = json.loads(exc.read() or b"null")
    except (ValueError, OSError):
        return exc.reason if isinstance(exc.reason, str) else str(exc.code)
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        msg = err.get("message") if isinstance(err, dict) else err
        if msg is None:
            msg = payload.get("message") or payload.get("detail")
        if msg is not None:
            return str(msg)[:500]
    return str(payload)[:500]


def describe_network_error(exc: BaseException, timeout_s: float) -> str:
    """A one-line reason for a connection failure (timeout, refused, reset, other)."""
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, TimeoutError) or "timed out" in str(reason):
        return f"timed out after {timeout_s:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (no server listening there)"
    if isinstance(reason, ConnectionResetError):
        return "connection reset by the server"
    return f"{type(reason).__name__}: {reason}"
