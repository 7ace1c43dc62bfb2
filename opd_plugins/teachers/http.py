"""A small JSON-over-HTTP client with retries, shared by the teachers that talk to a server.

Standard library only (``urllib``): transient failures (connection errors, timeouts, HTTP 5xx/408/429, malformed
JSON) are retried with exponential backoff; anything else is a ``TeacherError`` that names the component, the URL,
the HTTP status with the server's own message, and what to change. The API key never appears in a message.
"""

from __future__ import annotations

import json
import os
import re
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
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = self.scrub(error_detail(exc))
            if exc.code >= 500 or exc.code in RETRY_STATUSES:
                raise Retryable(f"HTTP {exc.code}: {detail}") from None
            env = self.api_key_env
            hints = {401: "the server requires an API key: set api_key_env to the name of the variable holding it"
                          + (f" (now {env}, whose key was refused)" if env else ""),
                     403: "the API key was refused",
                     404: "check base_url and model",
                     **self.status_hints}
            hint = hints.get(exc.code, "the server refused the request")
            raise TeacherError(f"teacher {self.name}: {url} answered HTTP {exc.code} while {what}: {detail}. "
                               f"{hint}.") from None
        except (TimeoutError, OSError) as exc:  # URLError is an OSError
            raise Retryable(describe_network_error(exc, self.timeout_s)) from None
        except Exception as exc:  # http.client.IncompleteRead/RemoteDisconnected and friends
            raise Retryable(f"{type(exc).__name__}: {exc}") from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise Retryable(f"malformed JSON in the response ({len(raw)} bytes: {self.scrub(repr(raw[:80]))})") \
                from None

    def scrub(self, text: str) -> str:
        """``text`` with the API key replaced by ``***``."""
        return text.replace(self.api_key, "***") if self.api_key else text


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
