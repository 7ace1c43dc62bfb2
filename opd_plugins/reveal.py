"""How much of a reference text (a solution, a hint) is shown: shared by the privileged-context teacher's reveal
schedule and the hint/prefix samplers."""

from __future__ import annotations

import math
import re


def reveal_prefix(text: str, ratio: float) -> str:
    """The first ``⌊ratio · n⌋`` of the ``n`` whitespace-separated words of ``text``, cut right after the last
    kept word (the original spacing inside the prefix is kept): ratio 0 gives ``""``, ratio 1 the whole text."""
    ratio = min(max(ratio, 0.0), 1.0)
    if ratio >= 1.0:
        return text
    words = list(re.finditer(r"\S+", text))
    keep = min(math.floor(ratio * len(words) + 1e-9), len(words))
    return text[: words[keep - 1].end()] if keep > 0 else ""


def word_count(text: str) -> int:
    """The number of whitespace-separated words of ``text`` (what :func:`reveal_prefix` counts)."""
    return len(re.findall(r"\S+", text))


__all__ = ["reveal_prefix", "word_count"]
