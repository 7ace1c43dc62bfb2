"""Teacher data is checked before anything trains on it (issue 13, items 9-12): implausible values, served-teacher
responses of the wrong type, a tokenizer that differs, a server that drips its answer."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch
from test_openai_server import FAST, FakeServer, fake, fake_teacher, good_response  # noqa: F401 - fixture

from opd_plugins.errors import TeacherError
from opd_plugins.teachers.base import TeacherBatch, TeacherScores
from opd_plugins.testing.contracts import make_inputs, random_pair, teacher_batch


def scores_and_batch(B=3, T=5, V=11, full=True):
    s_logits, t_logps, tokens = random_pair(B=B, T=T, V=V)
    _, _, teacher = make_inputs(s_logits, t_logps, tokens)
    if not full:
        teacher.logps = None
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    batch = TeacherBatch(torch.ones(B, 2, dtype=torch.long), torch.ones(B, 2, dtype=torch.long), tokens, mask)
    return teacher, batch


def refusal(scores, batch, **kw) -> str:
    with pytest.raises(TeacherError) as exc:
        scores.validate(batch, "the_teacher", **kw)
    assert "'the_teacher'" in str(exc.value)
    return str(exc.value)


def test_plausible_scores_pass_full_and_topk():
    for full in (True, False):
        scores, batch = scores_and_batch(full=full)
        assert scores.validate(batch, "t") == 0


def test_float16_topk_storage_passes():
    scores, batch = scores_and_batch(full=False)
    scores.topk_logps = scores.topk_logps.half().float()
    assert scores.validate(batch, "t") == 0


def test_garbage_at_masked_positions_is_ignored():
    scores, batch = scores_and_batch()
    scores.token_logps[0, 4] = 7.0
    scores.topk_logps[0, 4] = torch.tensor([1.0, 5.0, -3.0, 2.0])
    assert scores.validate(batch, "t") == 0


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.token_logps.__setitem__((1, 2), 5.0), "token log-prob above 0"),
    (lambda s: s.token_logps.__setitem__((1, 2), -1e30), "below -10000"),
    (lambda s: s.topk_logps.__setitem__((2, 1, 0), 0.5), "top-k log-prob above 0"),
    (lambda s: s.topk_logps.__setitem__((2, 1), s.topk_logps[2, 1].flip(-1).clone()), "not sorted"),
    (lambda s: s.topk_ids.__setitem__((2, 1, 1), s.topk_ids[2, 1, 0].item()), "same token id twice"),
    (lambda s: s.topk_ids.__setitem__((2, 1, 3), -4), "negative top-k token id"),
    (lambda s: s.entropy.__setitem__((1, 1), -0.5), "negative entropy"),
    (lambda s: s.topk_mass.__setitem__((1, 1), 1.7), "top-k mass outside"),
])
def test_implausible_scores_are_refused(edit, needle):
    scores, batch = scores_and_batch(full=False)
    edit(scores)
    msg = refusal(scores, batch)
    assert needle in msg and "row" in msg and "Not training on them" in msg, msg


def test_sampled_token_inconsistent_with_its_topk_entry():
    scores, batch = scores_and_batch(full=False)
    ids, tokens = scores.topk_ids, batch.completion_ids
    i, t = 1, 1
    tokens[i, t] = ids[i, t, 0]  # the sampled token is the teacher's best ...
    scores.token_logps[i, t] = scores.topk_logps[i, t, 0] - 2.0  # ... but its log-prob says otherwise
    assert "differs from its own top-k entry" in refusal(scores, batch)
    scores, batch = scores_and_batch(full=False)
    outside = next(v for v in range(11) if v not in ids[i, t].tolist())
    batch.completion_ids[i, t] = outside
    scores.token_logps[i, t] = scores.topk_logps[i, t, 0] + 0.1 if scores.topk_logps[i, t, 0] < -0.2 else -1e-4
    assert "outside the top-k but more likely" in refusal(scores, batch)


def test_probability_mass_above_one():
    scores, batch = scores_and_batch(full=False)
    scores.topk_logps[1, 1] = torch.log(torch.tensor([0.6, 0.5, 0.4, 0.3]))
    scores.topk_ids[1, 1] = torch.tensor([1, 2, 3, 4])
    batch.completion_ids[1, 1] = 1
    scores.token_logps[1, 1] = scores.topk_logps[1, 1, 0]
    scores.topk_mass = None
    assert "sum to more than 1" in refusal(scores, batch)


def test_full_logps_must_be_normalised_and_agree_with_token_logps():
    scores, batch = scores_and_batch()
    scores.logps[1, 1] += 0.5
    assert "do not sum to probability 1" in refusal(scores, batch)
    scores, batch = scores_and_batch()
    scores.token_logps[1, 1] -= 0.3
    assert "differ from the full-vocabulary" in refusal(scores, batch)


def test_booleans_and_integer_ids_as_logprobs():
    scores, batch = scores_and_batch(full=False)
    scores.token_logps = scores.token_logps < -1
    assert "dtype torch.bool" in refusal(scores, batch)
    scores, batch = scores_and_batch(full=False)
    scores.topk_ids = scores.topk_ids.float()
    assert "token ids must be integers" in refusal(scores, batch)


def test_nan_in_a_non_sampled_topk_entry_is_refused_or_masked():
    """The issue's case: NaN in top-k entries that are not the sampled token produced NaN weights."""
    scores, batch = scores_and_batch(full=False)
    scores.topk_logps[2, 3, -1] = float("nan")
    assert "non-finite" in refusal(scores, batch)
    scores, batch = scores_and_batch(full=False)
    scores.topk_logps[2, 3, -1] = float("nan")
    assert scores.validate(batch, "t", allow_nonfinite=True) == 1
    assert scores.mask[2, 3] == 0 and torch.isfinite(scores.topk_logps).all()


