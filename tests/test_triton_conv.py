"""Triton atrous-conv launcher (deconvseg_fast.kernels.conv) against torch's conv2d (+ relu).

Without a GPU the kernel runs under the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton; see tests/test_triton_pooling.py). Shapes are
small: the interpreter runs every program in numpy. Both formulations -- "direct" and
"space_to_batch" -- run every case they support. The oracle is a float64 torch convolution of the
same (already rounded) inputs, followed by the epilogue in float64.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as TF  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import deconvseg_fast  # noqa: E402,F401
import deconvseg_fast.kernels.conv as tc  # noqa: E402
from deconvseg_fast.ops import conv as conv_ops  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not (
        isinstance(tl.sum, InterpretedFunction) and isinstance(tc._atrous_conv2d_kernel, InterpretedFunction)):
    raise ImportError("triton was imported before TRITON_INTERPRET=1 was set; see tests/conftest.py")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CL = torch.channels_last

# (N, C_in, H, W), C_out, kernel, stride, padding, dilation
CASES = {
    "dense3x3": ((2, 5, 9, 11), 7, (3, 3), (1, 1), (1, 1), (1, 1)),
    "d2": ((1, 6, 10, 9), 5, (3, 3), (1, 1), (2, 2), (2, 2)),
    "d4_odd": ((1, 3, 11, 13), 4, (3, 3), (1, 1), (4, 4), (4, 4)),
    "d12_fc6": ((1, 4, 13, 11), 6, (3, 3), (1, 1), (12, 12), (12, 12)),
    "d12_nopad": ((1, 2, 27, 26), 3, (3, 3), (1, 1), (0, 0), (12, 12)),
    "rect_d3x1": ((2, 3, 12, 7), 5, (3, 2), (1, 1), (3, 0), (3, 1)),
    # more than one K chunk (C_in > 32), N tile (C_out > 32) and M tile (> 32 rows)
    "wide": ((1, 40, 7, 6), 36, (3, 3), (1, 1), (2, 2), (2, 2)),
    "strided": ((2, 3, 13, 12), 4, (3, 3), (2, 2), (2, 2), (2, 2)),
    "1x1": ((2, 8, 5, 7), 3, (1, 1), (1, 1), (0, 0), (1, 1)),
}
ALGOS = ["direct", "space_to_batch"]
# Tolerances against the float64 oracle. float32: the interpreter's dot is an exact-fp32 numpy
# matmul, so only the fp32 summation order differs (|sum| <= K * max term, K <= 360 here).
# fp16/bf16: the output is rounded once, after the fp32 epilogue: half an ulp of values up to
# max|ref| (2 eps * max|ref| leaves room for the fp32 sum's own error).
EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _cases(algos=ALGOS):
    return [pytest.param(name, algo, id=f"{name}-{algo}") for name in CASES for algo in algos
            if not (algo == "space_to_batch" and CASES[name][3] != (1, 1))]


def make(name, dtype=torch.float32, layout="contiguous", seed=0):
    shape, c_out, k, s, p, d = CASES[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    w = torch.randn((c_out, shape[1], *k), generator=g) / (shape[1] * k[0] * k[1]) ** 0.5
    b = torch.randn(c_out, generator=g) * 0.1
    scale = torch.rand(c_out, generator=g) + 0.5
    shift = torch.randn(c_out, generator=g) * 0.1
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    elif layout == "strided":
        x = torch.cat([x, x], dim=3)[..., ::2]
    return x, w, b, scale, shift, (s, p, d)


def oracle(x, w, b, scale, shift, geo, relu):
    s, p, d = geo
    y = TF.conv2d(x.double(), w.double(), None if b is None else b.double(), s, p, d)
    if scale is not None:
        y = y * scale.double().view(-1, 1, 1)
    if shift is not None:
        y = y + shift.double().view(-1, 1, 1)
    return TF.relu(y) if relu else y


def run(x, w, b, scale, shift, geo, relu, algo):
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return tc.atrous_conv2d(dev(x), dev(w), dev(b), dev(scale), dev(shift), *geo, relu, algorithm=algo).cpu()


def check(y, ref, dtype, x, w):
    assert y.dtype == dtype and y.shape == ref.shape
    eps = EPS[dtype]
    if dtype in (torch.float32, torch.float64):
        k = w[0].numel()
        atol = 4 * k * eps * (x.abs().max() * w.abs().max()).item() * 1.5 + 1e-30
        torch.testing.assert_close(y.double(), ref, rtol=4 * eps, atol=atol)
    else:
        torch.testing.assert_close(y.double(), ref, rtol=2 * eps, atol=2 * eps * ref.abs().max().item())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name,algo", _cases())
def test_matches_torch_fp32(name, algo, layout):
    x, w, b, scale, shift, geo = make(name, layout=layout)
    y = run(x, w, b, scale, shift, geo, True, algo)
    check(y, oracle(x, w, b, scale, shift, geo, True), torch.float32, x, w)
    # layout follows torch's rule: channels_last in, channels_last out
    expect = TF.conv2d(x, w, b, *geo)
    assert y.stride() == expect.stride()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name,algo", [("d2", a) for a in ALGOS] + [("d12_fc6", a) for a in ALGOS]
                         + [("wide", "direct")])
def test_dtypes(name, algo, layout, dtype):
    x, w, b, scale, shift, geo = make(name, dtype=dtype, layout=layout)
    y = run(x, w, b, scale, shift, geo, True, algo)
    check(y, oracle(x, w, b, scale, shift, geo, True), dtype, x, w)


@pytest.mark.parametrize("epilogue", ["none", "bias", "bias_relu", "scale_only", "shift_relu"])
@pytest.mark.parametrize("algo", ALGOS)
def test_epilogue_variants(epilogue, algo):
    x, w, b, scale, shift, geo = make("d4_odd")
    b = b if "bias" in epilogue else None
    scale = scale if epilogue == "scale_only" else None
    shift = shift if "shift" in epilogue else None
    relu = "relu" in epilogue
    y = run(x, w, b, scale, shift, geo, relu, algo)
    check(y, oracle(x, w, b, scale, shift, geo, relu), torch.float32, x, w)


@pytest.mark.parametrize("algo", ALGOS)
def test_strided_and_empty(algo):
    x, w, b, scale, shift, geo = make("d2", layout="strided")
    y = run(x, w, b, scale, shift, geo, True, algo)
    check(y, oracle(x, w, b, scale, shift, geo, True), torch.float32, x, w)
    # channels_last weight -> channels_last output, as torch
    wcl = w.contiguous(memory_format=CL)
    y = run(x.contiguous(), wcl, b, None, None, geo, False, algo)
    assert y.stride() == TF.conv2d(x.contiguous(), wcl, b, *geo).stride()
    check(y, oracle(x, w, b, None, None, geo, False), torch.float32, x, w)
    e = run(x[:0], w, b, scale, shift, geo, True, algo)
    assert e.shape == (0, *y.shape[1:])


def test_algorithm_rule():
    assert tc.choose_algorithm((1, 1), (12, 12)) == "space_to_batch"
    assert tc.choose_algorithm((1, 1), (4, 4)) == "space_to_batch"
    assert tc.choose_algorithm((1, 1), (2, 2)) == "direct"
    assert tc.choose_algorithm((1, 1), (12, 1)) == "direct"
    assert tc.choose_algorithm((2, 2), (12, 12)) == "direct"
    assert tc.choose_algorithm((1, 1), (2, 2), "space_to_batch") == "space_to_batch"
    with pytest.raises(ValueError, match=r"algorithm='space_to_batch' needs stride \(1, 1\)"):
        tc.choose_algorithm((2, 1), (2, 2), "space_to_batch")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        tc.choose_algorithm((1, 1), (2, 2), "winograd")
    with pytest.raises(ValueError, match="algorithm must be"):
        conv_ops.set_cuda_algorithm("fft")


@pytest.mark.parametrize("algorithm", ["auto", "direct", "space_to_batch"])
def test_registered_cuda_entry_point(algorithm):
    # The function registered for "cuda" (validation + algorithm setting + launcher), called on
    # the interpreter's CPU tensors; a strided call under "space_to_batch" falls back to direct.
    x, w, b, scale, shift, (s, p, d) = make("strided")
    old = conv_ops._cuda_algorithm
    try:
        conv_ops.set_cuda_algorithm(algorithm)
        y = conv_ops._cuda_atrous_conv2d(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), None, None,
                                         list(s), list(p), list(d), "relu").cpu()
        check(y, oracle(x, w, b, None, None, (s, p, d), True), torch.float32, x, w)
        x, w, b, scale, shift, (s, p, d) = make("d12_fc6")
        y = conv_ops._cuda_atrous_conv2d(x.to(DEVICE), w.to(DEVICE), None, scale.to(DEVICE), shift.to(DEVICE),
                                         list(s), list(p), list(d), "none").cpu()
        check(y, oracle(x, w, None, scale, shift, (s, p, d), False), torch.float32, x, w)
        with pytest.raises(ValueError, match="activation must be"):
            conv_ops._cuda_atrous_conv2d(x, w, None, None, None, list(s), list(p), list(d), "gelu")
    finally:
        conv_ops.set_cuda_algorithm(old)


def test_space_to_batch_layout():
    # the phase images are exactly x_pad[a + dh r, b + dw s], channels_last whatever x's layout
    x = torch.arange(2 * 3 * 7 * 8, dtype=torch.float32).view(2, 3, 7, 8)
    for layout in (torch.contiguous_format, CL):
        xl = x.contiguous(memory_format=layout)
        xs, (hm, wm) = tc._space_to_batch(xl, (2, 3), (2, 3), (3, 3), (7, 8))
        assert (hm, wm) == (4, 3) and xs.shape == (2 * 2 * 3, 3, 4 + 2, 3 + 2)
        assert xs.stride(1) == 1  # always channels_last: the kernel reads channel runs
        xp = TF.pad(x, (3, 3 * 5 - 8 - 3, 2, 2 * 6 - 7 - 2))
        for n, a, b in ((0, 0, 0), (1, 1, 2), (0, 1, 1)):
            torch.testing.assert_close(xs[(n * 2 + a) * 3 + b], xp[n, :, a::2, b::3], rtol=0, atol=0)
