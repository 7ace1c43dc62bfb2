"""``blackbox_text``: a teacher that only returns response text (SODA's black-box teacher)."""

from __future__ import annotations

import string
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from opd_plugins.components import ComponentParams
from opd_plugins.context import SetupContext
from opd_plugins.errors import DataError, TeacherError
from opd_plugins.generation import generate_text
from opd_plugins.teachers.base import Capability, Teacher, TeacherBatch, TeacherScores
from opd_plugins.teachers.http import JSONClient, check_api_key_env, check_base_url, read_api_key

Prompt = list[dict[str, Any]] | str

# Which params belong to which source: setting one for another source is a recipe error, not a silent no-op.
_SOURCE_FIELDS: dict[str, frozenset[str]] = {
    "openai_chat": frozenset({"base_url", "model", "api_key_env", "timeout_s", "max_retries", "backoff_s",
                              "concurrency", "extra_body", "max_tokens", "temperature", "system_prompt",
                              "prompt_template"}),
    "local_model": frozenset({"model", "dtype", "device", "batch_size", "trust_remote_code", "max_tokens",
                              "temperature", "system_prompt", "prompt_template"}),
    "column": frozenset({"column", "template"}),
}


class BlackBoxTextTeacher(Teacher):
    """A teacher that only returns response text: no token log-probs (black-box distillation, SODA).

    ``source`` says where the text comes from: ``openai_chat``, any OpenAI-compatible ``/v1/chat/completions``
    endpoint (vLLM, SGLang, a hosted API; one request per prompt, ``concurrency`` in flight, transient failures
    retried with exponential backoff, the API key read from the environment variable named by ``api_key_env`` and
    never logged); ``local_model``, generations of a local transformers checkpoint; ``column``, a dataset column that
    already holds the teacher's responses (``column``) or a ``template`` over the row's columns (e.g.
    ``"The answer is {answer}."``). For the two model sources, ``prompt_template`` can give the teacher privileged
    context the student never sees (``"{prompt}\n\n{hint}"``, as ``self_context`` does for token teachers).

    A text teacher serves :meth:`generate`, not :meth:`score`, so it pairs only with a preference objective
    (``divergence: {name: dpo}``); the recipe validator enforces this both ways.
    Paper: SODA, "Semi On-Policy Black-Box Distillation" (teacher response = chosen, a one-time snapshot of the
    student's own response = rejected, trained with DPO; docs/soda.md).
    """

    name: ClassVar[str] = "blackbox_text"
    capabilities: ClassVar[frozenset[str]] = frozenset({"text"})

    class Params(ComponentParams):
        source: Literal["openai_chat", "local_model", "column"] = Field(
            ..., description="openai_chat (a served chat endpoint), local_model (a local checkpoint's generations) "
            "or column (responses already in the dataset).")
        # openai_chat
        base_url: str | None = Field(None, description="openai_chat: server root, e.g. http://127.0.0.1:8000 (a "
                                     "trailing /v1 is accepted).")
        model: str | None = Field(None, description="openai_chat: the served model name; local_model: a local path, "
                                  "hub id or 'smollm2-135m-instruct'.")
        api_key_env: str | None = Field(None, description="openai_chat: NAME of the environment variable holding the "
                                        "API key (sent as 'Authorization: Bearer'); the key never goes in the recipe.")
        timeout_s: float = Field(120.0, gt=0, description="openai_chat: seconds to wait for one response.")
        max_retries: int = Field(3, ge=0, description="openai_chat: retries after a transient failure.")
        backoff_s: float = Field(1.0, ge=0, description="openai_chat: first retry delay; doubles on each retry.")
        concurrency: int = Field(8, ge=1, description="openai_chat: requests in flight at once.")
        extra_body: dict[str, Any] = Field(default_factory=dict, description="openai_chat: extra request fields, "
                                           "e.g. {chat_template_kwargs: {enable_thinking: false}} for vLLM.")
        # local_model
        dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field("float32", description="local_model: dtype.")
        device: str | None = Field(None, description="local_model: device (default: cuda if available, else cpu).")
        batch_size: int = Field(16, ge=1, description="local_model: prompts generated per batch.")
        trust_remote_code: bool = Field(False, description="local_model: allow custom model code.")
        # column
        column: str | None = Field(None, description="column: the dataset column holding the teacher's responses.")
        template: str | None = Field(None, description="column: a response built from row columns, e.g. "
                                     "'The answer is {answer}.' (instead of column).")
        # openai_chat and local_model
        max_tokens: int = Field(512, gt=0, description="Most tokens per teacher response.")
        temperature: float = Field(0.0, ge=0, description="Teacher sampling temperature (0 = greedy).")
        system_prompt: str | None = Field(None, description="A system message put before each prompt for the teacher.")
        prompt_template: str | None = Field(None, description="Rewrites the last user message for the teacher: "
                                            "{prompt} plus any dataset column, e.g. '{prompt}\n\n{hint}' "
                                            "(privileged context the student never sees).")

        @model_validator(mode="after")
        def _check(self) -> "BlackBoxTextTeacher.Params":
            # Model-level errors: the loader does not echo the input, so a key pasted by mistake is not printed.
            allowed = _SOURCE_FIELDS[self.source] | {"source"}
            fields = type(self).model_fields
            stray = sorted(f for f in self.model_fields_set - allowed
                           if getattr(self, f) != fields[f].get_default(call_default_factory=True))
            if stray:
                raise ValueError(f"{', '.join(stray)} {'does' if len(stray) == 1 else 'do'} not apply to source: "
                                 f"{self.source} (its params: {', '.join(sorted(_SOURCE_FIELDS[self.source]))})")
            if self.source == "openai_chat":
                if not self.base_url:
                    raise ValueError("source: openai_chat needs base_url (e.g. http://127.0.0.1:8000)")
                check_base_url(self.base_url)
                if not self.model:
                    raise ValueError("source: openai_chat needs model (the name the server serves, e.g. Qwen/Qwen3-8B)")
                check_api_key_env(self.api_key_env)
            elif self.source == "local_model":
                if not self.model:
                    raise ValueError("source: local_model needs model (a local path, hub id or "
                                     "'smollm2-135m-instruct')")
            elif (self.column is None) == (self.template is None):
                raise ValueError("source: column needs exactly one of column (a dataset column holding the "
                                 "responses) or template (e.g. 'The answer is {answer}.')")
            elif self.template is not None:
                fields = _fields(self.template)
                if not fields or any(not f.isidentifier() for f in fields):
                    raise ValueError(f"template fields must be plain column names like {{answer}}, got {fields}")
            if self.prompt_template is not None:
                fields = _fields(self.prompt_template)
                if "prompt" not in fields or any(not f.isidentifier() for f in fields):
                    raise ValueError("prompt_template must contain {prompt} (the student's message) and plain column "
                                     f"names like {{hint}}, got {fields}")
            return self

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.base_url = (self.params.base_url or "").strip().rstrip("/").removesuffix("/v1")
        self._api_key: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.model: Any = None
        self.tokenizer: Any = None

    @classmethod
    def example_params(cls) -> Params:
        return cls.Params(source="column", template="The answer is {answer}.")

    def required_columns(self) -> tuple[str, ...]:
        p = self.params
        if p.source != "column":
            return tuple(f for f in dict.fromkeys(_fields(p.prompt_template or "")) if f != "prompt")
        if p.column is not None:
            return (p.column,)
        return tuple(dict.fromkeys(_fields(p.template)))

    # -- setup --------------------------------------------------------------------------------------------------
    def setup(self, ctx: SetupContext | None = None) -> None:
        """Read the API key and open the HTTP pool (openai_chat) or load the model (local_model). Idempotent;
        :meth:`generate` calls it on first use."""
        p = self.params
        if p.source == "openai_chat" and self._pool is None:
            self._api_key = read_api_key("blackbox_text", p.api_key_env)
            self._pool = ThreadPoolExecutor(max_workers=p.concurrency, thread_name_prefix="opd-text-teacher")
        elif p.source == "local_model" and self.model is None:
            import torch

            from opd_plugins.models import load_causal_lm, load_tokenizer, resolve_model_path

            path = resolve_model_path(p.model)
            self.tokenizer = load_tokenizer(path, trust_remote_code=p.trust_remote_code)
            device = p.device or (ctx.device if ctx is not None else None) or (
                "cuda" if torch.cuda.is_available() else "cpu")
            model = load_causal_lm(path, dtype=p.dtype, trust_remote_code=p.trust_remote_code, tokenizer=self.tokenizer)
            self.model = model.to(device).eval().requires_grad_(False)

    def close(self) -> None:
        """Release the HTTP threads and the local model (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self.model = None

    # -- the text interface -------------------------------------------------------------------------------------
    def generate(self, prompts: list[Prompt], rows: list[dict[str, Any]] | None = None) -> list[str]:
        """One response per prompt, in order. ``rows`` (the dataset rows) are needed by ``source: column``."""
        p = self.params
        if p.source == "column":
            out = self._from_rows(prompts, rows)
        elif p.source == "local_model":
            if self.model is None:
                self.setup()
            messages = self._teacher_prompts(prompts, rows)
            out = generate_text(self.model, self.tokenizer, messages, max_new_tokens=p.max_tokens,
                                temperature=p.temperature, batch_size=p.batch_size)
        else:
            out = self._chat_all(self._teacher_prompts(prompts, rows))
        if len(out) != len(prompts):  # a bug, never a silent misalignment of chosen and rejected
            raise TeacherError(f"teacher blackbox_text returned {len(out)} responses for {len(prompts)} prompts")
        return out

    def score(self, batch: TeacherBatch, want: Capability = "sampled") -> TeacherScores:
        raise TeacherError(
            "teacher blackbox_text is text-only: it returns response text, never token log-probs, so it cannot "
            "score completions for a token-level divergence. Use it with a preference objective (divergence: "
            "{name: dpo}, the SODA recipe: docs/soda.md), or use a teacher that scores tokens (hf_model, "
            "openai_server)."
        )

    def _teacher_prompts(self, prompts: list[Prompt], rows: list[dict[str, Any]] | None) -> list[list[dict]]:
        """The conversations the teacher answers: ``system_prompt`` first, the last user message rewritten by
        ``prompt_template``."""
        p = self.params
        out = []
        for i, q in enumerate(prompts):
            messages = as_messages(q, p.system_prompt)
            if p.prompt_template is not None:
                row = self._row(rows, i, len(prompts))
                users = [j for j, m in enumerate(messages) if m.get("role") == "user"]
                last = users[-1] if users else len(messages) - 1
                fields = {k: v for k, v in row.items() if k != "prompt"}
                messages[last] = {**messages[last], "content": p.prompt_template.format(
                    **fields, prompt=messages[last]["content"])}
            out.append(messages)
        return out

    def _row(self, rows: list[dict[str, Any]] | None, i: int, n: int) -> dict[str, Any]:
        if rows is None or len(rows) != n:
            raise TeacherError(f"teacher blackbox_text needs the dataset rows of the prompts (for "
                               f"{', '.join(self.required_columns())})")
        missing = [c for c in self.required_columns() if c not in rows[i]]
        if missing:
            raise DataError(f"teacher blackbox_text: row {i} has no column {missing[0]!r} (columns: {sorted(rows[i])})")
        return rows[i]

    def _from_rows(self, prompts: list[Prompt], rows: list[dict[str, Any]] | None) -> list[str]:
        p = self.params
        out = []
        for i in range(len(prompts)):
            row = self._row(rows, i, len(prompts))
            out.append(str(row[p.column]) if p.column is not None else p.template.format(**row))
        return out

    # -- HTTP -----------------------------------------------------------------------------------------------------
    def _chat_all(self, prompts: list[list[dict[str, Any]]]) -> list[str]:
        if self._pool is None:
            self.setup()
        abort = threading.Event()
        futures = [self._pool.submit(self._chat, q, f"prompt {i}", abort) for i, q in enumerate(prompts)]
        try:
            return [f.result() for f in futures]
        except BaseException:
            abort.set()
            for f in futures:
                f.cancel()
            raise

    def _chat(self, messages: list[dict[str, Any]], what: str, abort: threading.Event | None = None) -> str:
        p = self.params
        body = {**p.extra_body, "model": p.model, "messages": messages, "max_tokens": p.max_tokens,
                "temperature": p.temperature, "n": 1}
        data = self._request(body, f"generating for {what}", abort)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or len(choices) != 1:
            got = len(choices) if isinstance(choices, list) else "no"
            raise TeacherError(f"teacher blackbox_text: asked {self._url()} for 1 response to {what} but it returned "
                               f"{got} choices; not pairing a misaligned response")
        message = choices[0].get("message") if isinstance(choices[0], dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            raise TeacherError(f"teacher blackbox_text: the response to {what} has no message content (choices[0]: "
                               f"{str(choices[0])[:200]}); the endpoint must be OpenAI chat-completions compatible")
        return content.strip()

    def _url(self) -> str:
        return f"{self.base_url}/v1/chat/completions"

    def _request(self, body: dict[str, Any], what: str, abort: threading.Event | None) -> Any:
        p = self.params
        client = JSONClient(
            "blackbox_text", p.timeout_s, p.max_retries, p.backoff_s, api_key=self._api_key,
            api_key_env=p.api_key_env,
            status_hints={404: "check base_url and model (the endpoint is /v1/chat/completions)"},
            unreachable_hint="check that the server is running and reachable at base_url (e.g. 'vllm serve MODEL "
                             "--port P') and that base_url is right",
            timeout_hint=f"the server may be overloaded: raise timeout_s (now {p.timeout_s:g} s) or lower "
                         "concurrency")
        return client.request("POST", self._url(), body, what, abort)


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def as_messages(prompt: Prompt, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """A prompt as chat messages (a plain string becomes one user message), with ``system_prompt`` first unless
    the conversation already starts with a system message."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages
