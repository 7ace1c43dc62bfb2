"""FP8 (e4m3) weight quantization: round trips against a naive per-block loop, e4m3's rounding bound, zero and
outlier handling, FP8Linear (dequant path and, on CPU, torch's real row-wise FP8 matmul), the STE, and
convert_to_fp8 / requantize_from on a tiny transformers model."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from opd_plugins.rollout import _fp8
from opd_plugins.rollout._fp8 import (
    FP8Error,
    FP8Linear,
    convert_to_fp8,
    dequantize,
    divides,
    e4m3_max,
    fake_quantize,
    quantization_error,
    quantize_model,
    quantize_per_block,
    quantize_per_channel,
    requantize_from,
    select_kernel,
    skipped_linears,
    ste_fake_quantize,
)

SHAPES = [(256, 384), (130, 200), (1, 7)]


def _randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _naive_per_block(w, block):
    """Block by block with Python loops: scales and e4m3 values."""
    bo, bi = block
    out, inn = w.shape
    scales = torch.empty(math.ceil(out / bo), math.ceil(inn / bi))
    q = torch.empty(out, inn, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tile = w[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi].float()
            amax = tile.abs().max().item()
            s = amax / 448.0 if amax > 0 else 1.0
            scales[i, j] = s
            q[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi] = (tile / torch.tensor(s)).clamp(-448, 448).to(q.dtype)
    return q, scales


def _e4m3_bound(w, scale_full):
    """Round-to-nearest error of e4m3fn (3 mantissa bits) for y = w / s, mapped back by s.

    Normal |y| in [2^e, 2^(e+1)): spacing 2^(e-3), so |y - q| <= 2^(e-4) <= 2^-4 |y|. Subnormal |y| < 2^-6:
    spacing 2^-9 (the smallest subnormal), so |y - q| <= 2^-10. Hence |w - dq| <= max(2^-4 |w|, 2^-10 s).
    """
    return torch.maximum(w.abs() * 2.0**-4, scale_full * 2.0**-10)


def _full_scales(scales, block, shape):
    if block is None:
        return scales.expand(shape)
    return scales.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def test_e4m3_max_and_divides():
    assert e4m3_max() == 448.0
    assert divides((256, 384), (128, 128)) and not divides((130, 200), (128, 128)) and divides((130, 200), (1, 1))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [(128, 128), (64, 32)])
@pytest.mark.parametrize("magnitude", [1.0, 1e3])
def test_per_block_matches_naive_loop_and_e4m3_bound(shape, block, magnitude):
    w = _randn(*shape) * magnitude
    q, s = quantize_per_block(w, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    q_ref, s_ref = _naive_per_block(w, block)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.float(), q_ref.float())
    dq = dequantize(q, s, block)
    assert dq.dtype == torch.float32 and dq.shape == w.shape
    bound = _e4m3_bound(w, _full_scales(s, block, shape))
    err = (w - dq).abs()
    assert (err <= bound * (1 + 1e-5) + 1e-12).all()
    if w.numel() > 1000:  # the bound is tight: some element gets close to half a spacing
        assert (err / bound).max() > 0.9
    assert quantization_error(w, "per_block", block)["rel_fro_err"] < 0.05
    assert torch.equal(fake_quantize(w, "per_block", block), dq)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("magnitude", [1.0, 1e3, 1e-4])
def test_per_channel_round_trip_and_e4m3_bound(shape, magnitude):
    w = _randn(*shape, seed=1) * magnitude
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and s.dtype == torch.float32
    assert s.shape == (shape[0], 1)
    assert torch.equal(s, w.abs().amax(dim=1, keepdim=True) / 448)
    assert quantization_error(w, "per_channel")["rel_fro_err"] == pytest.approx(
        quantization_error(w / magnitude, "per_channel")["rel_fro_err"], rel=0.05)  # scale-free
    dq = dequantize(q, s)
    err = (w - dq).abs()
    bound = _e4m3_bound(w, s.expand(shape))
    assert (err <= bound * (1 + 1e-5) + 1e-12).all()
    # every row's largest entry is exactly representable (it maps to +-448)
    rows = torch.arange(shape[0])
    idx = w.abs().argmax(dim=1)
    assert torch.allclose(dq[rows, idx], w[rows, idx], rtol=1e-6, atol=0)
    m = quantization_error(w, "per_channel")
    assert m["rel_fro_err"] < 0.05 and m["max_abs_err"] == pytest.approx(err.max().item())


def test_dequantize_refuses_wrong_scale_shapes():
    q, s = quantize_per_block(_randn(130, 200))
    with pytest.raises(FP8Error, match=r"\(2, 2\)"):
        dequantize(q, s[:1], (128, 128))
    with pytest.raises(FP8Error, match=r"\(130, 1\)"):
        dequantize(q, s)


def test_zeros_dequantize_to_exact_zeros():
    for fmt in ("per_block", "per_channel"):
        assert torch.equal(fake_quantize(torch.zeros(256, 384), fmt), torch.zeros(256, 384))
    w = _randn(256, 384)
    w[:128, 128:256] = 0
    w[200] = 0
    q, s = quantize_per_block(w)
    assert s[0, 1] == 1.0
    dq = dequantize(q, s, (128, 128))
    assert not dq.isnan().any()
    assert torch.equal(dq[:128, 128:256], torch.zeros(128, 128)) and torch.equal(dq[200], torch.zeros(384))
    dq_c = fake_quantize(w, "per_channel")
    assert not dq_c.isnan().any() and torch.equal(dq_c[200], torch.zeros(384))


def _rel(err, ref):
    return (err.norm() / ref.norm()).item()


def test_an_outlier_stays_in_its_block_but_spreads_along_its_row_per_channel():
    w = _randn(256, 384, seed=2)
    spiked = w.clone()
    spiked[3, 5] = 1e5  # block (0, 0), row 3: the scale grows ~1e4x, the other entries fall into subnormals
    base_b, spiked_b = fake_quantize(w, "per_block"), fake_quantize(spiked, "per_block")
    other = torch.ones(256, 384, dtype=torch.bool)
    other[:128, :128] = False
    assert torch.equal(base_b[other], spiked_b[other])  # every other block is bit-identical
    err = spiked_b - w
    err[3, 5] = 0
    blk = (slice(0, 128), slice(0, 128))
    assert _rel(err[blk], w[blk]) > 3 * _rel((base_b - w)[blk], w[blk])  # its own block pays for the outlier

    base_c, spiked_c = fake_quantize(w, "per_channel"), fake_quantize(spiked, "per_channel")
    rows = torch.arange(256) != 3
    assert torch.equal(base_c[rows], spiked_c[rows])
    # per channel, row 3 pays all along, past block (0, 0); per block, that part of row 3 is untouched
    assert _rel((spiked_c - w)[3, 128:], w[3, 128:]) > 3 * _rel((base_c - w)[3, 128:], w[3, 128:])
    assert torch.equal(spiked_b[3, 128:], base_b[3, 128:])


def test_bad_inputs_are_refused():
    with pytest.raises(FP8Error, match="2-D"):
        quantize_per_block(torch.randn(4, 4, 4))
    with pytest.raises(FP8Error, match="int64"):
        quantize_per_channel(torch.ones(4, 4, dtype=torch.long))
    with pytest.raises(FP8Error, match="format"):
        fake_quantize(torch.randn(4, 4), "per_tensor")
    with pytest.raises(FP8Error, match="block"):
        quantize_per_block(torch.randn(4, 4), (0, 4))


def test_ste_forward_is_fake_quant_and_gradient_is_identity():
    w = _randn(130, 200, seed=3).requires_grad_(True)
    for fmt in ("per_block", "per_channel"):
        w.grad = None
        y = ste_fake_quantize(w, fmt)
        assert torch.equal(y.detach(), fake_quantize(w.detach(), fmt))
        upstream = _randn(130, 200, seed=4)
        (y * upstream).sum().backward()
        assert torch.equal(w.grad, upstream)


def _linear(inn, out, seed=0, bias=True, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Linear(inn, out, bias=bias).to(dtype)


@pytest.mark.parametrize("fmt", ["per_block", "per_channel"])
def test_fp8_linear_cpu_matches_fake_quant_reference(fmt):
    lin = _linear(200, 136)
    mod = FP8Linear.from_linear(lin, fmt, name="blk.q_proj")
    assert mod.kernel == "dequant" and mod.mode.endswith("/dequant") and mod.mode.startswith(fmt)
    assert mod.weight.dtype == torch.float8_e4m3fn and mod.bias.dtype == torch.float32
    w_fq = fake_quantize(lin.weight.detach(), fmt)
    for x in (_randn(7, 200, seed=5), _randn(2, 5, 200, seed=6)):
        torch.testing.assert_close(mod(x), F.linear(x, w_fq, lin.bias.detach()), rtol=0, atol=1e-6)
    x = _randn(2, 5, 200, seed=7)
    before = mod(x)
    new_w = lin.weight.detach() + 0.05 * _randn(136, 200, seed=8)
    mod.requantize_(new_w)
    after = mod(x)
    assert (after - before).abs().max() > 1e-2
    torch.testing.assert_close(after, F.linear(x, fake_quantize(new_w, fmt), lin.bias.detach()), rtol=0, atol=1e-6)


def test_fp8_linear_bfloat16_and_dtype_moves():
    lin = _linear(128, 64, dtype=torch.bfloat16, bias=False)
    mod = FP8Linear.from_linear(lin, "per_block")
    x = _randn(3, 128, seed=9, dtype=torch.bfloat16)
    out = mod(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(x, fake_quantize(lin.weight.detach(), "per_block")))
    mod.to(torch.float16)  # weights and scales keep their formats
    assert mod.weight.dtype == torch.float8_e4m3fn and mod.weight_scale.dtype == torch.float32
    assert torch.equal(mod(x), out)


def test_fp8_linear_errors_name_the_layer():
    lin = _linear(32, 32)
    lin.weight = torch.nn.Parameter(torch.ones(32, 32, dtype=torch.int32), requires_grad=False)
    with pytest.raises(FP8Error, match=r"layers\.0\.mlp.*int32"):
        FP8Linear.from_linear(lin, name="layers.0.mlp")
    mod = FP8Linear.from_linear(_linear(32, 48), name="layers.1.o_proj")
    with pytest.raises(FP8Error, match=r"layers\.1\.o_proj.*\(32, 32\)"):
        mod.requantize_(torch.randn(32, 32))
    bad = torch.randn(48, 32)
    bad[0, 0] = float("inf")
    with pytest.raises(FP8Error, match=r"layers\.1\.o_proj.*inf"):
        mod.requantize_(bad)
    with pytest.raises(FP8Error, match=r"layers\.1\.o_proj.*48"):
        mod(torch.randn(2, 48))
    mod.kernel_request = "scaled_mm_rowwise"  # a per-channel kernel on per-block weights
    with pytest.raises(FP8Error, match=r"layers\.1\.o_proj.*per_channel"):
        mod(torch.randn(2, 32, dtype=torch.bfloat16))


def test_real_rowwise_fp8_matmul_on_cpu_matches_reference():
    """torch's CPU ``_scaled_mm`` runs the same row-wise call as CUDA: check the arguments and the numbers."""
    lin = _linear(256, 384, seed=10, dtype=torch.bfloat16)
    mod = FP8Linear.from_linear(lin, "per_channel", name="mlp.up_proj")
    mod.kernel_request = "scaled_mm_rowwise"
    x = _randn(3, 5, 256, seed=11, dtype=torch.bfloat16)  # M = 15: padded to 16 inside
    out = mod(x)
    assert out.shape == (3, 5, 384) and out.dtype == torch.bfloat16 and mod.mode == "per_channel/scaled_mm_rowwise"
    x_fq = fake_quantize(x.reshape(15, 256).float(), "per_channel").reshape(3, 5, 256)  # per-token activations
    ref = F.linear(x_fq, fake_quantize(lin.weight.detach().float(), "per_channel"), lin.bias.detach().float())
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    without_act_quant = F.linear(x.float(), fake_quantize(lin.weight.detach().float(), "per_channel"),
                                 lin.bias.detach().float())
    assert (out.float() - without_act_quant).abs().max() > (out.float() - ref).abs().max()


