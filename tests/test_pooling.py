"""CPU kernels of the four pooling ops against torch's own ops (the oracle), per docs/switches.md."""
import pytest
import torch
import torch.nn.functional as TF

import deconvseg_fast
import deconvseg_fast.functional as F
from deconvseg_fast.reference import pooling as ref

ops = torch.ops.deconvseg

# (shape, kernel, stride, padding, dilation, ceil_mode)
GEOMETRIES = [
    pytest.param((2, 3, 8, 10), 2, 2, 0, 1, False, id="2x2s2"),
    pytest.param((2, 3, 9, 11), 2, 2, 0, 1, False, id="2x2s2-odd"),
    pytest.param((2, 3, 9, 11), 2, 2, 0, 1, True, id="2x2s2-odd-ceil"),
    pytest.param((1, 4, 37, 45), 2, 2, 0, 1, False, id="2x2s2-wide"),
    pytest.param((1, 4, 13, 13), 3, 2, 1, 1, False, id="3x3s2p1-deeplab"),
    pytest.param((1, 4, 13, 12), 3, 1, 1, 1, False, id="3x3s1p1-deeplab"),
    pytest.param((2, 3, 15, 14), 3, 2, 1, 2, True, id="3x3s2p1d2-ceil"),
    pytest.param((2, 2, 7, 9), (2, 3), (1, 2), (1, 1), (2, 1), True, id="rect"),
    pytest.param((1, 2, 11, 10), 3, 3, 0, 1, True, id="3x3s3-ceil"),
    pytest.param((1, 2, 10, 10), 2, 3, 1, 1, False, id="2x2s3p1-gaps"),
]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def with_formats(formats, geometries=GEOMETRIES):
    """(fmt, geometry...) combinations; "packed" only exists for 2x2 windows."""
    return [
        pytest.param(fmt, *g.values, id=f"{fmt}-{g.id}")
        for fmt in formats
        for g in geometries
        if fmt != "packed" or g.values[1] == 2
    ]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def make_input(shape, dtype=torch.float32, layout="contiguous", seed=0, specials=True):
    g = torch.Generator().manual_seed(seed)
    # Few distinct values make ties common; the specials put NaN, -inf and equal maxima in windows.
    x = torch.randint(-6, 7, shape, generator=g).to(torch.float64) / 2
    if specials and shape[-1] >= 3 and shape[-2] >= 3:
        x[0, 0, 0, :3] = float("nan")
        x[0, 0, 1, 1] = float("nan")
        x[-1, -1, :2, :2] = float("-inf")
        x[0, -1, :3, :3] = 3.0
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        big = torch.zeros(shape[0], shape[1], shape[2], shape[3] * 2, dtype=dtype)
        big[..., ::2] = x
        x = big[..., ::2]
        assert not x.is_contiguous()
    return x


