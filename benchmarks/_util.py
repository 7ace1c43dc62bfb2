"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, so this directory is on
``sys.path``)."""

from __future__ import annotations

import resource


def peak_rss_mib() -> float:
    """This process's peak RSS. ``VmHWM`` belongs to the process's own address space, so unlike ``ru_maxrss`` (which
    Linux carries across ``execve``) it does not include the parent's high-water mark at the time of the fork."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