def test_blockwise_call_passes_torchs_cuda_shape_and_stride_checks_on_meta():
    """Meta tensors run ``_meta_registrations``' CUDA checks (strides, 1x128 / 128x128 scale layouts)."""
    lin = torch.nn.Linear(256, 384, device="meta")
    mod = FP8Linear.from_linear(lin, "per_block", name="attn.q_proj")
    mod.kernel_request = "scaled_mm_blockwise"
    out = mod(torch.empty(2, 5, 256, device="meta", dtype=torch.bfloat16))
    assert out.shape == (2, 5, 384) and out.dtype == torch.bfloat16
    x = torch.empty(10, 256, device="meta", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):  # the scales as stored (not the kernel's layout) are refused
        _fp8._mm_blockwise(x, mod.weight, mod.weight_scale, None)
    assert _fp8._blockwise_scale_layout(mod.weight_scale).stride() == (1, 4)  # L4 = round_up(256 / 128, 4)
    rowwise = FP8Linear.from_linear(lin, "per_channel")
    rowwise.kernel_request = "scaled_mm_rowwise"
    assert rowwise(x).shape == (10, 384)


def test_select_kernel(monkeypatch):
    assert select_kernel("cpu", "per_block") == "dequant" and select_kernel("cpu", "per_channel") == "dequant"
    with pytest.raises(FP8Error, match="format"):
        select_kernel("cpu", "per_tensor")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    cases = {  # (capability, CUDA version, block) -> (per_block kernel, per_channel kernel)
        ((9, 0), "12.9", (128, 128)): ("scaled_mm_blockwise", "scaled_mm_rowwise"),
        ((9, 0), "12.4", (128, 128)): ("dequant", "scaled_mm_rowwise"),
        ((9, 0), "13.0", (64, 64)): ("dequant", "scaled_mm_rowwise"),
        ((8, 9), "12.9", (128, 128)): ("dequant", "scaled_mm_rowwise"),
        ((10, 0), "12.9", (128, 128)): ("dequant", "scaled_mm_rowwise"),
        ((8, 0), "12.9", (128, 128)): ("dequant", "dequant"),
    }
    for (cap, cuda, block), want in cases.items():
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        monkeypatch.setattr(torch.version, "cuda", cuda)
        got = (select_kernel("cuda", "per_block", block), select_kernel("cuda:0", "per_channel", block))
        assert got == want, (cap, cuda, block)
    assert select_kernel("cpu", "per_block") == "dequant"