def same(a, b):
    """Bitwise-equal values, NaN equal to NaN."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def torch_unpool(values, flat, hw):
    return torch.ops.aten.max_unpool2d(values, flat, list(hw))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,k,s,p,d,ceil", GEOMETRIES)
def test_pool_matches_torch(shape, k, s, p, d, ceil, layout):
    x = make_input(shape, layout=layout)
    v0, i0 = TF.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    v1, i1 = F.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    same(v1, v0)
    assert torch.equal(i1, i0)
    assert v1.stride() == v0.stride() and i1.stride() == i0.stride()
    assert torch.equal(F.max_pool2d(x, k, s, p, d, ceil).nan_to_num(7), v0.nan_to_num(7))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("fmt,shape,k,s,p,d,ceil", with_formats(["window", "packed"]))
def test_compact_formats_match_torch(shape, k, s, p, d, ceil, fmt, layout):
    x = make_input(shape, layout=layout)
    v0, i0 = TF.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    v1, sw = F.max_pool2d(x, k, s, p, d, ceil, return_indices=True, index_format=fmt)
    same(v1, v0)
    assert sw.dtype == torch.uint8
    flat = ref.switches_to_flat(sw, fmt, v1.shape[-2:], x.shape[-2:], k, s, p, d)
    assert torch.equal(flat, i0)
    # The readable oracle agrees too (and pins the packed byte layout).
    _, sw_ref = ref.max_pool2d_switches(x, k, s, p, d, ceil, index_format=fmt)
    assert torch.equal(sw.contiguous(), sw_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,k,s,p,d,ceil", [GEOMETRIES[1], GEOMETRIES[4], GEOMETRIES[5]])
def test_dtypes(shape, k, s, p, d, ceil, dtype, layout):
    x = make_input(shape, dtype=dtype, layout=layout)
    v0, i0 = TF.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    v1, i1 = F.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    # A max is a selection, so every dtype is exact (no tolerance to loosen).
    same(v1, v0)
    assert torch.equal(i1, i0)
    hw = x.shape[-2:]
    same(F.max_unpool2d(v1, i1, k, s, p, output_size=hw, dilation=d), torch_unpool(v0, i0, hw))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt,shape,k,s,p,d,ceil", with_formats(["flat", "window", "packed"]))
def test_unpool_matches_torch(shape, k, s, p, d, ceil, fmt, layout):
    x = make_input(shape, layout=layout)
    v0, i0 = TF.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    v1, sw = F.max_pool2d(x, k, s, p, d, ceil, return_indices=True, index_format=fmt)
    hw = x.shape[-2:]
    out = F.max_unpool2d(v1, sw, k, s, p, output_size=hw, index_format=fmt, dilation=d)
    expect = torch_unpool(v0, i0, hw)
    same(out, expect)
    assert out.stride() == expect.stride()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt,shape,k,s,p,d,ceil", with_formats(["flat", "packed"]))
def test_backwards_match_torch(shape, k, s, p, d, ceil, fmt, layout):
    x = make_input(shape, layout=layout, specials=False) + torch.rand(shape).contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    x0 = x.clone().requires_grad_()
    x1 = x.clone().requires_grad_()
    v0, i0 = TF.max_pool2d(x0, k, s, p, d, ceil, return_indices=True)
    v1, sw = F.max_pool2d(x1, k, s, p, d, ceil, return_indices=True, index_format=fmt)
    g = torch.randn(v0.shape, generator=torch.Generator().manual_seed(1))
    (gx0,) = torch.autograd.grad(v0, x0, g)
    (gx1,) = torch.autograd.grad(v1, x1, g)
    # Overlapping windows add in torch's window order, so float32 sums are bit-identical too.
    same(gx1, gx0)

    # Unpool backward: gradient w.r.t. the pooled values.
    hw = x.shape[-2:]
    pv0 = v0.detach().clone().requires_grad_()
    pv1 = v1.detach().clone().requires_grad_()
    go = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (gu0,) = torch.autograd.grad(TF.max_unpool2d(pv0, i0, k, s, p, output_size=hw) if d == 1 else
                                 torch.ops.aten.max_unpool2d(pv0, i0, list(hw)), pv0, go)
    (gu1,) = torch.autograd.grad(F.max_unpool2d(pv1, sw, k, s, p, output_size=hw, index_format=fmt, dilation=d), pv1, go)
    same(gu1, gu0)


def test_3d_input_and_empty_batch():
    x = make_input((1, 3, 9, 8))[0]
    v0, i0 = TF.max_pool2d(x, 2, return_indices=True)
    v1, i1 = F.max_pool2d(x, 2, return_indices=True)
    same(v1, v0)
    assert torch.equal(i1, i0)
    same(F.max_unpool2d(v1, i1, 2, output_size=x.shape[-2:]), TF.max_unpool2d(v0, i0, 2, output_size=x.shape[-2:]))
    for fmt in ("flat", "window", "packed"):
        e = torch.empty(0, 3, 8, 8)
        v, sw = F.max_pool2d(e, 2, return_indices=True, index_format=fmt)
        assert v.shape == (0, 3, 4, 4) and sw.shape[0] == 0
        assert F.max_unpool2d(v, sw, 2, index_format=fmt).shape == (0, 3, 8, 8)
        e.requires_grad_()
        F.max_pool2d(e, 2).sum().backward()
        assert e.grad.shape == e.shape


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("k,s", [(2, 2), (3, 2), (3, 1)])
def test_unpool_duplicates_last_wins(k, s, layout):
    # Hand-made flat switches: several pooled elements point at one position, and some leave their
    # window (legal for torch). torch's sequential CPU loop (contiguous) is the oracle.
    torch.manual_seed(0)
    hp, wp = 4, 5
    hw = ((hp - 1) * s + k, (wp - 1) * s + k)
    v = torch.randn(2, 3, hp, wp)
    idx = torch.randint(0, 6, (2, 3, hp, wp))  # everything lands in the first row, out of window
    expect = torch_unpool(v, idx, hw)
    if layout == "channels_last":
        v = v.contiguous(memory_format=torch.channels_last)
        idx = idx.contiguous(memory_format=torch.channels_last)
    same(F.max_unpool2d(v, idx, k, s, output_size=hw), expect)
    # Pool backward sums the duplicates.
    expect_g = ref.max_pool2d_backward(v.contiguous(), idx.contiguous(), hw)
    got_g = ops.max_pool2d_switches_backward(v, idx, list(hw), [k, k], [s, s], [0, 0], [1, 1], "flat")
    torch.testing.assert_close(got_g, expect_g, rtol=1e-6, atol=1e-6)
    # Unpool backward gathers at any in-plane switch.
    go = torch.randn(2, 3, *hw)
    got = ops.max_unpool2d_backward(go, idx, [hp, wp], [k, k], [s, s], [0, 0], [1, 1], "flat")
    same(got, go.flatten(2).gather(2, idx.contiguous().flatten(2)).view(2, 3, hp, wp))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 3, 1)])
def test_out_of_range_switches_raise(k, s, p, layout):
    x = make_input((1, 2, 10, 12), layout=layout, specials=False)
    v, i = F.max_pool2d(x, k, s, p, return_indices=True)
    hw = list(x.shape[-2:])
    for bad in (-1, 120, 10**12):
        j = i.clone()
        j[0, 1, -1, -1] = bad
        with pytest.raises(RuntimeError, match="indices"):
            F.max_unpool2d(v, j, k, s, p, output_size=hw)
        with pytest.raises(RuntimeError, match="indices"):
            ops.max_pool2d_switches_backward(v, j, hw, [k, k], [s, s], [p, p], [1, 1], "flat")
        with pytest.raises(RuntimeError, match="indices"):
            ops.max_unpool2d_backward(x.contiguous(), j, list(v.shape[-2:]), [k, k], [s, s], [p, p], [1, 1], "flat")
    # A window code that is not a tap, and a tap that lands in padding.
    _, w = F.max_pool2d(x, k, s, p, return_indices=True, index_format="window")
    for code in (k * k, 255) + ((0,) if p > 0 else ()):
        j = w.clone()
        j[0, 0, 0, 0] = code
        with pytest.raises(RuntimeError, match="indices"):
            F.max_unpool2d(v, j, k, s, p, output_size=hw, index_format="window")
        with pytest.raises(RuntimeError, match="indices"):
            ops.max_unpool2d_backward(x.contiguous(), j, list(v.shape[-2:]), [k, k], [s, s], [p, p], [1, 1], "window")


@pytest.mark.parametrize("col", [3, 17, 21])  # in the first or second vector step, or the tail past them
def test_2x2_row_kernels_fall_back_per_element(col):
    # 2x2 rows of 22 pooled columns take the SIMD row kernels (steps of 16 or 8, then a tail). A
    # flat switch that leaves its window is legal (unpool writes there, unpool backward gathers
    # there); a window code that is not a tap raises; either way at any column.
    x = make_input((1, 2, 6, 44), specials=False)
    v, i = F.max_pool2d(x, 2, return_indices=True)
    go = torch.randn(1, 2, 6, 44)
    j = i.clone()
    j[0, 1, 2, col] = 5  # row 0: outside every window of pooled row 2
    same(F.max_unpool2d(v, j, 2), torch_unpool(v, j, (6, 44)))
    got = ops.max_unpool2d_backward(go, j, [3, 22], [2, 2], [2, 2], [0, 0], [1, 1], "flat")
    same(got, go.flatten(2).gather(2, j.flatten(2)).view(1, 2, 3, 22))
    for fmt in ("window", "packed"):
        _, w = F.max_pool2d(x, 2, return_indices=True, index_format=fmt)
        expect = go.flatten(2).gather(2, i.flatten(2)).view(1, 2, 3, 22)
        same(ops.max_unpool2d_backward(go, w, [3, 22], [2, 2], [2, 2], [0, 0], [1, 1], fmt), expect)
    _, w = F.max_pool2d(x, 2, return_indices=True, index_format="window")
    w[0, 1, 2, col] = 4
    with pytest.raises(RuntimeError, match="indices"):
        ops.max_unpool2d_backward(go, w, [3, 22], [2, 2], [2, 2], [0, 0], [1, 1], "window")
    with pytest.raises(RuntimeError, match="indices"):
        F.max_unpool2d(v, w, 2, index_format="window")


def test_packed_switch_outside_smaller_output_raises():
    # output_size one row short of the default: the last window's lower taps leave the plane.
    v, sw = F.max_pool2d(torch.arange(64.0).view(1, 1, 8, 8), 2, return_indices=True, index_format="packed")
    with pytest.raises(RuntimeError, match="indices"):
        F.max_unpool2d(v, sw, 2, output_size=(7, 8), index_format="packed")
    # ... while a larger output just gains a zero row.
    out = F.max_unpool2d(v, sw, 2, output_size=(9, 8), index_format="packed")
    assert out.shape == (1, 1, 9, 8) and out[0, 0, 8].abs().sum() == 0


def test_deterministic_across_threads():
    x = make_input((2, 8, 33, 31), specials=False) + torch.rand(2, 8, 33, 31)
    results = []
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            v, i = F.max_pool2d(x, 3, 1, 1, return_indices=True)
            g = ops.max_pool2d_switches_backward(v, i, [33, 31], [3, 3], [1, 1], [1, 1], [1, 1], "flat")
            results.append((v, i, g))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fmt,k,s,p,ceil", [
    (f, *g) for f in ("flat", "window", "packed") for g in [(2, 2, 0, True), (3, 2, 1, False), (3, 1, 1, False)]
    if f != "packed" or g[0] == 2])
def test_gradcheck(fmt, k, s, p, ceil):
    # Distinct values keep the max away from ties, where the gradient is not defined.
    x = torch.randperm(2 * 2 * 7 * 9, generator=torch.Generator().manual_seed(0)).to(torch.float64).view(2, 2, 7, 9)
    x = (x / 10).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: F.max_pool2d(t, k, s, p, ceil_mode=ceil), (x,))
    # Unpool is linear in its input only while no two switches share a position (with duplicates,
    # torch's and our backward both gather for every element). Non-overlapping windows pool to
    # unique switches; for overlapping ones every window points at its centre tap.
    v, sw = F.max_pool2d(x.detach(), k, s, p, ceil_mode=ceil, return_indices=True, index_format=fmt)
    if k != s:
        centre = torch.full(v.shape, (k // 2) * k + k // 2, dtype=torch.uint8)
        sw = centre if fmt == "window" else ref.switches_to_flat(centre, "window", v.shape[-2:], (7, 9), k, s, p)
    flat = ref.switches_to_flat(sw, fmt, v.shape[-2:], (7, 9), k, s, p)
    srt = flat.flatten(2).sort(-1).values
    assert (srt[..., 1:] != srt[..., :-1]).all(), "test needs unique switches"
    vv = v.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: F.max_unpool2d(t, sw, k, s, p, output_size=(7, 9), index_format=fmt), (vv,))
    assert torch.autograd.gradgradcheck(lambda t: F.max_pool2d(t, k, s, p, ceil_mode=ceil), (x,))


@pytest.mark.parametrize("fmt", ["flat", "window", "packed"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(fmt, layout):
    x = make_input((2, 3, 8, 10), dtype=torch.float64, layout=layout, specials=False) + torch.rand(2, 3, 8, 10, dtype=torch.float64)
    x.requires_grad_()
    geo = ([2, 2], [2, 2], [0, 0], [1, 1])
    torch.library.opcheck(ops.max_pool2d_switches.default, (x, *geo, False, fmt))
    v, sw = ops.max_pool2d_switches(x.detach(), *geo, False, fmt)
    vv = v.clone().requires_grad_()
    torch.library.opcheck(ops.max_unpool2d.default, (vv, sw, *geo, [8, 10], fmt))
    g = torch.randn(v.shape, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.max_pool2d_switches_backward.default, (g, sw, [8, 10], *geo, fmt))
    go = torch.randn(2, 3, 8, 10, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.max_unpool2d_backward.default, (go, sw, [4, 5], *geo, fmt))


def test_torch_compile_fullgraph():
    def segnet_block(x):
        v, sw = F.max_pool2d(x, 2, return_indices=True, index_format="packed")
        return F.max_unpool2d(torch.relu(v), sw, 2, output_size=x.shape[-2:], index_format="packed")

    compiled = torch.compile(segnet_block, fullgraph=True, backend="aot_eager")
    x = make_input((2, 3, 9, 10), specials=False).requires_grad_()
    out = compiled(x)
    same(out, segnet_block(x))
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_nn_modules_are_drop_in():
    pool = deconvseg_fast.nn.MaxPool2d(2, return_indices=True, ceil_mode=True)
    unpool = deconvseg_fast.nn.MaxUnpool2d(2)
    assert isinstance(pool, torch.nn.MaxPool2d) and isinstance(unpool, torch.nn.MaxUnpool2d)
    tpool, tunpool = torch.nn.MaxPool2d(2, return_indices=True, ceil_mode=True), torch.nn.MaxUnpool2d(2)
    x = make_input((2, 3, 9, 11))
    (v, i), (tv, ti) = pool(x), tpool(x)
    same(v, tv)
    assert torch.equal(i, ti)
    same(unpool(v, i, output_size=x.shape), tunpool(tv, ti, output_size=x.shape))
    assert "index_format='flat'" in repr(pool)
    p2 = deconvseg_fast.nn.MaxPool2d(2, return_indices=True, index_format="packed")
    u2 = deconvseg_fast.nn.MaxUnpool2d(2, index_format="packed")
    v2, sw = p2(x[..., :8, :10])
    same(u2(v2, sw), tunpool(*tpool(x[..., :8, :10])))


def test_memory_of_switch_formats():
    x = torch.randn(1, 4, 16, 32)
    sizes = {f: F.max_pool2d(x, 2, return_indices=True, index_format=f)[1].nbytes for f in ("flat", "window", "packed")}
    assert sizes["window"] * 8 == sizes["flat"]
    assert sizes["packed"] * 32 == sizes["flat"]


BAD_POOL = [
    (dict(input=torch.randn(8, 8)), ValueError, "input"),
    (dict(input=torch.randn(1, 1, 1, 8, 8)), ValueError, "input"),
    (dict(input=torch.randint(0, 5, (1, 1, 8, 8))), ValueError, "input"),
    (dict(input=torch.randn(1, 1, 8, 8), kernel_size=0), ValueError, "kernel_size"),
    (dict(input=torch.randn(1, 1, 8, 8), kernel_size=-2), ValueError, "kernel_size"),
    (dict(input=torch.randn(1, 1, 8, 8), stride=0), ValueError, "stride"),
    (dict(input=torch.randn(1, 1, 8, 8), padding=2), ValueError, "padding"),
    (dict(input=torch.randn(1, 1, 8, 8), padding=-1), ValueError, "padding"),
    (dict(input=torch.randn(1, 1, 8, 8), dilation=0), ValueError, "dilation"),
    (dict(input=torch.randn(1, 1, 1, 8)), ValueError, "too small"),
    (dict(input=torch.randn(1, 1, 8, 8), index_format="int8"), ValueError, "index_format"),
    (dict(input=torch.randn(1, 1, 9, 9), kernel_size=3, index_format="packed"), ValueError, "packed"),
    (dict(input=torch.randn(1, 1, 40, 40), kernel_size=17, index_format="window"), ValueError, "window"),
    (dict(input=torch.randn(1, 0, 8, 8)), ValueError, "input"),
    (dict(input=torch.randn(1, 1, 8, 8), kernel_size=(2, 2, 2)), ValueError, "kernel_size"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_POOL)
def test_pool_bad_input(kwargs, exc, match):
    args = dict(kernel_size=2, return_indices=True)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        F.max_pool2d(**args)


def test_bad_input_reaches_the_op_directly():
    # Direct calls skip the Python checks; the C++ kernel must refuse on its own.
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="kernel_size"):
        ops.max_pool2d_switches(x, [0, 2], [2, 2], [0, 0], [1, 1], False, "flat")
    with pytest.raises(ValueError, match="index_format"):
        ops.max_pool2d_switches(x, [2, 2], [2, 2], [0, 0], [1, 1], False, "bits")
    v, i = ops.max_pool2d_switches(x, [2, 2], [2, 2], [0, 0], [1, 1], False, "flat")
    with pytest.raises(ValueError, match="indices"):
        ops.max_unpool2d(v, i[..., :2], [2, 2], [2, 2], [0, 0], [1, 1], [8, 8], "flat")
    with pytest.raises(ValueError, match="indices"):
        ops.max_unpool2d(v, i.to(torch.uint8), [2, 2], [2, 2], [0, 0], [1, 1], [8, 8], "flat")


def test_unpool_bad_input():
    v, i = F.max_pool2d(torch.randn(1, 2, 8, 8), 2, return_indices=True)
    with pytest.raises(ValueError, match="output_size"):
        F.max_unpool2d(v, i, 2, output_size=(12, 8))
    with pytest.raises(ValueError, match="output_size"):
        F.max_unpool2d(v, i, 2, output_size=(8,))
    with pytest.raises(ValueError, match="indices"):
        F.max_unpool2d(v, i[:, :1], 2)
    with pytest.raises(ValueError, match="indices"):
        F.max_unpool2d(v, i.to(torch.int32), 2)
    with pytest.raises(ValueError, match="indices"):
        F.max_unpool2d(v, i, 2, index_format="window")
    with pytest.raises(ValueError, match="indices"):
        F.max_unpool2d(v, i[0], 2)
    with pytest.raises(ValueError, match="index_format"):
        F.max_unpool2d(v, i, 2, index_format="nope")
    with pytest.raises(ValueError, match="index_format"):
        deconvseg_fast.nn.MaxUnpool2d(3, index_format="packed")
    with pytest.raises(ValueError, match="input"):
        F.max_unpool2d(v.to(torch.int64), i, 2)


CACHE_CHECK = """
import torch, torch.nn.functional as TF
import deconvseg_fast.functional as F
ops = torch.ops.deconvseg
geo = ([2, 2], [2, 2], [0, 0], [1, 1])
for trial in range(3):
    x = torch.randn(4, 8, 256, 250, generator=torch.Generator().manual_seed(trial))
    for fmt in ("flat", "window", "packed"):
        v, sw = F.max_pool2d(x, 2, return_indices=True, index_format=fmt)
        v0, i0 = TF.max_pool2d(x, 2, return_indices=True)
        assert torch.equal(v, v0)
        u = F.max_unpool2d(v, sw, 2, index_format=fmt)
        assert torch.equal(u, TF.max_unpool2d(v0, i0, 2))
        g = ops.max_pool2d_switches_backward(v, sw, [256, 250], *geo, fmt)
        assert torch.equal(g, u)
        gu = ops.max_unpool2d_backward(x, sw, [128, 125], *geo, fmt)
        assert torch.equal(gu, v0)
        # Poison every output before it is freed: a reused buffer must be overwritten in full.
        for t in (v, sw, u, g, gu):
            t.fill_(float("nan") if t.is_floating_point() else 0xAB)
        del v, sw, u, g, gu
print("ok")
"""


@pytest.mark.parametrize("cache_mb,no_avx512,no_avx2", [("1024", "0", "0"), ("0", "0", "0"), ("1024", "1", "0"),
                                                         ("1024", "1", "1")])
def test_reused_output_buffers_are_overwritten(cache_mb, no_avx512, no_avx2):
    # Outputs of 2 MB and more come from a cache of freed buffers (csrc/cpu/huge_pages.h); the
    # size limit is read once per process, hence a subprocess per setting. These 2x2 shapes take the
    # AVX-512 row kernels where the CPU has them; DECONVSEG_DISABLE_AVX512=1 checks the AVX2 ones
    # (where the CPU has those), and with DECONVSEG_DISABLE_AVX2=1 too the portable loops that run
    # everywhere else, on the same machine.
    import os
    import subprocess
    import sys

    env = dict(os.environ, DECONVSEG_CPU_CACHE_MB=cache_mb, DECONVSEG_DISABLE_AVX512=no_avx512,
               DECONVSEG_DISABLE_AVX2=no_avx2)
    done = subprocess.run([sys.executable, "-c", CACHE_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
