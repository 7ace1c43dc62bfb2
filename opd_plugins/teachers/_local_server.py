"""A local ``opd-plugins serve-teacher`` child process: spawned on a free loopback port, shared, and stopped.

The client side of the served teacher (``openai_server``'s ``spawn_local_server``); the server itself is
:mod:`opd_plugins.commands.serve_teacher`. Standard library only.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from opd_plugins.errors import OPDError


# ---------------------------------------------------------------------------------------------------------------
# Spawning a local server (the openai_server teacher's spawn_local_server, tests and benchmarks)
# ---------------------------------------------------------------------------------------------------------------


class SpawnedServer:
    """A ``serve-teacher`` child process on a free loopback port. It exits when :meth:`stop` is called, and
    also by itself when this process dies (it watches its stdin)."""

    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path, workdir: tempfile.TemporaryDirectory) -> None:
        self.proc, self.url, self.log_path, self._workdir = proc, url, log_path, workdir

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 3.0) -> None:
        """Ask the server to stop (stdin EOF); kill it if it has not exited after ``grace_s`` (it holds no state,
        and a torch process can take seconds just to tear down its interpreter)."""
        if self.proc.poll() is None:
            try:
                if self.proc.stdin:
                    self.proc.stdin.close()
                self.proc.wait(grace_s)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait(30)
        self._workdir.cleanup()


def spawn_server(model: str, *, extra_args: list[str] | tuple[str, ...] = (), api_key_env: str | None = None,
                 timeout_s: float = 600.0, env: dict[str, str] | None = None) -> SpawnedServer:
    """Start ``python -m opd_plugins serve-teacher MODEL`` on 127.0.0.1 with a free port; wait until it answers
    ``/health`` (at most ``timeout_s``). Raises :class:`OPDError` with the server's log if it does not come up."""
    workdir = tempfile.TemporaryDirectory(prefix="opd-serve-teacher-")
    ready = Path(workdir.name) / "ready.json"
    log_path = Path(workdir.name) / "server.log"
    cmd = [sys.executable, "-m", "opd_plugins", "serve-teacher", model, "--host", "127.0.0.1", "--port", "0",
           "--ready-file", str(ready), "--exit-on-stdin-eof", *extra_args]
    if api_key_env:
        cmd += ["--api-key-env", api_key_env]  # the key itself travels in the environment, never on the command line
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    server = SpawnedServer(proc, "", log_path, workdir)
    deadline = time.monotonic() + timeout_s
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise OPDError(f"the local teacher server for {model!r} exited with status {proc.returncode} before "
                               f"it was ready. Its log:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise OPDError(f"the local teacher server for {model!r} was not ready after {timeout_s:.0f} s. "
                               f"Its log:\n{server.log_tail()}")
            time.sleep(0.1)
        server.url = json.loads(ready.read_text())["url"]
        wait_for_health(server.url, max(1.0, deadline - time.monotonic()))
    except BaseException:
        server.stop()
        raise
    return server


def wait_for_health(url: str, timeout_s: float) -> None:
    """Poll ``GET {url}/health`` until it answers 200 (bounded by ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise OPDError(f"{url}/health did not answer within {timeout_s:.0f} s (last error: {last})")


# Spawned servers are shared by the teachers of this process that ask for the same settings (e.g. one per test
# session), counted, and stopped when the last one releases it, or at exit.
_SERVERS: dict[tuple, list] = {}  # key -> [SpawnedServer, users]
_SERVERS_LOCK = threading.Lock()


def acquire_local_server(model: str, *, served_model_name: str, extra_args: list[str] | tuple[str, ...] = (),
                         api_key_env: str | None = None, timeout_s: float = 600.0) -> tuple[str, tuple]:
    """The URL of a local ``serve-teacher`` for ``model`` (spawned, or shared with an earlier caller) and the
    handle to pass to :func:`release_local_server`."""
    key = (model, served_model_name, tuple(extra_args), api_key_env)
    with _SERVERS_LOCK:
        entry = _SERVERS.get(key)
        if entry is None or entry[0].proc.poll() is not None:
            server = spawn_server(model, extra_args=[*extra_args, "--served-model-name", served_model_name],
                                  api_key_env=api_key_env, timeout_s=timeout_s)
            entry = _SERVERS[key] = [server, 0]
        entry[1] += 1
    return entry[0].url, key


def release_local_server(key: tuple) -> None:
    """Drop one use of a server from :func:`acquire_local_server`; the last use stops it."""
    with _SERVERS_LOCK:
        entry = _SERVERS.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _SERVERS[key]
    entry[0].stop()


@atexit.register
def _stop_local_servers() -> None:
    with _SERVERS_LOCK:
        servers = [entry[0] for entry in _SERVERS.values()]
        _SERVERS.clear()
    for server in servers:
        server.stop()


__all__ = ["SpawnedServer", "acquire_local_server", "release_local_server", "spawn_server", "wait_for_health"]
