"""CPU kernels of paste_aggregate (and its backward) against the oracle, per docs/proposals.md."""
import pytest
import torch

import deconvseg_fast.functional as F
from deconvseg_fast.ops import proposals as prop_ops
from deconvseg_fast.reference import proposals as ref

ops = torch.ops.deconvseg

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Ours samples and reduces in float32 (float64 for float64) and rounds once; the oracle works in
# float64 and rounds once. float32: a few ulps of sampling arithmetic on values ~1; half types:
# the two roundings may land one ulp apart (2**-10 / 2**-7 relative) after a sum of up to 4 maps.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float16: dict(atol=4e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=1.6e-2),
}

# (x1, y1, x2, y2, image): inside, partly outside on every side, larger and smaller than the map,
# sub-pixel, degenerate (zero width, negative height), fully outside, a duplicate of the first.
BOXES = [
    (1.0, 2.0, 9.0, 7.0, 0),
    (-3.5, -2.25, 4.5, 5.75, 0),
    (6.2, 4.9, 15.7, 13.1, 0),
    (0.0, 0.0, 3.0, 2.0, 1),
    (2.3, 1.1, 2.7, 1.4, 1),
    (5.0, 1.0, 5.0, 8.0, 1),
    (4.0, 6.0, 9.0, 3.0, 1),
    (20.0, 1.0, 25.0, 6.0, 2),
    (-1.0, -1.0, 13.0, 10.0, 2),
    (1.0, 2.0, 9.0, 7.0, 0),
]
OUT = (4, 9, 12)  # image 3 receives no proposal: fill only