# ---------------------------------------------------------------------------------------------------------------
# A served teacher whose response has the wrong types or values (fake servers on loopback)
# ---------------------------------------------------------------------------------------------------------------


def tampered(edit):
    def plan(n, body):
        if n == 1:
            return None  # the setup probe
        payload = good_response(body)
        for choice in payload["choices"]:
            for entry in choice["prompt_logprobs"][1:]:
                edit(entry)
        return ("json", 200, payload)
    return plan


def _set_all(key, value):
    def edit(entry):
        for v in entry.values():
            v[key] = value
    return edit


@pytest.mark.parametrize("edit, needle, where", [
    (_set_all("logprob", 5.0), "token log-prob above 0", "validate"),
    (_set_all("logprob", -1e30), "below -10000", "validate"),
    (_set_all("logprob", True), "the log-prob of token .* is bool", "score"),
    (_set_all("logprob", "-0.5"), "the log-prob of token .* is str", "score"),
    (_set_all("logprob", None), "is NoneType", "score"),
    (lambda e: e.update({"17": [-0.5, 1]}), "the entry for token '17' is list", "score"),
    (lambda e: e.update({"99": {"logprob": float("nan"), "rank": 2}}), "non-finite", "validate"),  # not sorted out
    (lambda e: e.update({"x17": {"logprob": -9.0, "rank": 3}}), "top-k key 'x17' is not a token id", "score"),
])
def test_served_teacher_bad_values_are_refused_naming_the_teacher(fake, opd_tokenizer, edit, needle, where):
    server = fake(tampered(edit))
    teacher = fake_teacher(server.url, opd_tokenizer, top_k=1)
    batch = teacher_batch(opd_tokenizer, n=2)
    with pytest.raises(TeacherError, match=needle) as exc:
        teacher.score(batch, "topk").validate(batch, teacher.name)
    assert "openai_server" in str(exc.value)
    assert where == "validate" or "malformed response" in str(exc.value)


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer check is exact
# ---------------------------------------------------------------------------------------------------------------


def decoded_plan(tokenizer, wrong_id=None, vocab_hash=None):
    """Every entry carries the student tokenizer's decoded text (one id's text replaced when ``wrong_id``)."""
    def plan(n, body):
        payload = good_response(body)
        for choice in payload["choices"]:
            for entry in choice["prompt_logprobs"][1:]:
                for t, v in entry.items():
                    v["decoded_token"] = "\u2581other" if int(t) == wrong_id else tokenizer.decode([int(t)])
        return ("json", 200, payload)
    return plan


