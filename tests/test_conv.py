"""deconvseg::atrous_conv2d on the CPU, F.atrous_conv2d and nn.AtrousConv2d against torch's conv2d.

Without scale/shift the CPU op is at::convolution (the same call F.conv2d makes, bias included)
plus an in-place ReLU, so it must equal F.conv2d (+ F.relu) bit for bit, strides included. With a
folded batch-norm the oracle is a float64 convolution of the same (already rounded) inputs.
"""
import pytest
import torch
import torch.nn.functional as TF

import deconvseg_fast
import deconvseg_fast.functional as F
from deconvseg_fast.nn import AtrousConv2d

op = torch.ops.deconvseg.atrous_conv2d.default

# (N, C_in, H, W), C_out, kernel, stride, padding, dilation
GEOMETRIES = [
    pytest.param((2, 5, 13, 11), 7, 3, 1, 1, 1, id="dense-3x3"),
    pytest.param((2, 6, 14, 15), 4, 3, 1, 2, 2, id="conv5-d2"),
    pytest.param((1, 4, 17, 19), 6, 3, 1, 4, 4, id="d4"),
    pytest.param((1, 3, 15, 17), 5, 3, 1, 12, 12, id="fc6-d12"),
    pytest.param((2, 3, 16, 13), 5, 3, 2, 2, 2, id="d2-stride2"),
    pytest.param((1, 4, 9, 12), 3, (3, 1), (2, 1), (1, 0), (3, 1), id="rect"),
    pytest.param((3, 8, 7, 9), 16, 1, 1, 0, 1, id="1x1-fc7"),
    pytest.param((1, 2, 27, 25), 3, 3, 1, 0, 12, id="d12-nopad"),
]
LAYOUTS = ["contiguous", "channels_last", "strided"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Machine epsilon per dtype, for the tolerances of the folded-batch-norm comparisons below.
EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def make(shape, c_out, k, dtype=torch.float32, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    k = (k, k) if isinstance(k, int) else k
    x = torch.randn(shape, generator=g)
    # weights scaled by 1/sqrt(fan-in) keep outputs O(1), so tolerances mean the same everywhere
    w = torch.randn((c_out, shape[1], *k), generator=g) / (shape[1] * k[0] * k[1]) ** 0.5
    b = torch.randn(c_out, generator=g) * 0.1
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.cat([x, x], dim=3)[..., ::2]
        assert not x.is_contiguous()
    return x, w, b


def bn_params(c_out, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(c_out, generator=g) + 0.5, torch.randn(c_out, generator=g) * 0.1


def same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert a.stride() == b.stride(), (a.stride(), b.stride())


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,c_out,k,s,p,d", GEOMETRIES)
def test_matches_torch_bitwise(shape, c_out, k, s, p, d, layout, activation):
    x, w, b = make(shape, c_out, k, layout=layout)
    expect = TF.conv2d(x, w, b, s, p, d)
    if activation == "relu":
        expect = TF.relu(expect)
    same(F.atrous_conv2d(x, w, b, s, p, d, activation=activation), expect)
    # no bias: the same call without the bias
    expect = TF.conv2d(x, w, None, s, p, d)
    same(F.atrous_conv2d(x, w, None, s, p, d, activation=activation),
         TF.relu(expect) if activation else expect)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,c_out,k,s,p,d", [GEOMETRIES[1], GEOMETRIES[3], GEOMETRIES[6]])
def test_dtypes(shape, c_out, k, s, p, d, dtype, layout):
    x, w, b = make(shape, c_out, k, dtype=dtype, layout=layout)
    # conv + bias + relu: every dtype is bit-identical to torch (same ATen convolution)
    same(F.atrous_conv2d(x, w, b, s, p, d, activation="relu"), TF.relu(TF.conv2d(x, w, b, s, p, d)))
    # + folded batch-norm, against a float64 convolution of the same rounded inputs
    scale, shift = bn_params(c_out)
    y = F.atrous_conv2d(x, w, b, s, p, d, activation="relu", scale=scale, shift=shift)
    ref = TF.relu(TF.conv2d(x.double(), w.double(), b.double(), s, p, d) * scale.double().view(-1, 1, 1)
                  + shift.double().view(-1, 1, 1))
    assert y.dtype == dtype and y.stride() == TF.conv2d(x, w, b, s, p, d).stride()
    # Tolerance: the convolution's output is rounded to `dtype` (as torch's own conv -> bn does)
    # and rounded again after the epilogue, each within half an ulp of values up to max|ref|/0.5
    # (scale >= 0.5); float32 also sums in oneDNN's blocked order. 4 eps * max|ref| covers both
    # roundings with margin; 16 eps relative for float32/float64's reordered sums.
    eps = EPS[dtype]
    amax = ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref, rtol=16 * eps, atol=4 * eps * amax + 1e-12)


def test_scale_shift_each_alone():
    x, w, b = make((1, 4, 9, 10), 5, 3)
    scale, shift = bn_params(5)
    z = TF.conv2d(x, w, b, 1, 2, 2)
    torch.testing.assert_close(F.atrous_conv2d(x, w, b, 1, 2, 2, scale=scale), z * scale.view(-1, 1, 1))
    torch.testing.assert_close(F.atrous_conv2d(x, w, b, 1, 2, 2, shift=shift), z + shift.view(-1, 1, 1))
    # float64 scale/shift on a float32 conv are applied in float32 (the op-math type)
    y = F.atrous_conv2d(x, w, b, 1, 2, 2, scale=scale.double(), shift=shift.double(), activation="relu")
    torch.testing.assert_close(y, TF.relu(z * scale.view(-1, 1, 1) + shift.view(-1, 1, 1)))


def test_nan_propagates_through_relu():
    x, w, b = make((1, 2, 6, 6), 3, 3)
    x[0, 0, 2, 2] = float("nan")
    same(F.atrous_conv2d(x, w, b, 1, 1, 1, activation="relu"), TF.relu(TF.conv2d(x, w, b, 1, 1, 1)))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty_batch(layout):
    x, w, b = make((0, 3, 8, 9), 4, 3, layout=layout)
    scale, shift = bn_params(4)
    y = F.atrous_conv2d(x, w, b, 1, 2, 2, activation="relu", scale=scale, shift=shift)
    same(y, TF.conv2d(x, w, b, 1, 2, 2))


def test_channels_last_weight_and_unbatched_input():
    x, w, b = make((1, 4, 10, 11), 6, 3)
    wcl = w.contiguous(memory_format=torch.channels_last)
    same(F.atrous_conv2d(x, wcl, b, 1, 2, 2, activation="relu"), TF.relu(TF.conv2d(x, wcl, b, 1, 2, 2)))
    same(F.atrous_conv2d(x[0], w, b, 1, 2, 2), TF.conv2d(x[0], w, b, 1, 2, 2))


@pytest.mark.parametrize("k,d", [(3, 2), (4, 2), (2, 3)])
def test_padding_strings(k, d):
    x, w, b = make((1, 3, 9, 8), 4, k)
    for padding in ("same", "valid"):
        same(F.atrous_conv2d(x, w, b, 1, padding, d), TF.conv2d(x, w, b, 1, padding, d))


def test_gradcheck_float64():
    x, w, b = make((2, 3, 7, 8), 4, 3, dtype=torch.float64)
    scale, shift = (v.double() for v in bn_params(4))
    args = [t.clone().requires_grad_() for t in (x, w, b, scale, shift)]

    def fn(x, w, b, scale, shift):
        return op(x, w, b, scale, shift, [2, 1], [2, 1], [2, 3], "relu")

    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
    # no epilogue, channels_last input, stride 1
    xcl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: op(x, w, None, None, None, [1, 1], [4, 4], [4, 4], "none"),
                                    [xcl, args[1]])


def test_backward_matches_torch():
    x, w, b = make((2, 6, 12, 13), 5, 3, layout="channels_last")
    scale, shift = bn_params(5)
    ours = [t.clone().requires_grad_() for t in (x, w, b, scale, shift)]
    ref = [t.clone().requires_grad_() for t in (x, w, b, scale, shift)]
    g = torch.randn(2, 5, 12, 13)
    F.atrous_conv2d(*ours[:3], 1, 2, 2, "relu", scale=ours[3], shift=ours[4]).backward(g)
    TF.relu(TF.conv2d(*ref[:3], 1, 2, 2) * ref[3].view(-1, 1, 1) + ref[4].view(-1, 1, 1)).backward(g)
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-5, atol=1e-5)
    # a stride-0 gradient (x.sum().backward()) works too
    x2 = x.clone().requires_grad_()
    F.atrous_conv2d(x2, w, b, 1, 2, 2, "relu").sum().backward()
    x3 = x.clone().requires_grad_()
    TF.relu(TF.conv2d(x3, w, b, 1, 2, 2)).sum().backward()
    torch.testing.assert_close(x2.grad, x3.grad)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    x, w, b = make((2, 3, 9, 8), 4, 3, layout=layout)
    scale, shift = bn_params(4)
    for args in (
        (x, w, b, scale, shift, [1, 1], [2, 2], [2, 2], "relu"),
        (x, w, None, None, None, [2, 1], [1, 0], [1, 2], "none"),
        (x.requires_grad_(), w.requires_grad_(), b, None, shift, [1, 1], [4, 4], [4, 4], "relu"),
    ):
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = torch.nn.Sequential(AtrousConv2d(3, 8, 3, padding=2, dilation=2, activation="relu"),
                                AtrousConv2d(8, 4, 3, padding=12, dilation=12)).eval()
    x = torch.randn(2, 3, 15, 14)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)


