"""The ``blackbox_text`` teacher: a fake OpenAI chat endpoint on loopback, a tiny local model, dataset columns.

The fake server is a stdlib ``ThreadingHTTPServer`` on 127.0.0.1 in a thread, shut down by its fixture; timeouts
and backoffs are small and every request loop is bounded.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from opd_plugins.errors import DataError, TeacherError
from opd_plugins.teachers.blackbox_text import BlackBoxTextTeacher, as_messages

KEY_ENV = "OPD_TEST_TEXT_TEACHER_KEY"
FAST = dict(timeout_s=5.0, max_retries=2, backoff_s=0.02)


class FakeChat:
    """What the fake endpoint does; every request is recorded."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.inflight = self.max_inflight = 0
        self.delay = 0.0
        self.fail_first = 0          # answer HTTP 500 to the first N requests
        self.key: str | None = None  # require "Authorization: Bearer <key>"
        self.body: bytes | None = None  # a fixed raw response body
        self.n_choices = 1


def _handler(fake: FakeChat):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code: int, payload: bytes) -> None:
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:  # the client gave up (timeout test)
                pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            auth = self.headers.get("Authorization")
            with fake.lock:
                fake.requests.append({"t": time.monotonic(), "path": self.path, "body": body, "auth": auth})
                n = len(fake.requests)
                fake.inflight += 1
                fake.max_inflight = max(fake.max_inflight, fake.inflight)
            try:
                time.sleep(fake.delay)
                if fake.key is not None and auth != f"Bearer {fake.key}":
                    # a careless server that echoes the credential it got
                    return self._send(401, json.dumps({"error": {"message": f"invalid credential {auth}"}}).encode())
                if n <= fake.fail_first:
                    return self._send(500, json.dumps({"error": {"message": "overloaded"}}).encode())
                if fake.body is not None:
                    return self._send(200, fake.body)
                question = body["messages"][-1]["content"]
                choices = [{"index": i, "message": {"role": "assistant", "content": f" reply to {question} "},
                            "finish_reason": "stop"} for i in range(fake.n_choices)]
                return self._send(200, json.dumps({"id": "x", "object": "chat.completion", "choices": choices}).encode())
            finally:
                with fake.lock:
                    fake.inflight -= 1

    return Handler


@pytest.fixture
def fake():
    state = FakeChat()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def chat_teacher(fake, **params) -> BlackBoxTextTeacher:
    teacher = BlackBoxTextTeacher(BlackBoxTextTeacher.Params(source="openai_chat", base_url=fake.url + "/v1",
                                                             model="teacher-8b", **{**FAST, **params}))
    teacher.setup()
    return teacher


PROMPTS = [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(10)]


