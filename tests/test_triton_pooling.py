"""Triton pooling launchers (deconvseg_fast.kernels.pooling) against torch's own ops.

Without a GPU the kernels run under the Triton interpreter on CPU tensors. Triton picks the
interpreter when a function is *decorated*: `@triton.jit` reads TRITON_INTERPRET when the module
defining it is imported -- both our kernels and triton.language's own helpers (tl.sum, tl.max),
which are decorated when triton is first imported. So the variable must be set before anything in
the pytest process imports triton (torch.compile / opcheck tests do): tests/conftest.py sets it,
and this module sets it too for runs of this file alone. References are always computed by torch
on CPU, where its unpool/backward loops are sequential and so define "last writer wins" and the
summation order.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import deconvseg_fast.kernels.pooling as tp  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not (
        isinstance(tl.sum, InterpretedFunction)
        and isinstance(tp._max_pool2d_switches_kernel, InterpretedFunction)):
    raise ImportError(
        "triton was imported in this process before TRITON_INTERPRET=1 was set, so its kernels "
        "cannot run on CPU; set it at the top of tests/conftest.py: `import os, torch; "
        "torch.cuda.is_available() or os.environ.setdefault('TRITON_INTERPRET', '1')`")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CL = torch.channels_last

# (kernel, stride, padding, dilation, ceil_mode, input H, W)
CONFIGS = {
    "2x2s2": ((2, 2), (2, 2), (0, 0), (1, 1), False, 6, 8),
    "2x2s2_odd_ceil": ((2, 2), (2, 2), (0, 0), (1, 1), True, 7, 9),
    "3x3s2p1": ((3, 3), (2, 2), (1, 1), (1, 1), False, 7, 9),
    "3x3s2p1_ceil": ((3, 3), (2, 2), (1, 1), (1, 1), True, 8, 6),
    "3x3s1p1": ((3, 3), (1, 1), (1, 1), (1, 1), False, 5, 7),
    "3x3s1p1_d2": ((3, 3), (1, 1), (1, 1), (2, 2), False, 7, 6),
    "3x2_mixed": ((3, 2), (2, 1), (1, 0), (1, 2), True, 9, 7),
}
PACKED_CONFIGS = ["2x2s2", "2x2s2_odd_ceil"]


def _cases(formats=("flat", "window", "packed")):
    return [pytest.param(name, fmt, id=f"{name}-{fmt}") for name in CONFIGS for fmt in formats
            if fmt != "packed" or name in PACKED_CONFIGS]


def _pooled_hw(cfg):
    k, s, p, d, ceil, h, w = cfg
    out = []
    for size, kk, ss, pp, dd in zip((h, w), k, s, p, d):
        o = (size + 2 * pp - dd * (kk - 1) - 1 + (ss - 1 if ceil else 0)) // ss + 1
        if ceil and (o - 1) * ss >= size + pp:
            o -= 1
        out.append(o)
    return tuple(out)


def _pool(x, cfg, fmt):
    k, s, p, d = cfg[:4]
    return tp.max_pool2d_switches(x.to(DEVICE), k, s, p, d, _pooled_hw(cfg), fmt)


def _torch_pool(x, cfg):
    k, s, p, d, ceil = cfg[:5]
    return F.max_pool2d(x.cpu(), k, s, p, d, ceil_mode=ceil, return_indices=True)


def _to_flat(sw, fmt, cfg, wo, plane_w):
    """Decodes compact switches to torch's flat indices, exactly as docs/switches.md defines."""
    sw = sw.cpu()
    if fmt == "flat":
        return sw
    k, s, p, d = cfg[:4]
    codes = sw.long()
    if fmt == "packed":
        shifts = torch.tensor([0, 2, 4, 6])
        codes = ((codes[..., None] >> shifts) & 3).flatten(-2)[..., :wo]
    ho = codes.shape[2]
    oh = torch.arange(ho)[:, None]
    ow = torch.arange(wo)[None, :]
    h = oh * s[0] - p[0] + (codes // k[1]) * d[0]
    w = ow * s[1] - p[1] + (codes % k[1]) * d[1]
    return h * plane_w + w


def _to_format(flat, fmt, cfg, plane_w):
    """Encodes in-window flat indices into a compact format (inverse of _to_flat)."""
    if fmt == "flat":
        return flat.clone()
    k, s, p, d = cfg[:4]
    ho, wo = flat.shape[2:]
    oh = torch.arange(ho)[:, None]
    ow = torch.arange(wo)[None, :]
    i = (flat // plane_w - oh * s[0] + p[0]) // d[0]
    j = (flat % plane_w - ow * s[1] + p[1]) // d[1]
    codes = i * k[1] + j
    if fmt == "window":
        return codes.to(torch.uint8)
    wq = (wo + 3) // 4
    padded = torch.zeros(*codes.shape[:3], wq * 4, dtype=torch.int64)
    padded[..., :wo] = codes
    packed = (padded.view(*codes.shape[:3], wq, 4) << torch.tensor([0, 2, 4, 6])).sum(-1)
    return packed.to(torch.uint8)


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------------------
# max_pool2d_switches
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,fmt", _cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pool_matches_torch_exactly(name, fmt, dtype):
    cfg = CONFIGS[name]
    x = _randn(2, 3, cfg[5], cfg[6], dtype=dtype)
    values, switches = _pool(x, cfg, fmt)
    ref_v, ref_i = _torch_pool(x, cfg)
    assert values.dtype == dtype
    assert switches.dtype == (torch.int64 if fmt == "flat" else torch.uint8)
    wo = ref_v.shape[3]
    expected_sw_w = (wo + 3) // 4 if fmt == "packed" else wo
    assert switches.shape == (*ref_v.shape[:3], expected_sw_w)
    torch.testing.assert_close(values.cpu(), ref_v, rtol=0, atol=0)
    assert torch.equal(_to_flat(switches, fmt, cfg, wo, cfg[6]), ref_i)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["2x2s2_odd_ceil", "3x3s2p1", "3x3s1p1_d2"])
def test_pool_reduced_precision(name, dtype):
    # Rounded inputs tie often; selection compares in float32 with torch's tie rule, so values
    # and switches are still exact.
    cfg = CONFIGS[name]
    x = (_randn(2, 3, cfg[5], cfg[6]) * 2).round().to(dtype)
    values, switches = _pool(x, cfg, "flat")
    ref_v, ref_i = _torch_pool(x, cfg)
    assert values.dtype == dtype
    torch.testing.assert_close(values.cpu(), ref_v, rtol=0, atol=0)
    assert torch.equal(switches.cpu(), ref_i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["flat", "window"])
def test_pool_nan_ties_and_infinities(dtype, fmt):
    cfg = CONFIGS["3x3s2p1"]
    x = torch.zeros(1, 2, 7, 9)
    x[0, 0, 0, 0] = float("nan")  # NaN first in its window: later finite values must not replace
    x[0, 0, 0, 1] = 5.0
    x[0, 0, 2, 2] = float("nan")
    x[0, 0, 3, 3] = float("nan")  # two NaNs in one window: the last one wins
    x[0, 0, 5:7, 5:7] = 7.0  # ties: the first in row-major order wins
    x[0, 1].fill_(float("-inf"))  # all -inf: the switch is the first in-bounds tap
    x[0, 1, 6, 8] = float("inf")
    x = x.to(dtype)
    values, switches = _pool(x, cfg, fmt)
    ref_v, ref_i = _torch_pool(x, cfg)
    torch.testing.assert_close(values.cpu(), ref_v, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(_to_flat(switches, fmt, cfg, ref_v.shape[3], 9), ref_i)


def test_packed_bit_layout():
    # 2x2 s2 over 2x10 -> Wo = 5: byte 0 holds columns 0..3, byte 1 holds column 4 in bits 0-1
    # and zeros above.
    cfg = CONFIGS["2x2s2"]
    x = torch.zeros(1, 1, 2, 10)
    taps = [3, 2, 1, 0, 3]  # i*2 + j of the maximum in each window
    for ow, code in enumerate(taps):
        x[0, 0, code // 2, 2 * ow + code % 2] = 1.0
    _, switches = tp.max_pool2d_switches(x.to(DEVICE), *cfg[:4], (1, 5), "packed")
    expected = 3 | (2 << 2) | (1 << 4) | (0 << 6)
    assert switches.cpu().view(-1).tolist() == [expected, 3]


@pytest.mark.parametrize("fmt", ["flat", "window", "packed"])
def test_pool_channels_last_and_non_contiguous(fmt):
    cfg = CONFIGS["2x2s2_odd_ceil"]
    base = _randn(2, 5, 7, 9)
    ref_v, ref_i = _torch_pool(base, cfg)
    wo = ref_v.shape[3]
    # channels_last in, channels_last out (values and switches)
    values, switches = _pool(base.contiguous(memory_format=CL), cfg, fmt)
    assert values.is_contiguous(memory_format=CL)
    assert switches.is_contiguous(memory_format=CL)
    torch.testing.assert_close(values.cpu(), ref_v, rtol=0, atol=0)
    assert torch.equal(_to_flat(switches, fmt, cfg, wo, 9), ref_i)
    # a strided view (every other column of a wider tensor) gives contiguous NCHW outputs
    wide = torch.zeros(2, 5, 7, 18, dtype=base.dtype)
    wide[..., ::2] = base
    values, switches = _pool(wide[..., ::2], cfg, fmt)
    assert values.is_contiguous() and switches.is_contiguous()
    torch.testing.assert_close(values.cpu(), ref_v, rtol=0, atol=0)
    assert torch.equal(_to_flat(switches, fmt, cfg, wo, 9), ref_i)


# --------------------------------------------------------------------------------------------
# max_unpool2d
# --------------------------------------------------------------------------------------------
def _torch_unpool(src, indices, out_hw):
    # The aten op directly: F.max_unpool2d validates output_size with a dilation-free formula.
    return torch.ops.aten.max_unpool2d(src.cpu(), indices.cpu(), list(out_hw))


@pytest.mark.parametrize("name,fmt", _cases())
def test_unpool_matches_torch(name, fmt):
    # Unpool fresh values (not the pooled maxima) so that duplicate switches from overlapping
    # windows carry different values and "last writer wins" is observable.
    cfg = CONFIGS[name]
    h, w = cfg[5], cfg[6]
    x = _randn(2, 3, h, w)
    ref_v, ref_i = _torch_pool(x, cfg)
    _, switches = _pool(x, cfg, fmt)
    src = _randn(*ref_v.shape, seed=1)
    out = tp.max_unpool2d(src.to(DEVICE), switches, *cfg[:4], (h, w), fmt)
    ref = _torch_unpool(src, ref_i, (h, w))
    assert out.shape == ref.shape
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)


def test_unpool_duplicates_last_wins():
    # 3x3 s1 p1 over a constant plane: every window picks the same pixel (its first in-bounds
    # tap), so many windows share a switch; the highest pooled index must win.
    cfg = CONFIGS["3x3s1p1"]
    x = torch.zeros(1, 1, 5, 7)
    _, switches = _pool(x, cfg, "window")
    flat = _to_flat(switches, "window", cfg, 7, 7)
    assert flat.unique().numel() < flat.numel()
    src = torch.arange(35, dtype=torch.float32).view(1, 1, 5, 7)
    out = tp.max_unpool2d(src.to(DEVICE), switches, *cfg[:4], (5, 7), "window")
    ref = _torch_unpool(src, flat, (5, 7))
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_unpool_dtypes_channels_last_and_larger_output(dtype):
    cfg = CONFIGS["2x2s2_odd_ceil"]
    x = _randn(2, 3, 7, 9, dtype=dtype)
    ref_v, ref_i = _torch_pool(x, cfg)
    values, switches = _pool(x.contiguous(memory_format=CL), cfg, "packed")
    out_hw = (9, 10)  # user output_size above the default (8, 10): extra row stays zero
    out = tp.max_unpool2d(values, switches, *cfg[:4], out_hw, "packed")
    assert out.is_contiguous(memory_format=CL) and out.dtype == dtype
    ref = _torch_unpool(ref_v, _to_flat(switches, "packed", cfg, ref_v.shape[3], 10), out_hw)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("out_hw", [(7, 9), (9, 11)])
def test_unpool_flat_other_output_size(out_hw):
    # Flat indices are positions in the output plane itself (torch semantics): below the default
    # size (8, 10) the plane equals the pooled input and every switch stays in its window; above
    # it the row width changes, switches land outside their windows and the fallback must run.
    cfg = CONFIGS["2x2s2_odd_ceil"]
    x = _randn(2, 3, 7, 9)
    ref_v, ref_i = _torch_pool(x, cfg)
    values, switches = _pool(x, cfg, "flat")
    out = tp.max_unpool2d(values, switches, *cfg[:4], out_hw, "flat")
    torch.testing.assert_close(out.cpu(), _torch_unpool(ref_v, ref_i, out_hw), rtol=0, atol=0)


def test_unpool_flat_outside_window_uses_fallback():
    # torch accepts any in-plane flat index; these point across windows and collide, which the
    # gather kernel cannot see, so the launcher must take the sort-based fallback.
    cfg = CONFIGS["2x2s2"]
    g = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 48, (2, 3, 3, 4), generator=g)
    indices[0, 0, 2, 3] = indices[0, 0, 0, 0]  # a guaranteed collision, last must win
    src = _randn(2, 3, 3, 4, seed=4)
    for memory_format in (torch.contiguous_format, CL):
        s = src.contiguous(memory_format=memory_format).to(DEVICE)
        out = tp.max_unpool2d(s, indices.to(DEVICE), *cfg[:4], (6, 8), "flat")
        ref = _torch_unpool(src, indices, (6, 8))
        torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)
        assert out.is_contiguous(memory_format=memory_format)