# ---- bad input -----------------------------------------------------------------------------------
def _bad(**over):
    x, w, b = make((1, 3, 8, 8), 4, 3)
    kw = dict(input=x, weight=w, bias=b, stride=1, padding=1, dilation=1, activation=None)
    kw.update(over)
    return kw


@pytest.mark.parametrize("over,match", [
    (dict(input=torch.randn(3, 8)), "input must be a 3-D"),
    (dict(weight=torch.randn(4, 3, 3)), "weight must be a 4-D"),
    (dict(input=torch.randint(0, 5, (1, 3, 8, 8))), "input must be float32"),
    (dict(weight=torch.randn(4, 3, 3, 3, dtype=torch.float64)), "weight must have the dtype of input"),
    (dict(weight=torch.randn(4, 2, 3, 3)), "weight must have C_in = 3"),
    (dict(bias=torch.randn(5)), "bias must be a 1-D tensor of 4"),
    (dict(bias=torch.randn(4, dtype=torch.float64)), "bias must have the dtype of input"),
    (dict(stride=0), "stride must be positive"),
    (dict(dilation=(1, 0)), "dilation must be positive"),
    (dict(padding=-1), "padding must be non-negative"),
    (dict(padding="full"), "padding must be an int"),
    (dict(padding="same", stride=2), "padding='same' needs stride 1"),
    (dict(stride=(1, 2, 3)), "stride must be an int or a pair"),
    (dict(activation="gelu"), "activation must be None, 'none' or 'relu'"),
    (dict(dilation=5, padding=0), "too small for a kernel of extent 11"),
])
def test_bad_input(over, match):
    with pytest.raises(ValueError, match=match):
        F.atrous_conv2d(**_bad(**over))