def test_fp8_linear_falls_back_to_dequant_for_shapes_the_kernels_refuse(monkeypatch):
    monkeypatch.setattr(_fp8, "select_kernel", lambda device, fmt, block: {
        "per_block": "scaled_mm_blockwise", "per_channel": "scaled_mm_rowwise"}[fmt])
    assert FP8Linear.from_linear(_linear(256, 384)).kernel == "scaled_mm_blockwise"
    assert FP8Linear.from_linear(_linear(200, 384)).kernel == "dequant"
    assert FP8Linear.from_linear(_linear(200, 384), "per_channel").kernel == "dequant"
    assert FP8Linear.from_linear(_linear(208, 384), "per_channel").kernel == "scaled_mm_rowwise"


@pytest.fixture(scope="module")
def tiny():
    from opd_plugins.testing.models import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    model = build_tiny_model(tok, seed=0).eval()
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    return model, ids


def _naive_reference(source, names, fmt="per_block"):
    ref = copy.deepcopy(source)
    with torch.no_grad():
        for name in names:
            lin = ref.get_submodule(name)
            lin.weight.copy_(fake_quantize(lin.weight, fmt))
    return ref


@torch.no_grad()
def test_convert_and_requantize_tiny_model_match_naive_fake_quant(tiny):
    source, ids = tiny
    source = copy.deepcopy(source)
    linears = [n for n, m in source.named_modules() if isinstance(m, torch.nn.Linear)]
    fp8 = convert_to_fp8(copy.deepcopy(source))
    converted = [n for n, m in fp8.named_modules() if isinstance(m, FP8Linear)]
    assert "lm_head" not in converted and set(fp8.fp8_skipped) == {"lm_head"}
    assert sorted(converted) == sorted(n for n in linears if n != "lm_head") and len(converted) == 14
    assert all(not isinstance(m, torch.nn.Linear) for n, m in fp8.named_modules() if n in converted)

    ref_logits = _naive_reference(source, converted)(ids).logits
    fp8_logits = fp8(ids).logits
    torch.testing.assert_close(fp8_logits, ref_logits, rtol=0, atol=1e-6)
    assert (fp8_logits - source(ids).logits).abs().max() > 1e-4  # quantization did something

    torch.manual_seed(1)
    for p in source.parameters():  # a training step: every weight moves, norms and embeddings included
        p.add_(0.05 * torch.randn_like(p))
    assert requantize_from(fp8, source)["requantized"] == 14
    new_logits = fp8(ids).logits
    assert (new_logits - fp8_logits).abs().max() > 1e-2
    torch.testing.assert_close(new_logits, _naive_reference(source, converted)(ids).logits, rtol=0, atol=1e-6)