def test_one_differing_token_is_enough_to_refuse(fake, opd_tokenizer):
    from opd_plugins.teachers.openai_server import _PROBE_TEXT

    ids = opd_tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    assert fake_teacher(fake(decoded_plan(opd_tokenizer)).url, opd_tokenizer, check_tokenizer=True)
    with pytest.raises(TeacherError, match=f"decodes token id {ids[5]} as '\u2581other'"):
        fake_teacher(fake(decoded_plan(opd_tokenizer, wrong_id=ids[5])).url, opd_tokenizer, check_tokenizer=True)


def test_a_differing_token_in_a_later_response_is_refused(fake, opd_tokenizer):
    batch = teacher_batch(opd_tokenizer, n=2)
    wrong = int(batch.completion_ids[1, 0])
    probe = decoded_plan(opd_tokenizer)
    later = decoded_plan(opd_tokenizer, wrong_id=wrong)
    server = fake(lambda n, body: probe(n, body) if n == 1 else later(n, body))
    teacher = fake_teacher(server.url, opd_tokenizer, check_tokenizer=True)
    with pytest.raises(TeacherError, match=f"decodes token id {wrong} as"):
        teacher.score(batch)


class HashServer(FakeServer):
    """A fake whose /v1/models entry reports a vocabulary hash (and whose responses carry no decoded text)."""

    def __init__(self, vocab_sha256):
        super().__init__(lambda n, body: None)
        handler = self.httpd.RequestHandlerClass

        def do_GET(h):
            h._reply(200, json.dumps({"object": "list", "data": [
                {"id": "fake", "object": "model", "vocab_sha256": vocab_sha256}]}).encode())

        handler.do_GET = do_GET


def test_without_decoded_text_a_vocab_hash_is_compared_or_setup_refuses(fake, opd_tokenizer):
    from opd_plugins.teachers.cache.format import tokenizer_sha256

    with pytest.raises(TeacherError, match="cannot check .* no decoded_token .* no vocab_sha256.*check_tokenizer: false"):
        fake_teacher(fake().url, opd_tokenizer, check_tokenizer=True)
    good, bad = HashServer(tokenizer_sha256(opd_tokenizer)), HashServer("0" * 64)
    try:
        assert fake_teacher(good.url, opd_tokenizer, check_tokenizer=True).model_name == "fake"
        with pytest.raises(TeacherError, match="reports vocabulary sha256 000000000000"):
            fake_teacher(bad.url, opd_tokenizer, check_tokenizer=True)
    finally:
        good.stop()
        bad.stop()


# ---------------------------------------------------------------------------------------------------------------
# A total deadline per request
# ---------------------------------------------------------------------------------------------------------------


class DripServer:
    """A raw loopback server that answers every request one byte every ``interval`` seconds (status line and
    headers included), as a slowloris-style server does."""

    def __init__(self, interval: float, body: bytes = b'{"object": "list", "data": [{"id": "fake"}]}'):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.interval, self.stopped = interval, threading.Event()
        self.reply = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                      .encode() + body)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        self.sock.settimeout(0.1)
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn):
        try:
            conn.recv(65536)
            for i in range(len(self.reply)):
                if self.stopped.wait(self.interval):
                    break
                conn.sendall(self.reply[i:i + 1])
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self):
        self.stopped.set()
        self.sock.close()


def test_a_dripping_server_cannot_outlast_timeout_s(opd_tokenizer):
    """Each byte arrives well within the per-read timeout; the whole answer would take about a minute."""
    from opd_plugins.teachers.http import JSONClient

    server = DripServer(interval=0.4)
    try:
        client = JSONClient("openai_server", timeout_s=1.0, max_retries=1, backoff_s=0.01)
        start = time.monotonic()
        with pytest.raises(TeacherError, match=r"timed out after 1 s \(the whole response must arrive"):
            client.request("GET", f"{server.url}/v1/models", None, "listing the served models")
        assert time.monotonic() - start < 4  # two attempts of 1 s, not a minute
        with pytest.raises(TeacherError, match="timed out after 1 s"):
            fake_teacher(server.url, opd_tokenizer, timeout_s=1.0, max_retries=0)
    finally:
        server.stop()