def test_bad_scale_shift():
    kw = _bad()
    with pytest.raises(ValueError, match=r"scale must be a 1-D tensor of 4"):
        F.atrous_conv2d(**kw, scale=torch.ones(3))
    with pytest.raises(ValueError, match=r"shift must be a floating-point tensor"):
        F.atrous_conv2d(**kw, shift=torch.ones(4, dtype=torch.int64))
    # the C++ kernel checks too when called directly (memory safety)
    with pytest.raises(ValueError, match=r"scale must be a 1-D tensor of 4"):
        torch.ops.deconvseg.atrous_conv2d(kw["input"], kw["weight"], None, torch.ones(3), None,
                                          [1, 1], [1, 1], [1, 1], "none")
    with pytest.raises(ValueError, match=r"activation must be 'none' or 'relu'"):
        torch.ops.deconvseg.atrous_conv2d(kw["input"], kw["weight"], None, None, None,
                                          [1, 1], [1, 1], [1, 1], "tanh")


# ---- nn.AtrousConv2d -----------------------------------------------------------------------------
def test_module_is_a_drop_in_for_conv2d():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=2, dilation=2)
    ours = AtrousConv2d(4, 6, 3, padding=2, dilation=2)
    assert isinstance(ours, torch.nn.Conv2d)
    assert ours.state_dict().keys() == conv.state_dict().keys()
    ours.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 11, 10)
    same(ours(x), conv(x))
    # and back: our state_dict loads into nn.Conv2d
    other = torch.nn.Conv2d(4, 6, 3, padding=2, dilation=2)
    other.load_state_dict(AtrousConv2d(4, 6, 3, padding=2, dilation=2, activation="relu").state_dict())
    relu = AtrousConv2d(4, 6, 3, padding=2, dilation=2, activation="relu")
    relu.load_state_dict(other.state_dict())
    same(relu(x), TF.relu(other(x)))
    assert "activation='relu'" in repr(relu)
    # padding modes other than zeros go through F.pad as in nn.Conv2d
    refl = torch.nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=False)
    ours = AtrousConv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=False)
    ours.load_state_dict(refl.state_dict())
    same(ours(x), refl(x))