def test_concurrent_requests_keep_prompt_order(fake):
    fake.delay = 0.05
    teacher = chat_teacher(fake, concurrency=3, max_tokens=7, temperature=0.5, system_prompt="Be brief.",
                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    out = teacher.generate([*PROMPTS, "a plain prompt"])
    teacher.close()
    assert out == [f"reply to What is {i} + {i}?" for i in range(10)] + ["reply to a plain prompt"]  # stripped
    assert len(fake.requests) == 11 and {r["path"] for r in fake.requests} == {"/v1/chat/completions"}
    assert 1 < fake.max_inflight <= 3  # concurrent, never above the limit
    body = fake.requests[0]["body"]
    assert body["model"] == "teacher-8b" and body["max_tokens"] == 7 and body["temperature"] == 0.5 and body["n"] == 1
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert all(r["auth"] is None for r in fake.requests)  # no api_key_env: no Authorization header


def test_prompt_template_gives_the_teacher_privileged_context(fake):
    teacher = chat_teacher(fake, prompt_template="{prompt}\n\n{hint}")
    assert teacher.required_columns() == ("hint",)
    rows = [{"prompt": p, "hint": f"(Hint: {i + i}.)"} for i, p in enumerate(PROMPTS[:2])]
    assert teacher.generate(PROMPTS[:2], rows) == [f"reply to What is {i} + {i}?\n\n(Hint: {i + i}.)" for i in range(2)]
    with pytest.raises(DataError, match="no column 'hint'"):
        teacher.generate(PROMPTS[:1], [{"answer": "0"}])
    with pytest.raises(ValidationError, match="must contain {prompt}"):
        BlackBoxTextTeacher.Params(source="local_model", model="m", prompt_template="{hint}")
    with pytest.raises(ValidationError, match="prompt_template does not apply to source: column"):
        BlackBoxTextTeacher.Params(source="column", column="answer", prompt_template="{prompt}")


def test_api_key_from_env_var_is_sent_and_never_shown(fake, monkeypatch, caplog):
    key = "sk-test-4f9a1c77e0b2"
    fake.key = key
    monkeypatch.setenv(KEY_ENV, key)
    caplog.set_level(logging.DEBUG)
    teacher = chat_teacher(fake, api_key_env=KEY_ENV)
    assert teacher.generate(PROMPTS[:2]) == ["reply to What is 0 + 0?", "reply to What is 1 + 1?"]
    assert {r["auth"] for r in fake.requests} == {f"Bearer {key}"}
    assert key not in repr(teacher) and key not in json.dumps(teacher.params.model_dump())

    monkeypatch.setenv(KEY_ENV, "sk-wrong-0000000000")
    wrong = chat_teacher(fake, api_key_env=KEY_ENV)
    with pytest.raises(TeacherError) as exc:
        wrong.generate(PROMPTS[:1])
    msg = str(exc.value)
    assert "HTTP 401" in msg and KEY_ENV in msg and "sk-wrong" not in msg and "***" in msg
    assert key not in caplog.text and "sk-wrong" not in caplog.text

    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(TeacherError, match=f"{KEY_ENV}, which is not set"):
        chat_teacher(fake, api_key_env=KEY_ENV)
    with pytest.raises(ValidationError, match="NAME of an environment variable"):
        BlackBoxTextTeacher.Params(source="openai_chat", base_url=fake.url, model="m", api_key_env="sk-abc-123")


def test_http_500_is_retried_with_backoff_then_succeeds(fake):
    fake.fail_first = 2
    teacher = chat_teacher(fake, max_retries=3, backoff_s=0.1)
    assert teacher.generate(PROMPTS[:1]) == ["reply to What is 0 + 0?"]
    t = [r["t"] for r in fake.requests]
    assert len(t) == 3
    assert t[1] - t[0] >= 0.09 and t[2] - t[1] >= 0.19  # 0.1 s, then doubled


def test_timeout_is_a_clear_error_after_the_retries(fake):
    fake.delay = 1.0
    teacher = chat_teacher(fake, timeout_s=0.2, max_retries=1, backoff_s=0.01)
    t0 = time.monotonic()
    with pytest.raises(TeacherError) as exc:
        teacher.generate(PROMPTS[:1])
    msg = str(exc.value)
    assert "failed after 2 attempts" in msg and "timed out after 0.2 s" in msg and "raise timeout_s" in msg
    assert len(fake.requests) == 2 and time.monotonic() - t0 < 3


def test_malformed_json_is_a_clear_error(fake):
    fake.body = b"{this is not json"
    teacher = chat_teacher(fake, max_retries=1)
    with pytest.raises(TeacherError, match="malformed JSON in the response"):
        teacher.generate(PROMPTS[:1])
    assert len(fake.requests) == 2


@pytest.mark.parametrize("n_choices", [0, 2])
def test_wrong_number_of_choices_is_an_error(fake, n_choices):
    fake.n_choices = n_choices
    teacher = chat_teacher(fake)
    with pytest.raises(TeacherError, match=f"returned {n_choices} choices"):
        teacher.generate(PROMPTS[:3])


def test_missing_message_content_is_an_error(fake):
    fake.body = json.dumps({"choices": [{"message": {"role": "assistant"}}]}).encode()
    with pytest.raises(TeacherError, match="no message content"):
        chat_teacher(fake).generate(PROMPTS[:1])


def test_params_are_validated_per_source():
    with pytest.raises(ValidationError, match="openai_chat needs base_url"):
        BlackBoxTextTeacher.Params(source="openai_chat", model="m")
    with pytest.raises(ValidationError, match="openai_chat needs model"):
        BlackBoxTextTeacher.Params(source="openai_chat", base_url="http://127.0.0.1:8000")
    with pytest.raises(ValidationError, match="must not contain credentials"):
        BlackBoxTextTeacher.Params(source="openai_chat", model="m", base_url="http://u:p@127.0.0.1:8000")
    with pytest.raises(ValidationError, match="local_model needs model"):
        BlackBoxTextTeacher.Params(source="local_model")
    with pytest.raises(ValidationError, match="exactly one of column"):
        BlackBoxTextTeacher.Params(source="column")
    with pytest.raises(ValidationError, match="column does not apply to source: openai_chat"):
        BlackBoxTextTeacher.Params(source="openai_chat", base_url="http://127.0.0.1:8000", model="m", column="x")
    with pytest.raises(ValidationError, match="plain column names"):
        BlackBoxTextTeacher.Params(source="column", template="{answer[0]}")
    with pytest.raises(ValidationError, match="source"):
        BlackBoxTextTeacher.Params()


def test_score_says_it_is_text_only(opd_tokenizer):
    from opd_plugins.testing.contracts import teacher_batch

    teacher = BlackBoxTextTeacher(BlackBoxTextTeacher.example_params())
    with pytest.raises(TeacherError, match="text-only.*preference objective"):
        teacher.score(teacher_batch(opd_tokenizer))
    assert teacher.capabilities == frozenset({"text"})


def test_local_model_generates_strings(opd_tiny_model_dir):
    teacher = BlackBoxTextTeacher(BlackBoxTextTeacher.Params(source="local_model", model=str(opd_tiny_model_dir),
                                                             max_tokens=5, batch_size=2, system_prompt="Be brief."))
    teacher.setup()
    prompts = [*PROMPTS[:3], "plain text prompt"]
    out = teacher.generate(prompts)
    assert len(out) == 4 and all(isinstance(t, str) for t in out)
    assert teacher.generate(prompts) == out  # greedy (temperature 0): deterministic
    assert teacher.tokenizer.padding_side == "left"
    teacher.close()
    assert teacher.model is None
    sampled = BlackBoxTextTeacher(BlackBoxTextTeacher.Params(source="local_model", model=str(opd_tiny_model_dir),
                                                             max_tokens=5, temperature=1.0))
    out = sampled.generate(prompts)  # set up on first use
    assert len(out) == 4 and any(out)  # the random tiny model's greedy choice is a newline; sampling gives text


def test_column_and_template_sources():
    rows = [{"answer": "7", "solution": "3 + 4 = 7"}, {"answer": "9", "solution": "4 + 5 = 9"}]
    col = BlackBoxTextTeacher(BlackBoxTextTeacher.Params(source="column", column="solution"))
    assert col.required_columns() == ("solution",)
    assert col.generate(PROMPTS[:2], rows) == ["3 + 4 = 7", "4 + 5 = 9"]
    tpl = BlackBoxTextTeacher(BlackBoxTextTeacher.Params(source="column", template="The answer is {answer}."))
    assert tpl.required_columns() == ("answer",)
    assert tpl.generate(PROMPTS[:2], rows) == ["The answer is 7.", "The answer is 9."]
    with pytest.raises(DataError, match="no column 'answer'"):
        tpl.generate(PROMPTS[:1], [{"hint": "x"}])
    with pytest.raises(TeacherError, match="needs the dataset rows of the prompts"):
        tpl.generate(PROMPTS[:2])


def test_as_messages():
    assert as_messages("hi") == [{"role": "user", "content": "hi"}]
    assert as_messages("hi", "sys")[0] == {"role": "system", "content": "sys"}
    convo = [{"role": "system", "content": "own"}, {"role": "user", "content": "q"}]
    assert as_messages(convo, "sys") == convo  # an existing system message is kept, not doubled


def test_dpo_loss_types_are_trl_branches():
    """Every loss_type a SODA recipe accepts is a branch of TRL's DPOTrainer loss (catches a TRL upgrade)."""
    import inspect
    import typing

    from trl import DPOTrainer

    from opd_plugins.recipe.preference import LossType

    source = inspect.getsource(DPOTrainer._compute_loss)
    missing = [t for t in typing.get_args(LossType) if f'loss_type == "{t}"' not in source]
    assert not missing, missing
