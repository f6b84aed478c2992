"""The seed networks against their pure-torch twins (deconvseg_fast.reference.models).

The twins share the state_dict keys, so each test builds ours, copies its weights into the twin and
compares outputs in float32, eval mode. The networks are the published architectures at reduced
channel width (``width`` multiplies every channel count; 1.0 is the paper's) and small, odd spatial
sizes, so the suite stays fast on one core. Tolerances: float32 with a few hundred accumulated
products per output and (DeconvNet, SegNet) BN folded into the convolution epilogue instead of a
separate pass: rtol 1e-4 / atol 1e-5 allows a few ulps on O(1) logits.
"""
from __future__ import annotations

import copy

import pytest
import torch

import deconvseg_fast
from deconvseg_fast import functional as F
from deconvseg_fast import models as M
from deconvseg_fast.nn import AtrousConv2d, MaxPool2d, MaxUnpool2d
from deconvseg_fast.reference import models as R

W = 1 / 16  # channel width of every test network
TOL = dict(rtol=1e-4, atol=1e-5)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and affine (fresh BNs are the identity, which would hide folding bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


def assert_matches_twin(y: torch.Tensor, twin: torch.nn.Module, x: torch.Tensor) -> None:
    """Ours against the twin run in float64, the exact result up to float32 rounding. The float32 twin
    is no oracle at TOL: on an AVX2-only host torch's own convolutions put DeconvNet's output 2.4e-5
    from the float64 result, ours 7.7e-6 (oneDNN blocks its sums per vector width)."""
    with torch.no_grad():
        ref = copy.deepcopy(twin).double()(x.double())
    torch.testing.assert_close(y.double(), ref, **TOL)


def pair(name: str, *args, **kwargs):
    torch.manual_seed(0)
    ours = randomize(getattr(M, name)(*args, width=W, **kwargs)).eval()
    twin = getattr(R, name)(*args, width=W).eval()
    assert set(ours.state_dict()) == set(twin.state_dict())
    twin.load_state_dict(ours.state_dict())
    return ours, twin


# (builder, num_classes, input shape): odd sizes everywhere; DeconvNet/DecoupledNet need >= 193.
CASES = [
    ("segnet", 11, (2, 3, 45, 61)),
    ("deconvnet", 21, (2, 3, 197, 203)),
    ("deeplab_largefov", 21, (2, 3, 41, 53)),
    ("fcn8s", 21, (2, 3, 37, 45)),
]


@pytest.mark.parametrize("name,classes,shape", CASES, ids=[c[0] for c in CASES])
def test_model_matches_twin(name, classes, shape):
    ours, twin = pair(name, classes)
    x = torch.randn(shape)
    with torch.no_grad():
        y, ref = ours(x), twin(x)
    assert y.shape == (shape[0], classes, shape[2], shape[3])
    assert ref.abs().max() > 1e-3  # the comparison is not between two zero maps
    assert_matches_twin(y, twin, x)


@pytest.mark.parametrize("name,classes,shape", CASES, ids=[c[0] for c in CASES])
def test_frozen_model_matches_twin(name, classes, shape):
    """deconvseg_fast.freeze: every convolution (DeconvNet's flipped deconvolutions included) runs
    its packed weight, and the output still matches the twin; train() goes back to plain weights."""
    ours, twin = pair(name, classes)
    x = torch.randn(shape)
    deconvseg_fast.freeze(ours)
    with torch.no_grad():
        y = ours(x)
    packs = [m for m in ours.modules() if getattr(m, "_pack", None) is not None and m._pack.packs]
    assert packs
    assert_matches_twin(y, twin, x)
    ours.train()
    assert all(getattr(m, "_pack", None) is None for m in ours.modules())


def test_models_use_our_modules():
    seg = M.segnet(width=W)
    assert isinstance(seg.pool, MaxPool2d) and seg.pool.index_format == "packed"
    assert isinstance(seg.unpool, MaxUnpool2d) and seg.unpool.index_format == "packed"
    dl = M.deeplab_largefov(width=W)
    assert isinstance(dl.fc6.conv, AtrousConv2d) and dl.fc6.conv.dilation == (12, 12)
    assert dl.conv5[0].conv.dilation == (2, 2) and dl.conv5[0].conv.activation == "relu"


@pytest.mark.parametrize("hw", [(32, 48), (33, 47), (17, 9), (1, 1)])
def test_segnet_any_size(hw):
    """Switch geometry is carried through the decoder: unpooling returns the exact pre-pool sizes."""
    ours, twin = pair("segnet", 5)
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), twin(x), **TOL)


