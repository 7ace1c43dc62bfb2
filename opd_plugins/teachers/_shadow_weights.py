"""Teacher weights kept beside the student's trainable parameters and swapped in to score: a frozen copy of the
initial values or an exponential moving average (EMA). Used by ``self_context``; not a component."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from opd_plugins.errors import OPDError


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class ShadowWeights:
    """A copy of ``model``'s trainable parameters (``initial``: as they are now, in their dtype; ``ema``: float32,
    updated by :meth:`update`), which :meth:`swapped_in` points the parameters at while the teacher scores. No copy
    of the student's weights is made: the tensors' storage is swapped and put back, even when scoring raises."""

    def __init__(self, model: torch.nn.Module, *, ema_decay: float | None = None, who: str = "teacher") -> None:
        params = trainable(model)
        if not params:
            raise OPDError(f"{who}: the model has no trainable parameters to keep a copy of")
        self.model, self.who, self.decay = model, who, ema_decay
        dtype = torch.float32 if ema_decay is not None else None
        self.tensors = {n: p.detach().to(dtype=dtype or p.dtype, copy=True) for n, p in params.items()}
        self.updates = 0

    def _params(self) -> dict[str, torch.nn.Parameter]:
        params = dict(self.model.named_parameters())
        missing = [n for n in self.tensors if n not in params]
        if missing:
            raise OPDError(f"{self.who}: the model no longer has parameter(s) {missing[:3]} the teacher tracks")
        return params

    @torch.no_grad()
    def update(self) -> None:
        """θ_ema ← d·θ_ema + (1−d)·θ over the tracked parameters."""
        if self.decay is None:
            raise RuntimeError(f"{self.who}: update() is for EMA weights")
        params, d = self._params(), self.decay
        for name, avg in self.tensors.items():
            avg.mul_(d).add_(params[name].detach().to(avg.device, torch.float32), alpha=1.0 - d)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        params = self._params()
        saved: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for name, shadow in self.tensors.items():
                    p = params[name]
                    if is_dtensor(p) and not is_dtensor(shadow):
                        # the student was sharded after the copy was made: keep this rank's shard of it from now on
                        from torch.distributed.tensor import distribute_tensor

                        shadow = self.tensors[name] = distribute_tensor(
                            shadow.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                    if is_dtensor(p):
                        # FSDP2 gathers a parameter from storage it keeps beside it: the shadow is copied into the
                        # shard in place (and the live values back afterwards) rather than swapped by pointer.
                        saved[name] = p.detach().clone()
                        p.copy_(shadow.to(dtype=p.dtype))
                    else:
                        saved[name] = p.data
                        p.data = shadow.to(device=p.device, dtype=p.dtype)
            yield
        finally:
            with torch.no_grad():
                for name, data in saved.items():
                    p = params[name]
                    if is_dtensor(p):
                        p.copy_(data)
                    else:
                        p.data = data

    def load(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        """Restore a checkpoint's tensors, refusing ones that do not match the tracked parameters."""
        current = self.tensors
        missing = sorted(set(current) - set(tensors))
        unexpected = sorted(set(tensors) - set(current))
        shapes = [f"{n}: checkpoint {tuple(tensors[n].shape)}, model {tuple(current[n].shape)}"
                  for n in sorted(set(tensors) & set(current)) if tuple(tensors[n].shape) != tuple(current[n].shape)]
        if missing or unexpected or shapes:
            parts = [f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}" if missing else "",
                     f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}" if unexpected else "",
                     f"shape mismatch {shapes[:3]}" if shapes else ""]
            raise ValueError(f"{self.who}: the checkpoint's EMA teacher does not match this model's trainable "
                             "parameters (" + "; ".join(p for p in parts if p) + "); resume with the same model "
                             "and LoRA settings")
        with torch.no_grad():
            for n, t in tensors.items():
                current[n].copy_(t)
        self.updates = updates


def is_dtensor(tensor: Any) -> bool:
    """A parameter sharded by FSDP2 (a ``DTensor``)."""
    return callable(getattr(tensor, "full_tensor", None)) and hasattr(tensor, "placements")


def is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


__all__ = ["ShadowWeights", "is_dtensor", "is_peft", "trainable"]
