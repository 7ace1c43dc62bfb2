"""FP8 (e4m3) weight quantization for an FP8 rollout copy of the policy (helper module, not a component).

Formats, as verl / NeMo-RL quantize policy weights trainer-side for vLLM:

* ``per_block``: one float32 scale per ``block`` tile (default 128x128, vLLM's ``fp8_per_block``, DeepSeek-V3
  block-wise FP8). A last partial tile gets its own scale; nothing padded is stored.
* ``per_channel``: one float32 scale per output row, scales of shape ``(out, 1)``.

``scale = amax / 448`` (448 = e4m3fn's largest finite value; an all-zero tile gets scale 1 so it dequantizes to
exact zeros), ``q = clamp(w / scale, -448, 448).to(float8_e4m3fn)``, ``dequant = q.float() * scale``.

:class:`FP8Linear` picks its matmul per device (:func:`select_kernel`), for bfloat16 inputs:

* ``scaled_mm_rowwise`` (``per_channel``, CUDA compute capability >= 8.9): activations quantized per token,
  ``torch._scaled_mm(x_q, w_q.t(), scale_a=(M, 1), scale_b=(1, N), out_dtype=bf16, bias=bias)``;
* ``scaled_mm_blockwise`` (``per_block`` 128x128, sm90 with CUDA >= 12.9, the combination torch 2.13 tests):
  activations quantized per 1x128 tile, ``torch.nn.functional.scaled_mm`` with ``ScalingType.BlockWise1x128`` x
  ``ScalingType.BlockWise128x128``; scale_a ``(M, K/128)`` with strides ``(1, M)``, scale_b ``(L4, N/128)``
  with strides ``(1, L4)``, ``L4 = round_up(K/128, 4)`` (the layout ``torch/_meta_registrations.py`` checks);
* ``dequant`` everywhere else (CPU, older GPUs, other input dtypes, shapes the kernels refuse): the weight is
  dequantized to ``x.dtype`` on every call and fed to ``F.linear``, the same numbers as :func:`fake_quantize`.
  No high-precision copy is kept between calls, so the memory saving holds on this path too — unless
  ``keep_dequantized`` is set (the ``fp8`` rollout backend sets it on CPU, where FP8 saves nothing and
  re-dequantizing every layer at every decoding step costs ~10x the matmul).

:class:`FakeQuantLinear` (:func:`fake_quantize_linears_`) is the training-side counterpart for one precision flow:
an ``nn.Linear`` whose forward uses ``fake_quantize(weight)`` with a straight-through gradient into the master
weight, re-quantized only when the weight changes.

Both FP8 kernels pad M (tokens) to a multiple of 16 (a precaution; torch's own checks ask it only of K and N).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opd_plugins.errors import OPDError

Format = Literal["per_block", "per_channel"]
FORMATS = ("per_block", "per_channel")
KERNELS = ("dequant", "scaled_mm_rowwise", "scaled_mm_blockwise")
FP8 = torch.float8_e4m3fn


class FP8Error(OPDError, ValueError):
    """A weight or layer cannot be quantized to FP8 as asked (the message names the layer and the shape)."""


def e4m3_max() -> float:
    """Largest finite float8_e4m3fn value (448.0)."""
    return float(torch.finfo(FP8).max)


def divides(shape: Iterable[int], block: Iterable[int]) -> bool:
    """Whether ``block`` tiles ``shape`` exactly (no partial last block in any dimension)."""
    return all(s % b == 0 for s, b in zip(tuple(shape), tuple(block), strict=True))


def _check_2d(w: Tensor, what: str = "weight") -> None:
    if w.dim() != 2:
        raise FP8Error(f"{what}: expected a 2-D (out, in) tensor, got shape {tuple(w.shape)}")
    if not (w.is_floating_point() and w.dtype != FP8):
        raise FP8Error(f"{what}: expected a high-precision floating-point tensor, got {w.dtype}")


def _scale_of(amax: Tensor) -> Tensor:
    return torch.where(amax > 0, amax / e4m3_max(), torch.ones_like(amax))


def _to_e4m3(x: Tensor, scale: Tensor) -> Tensor:
    m = e4m3_max()
    return (x / scale).clamp_(-m, m).to(FP8)


def _block(block: Iterable[int]) -> tuple[int, int]:
    b = tuple(int(v) for v in block)
    if len(b) != 2 or min(b) < 1:
        raise FP8Error(f"block must be two positive ints (rows, cols), got {block!r}")
    return b  # type: ignore[return-value]


def quantize_per_block(w: Tensor, block: tuple[int, int] = (128, 128)) -> tuple[Tensor, Tensor]:
    """``(q, scales)``: ``q`` float8_e4m3fn ``(out, in)``, ``scales`` float32 ``(ceil(out/bo), ceil(in/bi))``."""
    _check_2d(w)
    bo, bi = _block(block)
    out, inn = w.shape
    nbo, nbi = math.ceil(out / bo), math.ceil(inn / bi)
    wf = w.float().contiguous()
    if not divides(w.shape, (bo, bi)):  # zero padding changes no amax; it is cut off again below
        wf = F.pad(wf, (0, nbi * bi - inn, 0, nbo * bo - out))
    tiles = wf.view(nbo, bo, nbi, bi)
    scales = _scale_of(tiles.abs().amax(dim=(1, 3)))
    q = _to_e4m3(tiles, scales[:, None, :, None]).view(nbo * bo, nbi * bi)[:out, :inn].contiguous()
    return q, scales


def quantize_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """``(q, scales)``: ``q`` float8_e4m3fn ``(out, in)``, ``scales`` float32 ``(out, 1)`` (one per output row)."""
    _check_2d(w)
    wf = w.float()
    scales = _scale_of(wf.abs().amax(dim=1, keepdim=True))
    return _to_e4m3(wf, scales), scales


def dequantize(q: Tensor, scales: Tensor, block: tuple[int, int] | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize_per_block` (``block`` given) or :func:`quantize_per_channel` (``block=None``)."""
    out, inn = q.shape
    if block is None:
        if tuple(scales.shape) != (out, 1):
            raise FP8Error(f"per-channel scales for a {tuple(q.shape)} weight must be ({out}, 1), "
                           f"got {tuple(scales.shape)}")
        return (q.float() * scales).to(dtype)
    bo, bi = _block(block)
    want = (math.ceil(out / bo), math.ceil(inn / bi))
    if tuple(scales.shape) != want:
        raise FP8Error(f"per-block {bo}x{bi} scales for a {tuple(q.shape)} weight must be {want}, "
                       f"got {tuple(scales.shape)}")
    if divides(q.shape, (bo, bi)):
        return (q.float().view(want[0], bo, want[1], bi) * scales[:, None, :, None]).view(out, inn).to(dtype)
    full = scales.repeat_interleave(bo, dim=0)[:out].repeat_interleave(bi, dim=1)[:, :inn]
    return (q.float() * full).to(dtype)


