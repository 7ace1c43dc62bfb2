"""Files and folders every layer uses: the user cache directory and crash-safe writes.

Standard library only, so the recipe loader can use it without importing anything heavy.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The opd_plugins cache: ``$OPD_PLUGINS_CACHE``, ``$XDG_CACHE_HOME/opd_plugins`` or ``~/.cache/opd_plugins``."""
    if os.environ.get("OPD_PLUGINS_CACHE"):
        return Path(os.environ["OPD_PLUGINS_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "opd_plugins"
    return Path.home() / ".cache" / "opd_plugins"


def atomic_write(path: str | os.PathLike, data: bytes | str, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part: a temporary
    file next to it (named after this process), flushed and fsynced, then renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_durably(path: str | os.PathLike, data: bytes | str) -> None:
    """Append ``data`` in one write, flushed and fsynced (a killed process leaves at most a torn last line)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with open(path, "ab") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


__all__ = ["append_durably", "atomic_write", "cache_dir"]