# --------------------------------------------------------------------------------------------
# max_pool2d_switches_backward
# --------------------------------------------------------------------------------------------
def _torch_pool_backward(grad, x, cfg, indices):
    k, s, p, d, ceil = cfg[:5]
    return torch.ops.aten.max_pool2d_with_indices_backward(
        grad.cpu(), x.cpu(), list(k), list(s), list(p), list(d), ceil, indices.cpu())


@pytest.mark.parametrize("name,fmt", _cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pool_backward_matches_torch_exactly(name, fmt, dtype):
    # Same summation order as torch's sequential CPU loop, so even float32 is bit-exact.
    cfg = CONFIGS[name]
    h, w = cfg[5], cfg[6]
    x = (_randn(2, 3, h, w) * 2).round().to(dtype)  # ties make overlapping windows share pixels
    ref_v, ref_i = _torch_pool(x, cfg)
    _, switches = _pool(x, cfg, fmt)
    grad = _randn(*ref_v.shape, dtype=dtype, seed=5)
    out = tp.max_pool2d_switches_backward(grad.to(DEVICE), switches, (h, w), *cfg[:4], fmt)
    ref = _torch_pool_backward(grad, x, cfg, ref_i)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pool_backward_reduced_precision(dtype):
    # The kernel sums in float32 and rounds once (torch's CUDA kernel does the same; its CPU loop
    # rounds after every add), so compare with the float64 sum rounded to dtype, at dtype's
    # default tolerance.
    cfg = CONFIGS["3x3s1p1"]
    x = (_randn(2, 3, 5, 7) * 2).round()
    ref_v, ref_i = _torch_pool(x, cfg)
    _, switches = _pool(x.to(dtype), cfg, "window")
    grad = _randn(*ref_v.shape, seed=6).to(dtype)
    out = tp.max_pool2d_switches_backward(grad.to(DEVICE), switches, (5, 7), *cfg[:4], "window")
    ref = _torch_pool_backward(grad.double(), x.double(), cfg, ref_i).to(dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out.cpu(), ref)


@pytest.mark.parametrize("fmt", ["flat", "packed"])
def test_pool_backward_channels_last_and_expanded_grad(fmt):
    cfg = CONFIGS["2x2s2_odd_ceil"]
    x = _randn(2, 3, 7, 9)
    ref_v, ref_i = _torch_pool(x, cfg)
    _, switches = _pool(x.contiguous(memory_format=CL), cfg, fmt)
    grad = _randn(*ref_v.shape, seed=7).contiguous(memory_format=CL)
    out = tp.max_pool2d_switches_backward(grad.to(DEVICE), switches, (7, 9), *cfg[:4], fmt)
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out.cpu(), _torch_pool_backward(grad, x, cfg, ref_i),
                               rtol=0, atol=0)
    # what x.sum().backward() hands over: a stride-0 gradient
    ones = torch.ones((), device=DEVICE).expand(*ref_v.shape)
    out = tp.max_pool2d_switches_backward(ones, switches, (7, 9), *cfg[:4], fmt)
    torch.testing.assert_close(out.cpu(), _torch_pool_backward(ones, x, cfg, ref_i),
                               rtol=0, atol=0)


