"""convert() and fuse_conv_bn() on torchvision-style models built here (torchvision is not a dependency)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deconvseg_fast
from deconvseg_fast.nn import AtrousConv2d, MaxPool2d, MaxUnpool2d

TOL = dict(rtol=1e-4, atol=1e-5)


def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


class VGGLike(nn.Module):
    """torchvision.models.vgg's layout: ``features`` Sequential of Conv/BN/ReLU/MaxPool, then a head."""

    def __init__(self, bn=True, dilated=False):
        super().__init__()
        layers, cin = [], 3
        for v in [8, "M", 16, 16, "M", 24]:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers.append(nn.Conv2d(cin, v, 3, padding=1))
            if bn:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            cin = v
        if dilated:  # DeepLab-style tail: dilated conv + ReLU, then a lone dilated conv
            layers += [nn.Conv2d(cin, 24, 3, padding=2, dilation=2), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(24, 5, 3, padding=4, dilation=4)

    def forward(self, x):
        return self.head(self.features(x))


class SegNetLike(nn.Module):
    """The usual hand-written SegNet: MaxPool2d(return_indices=True) / MaxUnpool2d pairs in forward."""

    def __init__(self, k=2):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.MaxPool2d(k, 2, ceil_mode=True, return_indices=True)
        self.unpool = nn.MaxUnpool2d(k, 2)
        self.dec2 = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dec1 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x = self.enc1(x)
        s1 = x.shape
        x, i1 = self.pool(x)
        x = self.enc2(x)
        s2 = x.shape
        x, i2 = self.pool(x)
        x = self.unpool(x, i2, output_size=s2)
        x = self.dec2(x)
        x = self.unpool(x, i1, output_size=s1)
        return self.dec1(x)


def test_convert_vgg_eval_fuses_and_matches():
    model = _randomize_bn(VGGLike(bn=True, dilated=True)).eval()
    x = torch.randn(2, 3, 19, 23)
    ref = model(x)
    conv = deconvseg_fast.convert(model)
    f = conv.features
    assert isinstance(f[0], AtrousConv2d) and f[0].activation == "relu"
    assert isinstance(f[1], nn.Identity) and isinstance(f[2], nn.Identity)  # indices keep their meaning
    assert isinstance(f[3], MaxPool2d) and f[3].index_format == "flat"
    assert isinstance(f[-2], AtrousConv2d) and f[-2].dilation == (2, 2) and isinstance(f[-1], nn.Identity)
    assert isinstance(conv.head, AtrousConv2d) and conv.head.activation is None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in conv.modules())
    assert type(model.features[0]) is nn.Conv2d  # the original is untouched (a copy was converted)
    torch.testing.assert_close(conv(x), ref, **TOL)


def test_convert_train_mode_keeps_bn():
    model = VGGLike(bn=True, dilated=True).train()
    conv = deconvseg_fast.convert(model)
    assert isinstance(conv.features[1], nn.BatchNorm2d)
    assert type(conv.features[0]) is nn.Conv2d  # undilated, unfused: left to torch
    assert isinstance(conv.features[-2], AtrousConv2d) and conv.features[-2].activation is None
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(0)
    torch.testing.assert_close(conv(x), model(x), **TOL)
    conv(x).sum().backward()
    assert conv.features[-2].weight.grad is not None


def test_convert_vgg_without_bn_fuses_relu():
    model = VGGLike(bn=False).eval()
    conv = deconvseg_fast.convert(model)
    assert isinstance(conv.features[0], AtrousConv2d) and conv.features[0].activation == "relu"
    x = torch.randn(1, 3, 17, 17)
    torch.testing.assert_close(conv(x), model(x), **TOL)


@pytest.mark.parametrize("fmt,k,expected", [("flat", 2, "flat"), ("packed", 2, "packed"), ("window", 2, "window"),
                                            ("packed", 3, "window")])
def test_convert_segnet_like(fmt, k, expected):
    model = _randomize_bn(SegNetLike(k)).eval()
    x = torch.randn(2, 3, 21, 27)  # odd: ceil_mode windows hang over the edge
    ref = model(x)
    conv = deconvseg_fast.convert(model, index_format=fmt)
    assert isinstance(conv.pool, MaxPool2d) and conv.pool.index_format == expected
    assert isinstance(conv.unpool, MaxUnpool2d) and conv.unpool.index_format == expected
    torch.testing.assert_close(conv(x), ref, **TOL)


def test_convert_inplace_and_root_module():
    model = SegNetLike().eval()
    assert deconvseg_fast.convert(model, inplace=True) is model
    assert isinstance(model.pool, MaxPool2d)
    pool = deconvseg_fast.convert(nn.MaxPool2d(3, 2, 1))
    assert isinstance(pool, MaxPool2d) and pool.padding == 1
    with pytest.raises(ValueError, match="index_format"):
        deconvseg_fast.convert(model, index_format="int32")
    with pytest.raises(TypeError, match="model"):
        deconvseg_fast.convert(torch.randn(3))


def test_fuse_conv_bn():
    conv = nn.Conv2d(4, 6, 3, padding=2, dilation=2)
    bn = _randomize_bn(nn.Sequential(nn.BatchNorm2d(6))).eval()[0]
    x = torch.randn(2, 4, 11, 13)
    fused = deconvseg_fast.fuse_conv_bn(conv, bn, activation="relu")
    assert isinstance(fused, AtrousConv2d)
    torch.testing.assert_close(fused(x), torch.relu(bn(conv(x))), **TOL)
    torch.testing.assert_close(deconvseg_fast.fuse_conv_bn(conv)(x), conv(x), **TOL)
    with pytest.raises(ValueError, match="bn"):
        deconvseg_fast.fuse_conv_bn(conv, nn.BatchNorm2d(5))