def make_case(dtype=torch.float64, layout="contiguous", C=3, h=5, w=6, seed=0, boxes=BOXES):
    g = torch.Generator().manual_seed(seed)
    P = len(boxes)
    s = torch.randn(P, C, h, w, generator=g, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        s = s.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        big = torch.zeros(P, C, h, 2 * w, dtype=dtype)
        big[..., ::2] = s
        s = big[..., ::2]
        assert not s.is_contiguous()
    b = torch.tensor([bx[:4] for bx in boxes], dtype=torch.float32).reshape(P, 4)
    ii = torch.tensor([bx[4] for bx in boxes], dtype=torch.int64)
    return s, b, ii


@pytest.mark.parametrize("mode", ["max", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_matches_oracle(mode, dtype, layout):
    s, b, ii = make_case(dtype, layout)
    out = F.paste_aggregate(s, b, ii, OUT, mode)
    want = ref.paste_aggregate(s, b, ii, OUT, mode)
    assert out.dtype == dtype and out.shape == (4, 3, 9, 12) and out.is_contiguous()
    torch.testing.assert_close(out, want, **TOL[dtype])
    if mode == "max":
        assert torch.isneginf(out[3]).all()
    else:
        assert (out[3] == 0).all()


def test_winner_and_ties():
    # Boxes 0 and 9 are identical; give them identical maps so every pixel of box 0 ties.
    s, b, ii = make_case()
    s[9] = s[0]
    out, winner = ops.paste_aggregate(s, b, ii, list(OUT), "max", float("-inf"))
    want, want_winner = ref.paste_aggregate(s, b, ii, OUT, "max", return_winner=True)
    torch.testing.assert_close(out, want, **TOL[torch.float64])
    assert torch.equal(winner.long(), want_winner)
    assert winner.dtype == torch.int32
    assert not (winner == 9).any() and (winner == 0).any()
    # Degenerate and fully outside boxes win nothing.
    for p in (5, 6, 7):
        assert not (winner == p).any()


def test_fill_and_nan():
    s, b, ii = make_case()
    s[1, 0, :, :] = float("nan")
    out = F.paste_aggregate(s, b, ii, OUT, "max", fill=-7.0)
    want = ref.paste_aggregate(s, b, ii, OUT, "max", fill=-7.0)
    torch.testing.assert_close(out, want, equal_nan=True, **TOL[torch.float64])
    assert out[0, 0].isnan().any() and (out[3] == -7.0).all()
    out = F.paste_aggregate(s, b, ii, OUT, "sum", fill=2.5)
    torch.testing.assert_close(out, ref.paste_aggregate(s, b, ii, OUT, "sum", fill=2.5), equal_nan=True)


def test_identity_box_reproduces_the_map():
    # A box exactly the map's size at an integer position pastes the map unchanged.
    s = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    out = F.paste_aggregate(s, torch.tensor([[3.0, 2.0, 9.0, 7.0]]), torch.tensor([0]), (1, 8, 10), "sum")
    assert torch.equal(out[0, :, 2:7, 3:9], s[0])
    assert (out[0, :, :2] == 0).all() and (out[0, :, :, :3] == 0).all()


def test_empty():
    s = torch.zeros(0, 3, 5, 6)
    b = torch.zeros(0, 4)
    ii = torch.zeros(0, dtype=torch.int64)
    out = F.paste_aggregate(s, b, ii, (2, 4, 5), "max")
    assert out.shape == (2, 3, 4, 5) and torch.isneginf(out).all()
    assert (F.paste_aggregate(s, b, ii, (2, 4, 5), "sum") == 0).all()
    assert F.paste_aggregate(s, b, ii, (0, 4, 5)).shape == (0, 3, 4, 5)
    g = ops.paste_aggregate_backward(torch.ones(2, 3, 4, 5), torch.zeros(0, dtype=torch.int32), b, ii, [5, 6], "sum")
    assert g.shape == (0, 3, 5, 6)


def test_deterministic_across_threads():
    # Many overlapping proposals, float32: any change of summation order would show in the bits.
    g = torch.Generator().manual_seed(1)
    P = 40
    xy = torch.rand(P, 2, generator=g) * 60 - 10
    wh = torch.rand(P, 2, generator=g) * 40 + 1
    b = torch.cat([xy, xy + wh], 1)
    ii = torch.randint(0, 2, (P,), generator=g)
    s = torch.randn(P, 4, 14, 14, generator=g)
    old = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            res = []
            for mode in ("max", "sum"):
                out, win = ops.paste_aggregate(s, b, ii, [2, 48, 50], mode, 0.0)
                go = torch.cos(torch.arange(out.numel(), dtype=torch.float32)).view(out.shape)
                res += [out, win, ops.paste_aggregate_backward(go, win, b, ii, [14, 14], mode)]
            results.append(res)
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


@pytest.mark.parametrize("mode", ["max", "sum"])
def test_gradcheck(mode):
    # Distinct, well-separated values keep the max away from ties (where it has no gradient).
    boxes = [bx for bx in BOXES[:9]]
    s, b, ii = make_case(torch.float64, C=2, h=4, w=5, boxes=boxes)
    s = (torch.randperm(s.numel(), generator=torch.Generator().manual_seed(3)).to(torch.float64) / 7).view(s.shape)
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: F.paste_aggregate(t, b, ii, (3, 9, 12), mode, fill=0.0), (s,))


@pytest.mark.parametrize("mode", ["max", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_composite_backward_matches_cpu_kernel(mode, dtype):
    # backward_composite is the "cuda" backward; it is device-agnostic, so it is checked here.
    s, b, ii = make_case(dtype)
    _out, win = ops.paste_aggregate(s, b, ii, list(OUT), mode, 0.0)
    go = torch.randn(4, 3, 9, 12, dtype=torch.float64).to(dtype)
    got = prop_ops.backward_composite(go, win, b, ii, [5, 6], mode)
    want = ops.paste_aggregate_backward(go, win, b, ii, [5, 6], mode)
    torch.testing.assert_close(got, want, **TOL[dtype])
    assert want.abs().sum() > 0


@pytest.mark.parametrize("mode", ["max", "sum"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(mode, layout):
    s, b, ii = make_case(torch.float64, layout, C=2, h=4, w=5)
    s.requires_grad_()
    torch.library.opcheck(ops.paste_aggregate.default, (s, b, ii, [3, 9, 12], mode, -1.0))
    _out, win = ops.paste_aggregate(s.detach(), b, ii, [3, 9, 12], mode, -1.0)
    go = torch.randn(3, 2, 9, 12, dtype=torch.float64)
    torch.library.opcheck(ops.paste_aggregate_backward.default, (go, win, b, ii, [4, 5], mode))


def test_torch_compile_fullgraph():
    def head(scores, boxes, image_index):
        agg = F.paste_aggregate(torch.relu(scores), boxes, image_index, (3, 9, 12), "max", fill=0.0)
        return agg.softmax(1)

    s, b, ii = make_case(torch.float32)
    s.requires_grad_()
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    out = compiled(s, b, ii)
    torch.testing.assert_close(out, head(s, b, ii))
    out.sum().backward()
    assert s.grad is not None and s.grad.shape == s.shape


BAD = [
    (dict(boxes=torch.tensor([[0.0, 0.0, float("nan"), 3.0]])), ValueError, "boxes must be finite"),
    (dict(boxes=torch.tensor([[0.0, float("-inf"), 2.0, 3.0]])), ValueError, "boxes must be finite"),
    (dict(boxes=torch.tensor([[0.0, 0.0, 1e9, 3.0]])), ValueError, r"boxes must have coordinates within"),
    (dict(image_index=torch.tensor([2])), ValueError, r"image_index must be in \[0, 2\)"),
    (dict(image_index=torch.tensor([-1])), ValueError, r"image_index must be in \[0, 2\)"),
    (dict(image_index=torch.tensor([0], dtype=torch.int32)), ValueError, "image_index must be int64"),
    (dict(boxes=torch.zeros(1, 5)), ValueError, r"boxes must be a \[P, 4\] tensor"),
    (dict(boxes=torch.zeros(2, 4)), ValueError, r"boxes must be a \[P, 4\] tensor"),
    (dict(boxes=torch.zeros(1, 4, dtype=torch.int64)), ValueError, "boxes must be a floating-point"),
    (dict(scores=torch.zeros(1, 2, 0, 3)), ValueError, "scores must have non-zero height and width"),
    (dict(scores=torch.zeros(1, 2, 3, 3, dtype=torch.int32)), ValueError, "scores must be float32"),
    (dict(scores=torch.zeros(2, 3, 3)), ValueError, "scores must be a 4-D"),
    (dict(mode="mean"), ValueError, "mode must be 'max' or 'sum'"),
    (dict(output_size=(2, 5)), ValueError, "output_size must be 3 non-negative ints"),
    (dict(output_size=(2, -1, 5)), ValueError, "output_size must be 3 non-negative ints"),
]


def _bad_args(**kw):
    args = dict(scores=torch.zeros(1, 2, 3, 3), boxes=torch.tensor([[0.0, 0.0, 2.0, 3.0]]),
                image_index=torch.tensor([1]), output_size=(2, 5, 6), mode="max")
    args.update(kw)
    return args


@pytest.mark.parametrize("kwargs,exc,match", BAD)
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        F.paste_aggregate(**_bad_args(**kwargs))


@pytest.mark.parametrize("kwargs,exc,match", [c for c in BAD if "output_size" not in c[0] and c[1] is ValueError])
def test_bad_input_reaches_the_op_directly(kwargs, exc, match):
    # The C++ kernel validates on its own (memory safety when called without functional).
    a = _bad_args(**kwargs)
    with pytest.raises(exc, match=match):
        ops.paste_aggregate(a["scores"], a["boxes"], a["image_index"], list(a["output_size"]), a["mode"], 0.0)


def test_backward_bad_input():
    go = torch.zeros(2, 2, 5, 6)
    b, ii = torch.tensor([[0.0, 0.0, 2.0, 3.0]]), torch.tensor([0])
    with pytest.raises(ValueError, match="winner must be an int32 tensor"):
        ops.paste_aggregate_backward(go, torch.zeros(2, 2, 5, 6, dtype=torch.int64), b, ii, [3, 3], "max")
    with pytest.raises(ValueError, match="image_index must be in"):
        ops.paste_aggregate_backward(go, torch.zeros(0, dtype=torch.int32), b, torch.tensor([5]), [3, 3], "sum")
    with pytest.raises(ValueError, match="boxes must be finite"):
        ops.paste_aggregate_backward(go, torch.zeros(0, dtype=torch.int32), b * float("nan"), ii, [3, 3], "sum")