def test_pool_backward_flat_outside_window_uses_fallback():
    # Indices that leave their window and pile up on a few pixels: the fallback must sum them in
    # increasing window order, which makes float32 bit-identical to torch's sequential loop.
    cfg = CONFIGS["3x3s2p1"]
    g = torch.Generator().manual_seed(8)
    indices = torch.randint(0, 6, (2, 3, 4, 5), generator=g)
    indices[1, 2] = 62  # every window of one plane on the last pixel
    x = torch.zeros(2, 3, 7, 9)
    grad = _randn(2, 3, 4, 5, seed=9) * 1000
    for memory_format in (torch.contiguous_format, CL):
        gd = grad.contiguous(memory_format=memory_format).to(DEVICE)
        out = tp.max_pool2d_switches_backward(gd, indices.to(DEVICE), (7, 9), *cfg[:4], "flat")
        assert out.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(out.cpu(), _torch_pool_backward(grad, x, cfg, indices),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("name,window,target", [
    pytest.param("2x2s2", (1, 1), (1, 2), id="row-above"),
    pytest.param("2x2s2", (1, 1), (2, 1), id="column-left"),
    pytest.param("2x2s2", (1, 1), (4, 3), id="row-below"),
    pytest.param("2x2s2", (1, 1), (3, 4), id="column-right"),
    pytest.param("3x3s1p1_d2", (2, 2), (2, 3), id="between-dilated-taps"),
])
def test_flat_just_outside_window(name, window, target):
    # One valid switch moved just past its window (or between dilated taps): only the check
    # kernel can notice, and both scattering ops must then take the fallback.
    cfg = CONFIGS[name]
    h, w = cfg[5], cfg[6]
    x = _randn(1, 2, h, w)
    ref_v, ref_i = _torch_pool(x, cfg)
    indices = ref_i.clone()
    indices[0, 1, window[0], window[1]] = target[0] * w + target[1]
    src = _randn(*ref_v.shape, seed=14)
    out = tp.max_unpool2d(src.to(DEVICE), indices.to(DEVICE), *cfg[:4], (h, w), "flat")
    torch.testing.assert_close(out.cpu(), _torch_unpool(src, indices, (h, w)), rtol=0, atol=0)
    out = tp.max_pool2d_switches_backward(src.to(DEVICE), indices.to(DEVICE), (h, w), *cfg[:4],
                                          "flat")
    torch.testing.assert_close(out.cpu(), _torch_pool_backward(src, x, cfg, indices),
                               rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# max_unpool2d_backward
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,fmt", _cases())
def test_unpool_backward_matches_autograd(name, fmt):
    cfg = CONFIGS[name]
    h, w = cfg[5], cfg[6]
    x = _randn(2, 3, h, w)
    ref_v, ref_i = _torch_pool(x, cfg)
    _, switches = _pool(x, cfg, fmt)
    src = ref_v.clone().requires_grad_(True)
    grad_out = _randn(2, 3, h, w, seed=10)
    _torch_unpool(src, ref_i, (h, w)).backward(grad_out)
    out = tp.max_unpool2d_backward(grad_out.to(DEVICE), switches, tuple(ref_v.shape[2:]),
                                   *cfg[:4], fmt)
    torch.testing.assert_close(out.cpu(), src.grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_unpool_backward_channels_last_and_outside_window(dtype):
    # A plain gather: flat indices anywhere in the plane are read directly, no fallback needed.
    g = torch.Generator().manual_seed(11)
    indices = torch.randint(0, 48, (2, 3, 3, 4), generator=g)
    grad_out = _randn(2, 3, 6, 8, dtype=dtype, seed=12).contiguous(memory_format=CL)
    out = tp.max_unpool2d_backward(grad_out.to(DEVICE), indices.to(DEVICE), (3, 4), (2, 2),
                                   (2, 2), (0, 0), (1, 1), "flat")
    assert out.is_contiguous(memory_format=CL) and out.dtype == dtype
    ref = grad_out.flatten(2).gather(2, indices.flatten(2)).view(2, 3, 3, 4)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# empty tensors, bad indices, determinism
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["flat", "window", "packed"])
@pytest.mark.parametrize("shape", [(0, 3, 6, 8), (2, 0, 6, 8)])
def test_empty(shape, fmt):
    cfg = CONFIGS["2x2s2"]
    geo = cfg[:4]
    x = torch.randn(*shape, device=DEVICE)
    values, switches = tp.max_pool2d_switches(x, *geo, (3, 4), fmt)
    assert values.shape == (*shape[:2], 3, 4)
    assert switches.shape == (*shape[:2], 3, 1 if fmt == "packed" else 4)
    out = tp.max_unpool2d(values, switches, *geo, (6, 8), fmt)
    assert out.shape == shape
    grad_in = tp.max_pool2d_switches_backward(values, switches, (6, 8), *geo, fmt)
    assert grad_in.shape == shape
    grad_un = tp.max_unpool2d_backward(x, switches, (3, 4), *geo, fmt)
    assert grad_un.shape == values.shape


def _bad_switch_cases():
    cfg = CONFIGS["3x3s2p1"]  # pooled 4x5 over 7x9
    flat = torch.zeros(1, 2, 4, 5, dtype=torch.int64)
    flat_high = flat.clone()
    flat_high[0, 1, 3, 4] = 63  # == H*W
    flat_neg = flat.clone()
    flat_neg[0, 0, 1, 2] = -1
    window = torch.full((1, 2, 4, 5), 4, dtype=torch.uint8)  # centre tap: always valid
    code_high = window.clone()
    code_high[0, 1, 2, 2] = 9  # == kh*kw
    padding = window.clone()
    padding[0, 0, 0, 0] = 0  # tap (0, 0) of window (0, 0) is row -1, column -1
    packed_cfg = CONFIGS["2x2s2_odd_ceil"]  # pooled 4x5 over 7x9, last row/column half outside
    packed = torch.zeros(1, 2, 4, 2, dtype=torch.uint8)
    packed_out = packed.clone()
    packed_out[0, 0, 3, 0] = 2 << 2  # window (3, 1) tap i=1: row 7 of a 7-row plane
    return [
        pytest.param(cfg, flat_high, "flat", "out of range", id="flat-high"),
        pytest.param(cfg, flat_neg, "flat", "out of range", id="flat-negative"),
        pytest.param(cfg, code_high, "window", r"\[0, 9\)", id="window-code"),
        pytest.param(cfg, padding, "window", "padding", id="window-padding"),
        pytest.param(packed_cfg, packed_out, "packed", "padding", id="packed-outside"),
    ]


@pytest.mark.parametrize("cfg,switches,fmt,detail", _bad_switch_cases())
def test_bad_indices_raise(cfg, switches, fmt, detail):
    geo = cfg[:4]
    plane = (cfg[5], cfg[6])
    vals = torch.ones(1, 2, 4, 5, device=DEVICE)
    sw = switches.to(DEVICE)
    with pytest.raises(RuntimeError, match=f"indices.*{detail}"):
        tp.max_unpool2d(vals, sw, *geo, plane, fmt)
    with pytest.raises(RuntimeError, match=f"indices.*{detail}"):
        tp.max_pool2d_switches_backward(vals, sw, plane, *geo, fmt)
    with pytest.raises(RuntimeError, match=f"indices.*{detail}"):
        tp.max_unpool2d_backward(torch.ones(1, 2, *plane, device=DEVICE), sw, (4, 5), *geo, fmt)


def test_valid_compact_switches_do_not_raise():
    # the counterpart of the cases above: the untouched switches pass the same checks
    cfg = CONFIGS["3x3s2p1"]
    sw = torch.full((1, 2, 4, 5), 4, dtype=torch.uint8, device=DEVICE)
    vals = torch.ones(1, 2, 4, 5, device=DEVICE)
    out = tp.max_unpool2d(vals, sw, *cfg[:4], (7, 9), "window")
    assert out.sum().item() == 40


def test_deterministic_bits():
    cfg = CONFIGS["3x3s1p1"]
    x = (_randn(2, 3, 5, 7) * 2).round()
    _, switches = _pool(x, cfg, "flat")
    grad = _randn(2, 3, 5, 7, seed=13)
    runs = [tp.max_pool2d_switches_backward(grad.to(DEVICE), switches, (5, 7), *cfg[:4], "flat")
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    # the converted format round-trips (sanity check of the test's own encoder)
    assert torch.equal(_to_flat(_to_format(switches.cpu(), "window", cfg, 7), "window", cfg, 7, 7),
                       switches.cpu())


@pytest.mark.parametrize("fmt", ["flat", "packed"])
def test_int64_index_path(monkeypatch, fmt):
    # Tensors of 2**31 elements do not fit the interpreter; force the INDEX_64 specialisation on
    # small ones so its index math is exercised too.
    monkeypatch.setattr(tp, "_index_64", lambda *tensors: True)
    cfg = CONFIGS["2x2s2_odd_ceil"]
    x = _randn(2, 3, 7, 9).contiguous(memory_format=CL)
    ref_v, ref_i = _torch_pool(x, cfg)
    values, switches = _pool(x, cfg, fmt)
    torch.testing.assert_close(values.cpu(), ref_v, rtol=0, atol=0)
    flat = _to_flat(switches, fmt, cfg, ref_v.shape[3], 9)
    assert torch.equal(flat, ref_i)
    grad = _randn(*ref_v.shape, seed=15)
    out = tp.max_pool2d_switches_backward(grad.to(DEVICE), switches, (7, 9), *cfg[:4], fmt)
    torch.testing.assert_close(out.cpu(), _torch_pool_backward(grad, x, cfg, ref_i),
                               rtol=0, atol=0)
    grad_out = _randn(2, 3, 7, 9, seed=16)
    out = tp.max_unpool2d_backward(grad_out.to(DEVICE), switches, (4, 5), *cfg[:4], fmt)
    ref = grad_out.flatten(2).gather(2, ref_i.flatten(2)).view_as(ref_v)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)


def test_cuda_registration_validates_then_launches():
    # The functions registered for "cuda" (deconvseg_fast/ops/pooling.py) check arguments like the
    # CPU op, then call the launchers; run them here on CPU tensors under the interpreter.
    from deconvseg_fast.ops.pooling import TRITON_LAUNCHERS as L

    x = torch.randn(1, 2, 6, 8, generator=torch.Generator().manual_seed(3))
    geo = ([2, 2], [2, 2], [0, 0], [1, 1])
    v, sw = L["max_pool2d_switches"](x, *geo, False, "packed")
    v0, i0 = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(v, v0)
    assert torch.equal(L["max_unpool2d"](v, sw, *geo, [6, 8], "packed"), F.max_unpool2d(v0, i0, 2))
    with pytest.raises(ValueError, match="index_format"):
        L["max_pool2d_switches"](x, [3, 3], [2, 2], [0, 0], [1, 1], False, "packed")
    with pytest.raises(ValueError, match="padding"):
        L["max_pool2d_switches"](x, [2, 2], [2, 2], [2, 2], [1, 1], False, "flat")
    with pytest.raises(ValueError, match="indices"):
        L["max_unpool2d"](v, sw[..., :0], *geo, [6, 8], "packed")
    bad = i0.clone()
    bad[0, 0, 0, 0] = 48
    with pytest.raises(RuntimeError, match="indices"):
        L["max_pool2d_switches_backward"](v0, bad, [6, 8], *geo, "flat")