@pytest.mark.parametrize("fold_into_weight", [True, False])
@pytest.mark.parametrize("conv_bias", [True, False])
def test_from_conv_folds_batch_norm(fold_into_weight, conv_bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=2, dilation=2, bias=conv_bias)
    bn = torch.nn.BatchNorm2d(5)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.2, 0.2)
    ref = torch.nn.Sequential(conv, bn, torch.nn.ReLU()).eval()
    fused = AtrousConv2d.from_conv(conv, bn, activation="relu", fold_into_weight=fold_into_weight)
    x = torch.randn(2, 3, 12, 11)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    if fold_into_weight:
        assert fused.bn_scale is None and set(fused.state_dict()) == {"weight", "bias"}
    else:
        assert fused.bn_scale is not None and "folded_bn=True" in repr(fused)
        assert torch.equal(fused.weight, conv.weight)
    plain = AtrousConv2d.from_conv(conv)
    same(plain(x), conv(x))


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="groups must be 1"):
        AtrousConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="activation must be"):
        AtrousConv2d(4, 4, 3, activation="sigmoid")
    with pytest.raises(ValueError, match="dilation must be positive"):
        AtrousConv2d(4, 4, 3, dilation=0)
    with pytest.raises(ValueError, match="conv must have groups 1"):
        AtrousConv2d.from_conv(torch.nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="bn must have num_features = 4"):
        AtrousConv2d.from_conv(torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="bn must track running statistics"):
        AtrousConv2d.from_conv(torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"scale must be a tensor of shape \[4\]"):
        AtrousConv2d(4, 4, 3).set_folded_batch_norm(torch.ones(3), None)