def _quantize(w: Tensor, fmt: str, block: tuple[int, int]) -> tuple[Tensor, Tensor, tuple[int, int] | None]:
    if fmt == "per_block":
        return (*quantize_per_block(w, block), _block(block))
    if fmt == "per_channel":
        return (*quantize_per_channel(w), None)
    raise FP8Error(f"unknown FP8 format {fmt!r}; expected one of {FORMATS}")


def fake_quantize(w: Tensor, fmt: Format = "per_block", block: tuple[int, int] = (128, 128)) -> Tensor:
    """Quantize then dequantize; same shape and dtype as ``w``."""
    q, s, b = _quantize(w, fmt, block)
    return dequantize(q, s, b, dtype=w.dtype)


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, fmt: str, block: tuple[int, int]) -> Tensor:  # noqa: D102
        return fake_quantize(w, fmt, block)  # type: ignore[arg-type]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: D102
        return grad, None, None


def ste_fake_quantize(w: Tensor, fmt: Format = "per_block", block: tuple[int, int] = (128, 128)) -> Tensor:
    """Straight-through estimator: forward is :func:`fake_quantize`, backward passes the gradient unchanged."""
    return _STE.apply(w, fmt, tuple(block))


def quantization_error(w: Tensor, fmt: Format = "per_block", block: tuple[int, int] = (128, 128)) -> dict[str, float]:
    """``max_abs_err`` and ``rel_fro_err`` (``||w - dq||_F / ||w||_F``, 0 for an all-zero ``w``) of a round trip."""
    wf = w.float()
    err = wf - fake_quantize(wf, fmt, block)
    norm = float(torch.linalg.vector_norm(wf))
    return {"max_abs_err": float(err.abs().max()) if err.numel() else 0.0,
            "rel_fro_err": float(torch.linalg.vector_norm(err)) / norm if norm > 0 else 0.0}


