"""Answer extraction and row helpers shared by tasks and third-party rewards (not a component)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from opd_plugins.recipe.schema import DEFAULT_HINT_TEMPLATE

NUMBER_ONLY_SUFFIX = "Reply with just the number."
ANSWER_ONLY_SUFFIX = "Reply with just the answer."

# A number as people write it: optional minus (ASCII or U+2212), digits with optional thousands commas, optional
# decimals. A minus directly after a letter or digit is a hyphen ("5-3" ends in 3, not -3); digits glued to a letter
# ("mul1") are not numbers.
NUMBER_RE = re.compile(r"(?<![\w.])[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)", re.ASCII)
ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
ANSWER_PREFIX_RE = re.compile(r"^(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:=]?\s*", re.IGNORECASE)


def extract_last_number(text: str) -> str | None:
    """The last number in ``text``, normalised (thousands commas removed, U+2212 minus made ASCII), or None.

    ``"so 1,234 apples"`` gives ``"1234"``; ``"it is -7."`` gives ``"-7"``; ``"5-3=2"`` gives ``"2"``.
    """
    matches = NUMBER_RE.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "").replace("\u2212", "-")


def as_decimal(text: str | None) -> Decimal | None:
    """``text`` as a Decimal (commas and U+2212 minus handled), or None when it is not a number."""
    if text is None:
        return None
    try:
        return Decimal(text.strip().replace(",", "").replace("\u2212", "-"))
    except InvalidOperation:
        return None


def is_number(text: str) -> bool:
    """Whether ``text`` is one number as people write it."""
    return NUMBER_RE.fullmatch(text.strip()) is not None


def _tag_tuples(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return {"__tuple__": [_tag_tuples(x) for x in obj]}
    if isinstance(obj, list):
        return [_tag_tuples(x) for x in obj]
    if isinstance(obj, Mapping):
        return {str(k): _tag_tuples(v) for k, v in obj.items()}
    return obj


def _untag_tuples(obj: dict[str, Any]) -> Any:
    return tuple(obj["__tuple__"]) if obj.keys() == {"__tuple__"} else obj


def encode_metadata(metadata: Mapping[str, Any]) -> str:
    """The ``metadata`` column: JSON that keeps tuples as tuples (reasoning-gym scorers compare them)."""
    return json.dumps(_tag_tuples(metadata), default=str, sort_keys=True)


def decode_metadata(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Inverse of :func:`encode_metadata`; a mapping or None passes through (as a dict)."""
    if text is None or text == "":
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    return json.loads(text, object_hook=_untag_tuples)


def completion_text(completion: Any) -> str:
    """The text of one completion as TRL passes it: a string, or a list of chat messages.

    For a conversational completion the contents of its assistant messages are joined (all messages when none is
    marked ``assistant``). Multimodal content parts contribute their ``text``.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        completion = [completion]
    messages = list(completion)
    assistant = [m for m in messages if isinstance(m, Mapping) and m.get("role") == "assistant"]
    parts = []
    for message in assistant or messages:
        content = message.get("content", "") if isinstance(message, Mapping) else message
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, Sequence):
            parts.extend(p.get("text", "") for p in content if isinstance(p, Mapping))
    return "\n".join(parts)


def make_hint(answer: str, template: str = DEFAULT_HINT_TEMPLATE) -> str:
    """The privileged-context string for ``answer``: ``"(Hint: the correct answer is 42.)"`` by default."""
    return template.format(answer=answer)