@pytest.mark.parametrize("fmt", ["window", "flat"])
def test_segnet_switch_formats(fmt):
    ours, twin = pair("segnet", 5, index_format=fmt)
    x = torch.randn(1, 3, 23, 29)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), twin(x), **TOL)


def test_segnet_training_step_matches_twin():
    """Train mode (batch statistics, running averages) and gradients equal the twin's."""
    ours, twin = pair("segnet", 5)
    ours.train(), twin.train()
    x = torch.randn(2, 3, 21, 27)
    target = torch.randint(0, 5, (2, 21, 27))
    for m in (ours, twin):
        torch.nn.functional.cross_entropy(m(x), target).backward()
    for (name, p), q in zip(ours.named_parameters(), twin.parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)
    torch.testing.assert_close(ours.enc1[0].bn.running_var, twin.enc1[0].bn.running_var)
    assert ours.enc1[0].conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name,shape", [("deconvnet", (2, 3, 193, 195)), ("deeplab_largefov", (1, 3, 25, 31))])
def test_gradients_flow(name, shape):
    ours, _ = pair(name, 4)
    ours.train()
    x = torch.randn(shape, requires_grad=True)
    ours(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for n, p in ours.named_parameters():
        assert p.grad is not None, n


def test_deconvnet_too_small():
    with pytest.raises(ValueError, match="input"):
        M.deconvnet(width=W).eval()(torch.randn(1, 3, 100, 100))


@pytest.mark.parametrize("mode", ["max", "sum"])
def test_deconvnet_instance_wise_matches_twin(mode):
    ours, twin = pair("deconvnet", 21)
    image = torch.randn(2, 3, 50, 67)
    boxes = torch.tensor([[0, 0, 67, 50], [3.5, 4.2, 40.1, 33.3], [-5, 10, 30, 60], [20, 20, 66.5, 49.9]])
    idx = torch.tensor([0, 0, 1, 1])
    out = ours.segment_instances(image, boxes, idx, mode)
    assert out.shape == (2, 21, 50, 67)
    torch.testing.assert_close(out, twin.segment_instances(image, boxes, idx, mode), **TOL)
    # pixels of image 1 left of x = -5 + 35 = 30 and above y = 10 are covered by no box: 0
    assert out[1, :, :10, :20].abs().max() == 0


def test_crop_proposals_is_interpolate():
    """Each crop is F.interpolate of the rounded box (border replicated outside the image).
    atol 1e-4: torch's kernel blends columns before rows, we rows before columns (a few ulps)."""
    image = torch.randn(2, 3, 50, 67)
    boxes = torch.tensor([[0, 0, 67, 50], [3.5, 4.2, 40.1, 33.3], [-5, 10, 30, 60], [1, 1, 1.5, 300.0]])
    idx = torch.tensor([0, 0, 1, 1])
    crops = M.crop_proposals(image, boxes, idx)
    for p, (x_lo, y_lo, x_hi, y_hi) in enumerate([(0, 0, 67, 50), (3, 4, 41, 34), (-5, 10, 30, 60), (1, 1, 2, 300)]):
        rows = torch.arange(y_lo, y_hi).clamp(0, 49)
        cols = torch.arange(x_lo, x_hi).clamp(0, 66)
        region = image[idx[p]][:, rows][:, :, cols]
        ref = torch.nn.functional.interpolate(region[None], size=(224, 224), mode="bilinear", align_corners=False)
        torch.testing.assert_close(crops[p], ref[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(crops[p], R.crop_proposal(image[idx[p]], boxes[p]), rtol=0, atol=1e-6)
    square = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(M.crop_proposals(square, torch.tensor([[0.0, 0, 224, 224]]), None), square)


def test_decouplednet_matches_twin():
    ours, twin = pair("decouplednet", 20)
    x = torch.randn(2, 3, 197, 203)
    classes = torch.zeros(2, 20, dtype=torch.bool)
    classes[0, [0, 19]] = True
    classes[1, 1] = True
    seg, logits = ours(x, classes)
    seg_t, logits_t = twin(x, classes)
    assert seg.shape == (2, 21, 197, 203)
    torch.testing.assert_close(logits, logits_t, **TOL)
    torch.testing.assert_close(seg, seg_t, **TOL)
    assert seg[0, 2].abs().max() == 0 and seg[1, 1].abs().max() == 0  # absent classes
    torch.testing.assert_close(seg[0, 0], 1 - torch.maximum(seg[0, 1], seg[0, 20]))
    # threshold path: no class above a threshold of 1 -> all background
    ours.threshold = 1.0
    seg, _ = ours(x)
    assert (seg[:, 0] == 1).all() and (seg[:, 1:] == 0).all()


def _crf_image(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def test_deeplab_crf():
    """The network part equals the twin's exactly; the CRF is ours (permutohedral lattice) vs the
    twin's brute-force O(N^2) filter, which agree only approximately (see tests/test_crf.py)."""
    ours, twin = pair("deeplab_largefov_crf", 4)
    x = torch.randn(1, 3, 17, 23)
    image = _crf_image((1, 3, 17, 23))
    with torch.no_grad():
        logits = ours.net(x)
        torch.testing.assert_close(logits, twin.net(x), **TOL)
        q = ours(x, image)
        torch.testing.assert_close(q, F.dense_crf(logits, image, iterations=10), rtol=0, atol=0)
        q_ref = twin(x, image)
    assert (q.argmax(1) == q_ref.argmax(1)).float().mean() >= 0.97
    assert (q - q_ref).abs().mean() <= 0.02


@pytest.mark.parametrize("with_boxes", [False, True])
def test_edeconvnet(with_boxes):
    ours, twin = pair("edeconvnet", 3, crf_iterations=3)
    x = torch.randn(1, 3, 193, 197)
    image = _crf_image((1, 3, 193, 197))
    boxes = torch.tensor([[0.0, 0.0, 197.0, 193.0], [10.0, 20.0, 120.0, 150.0]]) if with_boxes else None
    with torch.no_grad():
        p = ours.probabilities(x, boxes)
        torch.testing.assert_close(p, twin.probabilities(x, boxes), **TOL)
        torch.testing.assert_close(p.sum(1), torch.ones(1, 193, 197))
        q = ours(x, image, boxes)
    torch.testing.assert_close(q, F.dense_crf(torch.log(p.clamp_min(1e-8)), image, iterations=3), rtol=0, atol=0)


def test_compile_segnet():
    """torch.compile(fullgraph=True) traces our pooling/unpooling/conv ops (their fake kernels) in a
    whole network. aot_eager: inductor's codegen would add ~20 s on this CPU for no extra coverage
    of our ops."""
    ours, twin = pair("segnet", 5)
    x = torch.randn(1, 3, 23, 29)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), twin(x), **TOL)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_transposed_block_of_a_1x1_input_is_a_matrix_product(channels_last, bias):
    """DeconvNet's fc6-deconv (7x7 out of 1x1) runs as one matrix product; it must be torch's
    conv_transpose2d, forward and backward, in either weight layout."""
    from deconvseg_fast.models._layers import ConvBlock
    torch.manual_seed(0)
    block = ConvBlock(6, 5, 3, 0, bn=False, relu=False, transposed=True)
    if not bias:
        block.conv.bias = None
    if channels_last:
        block = block.to(memory_format=torch.channels_last)
    x = torch.randn(2, 6, 1, 1, requires_grad=True)
    assert block._outer_product(x) is not None
    y = block(x)
    ref = torch.nn.functional.conv_transpose2d(x, block.conv.weight, block.conv.bias)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, block.conv.weight), g)
    rx, rw = torch.autograd.grad(ref, (x, block.conv.weight), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    assert block._outer_product(torch.randn(2, 6, 2, 1)) is None  # larger inputs: conv_transpose2d