def select_kernel(device: torch.device | str, fmt: Format, block: tuple[int, int] = (128, 128)) -> str:
    """The matmul :class:`FP8Linear` uses on ``device`` for bf16 inputs: one of :data:`KERNELS` (see module doc)."""
    if fmt not in FORMATS:
        raise FP8Error(f"unknown FP8 format {fmt!r}; expected one of {FORMATS}")
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip or not torch.cuda.is_available():
        return "dequant"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return "dequant"
    if fmt == "per_channel":
        return "scaled_mm_rowwise" if hasattr(torch, "_scaled_mm") else "dequant"
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    blockwise = hasattr(F, "scaled_mm") and hasattr(getattr(F, "ScalingType", None), "BlockWise128x128")
    ok = blockwise and cap[0] == 9 and cuda >= (12, 9) and tuple(block) == (128, 128)
    return "scaled_mm_blockwise" if ok else "dequant"


def _pad_rows(x: Tensor, multiple: int = 16) -> Tensor:
    extra = -x.shape[0] % multiple
    return F.pad(x, (0, 0, 0, extra)) if extra else x


def _mm_rowwise(x: Tensor, w_q: Tensor, w_scales: Tensor, bias: Tensor | None) -> Tensor:
    """``x (M, K)`` bf16 times per-channel ``w_q (N, K)``: per-token activation scales, ``torch._scaled_mm``."""
    m = x.shape[0]
    xp = _pad_rows(x).float()
    sa = _scale_of(xp.abs().amax(dim=1, keepdim=True))
    out = torch._scaled_mm(_to_e4m3(xp, sa), w_q.t(), scale_a=sa, scale_b=w_scales.reshape(1, -1),
                           bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype)
    return out[:m]


def _blockwise_scale_layout(w_scales: Tensor) -> Tensor:
    """128x128 weight scales ``(N/128, K/128)`` as ``F.scaled_mm`` wants them: ``(L4, N/128)``, strides (1, L4)."""
    nb, kb = w_scales.shape
    return F.pad(w_scales, (0, -kb % 4), value=1.0).contiguous().t()