# ---- packed (frozen) weights ---------------------------------------------------------------------
# A packed weight runs oneDNN's mkldnn::_convolution_pointwise instead of at::convolution: oneDNN
# may pick another kernel, so the oracle is F.conv2d to float32 rounding, not bit for bit.
PACKED_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,c_out,k,s,p,d", GEOMETRIES)
def test_packed_weight_matches_torch(shape, c_out, k, s, p, d, layout):
    x, w, b = make(shape, c_out, k, layout=layout)
    scale, shift = bn_params(c_out)
    with torch.no_grad():
        for size in (None, x.shape):
            packed = F.pack_conv_weight(w, s, p, d, input_size=size)
            assert packed.is_mkldnn and packed.shape == w.shape
            for act in (None, "relu"):
                y = F.atrous_conv2d(x, packed, b, s, p, d, activation=act)
                ref = TF.conv2d(x, w, b, s, p, d)
                torch.testing.assert_close(y, TF.relu(ref) if act else ref, **PACKED_TOL)
                # the output takes the input's memory format (the fake kernel says the same)
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                assert y.is_contiguous(memory_format=fmt)
            y = F.atrous_conv2d(x, packed, b, s, p, d, activation="relu", scale=scale, shift=shift)
            ref = TF.relu(TF.conv2d(x, w, b, s, p, d) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
            torch.testing.assert_close(y, ref, **PACKED_TOL)


def test_packed_weight_bfloat16_and_fake():
    x, w, b = make((1, 4, 9, 10), 6, 3, dtype=torch.bfloat16, layout="channels_last")
    from deconvseg_fast.ops.conv import can_pack
    if not can_pack(torch.bfloat16):  # no AVX-512 BW/VL/DQ nor AVX-NE-CONVERT: a clear refusal
        with pytest.raises(RuntimeError, match="weight: this CPU cannot pack torch.bfloat16 weights"):
            F.pack_conv_weight(w, 1, 2, 2)
        conv = AtrousConv2d(4, 6, 3, padding=2, dilation=2).to(torch.bfloat16).eval()
        deconvseg_fast.freeze(conv)  # a frozen bfloat16 module runs its plain weight there
        with torch.no_grad():
            torch.testing.assert_close(conv(x).float(), TF.conv2d(x.float(), conv.weight.float(), conv.bias.float(),
                                                                  1, 2, 2), rtol=2e-2, atol=2e-2)
        return
    with torch.no_grad():
        packed = F.pack_conv_weight(w, 1, 2, 2)
        y = F.atrous_conv2d(x, packed, b, 1, 2, 2, activation="relu")
        ref = TF.relu(TF.conv2d(x.float(), w.float(), b.float(), 1, 2, 2))
        torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode()
    fx, fp, fb = (mode.from_tensor(t) for t in (x, packed, b))
    with mode:
        out = op(fx, fp, fb, None, None, [1, 1], [2, 2], [2, 2], "relu")
    assert out.shape == y.shape and out.stride() == y.stride()


def test_packed_weight_bad_input():
    x, w, b = make((1, 3, 8, 8), 4, 3)
    packed = F.pack_conv_weight(w, 1, 1, 1)
    with pytest.raises(ValueError, match="packed weight, which is for inference only"):
        F.atrous_conv2d(x.requires_grad_(), packed, b, 1, 1, 1)
    with torch.no_grad():
        with pytest.raises(ValueError, match="weight must have the dtype of input"):
            F.atrous_conv2d(x.double(), packed, b.double(), 1, 1, 1)
    with pytest.raises(ValueError, match="weight must be float32 or bfloat16 to be packed"):
        F.pack_conv_weight(w.double())
    with pytest.raises(ValueError, match="weight must be a non-empty 4-D"):
        F.pack_conv_weight(w[0])
    with pytest.raises(ValueError, match=r"input_size must be \[N, C_in=3, H, W\]"):
        F.pack_conv_weight(w, input_size=(1, 5, 8, 8))


def _frozen_pair(layout="channels_last"):
    torch.manual_seed(0)
    conv = AtrousConv2d(5, 7, 3, padding=2, dilation=2, activation="relu").eval()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 5, 11, 12).contiguous(memory_format=fmt)
    return conv, x


def test_freeze_packs_channels_last_inference_only():
    conv, x = _frozen_pair()
    with torch.no_grad():
        plain = conv(x)
        assert conv.packed_weight(x) is None  # not frozen
        assert deconvseg_fast.freeze(conv) is conv and not conv.training
        assert conv.packed_weight(x) is not None
        torch.testing.assert_close(conv(x), plain, **PACKED_TOL)
        # NCHW activations keep the plain weight (oneDNN's packed path answers NHWC there)
        assert conv.packed_weight(x.contiguous()) is None
    # gradients asked for: the plain weight, and the result is differentiable
    assert conv.packed_weight(x) is None
    conv(x.requires_grad_()).sum().backward()
    assert x.grad is not None
    # train() drops the pack; freezing again brings it back
    conv.train()
    assert conv._pack is None
    deconvseg_fast.freeze(conv)
    with torch.no_grad():
        assert conv.packed_weight(x) is not None


def test_freeze_follows_tracked_weight_changes():
    conv, x = _frozen_pair()
    deconvseg_fast.freeze(conv)
    with torch.no_grad():
        before = conv(x)
        first = conv.packed_weight(x)
        assert conv.packed_weight(x) is first  # cached per input size
        conv.weight.mul_(2)  # an in-place change torch tracks: repacked
        assert conv.packed_weight(x) is not first
        torch.testing.assert_close(conv(x), TF.relu(TF.conv2d(x, conv.weight, conv.bias, 1, 2, 2)), **PACKED_TOL)
        other = AtrousConv2d(5, 7, 3, padding=2, dilation=2, activation="relu")
        conv.load_state_dict(other.state_dict())
        torch.testing.assert_close(conv(x), TF.relu(TF.conv2d(x, other.weight, other.bias, 1, 2, 2)), **PACKED_TOL)
        assert not torch.allclose(conv(x), before)
        # another input size gets its own pack
        x2 = torch.randn(1, 5, 9, 9).contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(conv(x2), TF.relu(TF.conv2d(x2, conv.weight, conv.bias, 1, 2, 2)), **PACKED_TOL)


