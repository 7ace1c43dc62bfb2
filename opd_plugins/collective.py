"""Per-row statistics across the ranks of a multi-process run (``torch.distributed`` only; nothing else)."""

from __future__ import annotations

import torch


def gather_rows(local: torch.Tensor, total: int, local_slice: slice) -> torch.Tensor:
    """This rank's per-row values ``(B,)`` → the global batch's ``(N,)``.

    Every rank calls this in the same step, so when a process group spans the batch the rows are all-gathered.
    Without one (a single process, or tests that pass a slice) the other ranks' rows are NaN: statistics then use
    the rows this process has.
    """
    local = local.float()
    if local.shape[0] == total:
        return local
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() * local.shape[0] == total:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)
    out = torch.full((total,), float("nan"), dtype=local.dtype, device=local.device)
    out[local_slice] = local
    return out


__all__ = ["gather_rows"]