def test_quantize_model_skips_and_reports(tiny):
    model, _ = tiny
    mods = quantize_model(model, "per_channel", skip=("lm_head", "v_proj"), min_features=48)
    skipped = skipped_linears(model, skip=("lm_head", "v_proj"), min_features=48)
    # k_proj / v_proj are (32, 64): under min_features=48; v_proj and lm_head are skipped by name first
    assert skipped["lm_head"] == "skipped by name" and skipped["model.layers.0.self_attn.v_proj"] == "skipped by name"
    assert "min_features" in skipped["model.layers.1.self_attn.k_proj"]
    assert not set(mods) & set(skipped) and len(mods) + len(skipped) == 15
    assert all(m.fmt == "per_channel" and m.weight_scale.shape == (m.out_features, 1) for m in mods.values())
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), torch.nn.Linear)  # model untouched


def test_requantize_from_a_mismatched_source_names_the_layer(tiny):
    from opd_plugins.testing.models import build_tiny_model, build_tokenizer

    model, _ = tiny
    fp8 = convert_to_fp8(copy.deepcopy(model))
    shallower = build_tiny_model(build_tokenizer(), seed=0, layers=1)
    with pytest.raises(FP8Error, match=r"model\.layers\.1\."):
        requantize_from(fp8, shallower)



