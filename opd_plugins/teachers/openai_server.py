"""``openai_server``: a teacher behind an OpenAI-compatible scoring API (vLLM, or ``opd-plugins serve-teacher``)."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator, model_validator

from opd_plugins.components import ComponentParams
from opd_plugins.context import SetupContext
from opd_plugins.errors import OPDError, TeacherError
from opd_plugins.teachers.base import Capability, Teacher, TeacherBatch, TeacherScores
from opd_plugins.teachers.http import JSONClient, check_api_key_env, check_base_url, read_api_key

_PROBE_TEXT = ("The answer is 42. Check: 6 * 7 = 42, so we are done.\n\tdef f(x):\n        return x ** 2  # "
               "naïve café, Straße; 数学 ∑ π ≈ 3.14159 🙂 <tag attr=\"v\">")


class OpenAIServerTeacher(Teacher):
    """A teacher behind an HTTP server (vllm serve, opd-plugins serve-teacher): vLLM prompt_logprobs on token ids.

    Each row's student prompt (left padding stripped) and completion are sent as token ids; the server returns
    the log-prob of every token given the ones before it (vLLM's ``prompt_logprobs``), plus the top ``top_k``
    tokens. This is how TRL's ``ServerDistillationTrainer``, verl and tinker score with a served teacher, and it
    keeps the teacher out of training memory. Works with ``vllm serve`` and ``opd-plugins serve-teacher``
    (``spawn_local_server: true`` starts the latter for ``model`` on a free loopback port).

    Every response is checked before it reaches the loss: one entry per token, each containing the token id that
    was sent; a mismatch is a :class:`TeacherError` naming the row, never misaligned training data. Transient
    failures (connection refused/reset, timeouts, HTTP 5xx, malformed JSON) are retried with exponential backoff;
    other HTTP 4xx fail at once; ``timeout_s`` bounds each request as a whole. Log-probs must be JSON numbers and
    top-k entries mappings (anything else is a :class:`TeacherError`), and the trainer checks the values
    (:meth:`~opd_plugins.teachers.base.TeacherScores.validate`). At setup the teacher checks the served model
    name, that the server's tokenizer is the student's (exactly: every decoded token it returns, at setup and in
    every response, is the student's text for that id; without decoded text, a ``vocab_sha256`` the server
    reports), and, at a temperature other than 1, that the server applies it.
    ``entropy`` is the top-k part of the teacher entropy, ``-Σ_{top-k} p log p`` (a lower bound; None when
    ``top_k`` is 0). Paper: Thinking Machines, "On-Policy Distillation" (2025),
    https://thinkingmachines.ai/blog/on-policy-distillation/
    """

    name: ClassVar[str] = "openai_server"
    capabilities: ClassVar[frozenset[str]] = frozenset({"sampled", "topk"})

    class Params(ComponentParams):
        base_url: str | None = Field(None, description="Server root, e.g. http://127.0.0.1:8000 (a trailing /v1 "
                                     "is accepted). Leave unset with spawn_local_server.")
        model: str | None = Field(None, description="Model name sent to the server (default: the first it serves); "
                                  "with spawn_local_server, the checkpoint to serve.")
        top_k: int = Field(0, ge=0, description="Also return the teacher's top-k per token (0 = sampled-token "
                           "log-probs only; vLLM needs --max-logprobs >= top_k).")
        api_key_env: str | None = Field(None, description="NAME of the environment variable holding the API key "
                                        "(sent as 'Authorization: Bearer'); the key never goes in the recipe.")
        timeout_s: float = Field(120.0, gt=0, description="Seconds to wait for one HTTP response.")
        max_retries: int = Field(3, ge=0, description="Retries of a request after a transient failure.")
        backoff_s: float = Field(1.0, ge=0, description="First retry delay; doubles on each retry.")
        concurrency: int = Field(4, ge=1, description="Requests in flight at once.")
        sequences_per_request: int = Field(8, ge=1, description="Rows sent per request.")
        temperature: float | None = Field(None, gt=0, description="Scoring temperature (default: the sampling "
                                          "temperature).")
        spawn_local_server: bool = Field(False, description="Start 'opd-plugins serve-teacher <model>' on a free "
                                         "loopback port at setup (stopped at exit) instead of using base_url.")
        spawn_args: list[str] = Field(default_factory=list, description="Extra serve-teacher arguments for the "
                                      "spawned server, e.g. ['--dtype', 'bfloat16', '--max-batch', '16'].")
        spawn_timeout_s: float = Field(600.0, gt=0, description="Seconds to wait for the spawned server to load.")
        check_tokenizer: bool = Field(True, description="Check that the server's tokenizer is the student's: every "
                                      "returned token's decoded text must equal the student's (at setup and in every "
                                      "response), or, when the server returns no decoded text, the vocab_sha256 it "
                                      "reports must equal the student's; with neither, setup refuses. Set false only "
                                      "when the tokenizers are known to be the same.")
        allow_nonfinite: bool = Field(False, description="Mask and count NaN/inf teacher log-probs instead of failing.")

        @field_validator("base_url")
        @classmethod
        def _normalise_url(cls, v: str | None) -> str | None:
            if v is None:
                return v
            v = v.strip().rstrip("/")
            return v[: -len("/v1")] if v.endswith("/v1") else v

        @model_validator(mode="after")
        def _check(self) -> "OpenAIServerTeacher.Params":
            # Model-level errors: the loader does not echo the input, so a key pasted by mistake is not printed.
            check_api_key_env(self.api_key_env)
            if self.spawn_local_server:
                if not self.model:
                    raise ValueError("spawn_local_server needs model (the checkpoint to serve)")
                if self.base_url is not None:
                    raise ValueError("set either base_url (a running server) or spawn_local_server: true, not both")
            elif self.base_url is None:
                raise ValueError("base_url is required (e.g. http://127.0.0.1:8000), unless spawn_local_server: true")
            else:
                check_base_url(self.base_url)
            return self

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.base_url: str | None = self.params.base_url
        self.model_name: str | None = None
        self.temperature = 1.0
        self._api_key: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._spawn_key: tuple | None = None
        self._tokenizer: Any = None
        self._spelled: dict[int, frozenset[str]] = {}
        self._decoded_any = False
        self._served: dict[str, Any] = {}

    @classmethod
    def example_params(cls) -> Params:
        # The contract suite points `model` at a tiny local checkpoint and serves it on loopback.
        return cls.Params(model="tiny-teacher", spawn_local_server=True)

    # -- setup -------------------------------------------------------------------------------------------------
    def setup(self, ctx: SetupContext) -> None:
        p = self.params
        self._api_key = read_api_key("openai_server", p.api_key_env)
        if p.spawn_local_server:
            from opd_plugins.models import resolve_model_path
            from opd_plugins.teachers._local_server import acquire_local_server

            try:
                self.base_url, self._spawn_key = acquire_local_server(
                    resolve_model_path(p.model), served_model_name=p.model, extra_args=p.spawn_args,
                    api_key_env=p.api_key_env, timeout_s=p.spawn_timeout_s)
            except OPDError as exc:
                raise TeacherError(f"teacher openai_server: spawn_local_server failed: {exc}") from None
        self.temperature = float(p.temperature or ctx.temperature or 1.0)
        self._pool = ThreadPoolExecutor(max_workers=p.concurrency, thread_name_prefix="opd-teacher-http")
        try:
            self.model_name = self._check_model()
            self._probe(ctx.tokenizer)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the HTTP threads and this teacher's hold on a spawned server (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._spawn_key is not None:
            from opd_plugins.teachers._local_server import release_local_server

            release_local_server(self._spawn_key)
            self._spawn_key = None

    def _check_model(self) -> str:
        data = self._request("GET", "/v1/models", None, "listing the served models")
        entries = [m for m in data.get("data", []) if isinstance(m, dict)] if isinstance(data, dict) else []
        self._served = {str(m.get("id")): m for m in entries}
        served = [m.get("id") for m in entries]
        if not served:
            raise TeacherError(f"teacher openai_server: {self._url('/v1/models')} lists no models; is base_url an "
                               "OpenAI-compatible server (vllm serve / opd-plugins serve-teacher)?")
        if self.params.model is None:
            return served[0]
        if self.params.model not in served:
            raise TeacherError(f"teacher openai_server: the server at {self._safe_base()} serves {served}, not "
                               f"{self.params.model!r}; set teacher.params.model to one of those")
        return self.params.model

    def _probe(self, tokenizer: Any) -> None:
        """Fail before training if the server's tokenizer differs from the student's, or it ignores temperature."""
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a multimodal processor wraps its tokenizer
        self._tokenizer = tokenizer if self.params.check_tokenizer else None
        ids = list(tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]) if tokenizer is not None else []
        if len(ids) < 3:
            return
        entries = self._post_scores([ids], 0, self.temperature, "the setup probe")[0]
        logps = self._parse_row(ids, entries, 1, len(ids) - 1, 0, "the setup probe")[0]
        if self.params.check_tokenizer and not self._decoded_any:
            self._check_vocab_hash(tokenizer)
        if abs(self.temperature - 1.0) > 1e-6:
            at_one = self._parse_row(ids, self._post_scores([ids], 0, 1.0, "the setup probe")[0], 1, len(ids) - 1,
                                     0, "the setup probe")[0]
            if all(abs(a - b) < 1e-6 for a, b in zip(logps, at_one)):
                raise TeacherError(
                    f"teacher openai_server: the server at {self._safe_base()} returned the same log-probs at "
                    f"temperature {self.temperature:g} and 1.0, so it ignores the scoring temperature (vLLM computes "
                    "prompt_logprobs from raw logits). Set teacher.params.temperature: 1.0 to score at T=1 as verl "
                    "does, or serve with opd-plugins serve-teacher, which applies it."
                )

    def _check_vocab_hash(self, tokenizer: Any) -> None:
        """No decoded text to compare: the server must report the sha256 of its vocabulary (as the offline cache
        records it), else the tokenizers cannot be compared and setup refuses."""
        from opd_plugins.teachers.cache.format import tokenizer_sha256

        entry = self._served.get(str(self.model_name), {})
        reported = next((entry[k] for k in ("vocab_sha256", "tokenizer_sha256") if isinstance(entry.get(k), str)), None)
        if reported is None:
            raise TeacherError(
                f"teacher openai_server: cannot check that the server at {self._safe_base()} uses the student's "
                "tokenizer: its responses carry no decoded_token and /v1/models reports no vocab_sha256. Serve with "
                "vLLM or opd-plugins serve-teacher (both return decoded tokens), or set teacher.params."
                "check_tokenizer: false only if the two tokenizers are known to be the same")
        ours = tokenizer_sha256(tokenizer)
        if reported != ours:
            raise TeacherError(
                f"teacher openai_server: the server at {self._safe_base()} reports vocabulary sha256 {reported[:12]}…, "
                f"the student tokenizer's is {ours[:12]}…: token ids do not mean the same tokens on both sides. "
                "Serve a teacher with the student's tokenizer")

    def _check_decoded(self, token_id: int, decoded: Any, where: str) -> None:
        """The server's decoded text of ``token_id`` must be one of the student tokenizer's spellings of it."""
        if self._tokenizer is None or decoded is None:
            return
        if not isinstance(decoded, str):
            raise TeacherError(f"teacher openai_server: malformed response for {where}: decoded_token of token id "
                               f"{token_id} is {type(decoded).__name__}, not text")
        self._decoded_any = True
        spellings = self._spelled.get(token_id)
        if spellings is None:
            spellings = self._spelled[token_id] = _spellings(self._tokenizer, token_id)
        if not spellings or decoded in spellings or "\ufffd" in decoded:
            return  # a byte-fallback piece has no text of its own to compare
        ours = sorted(spellings)[0]
        raise TeacherError(
            f"teacher openai_server: the server at {self._safe_base()} decodes token id {token_id} as {decoded!r}, "
            f"the student tokenizer as {ours!r} (at {where}): the two tokenizers differ, so token-level distillation "
            "would pair unrelated tokens. Serve a teacher with the student's tokenizer (the same model family), or "
            "set check_tokenizer: false only if they are known to be the same")

    # -- scoring -----------------------------------------------------------------------------------------------
    def score(self, batch: TeacherBatch, want: Capability = "sampled") -> TeacherScores:
        if self._pool is None:
            raise RuntimeError("openai_server teacher used before setup()")
        if want == "full":
            raise TeacherError("teacher openai_server cannot return full-vocabulary log-probs (only sampled and "
                               "top-k); use a divergence estimator that needs 'sampled' or 'topk'")
        B, T = batch.completion_ids.shape
        k = self.params.top_k if self.params.top_k > 0 else (1 if want == "topk" else 0)
        token_logps = torch.zeros(B, T)
        topk_ids = torch.zeros(B, T, k, dtype=torch.long) if k else None
        topk_logps = torch.full((B, T, k), -math.inf) if k else None
        mask = batch.completion_mask.to(torch.float32).cpu()
        rows = []  # (row, ids, prompt_len, n_completion)
        for i in range(B):
            prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
            valid = mask[i].nonzero()
            if len(valid) == 0:
                continue
            n = int(valid[-1]) + 1  # score up to the last unmasked completion token
            if not prompt:
                raise TeacherError(f"teacher openai_server: row {i} has an empty prompt, so its first completion "
                                   "token has no teacher log-prob")
            rows.append((i, prompt + batch.completion_ids[i, :n].tolist(), len(prompt), n))
        chunks = [rows[s:s + self.params.sequences_per_request]
                  for s in range(0, len(rows), self.params.sequences_per_request)]
        abort = threading.Event()

        def send(chunk):
            return self._post_scores([r[1] for r in chunk], k, self.temperature, f"rows {chunk[0][0]}..{chunk[-1][0]}",
                                     abort)

        futures = [self._pool.submit(send, c) for c in chunks]
        try:
            for chunk, fut in zip(chunks, futures):
                for (i, ids, P, n), entries in zip(chunk, fut.result()):
                    lp, ti, tl = self._parse_row(ids, entries, P, n, k, f"row {i}")
                    token_logps[i, :n] = torch.tensor(lp)
                    if k:
                        topk_ids[i, :n] = torch.tensor(ti, dtype=torch.long)
                        topk_logps[i, :n] = torch.tensor(tl)
        except BaseException:
            abort.set()
            for fut in futures:
                fut.cancel()
            raise
        valid = mask.bool()
        out = TeacherScores(token_logps=torch.where(valid, token_logps, 0.0), mask=mask)
        if k:
            topk_logps = torch.where(valid.unsqueeze(-1), topk_logps, 0.0)
            probs = torch.where(valid.unsqueeze(-1), topk_logps.exp(), 0.0)
            out.topk_ids, out.topk_logps = topk_ids * valid.long().unsqueeze(-1), topk_logps
            out.topk_mass = probs.sum(-1)
            out.entropy = -torch.where(probs > 0, probs * topk_logps, 0.0).sum(-1)
        dev = batch.completion_ids.device
        for name in TeacherScores.TENSOR_FIELDS:
            t = getattr(out, name)
            if t is not None:
                setattr(out, name, t.to(dev))
        return out

    def _parse_row(self, ids: list[int], entries: Any, P: int, n: int, k: int, what: str):
        """Completion positions ``P..P+n-1`` of one choice's ``prompt_logprobs``: token log-probs and top-k."""
        if entries is None:
            raise TeacherError(f"teacher openai_server: the response for {what} has no prompt_logprobs; the server "
                               "must support vLLM's prompt_logprobs request field (vllm serve, opd-plugins "
                               "serve-teacher)")
        if not isinstance(entries, list) or len(entries) != len(ids):
            got = f"{len(entries)} entries" if isinstance(entries, list) else type(entries).__name__
            raise TeacherError(
                f"teacher openai_server: misaligned response for {what}: sent {len(ids)} tokens ({P} prompt + {n} "
                f"completion) but prompt_logprobs has {got}. Not training on it: check that the server scores token "
                "ids without adding special tokens (vLLM does for token-id prompts)."
            )
        logps, top_ids, top_lps = [], [], []
        for j in range(P, P + n):
            entry = entries[j]
            tok = ids[j]
            where = f"completion position {j - P} of {what}"
            actual = entry.get(str(tok)) if isinstance(entry, dict) else None
            if not isinstance(actual, dict) or "logprob" not in actual:
                have = sorted(map(str, entry))[:8] if isinstance(entry, dict) else entry
                raise TeacherError(
                    f"teacher openai_server: misaligned response for {what}: completion position {j - P} (token "
                    f"{j} of the sequence) has no log-prob for the token id {tok} that was sent (the entry has "
                    f"{have}). Not training on it: the server and the student disagree on the tokens."
                )
            logps.append(_logprob(actual.get("logprob"), tok, where))
            self._check_decoded(tok, actual.get("decoded_token"), where)
            if k:
                ranked = sorted(((_token_id(t, where), _logprob(v.get("logprob") if isinstance(v, dict) else v, t,
                                                                 where, entry=v)) for t, v in entry.items()),
                                key=_best_first)[:k]
                if len(ranked) < k:
                    raise TeacherError(
                        f"teacher openai_server: asked for top_k={k} but the server returned {len(ranked)} entries at "
                        f"completion position {j - P} of {what}; start vLLM with --max-logprobs >= {k}"
                    )
                for t, v in entry.items():
                    self._check_decoded(int(t), v.get("decoded_token"), where)
                top_ids.append([t for t, _ in ranked])
                top_lps.append([v for _, v in ranked])
        return logps, top_ids, top_lps

    # -- HTTP ---------------------------------------------------------------------------------------------------
    def _post_scores(self, seqs: list[list[int]], k: int, temperature: float, what: str,
                     abort: threading.Event | None = None) -> list:
        body = {"model": self.model_name, "prompt": seqs, "max_tokens": 1, "temperature": temperature,
                "prompt_logprobs": k}
        data = self._request("POST", "/v1/completions", body, f"scoring {what}", abort)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or len(choices) != len(seqs):
            got = len(choices) if isinstance(choices, list) else "no"
            raise TeacherError(f"teacher openai_server: sent {len(seqs)} sequences for {what} but the server "
                               f"returned {got} choices; not training on a misaligned response")
        choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
        return [c.get("prompt_logprobs") if isinstance(c, dict) else None for c in choices]

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _safe_base(self) -> str:
        return str(self.base_url)

    def _request(self, method: str, path: str, body: Any, what: str, abort: threading.Event | None = None) -> Any:
        p = self.params
        client = JSONClient(
            "openai_server", p.timeout_s, p.max_retries, p.backoff_s, api_key=self._api_key,
            api_key_env=p.api_key_env,
            status_hints={400: "the server rejected the request (for vLLM, check --max-logprobs >= top_k and that "
                               "the sequences fit --max-model-len)"},
            unreachable_hint="check that the server is running and reachable from this machine at that address "
                             "(start it with 'opd-plugins serve-teacher MODEL --port P' or 'vllm serve MODEL --port P "
                             "--max-logprobs K'), and that base_url is right",
            timeout_hint=f"the server may be overloaded: raise timeout_s (now {p.timeout_s:g} s) or lower "
                         "sequences_per_request/concurrency")
        return client.request(method, self._url(path), body, what, abort)


def _logprob(value: Any, token: Any, where: str, entry: Any = ...) -> float:
    """A log-prob from a response: a JSON number (NaN/inf are left to the trainer's checks), never a string,
    boolean or null."""
    if entry is not ... and not isinstance(entry, dict):
        raise TeacherError(f"teacher openai_server: malformed response at {where}: the entry for token {token!r} is "
                           f"{type(entry).__name__} ({entry!r:.40}), not a mapping with a logprob")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TeacherError(f"teacher openai_server: malformed response at {where}: the log-prob of token {token!r} is "
                           f"{type(value).__name__} ({value!r:.40}), not a number. Not training on it: check that "
                           "base_url is a vLLM-compatible scoring server")
    return float(value)


def _best_first(entry: tuple[int, float]) -> float:
    """Sort key of a top-k entry: highest log-prob first, and NaN before everything, so that a NaN the server
    returned is kept (and refused by the checks) rather than sorted out of the top-k."""
    return -math.inf if math.isnan(entry[1]) else -entry[1]


def _token_id(key: Any, where: str) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise TeacherError(f"teacher openai_server: malformed response at {where}: top-k key {key!r:.40} is not a "
                           "token id") from None


def _spellings(tokenizer: Any, token_id: int) -> frozenset[str]:
    """Ways a server may write a token's text exactly: decoded alone, the raw vocabulary piece, or the piece with
    SentencePiece's '▁' / byte-level BPE's 'Ġ' as the space it stands for."""
    out = {tokenizer.decode([token_id])}
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        out |= {piece, piece.replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", "\n")}
        try:
            out.add(tokenizer.convert_tokens_to_string([piece]))
        except Exception:  # a tokenizer without it
            pass
    return frozenset(x for x in out if x is not None)
