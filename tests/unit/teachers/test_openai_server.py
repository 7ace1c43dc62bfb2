"""The ``openai_server`` teacher against a real ``serve-teacher`` subprocess and against faulty fake servers.

Everything listens on 127.0.0.1 only. The real server is one subprocess for the module (killed in teardown);
fake servers run in threads and are shut down by their fixture. Timeouts and backoffs are small and every
request loop is bounded.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from pydantic import ValidationError

from opd_plugins.errors import TeacherError
from opd_plugins.testing.contracts import fake_trainer, teacher_batch
from opd_plugins.teachers.openai_server import OpenAIServerTeacher

KEY_ENV = "OPD_TEST_TEACHER_KEY"
FAST = dict(timeout_s=5.0, max_retries=2, backoff_s=0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_teacher(tokenizer, temperature: float = 1.0, **params) -> OpenAIServerTeacher:
    teacher = OpenAIServerTeacher(OpenAIServerTeacher.Params(**params))
    teacher.setup(fake_trainer(None, tokenizer, temperature=temperature))
    return teacher


# ---------------------------------------------------------------------------------------------------------------
# A real server: `python -m opd_plugins serve-teacher <tiny model> --port P --api-key-env VAR`
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(opd_tiny_model_dir, tmp_path_factory):
    key = "k-" + secrets.token_hex(12)
    port = free_port()
    log_path = tmp_path_factory.mktemp("served") / "server.log"
    env = {**os.environ, KEY_ENV: key, "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "opd_plugins", "serve-teacher", str(opd_tiny_model_dir), "--port", str(port),
             "--api-key-env", KEY_ENV, "--log-requests"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240  # bounded: imports are slow on 2 busy cores
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "serve-teacher did not come up:\n" + log_path.read_text()
            time.sleep(0.2)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(KEY_ENV, key)
            yield {"url": url, "key": key, "log": log_path, "model": str(opd_tiny_model_dir)}
    finally:
        proc.terminate()  # it stops serving at once; a torch interpreter can take seconds more to exit
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


def served_teacher(served, tokenizer, temperature: float = 1.0, **params) -> OpenAIServerTeacher:
    return make_teacher(tokenizer, temperature, base_url=served["url"], api_key_env=KEY_ENV, **{**FAST, **params})


def local_teacher(model_dir, temperature: float = 1.0, top_k: int = 0):
    """The same checkpoint scored in-process by ``hf_model`` (the reference)."""
    from opd_plugins.models import load_causal_lm
    from opd_plugins.teachers.hf_model import HFModelTeacher

    teacher = HFModelTeacher(HFModelTeacher.Params(model=str(model_dir), top_k=top_k))
    teacher.attach(load_causal_lm(str(model_dir)), temperature=temperature)
    return teacher


def test_served_logprobs_equal_local_model_and_divergence_is_zero(served, opd_tokenizer):
    from opd_plugins.divergences.base import StudentOutputs
    from opd_plugins.divergences.reverse_kl import ReverseKL

    batch = teacher_batch(opd_tokenizer, n=4, completion_len=7, seed=1)
    teacher = served_teacher(served, opd_tokenizer, sequences_per_request=3, concurrency=2)
    remote = teacher.score(batch, "sampled")
    local = local_teacher(served["model"]).score(batch, "sampled")
    valid = batch.completion_mask.bool()
    assert remote.token_logps.shape == batch.completion_ids.shape and remote.token_logps.dtype == torch.float32
    assert torch.allclose(remote.token_logps, local.token_logps, atol=1e-4), (remote.token_logps, local.token_logps)
    assert (remote.token_logps[~valid] == 0).all() and torch.equal(remote.mask, batch.completion_mask.float())
    assert remote.topk_logps is None and remote.entropy is None
    # Teacher == student: the reverse KL on the served scores is ~0.
    student = StudentOutputs(token_logps=local.token_logps, mask=batch.completion_mask.float())
    value = ReverseKL().per_token(student, remote).value
    assert value.abs().max() < 1e-4
    teacher.close()


def test_topk_returned_and_consistent(served, opd_tokenizer):
    batch = teacher_batch(opd_tokenizer, n=3, completion_len=5, seed=2)
    k = 6
    remote = served_teacher(served, opd_tokenizer, top_k=k).score(batch, "topk")
    local = local_teacher(served["model"], top_k=k).score(batch, "topk")
    valid = batch.completion_mask.bool()
    assert remote.topk_ids.shape == remote.topk_logps.shape == (3, 5, k) and remote.capability == "topk"
    assert torch.equal(remote.topk_ids[valid], local.topk_ids[valid])
    assert torch.allclose(remote.topk_logps[valid], local.topk_logps[valid], atol=1e-4)
    assert (remote.topk_logps[valid].diff(dim=-1) <= 1e-6).all()  # sorted, best first
    assert torch.allclose(remote.topk_mass[valid], local.topk_mass[valid], atol=1e-4)
    assert ((remote.topk_mass[valid] > 0) & (remote.topk_mass[valid] <= 1 + 1e-5)).all()
    assert (remote.token_logps[valid] <= remote.topk_logps[valid][:, 0] + 1e-6).all()
    in_topk = remote.topk_ids == batch.completion_ids.unsqueeze(-1)
    hit = in_topk.any(-1) & valid
    assert torch.allclose((remote.topk_logps * in_topk).sum(-1)[hit], remote.token_logps[hit], atol=1e-6)
    assert (remote.entropy[valid] >= 0).all() and (remote.topk_mass[~valid] == 0).all()
    # top_k: 0 still answers a top-k request (k = 1), like hf_model.
    one = served_teacher(served, opd_tokenizer).score(batch, "topk")
    assert one.topk_ids.shape == (3, 5, 1) and torch.equal(one.topk_ids[valid], remote.topk_ids[valid][:, :1])


def test_temperature_is_applied_by_the_server(served, opd_tokenizer):
    batch = teacher_batch(opd_tokenizer, n=2, completion_len=4, seed=3)
    remote = served_teacher(served, opd_tokenizer, temperature=0.7).score(batch, "sampled")  # setup probes T
    local = local_teacher(served["model"], temperature=0.7).score(batch, "sampled")
    assert torch.allclose(remote.token_logps, local.token_logps, atol=1e-4)


def test_api_key_required_refused_and_never_shown(served, opd_tokenizer, monkeypatch):
    key = served["key"]
    start = time.monotonic()
    with pytest.raises(TeacherError) as no_key:  # 401: immediate, no retries (backoff would take > 5 s)
        make_teacher(opd_tokenizer, base_url=served["url"], timeout_s=5, max_retries=3, backoff_s=5)
    assert time.monotonic() - start < 4
    assert "401" in str(no_key.value) and "api_key_env" in str(no_key.value)

    monkeypatch.setenv("OPD_TEST_WRONG_KEY", "wrong-" + key)
    with pytest.raises(TeacherError) as wrong:
        make_teacher(opd_tokenizer, base_url=served["url"], api_key_env="OPD_TEST_WRONG_KEY", **FAST)
    assert "401" in str(wrong.value) and "OPD_TEST_WRONG_KEY" in str(wrong.value)

    monkeypatch.delenv("OPD_TEST_MISSING_KEY", raising=False)
    with pytest.raises(TeacherError, match="OPD_TEST_MISSING_KEY.*not set"):
        make_teacher(opd_tokenizer, base_url=served["url"], api_key_env="OPD_TEST_MISSING_KEY")

    ok = served_teacher(served, opd_tokenizer)  # the right key works
    assert ok.score(teacher_batch(opd_tokenizer, n=1), "sampled").token_logps.shape == (1, 6)
    for text in (str(no_key.value), str(wrong.value), served["log"].read_text()):
        assert key not in text


def test_server_answers_malformed_requests_with_clear_errors(served):
    def post(body, headers=None, raw=None):
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(f"{served['url']}/v1/completions", data=data, method="POST",
                                     headers={"Authorization": f"Bearer {served['key']}", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    base = {"model": served["model"], "prompt": [5, 6, 7], "max_tokens": 1, "prompt_logprobs": 2}
    status, ok = post(base)
    assert status == 200 and len(ok["choices"][0]["prompt_logprobs"]) == 3
    assert ok["choices"][0]["prompt_logprobs"][0] is None and "6" in ok["choices"][0]["prompt_logprobs"][1]
    cases = {
        "not valid JSON": (None, b"{oops"),
        "does not tokenize text": ({**base, "prompt": "hello"}, None),
        "outside the vocabulary": ({**base, "prompt": [[5, 6], [7, 10 ** 6]]}, None),
        "greater than max allowed": ({**base, "prompt_logprobs": 10 ** 4}, None),
        "'max_tokens' must be 0 or 1": ({**base, "max_tokens": 16}, None),
        "'temperature' must be a number > 0": ({**base, "temperature": 0}, None),
        "does not exist": ({**base, "model": "other"}, None),
    }
    for needle, (body, raw) in cases.items():
        status, payload = post(body, raw=raw)
        assert status in (400, 404) and needle in payload["error"]["message"], (needle, payload)
    status, payload = post(base, headers={"Authorization": "Bearer nope"})
    assert status == 401


# ---------------------------------------------------------------------------------------------------------------
# Fake servers for failure modes
# ---------------------------------------------------------------------------------------------------------------


def good_entries(ids):
    return [None] + [{str(t): {"logprob": -1.0 - 0.01 * j, "rank": 1}} for j, t in enumerate(ids[1:])]


def good_response(body):
    seqs = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
    return {"object": "text_completion", "choices": [
        {"index": i, "text": "", "finish_reason": "length", "prompt_logprobs": good_entries(s)}
        for i, s in enumerate(seqs)]}


class FakeServer:
    """A loopback HTTP server whose POST /v1/completions behaviour is ``plan(n, body)`` (n counts POSTs from 1):
    ``("json", status, payload)``, ``("raw", status, bytes)``, ``("sleep", seconds)`` (then answers well),
    ``("die",)`` (drops the connection and shuts the server down), or None (a good answer)."""

    def __init__(self, plan):
        self.posts = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, data: bytes):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._reply(200, json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.posts += 1
                action = plan(fake.posts, body)
                if action is None:
                    self._reply(200, json.dumps(good_response(body)).encode())
                elif action[0] == "json":
                    self._reply(action[1], json.dumps(action[2]).encode())
                elif action[0] == "raw":
                    self._reply(action[1], action[2])
                elif action[0] == "sleep":
                    time.sleep(action[1])
                    self._reply(200, json.dumps(good_response(body)).encode())
                elif action[0] == "die":
                    self.close_connection = True
                    threading.Thread(target=fake.stop, daemon=True).start()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *a: None  # a client that timed out closes its socket: not an error here
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self._stopped = False

    def stop(self):
        if not self._stopped:
            self._stopped = True
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture
def fake():
    servers = []

    def start(plan=lambda n, body: None):
        servers.append(FakeServer(plan))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def fake_teacher(url, tokenizer, **params):
    """A teacher on a fake server. The fakes return no decoded text and report no vocabulary hash, so the
    tokenizer check (tested on its own) is off unless a test asks for it."""
    return make_teacher(tokenizer, base_url=url, **{**FAST, "check_tokenizer": False, **params})


def test_server_down_at_start_retries_then_clear_error(opd_tokenizer):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TeacherError) as err:
        fake_teacher(url, opd_tokenizer, max_retries=2, backoff_s=0.05)
    msg = str(err.value)
    assert time.monotonic() - start >= 0.05 + 0.1  # two backoffs happened
    assert "connection refused" in msg and url in msg and "3 attempts" in msg and "serve-teacher" in msg


def test_server_dying_mid_run(fake, opd_tokenizer):
    server = fake(lambda n, body: ("die",) if n > 3 else None)  # probe + 2 scoring requests, then gone
    teacher = fake_teacher(server.url, opd_tokenizer, sequences_per_request=8)
    batch = teacher_batch(opd_tokenizer, n=2)
    for _ in range(2):
        assert torch.isfinite(teacher.score(batch).token_logps).all()
    with pytest.raises(TeacherError) as err:
        teacher.score(batch)
    assert "failed after 3 attempts" in str(err.value) and server.url in str(err.value)


def test_slow_responses_time_out(fake, opd_tokenizer):
    server = fake(lambda n, body: ("sleep", 1.0) if n > 1 else None)
    teacher = fake_teacher(server.url, opd_tokenizer, timeout_s=0.25, max_retries=1)
    start = time.monotonic()
    with pytest.raises(TeacherError, match=r"timed out after 0.25 s.*raise timeout_s"):
        teacher.score(teacher_batch(opd_tokenizer, n=2))
    assert time.monotonic() - start < 3


def test_http_500_then_success_is_retried(fake, opd_tokenizer):
    server = fake(lambda n, body: ("json", 500, {"error": {"message": "CUDA OOM"}}) if n in (2, 3) else None)
    teacher = fake_teacher(server.url, opd_tokenizer, max_retries=2)
    scores = teacher.score(teacher_batch(opd_tokenizer, n=2))
    assert server.posts == 1 + 3 and torch.isfinite(scores.token_logps).all() and scores.token_logps.min() < -1


def test_http_500_forever_is_a_clear_error(fake, opd_tokenizer):
    server = fake(lambda n, body: ("json", 503, {"error": {"message": "engine dead"}}) if n > 1 else None)
    teacher = fake_teacher(server.url, opd_tokenizer, max_retries=2)
    with pytest.raises(TeacherError, match=r"failed after 3 attempts; last error: HTTP 503: engine dead"):
        teacher.score(teacher_batch(opd_tokenizer, n=2))
    assert server.posts == 1 + 3


def test_malformed_json_is_retried_then_fails(fake, opd_tokenizer):
    once = fake(lambda n, body: ("raw", 200, b'{"choices": [') if n == 2 else None)
    assert fake_teacher(once.url, opd_tokenizer).score(teacher_batch(opd_tokenizer, n=2)).token_logps.shape == (2, 6)
    always = fake(lambda n, body: ("raw", 200, b"<html>proxy error</html>") if n > 1 else None)
    with pytest.raises(TeacherError, match="malformed JSON"):
        fake_teacher(always.url, opd_tokenizer).score(teacher_batch(opd_tokenizer, n=2))


def _tamper(edit):
    def plan(n, body):
        if n == 1:
            return None
        payload = good_response(body)
        edit(payload)
        return ("json", 200, payload)
    return plan


@pytest.mark.parametrize("edit, needle", [
    (lambda p: p["choices"][1]["prompt_logprobs"].pop(), r"row 1: sent \d+ tokens .* has \d+ entries"),
    (lambda p: p["choices"][0]["prompt_logprobs"].append({"1": {"logprob": -1.0, "rank": 1}}), "row 0: sent"),
    (lambda p: p["choices"][0]["prompt_logprobs"].__setitem__(-1, {"1": {"logprob": -1.0, "rank": 1}}),
     "has no log-prob for the token id"),
    (lambda p: p["choices"].pop(), "returned 1 choices"),
])
def test_misaligned_logprobs_fail_at_once(fake, opd_tokenizer, edit, needle):
    server = fake(_tamper(edit))
    teacher = fake_teacher(server.url, opd_tokenizer, max_retries=3, backoff_s=5)
    batch = teacher_batch(opd_tokenizer, n=2)
    batch.completion_mask[:] = 1
    start = time.monotonic()
    with pytest.raises(TeacherError, match="misaligned|no log-prob|choices") as err:
        teacher.score(batch)
    assert time.monotonic() - start < 4 and server.posts == 2  # not retried
    assert re.search(needle, str(err.value)), str(err.value)


def test_client_errors_fail_at_once_with_the_servers_message(fake, opd_tokenizer):
    msg = "Requested prompt logprobs of 8, which is greater than max allowed: 5"
    server = fake(lambda n, body: ("json", 400, {"object": "error", "message": msg}) if n > 1 else None)
    teacher = fake_teacher(server.url, opd_tokenizer, max_retries=3, backoff_s=5, top_k=8)
    with pytest.raises(TeacherError, match="HTTP 400.*max allowed: 5.*--max-logprobs"):
        teacher.score(teacher_batch(opd_tokenizer, n=2), "topk")
    assert server.posts == 2


def test_too_few_topk_entries_is_a_clear_error(fake, opd_tokenizer):
    server = fake()
    teacher = fake_teacher(server.url, opd_tokenizer, top_k=4)  # the fake only returns the actual token
    with pytest.raises(TeacherError, match="asked for top_k=4 but the server returned 1"):
        teacher.score(teacher_batch(opd_tokenizer, n=2), "topk")


def test_setup_checks_model_tokenizer_and_temperature(fake, opd_tokenizer):
    server = fake()
    with pytest.raises(TeacherError, match=r"serves \['fake'\], not 'other'"):
        fake_teacher(server.url, opd_tokenizer, model="other")

    def wrong_tokens(n, body):
        payload = good_response(body)
        for entry in payload["choices"][0]["prompt_logprobs"][1:]:
            for v in entry.values():
                v["decoded_token"] = "<unk>"
        return ("json", 200, payload)

    with pytest.raises(TeacherError, match="decodes token id .* the student tokenizer as"):
        fake_teacher(fake(wrong_tokens).url, opd_tokenizer, check_tokenizer=True)
    assert fake_teacher(fake(wrong_tokens).url, opd_tokenizer, check_tokenizer=False).model_name == "fake"
    # The fake ignores temperature, as vLLM's prompt_logprobs do: scoring at T != 1 must not start.
    with pytest.raises(TeacherError, match="ignores the scoring temperature.*temperature: 1.0"):
        make_teacher(opd_tokenizer, temperature=0.7, base_url=server.url, check_tokenizer=False, **FAST)


def test_params_validation():
    P = OpenAIServerTeacher.Params
    assert P(base_url="http://127.0.0.1:8000/v1/").base_url == "http://127.0.0.1:8000"
    for bad, needle in [
        ({}, "base_url is required"),
        ({"spawn_local_server": True}, "needs model"),
        ({"spawn_local_server": True, "model": "m", "base_url": "http://127.0.0.1:1"}, "not both"),
        ({"base_url": "127.0.0.1:8000"}, "http://HOST:PORT"),
        ({"base_url": "http://u:secret@127.0.0.1:1"}, "must not contain credentials"),
        ({"base_url": "http://127.0.0.1:1", "api_key_env": "sk-live-abc123"}, "NAME of an environment variable"),
    ]:
        with pytest.raises(ValidationError, match=needle):
            P(**bad)
    # Recipe errors (through the loader's formatter) never echo a key pasted into api_key_env.
    from opd_plugins.recipe.loader import pydantic_problems

    with pytest.raises(ValidationError) as err:
        P(base_url="http://127.0.0.1:1", api_key_env="sk-live-abc123")
    assert "sk-live-abc123" not in " ".join(str(p) for p in pydantic_problems(err.value, P, "teacher.params"))