def test_blockwise_scale_layout_follows_requantize_and_load_state_dict(monkeypatch):
    """The kernel-layout copy of the scales is cached, and rebuilt whenever the scales are written."""
    seen, builds = [], []
    layout = _fp8._blockwise_scale_layout
    monkeypatch.setattr(_fp8, "_blockwise_scale_layout", lambda s: builds.append(1) or layout(s))
    monkeypatch.setattr(_fp8, "_mm_blockwise", lambda x, w, scale_b, bias: seen.append(scale_b.clone())
                        or torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype))
    mod = FP8Linear.from_linear(_linear(256, 384), name="mlp.down_proj")
    mod.kernel_request = "scaled_mm_blockwise"
    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    mod(x)
    mod(x)
    assert len(builds) == 1 and torch.equal(seen[0], layout(mod.weight_scale))
    new_w = 3 * _randn(384, 256, seed=12)
    mod.requantize_(new_w)
    mod(x)
    assert len(builds) == 2 and torch.equal(seen[2], layout(quantize_per_block(new_w)[1]))
    assert not torch.equal(seen[2], seen[1])
    state = FP8Linear.from_linear(_linear(256, 384, seed=13)).state_dict()
    mod.load_state_dict(state)
    mod(x)
    assert len(builds) == 3 and torch.equal(seen[3], layout(state["weight_scale"]))