def test_frozen_module_copies_and_saves_without_its_pack(tmp_path):
    import copy
    conv, x = _frozen_pair()
    deconvseg_fast.freeze(conv)
    with torch.no_grad():
        conv(x)
    assert conv._pack.packs
    twin = copy.deepcopy(conv)
    assert twin._pack is None
    torch.save(conv, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert loaded._pack is None and set(conv.state_dict()) == {"weight", "bias"}
    conv.to(torch.float64)  # a dtype move drops the pack; float64 runs the plain path
    assert conv._pack is None
    with torch.no_grad():
        conv(x.double())


def test_freeze_bad_argument():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        deconvseg_fast.freeze("model")


# ---- a kernel as large as its input: the GEMM route ------------------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_whole_window_matches_torch(layout, n, dtype):
    """DeconvNet's fc6 shape (7x7 over a 7x7 input, no padding): NCHW calls and channels_last
    calls of batch 1 run as one GEMM (another summation order: close, not bitwise); output strides
    are at::convolution's either way, and gradients are ATen's."""
    x, w, b = make((n, 6, 5, 4), 9, (5, 4), dtype=dtype, layout=layout)
    if layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    ref = torch.ops.aten.convolution.default(x, w, b, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    with torch.profiler.profile() as prof:
        F.atrous_conv2d(x, w, b)
    gemm = any(e.name == "aten::addmm" for e in prof.events())
    assert gemm == (layout == "contiguous" or n == 1)
    for act in (None, "relu"):
        y = F.atrous_conv2d(x, w, b, 1, 0, 1, activation=act)
        torch.testing.assert_close(y, TF.relu(ref) if act else ref)
        assert y.stride() == ref.stride()
    y = F.atrous_conv2d(x, w, None, 2, 0, 1)  # the stride does not matter for one output pixel
    torch.testing.assert_close(y, TF.conv2d(x, w, None, 2))
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.atrous_conv2d(x1, w1, b, activation="relu").sum().backward()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    TF.relu(TF.conv2d(x2, w2, b)).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


@pytest.mark.parametrize("activation", [None, "relu"])
def test_nchw_mostly_padding_packs_per_call(activation):
    """An NCHW float32 call with >= 64 input channels whose taps are mostly padding (fc6-like) runs
    oneDNN's convolution with a weight packed for the call; results are F.conv2d's to rounding,
    strides NCHW, gradients ATen's."""
    x, w, b = make((1, 64, 9, 9), 8, 3)
    scale, shift = bn_params(8)
    with torch.profiler.profile() as prof:
        y = F.atrous_conv2d(x, w, b, 1, 4, 4, activation=activation)
    assert any("convolution_pointwise" in e.name for e in prof.events())
    ref = TF.conv2d(x, w, b, 1, 4, 4)
    torch.testing.assert_close(y, TF.relu(ref) if activation else ref, **PACKED_TOL)
    assert y.is_contiguous()
    y = F.atrous_conv2d(x, w, b, 1, 4, 4, activation=activation, scale=scale, shift=shift)
    ref = ref * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    torch.testing.assert_close(y, TF.relu(ref) if activation else ref, **PACKED_TOL)
    x1 = x.clone().requires_grad_()
    F.atrous_conv2d(x1, w, b, 1, 4, 4, activation="relu").sum().backward()
    x2 = x.clone().requires_grad_()
    TF.relu(TF.conv2d(x2, w, b, 1, 4, 4)).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    # little padding (dilation 1 here): at::convolution, bit for bit
    with torch.profiler.profile() as prof:
        y = F.atrous_conv2d(x, w, b, 1, 1, 1)
    assert not any("convolution_pointwise" in e.name for e in prof.events())
    same(y, TF.conv2d(x, w, b, 1, 1, 1))