def _mm_blockwise(x: Tensor, w_q: Tensor, scale_b: Tensor, bias: Tensor | None) -> Tensor:
    """``x (M, K)`` times 128x128-block ``w_q (N, K)``: 1x128 activation tiles, ``F.scaled_mm`` (sm90)."""
    m, k = x.shape
    xp = _pad_rows(x).float().view(-1, k // 128, 128)
    sa = _scale_of(xp.abs().amax(dim=-1))  # (M, K/128)
    x_q = _to_e4m3(xp, sa[..., None]).view(-1, k)
    st = F.ScalingType
    out = F.scaled_mm(x_q, w_q.t(), sa.t().contiguous().t(), st.BlockWise1x128, scale_b, st.BlockWise128x128,
                      output_dtype=x.dtype)[:m]
    return out if bias is None else out + bias.to(out.dtype)


class FP8Linear(nn.Module):
    """Inference-only stand-in for ``nn.Linear``: float8_e4m3fn weight + float32 scales (+ bias, original dtype).

    ``kernel`` is the matmul used for bfloat16 inputs on the weight's current device (other input dtypes take
    ``dequant``); set ``kernel_request`` to one of :data:`KERNELS` to force one (``"auto"`` by default), and
    ``keep_dequantized`` to keep the dequant path's weight between calls.
    ``.to(dtype)`` leaves the FP8 weight and the float32 scales alone (it does cast the bias).
    """

    def __init__(self, in_features: int, out_features: int, *, fmt: Format = "per_block",
                 block: tuple[int, int] = (128, 128), bias: bool = True, device: torch.device | str | None = None,
                 bias_dtype: torch.dtype = torch.float32, name: str = "") -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise FP8Error(f"{name or 'FP8Linear'}: unknown FP8 format {fmt!r}; expected one of {FORMATS}")
        self.in_features, self.out_features, self.fmt, self.name = in_features, out_features, fmt, name
        self.block = _block(block) if fmt == "per_block" else None
        sshape = ((math.ceil(out_features / self.block[0]), math.ceil(in_features / self.block[1]))
                  if self.block else (out_features, 1))
        self.register_buffer("weight", torch.zeros(out_features, in_features, device=device, dtype=FP8))
        self.register_buffer("weight_scale", torch.ones(sshape, device=device, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, device=device, dtype=bias_dtype) if bias else None)
        self.kernel_request = "auto"
        self.keep_dequantized = False  # dequant path: keep the dequantized weight between calls (CPU speed)
        self._layout: tuple | None = None  # blockwise scale layout, keyed on the scales' storage and version
        self._dequantized: tuple | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: Format = "per_block", block: tuple[int, int] = (128, 128),
                    name: str = "") -> FP8Linear:
        """Quantize ``linear`` (left untouched) into a new :class:`FP8Linear` on the same device."""
        w = linear.weight
        label = name or type(linear).__name__
        if w.dim() != 2 or not w.is_floating_point() or w.dtype == FP8:
            raise FP8Error(f"{label}: cannot quantize a {w.dtype} weight of shape {tuple(w.shape)} to FP8 "
                           "(needs a 2-D high-precision floating-point weight)")
        b = linear.bias
        mod = cls(w.shape[1], w.shape[0], fmt=fmt, block=block, bias=b is not None, device=w.device,
                  bias_dtype=b.dtype if b is not None else torch.float32, name=name)
        mod.requantize_(w, b)
        return mod

    @property
    def label(self) -> str:
        return self.name or f"FP8Linear({self.in_features}->{self.out_features})"

    @torch.no_grad()
    def requantize_(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Re-quantize in place from a new high-precision ``weight`` (same shape), e.g. at every weight sync."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise FP8Error(f"{self.label}: new weight has shape {tuple(weight.shape)}, expected "
                           f"{(self.out_features, self.in_features)}")
        if not weight.is_floating_point() or weight.dtype == FP8:
            raise FP8Error(f"{self.label}: cannot quantize a {weight.dtype} weight to FP8")
        q, s, _ = _quantize(weight.detach().to(self.weight.device), self.fmt, self.block or (1, 1))
        if s.device.type != "meta" and not bool(torch.isfinite(s).all()):
            raise FP8Error(f"{self.label}: weight of shape {tuple(weight.shape)} has inf/nan values")
        self.weight.copy_(q)
        self.weight_scale.copy_(s)
        if bias is not None:
            if self.bias is None or bias.shape != self.bias.shape:
                raise FP8Error(f"{self.label}: bias of shape {tuple(bias.shape)} does not fit this layer")
            self.bias.copy_(bias.detach())

    @property
    def kernel(self) -> str:
        """The matmul path for bf16 inputs: ``kernel_request``, or the device's choice when the shape allows it."""
        if self.kernel_request != "auto":
            if self.kernel_request not in KERNELS:
                raise FP8Error(f"{self.label}: unknown kernel {self.kernel_request!r}; expected one of {KERNELS}")
            return self.kernel_request
        kernel = select_kernel(self.weight.device, self.fmt, self.block or (128, 128))
        n, k = self.out_features, self.in_features
        if kernel == "scaled_mm_rowwise" and (n % 16 or k % 16):
            return "dequant"
        if kernel == "scaled_mm_blockwise" and (n % 128 or k % 128):
            return "dequant"
        return kernel

    @property
    def mode(self) -> str:
        """``"<format>[:<block>]/<kernel>"``, e.g. ``"per_block:128x128/dequant"``, for logs and metrics."""
        fmt = f"{self.fmt}:{self.block[0]}x{self.block[1]}" if self.block else self.fmt
        return f"{fmt}/{self.kernel}"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"mode={self.mode}"

    def _dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        """The weight dequantized into ``dtype``; with ``keep_dequantized`` kept until the FP8 weight or its scales
        are written (``requantize_``, ``load_state_dict``, ``.to``), else made anew on every call."""
        if not self.keep_dequantized:
            return dequantize(self.weight, self.weight_scale, self.block, dtype=dtype)
        w, s = self.weight, self.weight_scale
        key = (w.data_ptr(), w._version, s.data_ptr(), s._version, dtype)
        if self._dequantized is None or self._dequantized[0] != key:
            self._dequantized = (key, dequantize(w, s, self.block, dtype=dtype))
        return self._dequantized[1]

    def _apply(self, fn, recurse: bool = True):  # keep the FP8 weight and float32 scales through .to(dtype)
        w, s = self.weight, self.weight_scale
        super()._apply(fn, recurse)
        if self.weight.dtype != FP8:
            self.weight = w.to(self.weight.device)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = s.to(self.weight_scale.device)
        return self

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise FP8Error(f"{self.label}: input has {x.shape[-1]} features, expected {self.in_features}")
        kernel = self.kernel if x.dtype == torch.bfloat16 else "dequant"
        if kernel == "dequant":
            w = self._dequantized_weight(x.dtype)
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        want = "per_channel" if kernel == "scaled_mm_rowwise" else "per_block"
        if self.fmt != want or (want == "per_block" and self.block != (128, 128)):
            raise FP8Error(f"{self.label}: kernel {kernel!r} needs {want} weights, this layer is {self.mode}")
        x2 = x.reshape(-1, self.in_features)
        if kernel == "scaled_mm_rowwise":
            out = _mm_rowwise(x2, self.weight, self.weight_scale, self.bias)
        else:
            s = self.weight_scale  # in-place writes (requantize_, load_state_dict) bump s._version
            key = (s.data_ptr(), s.device, s._version)
            if self._layout is None or self._layout[0] != key:
                self._layout = (key, _blockwise_scale_layout(self.weight_scale))
            out = _mm_blockwise(x2, self.weight, self._layout[1], self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


def _skip_reason(name: str, module: nn.Module, skip: Iterable[str], min_features: int) -> str | None:
    if any(name == s or name.endswith("." + s) for s in skip):
        return "skipped by name"
    w = module.weight
    if w.dim() != 2 or not w.is_floating_point() or w.dtype == FP8:
        return f"weight is {w.dtype} of shape {tuple(w.shape)}"
    if min(w.shape) < min_features:
        return f"shape {tuple(w.shape)} has a side < min_features={min_features}"
    return None


def plan_linears(named: Iterable[tuple[str, nn.Module]], skip: Iterable[str] = ("lm_head",),
                 min_features: int = 16) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """Split the ``nn.Linear`` modules among ``named`` ``(name, module)`` pairs into those to quantize (by name) and
    ``{name: reason}`` for the ones left in high precision. ``skip`` entries match names by suffix (``"lm_head"``
    matches ``lm_head`` and ``x.lm_head``)."""
    skip = tuple(skip)
    eligible, skipped = {}, {}
    for name, mod in named:
        if isinstance(mod, nn.Linear):
            reason = _skip_reason(name, mod, skip, min_features)
            if reason is None:
                eligible[name] = mod
            else:
                skipped[name] = reason
    return eligible, skipped


def quantize_model(model: nn.Module, fmt: Format = "per_block", block: tuple[int, int] = (128, 128),
                   skip: Iterable[str] = ("lm_head",), min_features: int = 16) -> dict[str, FP8Linear]:
    """An :class:`FP8Linear` copy of every eligible ``nn.Linear`` of ``model`` (left untouched), by module name.

    ``skip`` entries match module names by suffix (``"lm_head"`` matches ``lm_head`` and ``x.lm_head``).
    The ones left out, and why, are in :func:`skipped_linears`.
    """
    eligible, _ = plan_linears(model.named_modules(), skip, min_features)
    return {name: FP8Linear.from_linear(mod, fmt, block, name=name) for name, mod in eligible.items()}


def skipped_linears(model: nn.Module, skip: Iterable[str] = ("lm_head",), min_features: int = 16) -> dict[str, str]:
    """``{module name: reason}`` for every ``nn.Linear`` that :func:`quantize_model` leaves in high precision."""
    return plan_linears(model.named_modules(), skip, min_features)[1]


def convert_to_fp8(model: nn.Module, fmt: Format = "per_block", block: tuple[int, int] = (128, 128),
                   skip: Iterable[str] = ("lm_head",), min_features: int = 16) -> nn.Module:
    """Replace, in ``model`` itself (meant to be a private rollout copy), each eligible ``nn.Linear`` by an
    :class:`FP8Linear`; returns ``model``, with ``model.fp8_skipped = {name: reason}``. Merge LoRA first."""
    skipped = skipped_linears(model, skip, min_features)
    for name, mod in quantize_model(model, fmt, block, skip, min_features).items():
        model.set_submodule(name, mod)
    model.fp8_skipped = skipped
    return model


@torch.no_grad()
def requantize_from_state(fp8_model: nn.Module, tensors: Mapping[str, Tensor]) -> dict[str, int]:
    """Weight sync from named tensors (``effective_state`` of a policy, e.g. a LoRA model's merged weights): each
    :class:`FP8Linear` ``name`` is re-quantized from ``tensors[name + ".weight"]`` (and ``".bias"``), every other
    tensor is copied into ``fp8_model``'s parameter or buffer of that name. Returns ``{"requantized": n, "copied":
    m}``; a layer or tensor the two sides do not share is an error naming it."""
    fp8 = {n: m for n, m in fp8_model.named_modules() if isinstance(m, FP8Linear)}
    for name, mod in fp8.items():
        weight, bias = tensors.get(f"{name}.weight"), tensors.get(f"{name}.bias")
        if weight is None:
            raise FP8Error(f"{name}: the source has no weight of that name")
        if (bias is None) != (mod.bias is None):
            raise FP8Error(f"{name}: the source layer {'has no' if bias is None else 'has a'} bias, this one "
                           f"{'has' if bias is None else 'has none'}")
        mod.requantize_(weight, bias)
    targets = dict(fp8_model.named_parameters(remove_duplicate=False)) | dict(fp8_model.named_buffers())
    copied = 0  # remove_duplicate=False: a tied weight is reached under every name, so none hides behind an FP8 one
    for name, t in tensors.items():
        if name.rpartition(".")[0] in fp8:
            continue
        if name not in targets or targets[name].shape != t.shape:
            raise FP8Error(f"{name}: no tensor of shape {tuple(t.shape)} under that name in the FP8 model")
        targets[name].copy_(t)
        copied += 1
    return {"requantized": len(fp8), "copied": copied}


@torch.no_grad()
def requantize_from(fp8_model: nn.Module, source_model: nn.Module) -> dict[str, int]:
    """Weight sync: re-quantize each :class:`FP8Linear` from the source ``nn.Linear`` of the same name, and copy
    every other parameter and buffer of ``source_model`` by name. Returns ``{"requantized": n, "copied": m}``."""
    for name, mod in fp8_model.named_modules():
        if not isinstance(mod, FP8Linear):
            continue
        try:
            src = source_model.get_submodule(name)
        except AttributeError:
            raise FP8Error(f"{name}: the source model has no module of that name") from None
        if not isinstance(src, nn.Linear):
            raise FP8Error(f"{name}: the source module is a {type(src).__name__}, not an nn.Linear")
    tensors = dict(source_model.named_parameters(remove_duplicate=False)) | dict(source_model.named_buffers())
    return requantize_from_state(fp8_model, tensors)


# ---------------------------------------------------------------------------------------------------------------
# Fake quantization in the training forward (a unified precision flow)
# ---------------------------------------------------------------------------------------------------------------


class _CachedQuantizer:
    """The FP8 value of one weight, quantized again only when the weight changes: another tensor (a swapped-in
    shadow copy) or an in-place write (an optimizer step bumps the tensor's version). Keeps the FP8 tensor and its
    scales, not a high-precision copy; the cache holds the source tensor so its storage cannot be reused by
    another tensor while the key is live."""

    def __init__(self, fmt: Format, block: tuple[int, int], keep_dequantized: bool = False) -> None:
        self.fmt, self.block, self.keep_dequantized = fmt, _block(block), keep_dequantized
        self._key: tuple | None = None
        self._source: Tensor | None = None
        self._q: Tensor | None = None
        self._scales: Tensor | None = None
        self._dequantized: Tensor | None = None
        self.quantizations = 0

    def __call__(self, w: Tensor) -> Tensor:
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        if key != self._key:
            with torch.no_grad():
                self._q, self._scales, _ = _quantize(w.detach(), self.fmt, self.block)
            self._key, self._source, self._dequantized = key, w.detach(), None
            self.quantizations += 1
        if self._dequantized is not None:
            return self._dequantized
        dq = dequantize(self._q, self._scales, self.block if self.fmt == "per_block" else None, dtype=w.dtype)
        if self.keep_dequantized:
            self._dequantized = dq
        return dq


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, quantizer: _CachedQuantizer) -> Tensor:  # noqa: D102
        return quantizer(w).view_as(w)  # a view: autograd marks it, not the cached tensor behind it

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad, None


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` whose forward multiplies by its weight's FP8 value, ``fake_quantize(weight)`` (the numbers
    an :class:`FP8Linear` of the same weight computes on the dequant path), with a straight-through gradient into
    the high-precision master weight. Never built directly: :func:`fake_quantize_linears_` swaps the class of
    existing ``nn.Linear`` modules, so parameter names, state dicts, checkpoints and optimizer state are unchanged
    (and :func:`restore_linears_` swaps it back)."""

    fp8_quantizer: _CachedQuantizer

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if w.requires_grad and torch.is_grad_enabled():
            w = _StraightThrough.apply(w, self.fp8_quantizer)
        else:
            w = self.fp8_quantizer(w)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        q = self.fp8_quantizer
        fmt = f"{q.fmt}:{q.block[0]}x{q.block[1]}" if q.fmt == "per_block" else q.fmt
        return f"{super().extra_repr()}, fake_quant={fmt}"


def fake_quantize_linears_(modules: Mapping[str, nn.Module], fmt: Format = "per_block",
                           block: tuple[int, int] = (128, 128), keep_dequantized: bool | None = None) -> list[str]:
    """Turn each ``nn.Linear`` of ``modules`` (``{name: module}``) into a :class:`FakeQuantLinear` in place, so the
    model's own forward (training and generation alike) runs on the FP8 weights. Only plain ``nn.Linear`` modules
    (a subclass may have its own forward) with a 2-D high-precision weight; returns the names changed.
    ``keep_dequantized`` (default: on CPU) keeps each weight's dequantized value until the weight changes, instead
    of the FP8 tensor alone (faster; as much memory as the weight)."""
    if fmt not in FORMATS:
        raise FP8Error(f"unknown FP8 format {fmt!r}; expected one of {FORMATS}")
    for name, mod in modules.items():
        if type(mod) is not nn.Linear:
            raise FP8Error(f"{name}: a {type(mod).__name__}, not a plain nn.Linear, cannot be fake-quantized in "
                           "place (its forward may differ); skip it")
        _check_2d(mod.weight, f"{name}.weight")
    for mod in modules.values():
        keep = mod.weight.device.type == "cpu" if keep_dequantized is None else keep_dequantized
        mod.fp8_quantizer = _CachedQuantizer(fmt, block, keep)
        mod.__class__ = FakeQuantLinear
    return list(modules)


def restore_linears_(model: nn.Module) -> int:
    """Undo :func:`fake_quantize_linears_` on every module of ``model``; returns how many were restored."""
    n = 0
    for mod in model.modules():
        if type(mod) is FakeQuantLinear:
            mod.__class__ = nn.Linear
            del mod.fp8_quantizer
            n += 1
    return n
