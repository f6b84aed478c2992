"""Pure-torch twins of deconvseg_fast.models: the same networks with torch.nn layers only.

Each twin has exactly the state_dict keys of its deconvseg_fast.models counterpart, so
``twin.load_state_dict(model.state_dict())`` gives the same function; tests compare the two and the
benchmarks time them against each other. The switches are torch's int64 indices, conv -> BN -> ReLU
are three modules, DeconvNet's deconvolutions are ``nn.ConvTranspose2d``. The CRF models use the
brute-force O(N^2) dense CRF of ``reference.crf`` (small images only). Imports torch only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as TF
from torch import nn

from . import crf as _crf
from . import proposals as _proposals

VGG = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
SEGNET_DECODER = [[512, 512, 512], [512, 512, 256], [256, 256, 128], [128, 64], [64]]
DECONVNET_DECODER = [[512, 512, 512], [512, 512, 256], [256, 256, 128], [128, 64], [64, 64]]
CRF_SETTINGS = dict(iterations=10, gaussian_sxy=3.0, gaussian_weight=3.0, bilateral_sxy=80.0,
                    bilateral_srgb=13.0, bilateral_weight=10.0)


def channels(c, width):
    return max(1, int(round(c * width)))


class ConvBlock(nn.Module):
    def __init__(self, cin, cout, k=3, padding=1, dilation=1, bn=True, relu=True, transposed=False):
        super().__init__()
        cls = nn.ConvTranspose2d if transposed else nn.Conv2d
        self.conv = cls(cin, cout, k, 1, padding, dilation=dilation)
        self.bn = nn.BatchNorm2d(cout) if bn else None
        self.relu = relu

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return torch.relu(x) if self.relu else x


def vgg_stages(width, bn, dilation5=1, pad1=1):
    stages, cin = [], 3
    for s, outs in enumerate(VGG):
        blocks = []
        for j, c in enumerate(outs):
            d = dilation5 if s == 4 else 1
            blocks.append(ConvBlock(cin, channels(c, width), 3, pad1 if (s == 0 and j == 0) else d, d, bn=bn))
            cin = channels(c, width)
        stages.append(nn.Sequential(*blocks))
    return stages


def decoder(cin, cfg, width, transposed):
    stages = []
    for outs in cfg:
        blocks = []
        for c in outs:
            blocks.append(ConvBlock(cin, channels(c, width), 3, 1, bn=True, transposed=transposed))
            cin = channels(c, width)
        stages.append(nn.Sequential(*blocks))
    return stages, cin


def _encode(net, x, prefix):
    saved = []
    for i in range(1, 6):
        x = getattr(net, f"{prefix}{i}")(x)
        size = x.shape[-2:]
        x, idx = net.pool(x)
        saved.append((idx, size))
    return x, saved


def _decode(net, x, saved, select=None):
    for i in range(5, 0, -1):
        idx, size = saved[i - 1]
        if select is not None:
            idx = idx.index_select(0, select)
        x = getattr(net, f"dec{i}")(net.unpool(x, idx, output_size=size))
    return x


def crop_proposal(image, box, size=224):
    """image [C, H, W], box (x1, y1, x2, y2) -> [C, size, size]: the box rounded outwards to whole
    pixels (at least one), border-replicated outside the image, resized with F.interpolate's
    bilinear (align_corners=False) taps and weights, interpolating rows first, then columns."""
    C, H, W = image.shape
    acc = torch.float64 if image.dtype == torch.float64 else torch.float32
    x1, y1, x2, y2 = (float(v) for v in box)
    taps = []
    for a, b, limit in ((x1, x2, W), (y1, y2, H)):
        lo = math.floor(a)
        n = max(math.ceil(b), lo + 1) - lo
        src = (torch.tensor(float(n), dtype=acc) / size * (torch.arange(size, dtype=acc) + 0.5) - 0.5).clamp_min(0)
        i0 = src.long().clamp(max=n - 1)
        lam = (src - i0.to(acc)).clamp(0, 1)
        i1 = (i0 + 1).clamp(max=n - 1)
        taps.append(((lo + i0).clamp(0, limit - 1), (lo + i1).clamp(0, limit - 1), lam))
    (c0, c1, lx), (r0, r1, ly) = taps
    img = image.to(acc)
    r = img[:, r0] * (1 - ly)[None, :, None] + img[:, r1] * ly[None, :, None]
    return (r[:, :, c0] * (1 - lx) + r[:, :, c1] * lx).to(image.dtype)


def _add_segnet_decoder(net, cin, cfg, width, num_classes):
    """SegNet's switch decoder (dec5..dec1), its 3x3 classifier and the 2x2 ceil-mode pool/unpool."""
    stages, cin = decoder(cin, cfg, width, transposed=False)
    for i, s in zip((5, 4, 3, 2, 1), stages):
        setattr(net, f"dec{i}", s)
    net.classifier = nn.Conv2d(cin, num_classes, 3, padding=1)
    net.pool = nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True)
    net.unpool = nn.MaxUnpool2d(2, 2)


def _segnet_forward(net, x):
    x, saved = _encode(net, x, "enc")
    return net.classifier(_decode(net, x, saved))


class SegNet(nn.Module):
    def __init__(self, num_classes=11, width=1.0):
        super().__init__()
        for i, s in enumerate(vgg_stages(width, bn=True), 1):
            setattr(self, f"enc{i}", s)
        _add_segnet_decoder(self, channels(512, width), SEGNET_DECODER, width, num_classes)

    def forward(self, x):
        return _segnet_forward(self, x)


class DeconvNet(nn.Module):
    def __init__(self, num_classes=21, width=1.0):
        super().__init__()
        for i, s in enumerate(vgg_stages(width, bn=True), 1):
            setattr(self, f"enc{i}", s)
        c5, fc = channels(512, width), channels(4096, width)
        self.fc6 = ConvBlock(c5, fc, 7, 0)
        self.fc7 = ConvBlock(fc, fc, 1, 0)
        self.fc6_deconv = ConvBlock(fc, c5, 7, 0, transposed=True)
        stages, cin = decoder(c5, DECONVNET_DECODER, width, transposed=True)
        for i, s in zip((5, 4, 3, 2, 1), stages):
            setattr(self, f"dec{i}", s)
        self.score = nn.Conv2d(cin, num_classes, 1)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)

    def forward(self, x):
        x, saved = _encode(self, x, "enc")
        x = self.fc6_deconv(self.fc7(self.fc6(x)))
        return self.score(_decode(self, x, saved))

    @torch.no_grad()
    def segment_instances(self, image, boxes, image_index=None, mode="max"):
        """One proposal at a time: crop and resize to 224x224, segment, then paste and aggregate
        with reference.proposals."""
        P = boxes.shape[0]
        idx = torch.zeros(P, dtype=torch.long) if image_index is None else image_index.long()
        B, _, H, W = image.shape
        scores = [self(crop_proposal(image[idx[p]], boxes[p])[None]) for p in range(P)]
        scores = torch.cat(scores) if scores else image.new_zeros((0, self.score.out_channels, 224, 224))
        return _proposals.paste_aggregate(scores, boxes, idx, (B, H, W), mode, fill=0.0)


class DeepLabLargeFOV(nn.Module):
    def __init__(self, num_classes=21, width=1.0, upsample=True):
        super().__init__()
        self.upsample = upsample
        for i, s in enumerate(vgg_stages(width, bn=False, dilation5=2), 1):
            setattr(self, f"conv{i}", s)
        c5, fc = channels(512, width), channels(1024, width)
        self.pool_s2 = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.pool_s1 = nn.MaxPool2d(3, 1, 1, ceil_mode=True)
        self.avgpool = nn.AvgPool2d(3, 1, 1, ceil_mode=True, count_include_pad=True)
        self.fc6 = ConvBlock(c5, fc, 3, 12, 12, bn=False)
        self.drop6 = nn.Dropout2d(0.5)
        self.fc7 = ConvBlock(fc, fc, 1, 0, bn=False)
        self.drop7 = nn.Dropout2d(0.5)
        self.fc8 = nn.Conv2d(fc, num_classes, 1)

    def forward(self, x):
        h = self.pool_s2(self.conv1(x))
        h = self.pool_s2(self.conv2(h))
        h = self.pool_s2(self.conv3(h))
        h = self.pool_s1(self.conv4(h))
        h = self.avgpool(self.pool_s1(self.conv5(h)))
        h = self.fc8(self.drop7(self.fc7(self.drop6(self.fc6(h)))))
        if not self.upsample:
            return h
        return TF.interpolate(h, size=x.shape[-2:], mode="bilinear", align_corners=True)


def dense_crf(unary, image, **settings):
    """Batched wrapper of reference.crf.dense_crf (exact, float64) returning unary's dtype."""
    return torch.stack([_crf.dense_crf(u, im, **settings) for u, im in zip(unary, image)]).to(unary.dtype)


class DeepLabLargeFOVCRF(nn.Module):
    def __init__(self, num_classes=21, width=1.0, **crf):
        super().__init__()
        self.settings = {**CRF_SETTINGS, **crf}
        self.net = DeepLabLargeFOV(num_classes, width, upsample=True)

    def forward(self, input, image):
        return dense_crf(self.net(input), image, **self.settings)


class FCN8s(nn.Module):
    def __init__(self, num_classes=21, width=1.0):
        super().__init__()
        for i, s in enumerate(vgg_stages(width, bn=False, pad1=100), 1):
            setattr(self, f"conv{i}", s)
        c3, c4, c5, fc, n = (channels(256, width), channels(512, width), channels(512, width),
                             channels(4096, width), num_classes)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.fc6 = ConvBlock(c5, fc, 7, 0, bn=False)
        self.drop6 = nn.Dropout2d(0.5)
        self.fc7 = ConvBlock(fc, fc, 1, 0, bn=False)
        self.drop7 = nn.Dropout2d(0.5)
        self.score_fr = nn.Conv2d(fc, n, 1)
        self.score_pool4 = nn.Conv2d(c4, n, 1)
        self.score_pool3 = nn.Conv2d(c3, n, 1)
        self.upscore2 = nn.ConvTranspose2d(n, n, 4, 2, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(n, n, 4, 2, bias=False)
        self.upscore8 = nn.ConvTranspose2d(n, n, 16, 8, bias=False)

    def forward(self, x):
        H, W = x.shape[-2:]
        h = self.pool(self.conv1(x))
        h = self.pool(self.conv2(h))
        pool3 = h = self.pool(self.conv3(h))
        pool4 = h = self.pool(self.conv4(h))
        h = self.pool(self.conv5(h))
        h = self.score_fr(self.drop7(self.fc7(self.drop6(self.fc6(h)))))
        up2 = self.upscore2(h)
        up4 = self.upscore_pool4(up2 + self.score_pool4(pool4)[:, :, 5:5 + up2.shape[2], 5:5 + up2.shape[3]])
        up8 = self.upscore8(up4 + self.score_pool3(pool3)[:, :, 9:9 + up4.shape[2], 9:9 + up4.shape[3]])
        return up8[:, :, 31:31 + H, 31:31 + W].contiguous()


class EDeconvNet(nn.Module):
    def __init__(self, num_classes=21, width=1.0, crf_iterations=10):
        super().__init__()
        self.crf_iterations = crf_iterations
        self.deconvnet = DeconvNet(num_classes, width)
        self.fcn = FCN8s(num_classes, width)

    def probabilities(self, input, boxes=None, image_index=None, mode="max"):
        deconv = (self.deconvnet(input) if boxes is None
                  else self.deconvnet.segment_instances(input, boxes, image_index, mode))
        return 0.5 * (torch.softmax(deconv, 1) + torch.softmax(self.fcn(input), 1))

    def forward(self, input, image, boxes=None, image_index=None, mode="max"):
        p = self.probabilities(input, boxes, image_index, mode)
        return dense_crf(torch.log(p.clamp_min(1e-8)), image,
                         **{**CRF_SETTINGS, "iterations": self.crf_iterations})


class DecoupledNet(nn.Module):
    def __init__(self, num_classes=20, width=1.0, threshold=0.5):
        super().__init__()
        self.num_classes, self.threshold = num_classes, threshold
        for i, s in enumerate(vgg_stages(width, bn=False), 1):
            setattr(self, f"conv{i}", s)
        c5, fc, bridge = channels(512, width), channels(4096, width), channels(1024, width)
        self.fc6 = ConvBlock(c5, fc, 7, 0, bn=False)
        self.drop6 = nn.Dropout2d(0.5)
        self.fc7 = ConvBlock(fc, fc, 1, 0, bn=False)
        self.drop7 = nn.Dropout2d(0.5)
        self.fc8 = nn.Conv2d(fc, num_classes, 1)
        self.bridge1 = ConvBlock(2 * c5, bridge, 7, 0)
        self.bridge2 = ConvBlock(bridge, c5, 7, 0, transposed=True)
        stages, cin = decoder(c5, DECONVNET_DECODER, width, transposed=True)
        for i, s in zip((5, 4, 3, 2, 1), stages):
            setattr(self, f"dec{i}", s)
        self.score = nn.Conv2d(cin, 2, 1)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)

    def forward(self, x, classes=None):
        x, saved = _encode(self, x, "conv")
        B = x.shape[0]
        H, W = saved[0][1]
        seg = x.new_zeros((B, self.num_classes + 1, H, W))
        logits = []
        with torch.enable_grad():
            for b in range(B):  # one image, one class at a time: the plain reading of the paper
                f = x[b:b + 1].detach().requires_grad_(True)
                s = self.fc8(self.drop7(self.fc7(self.drop6(self.fc6(f))))).mean(dim=(2, 3))[0]
                logits.append(s.detach())
                present = (torch.sigmoid(s.detach()) > self.threshold) if classes is None else classes[b].bool()
                best = torch.zeros((H, W), dtype=x.dtype, device=x.device)
                for c in present.nonzero().flatten().tolist():
                    (g,) = torch.autograd.grad(s[c], f, retain_graph=True)
                    with torch.no_grad():
                        h = self.bridge2(self.bridge1(torch.cat([x[b:b + 1], g], 1)))
                        h = _decode(self, h, saved, torch.tensor([b], device=x.device))
                        fg = torch.softmax(self.score(h), 1)[0, 1]
                    seg[b, c + 1] = fg
                    best = torch.maximum(best, fg)
                seg[b, 0] = 1.0 - best
        return seg, torch.stack(logits)


def segnet(num_classes=11, width=1.0, **_):
    return SegNet(num_classes, width)


def deconvnet(num_classes=21, width=1.0, **_):
    return DeconvNet(num_classes, width)


def deeplab_largefov(num_classes=21, width=1.0, upsample=True):
    return DeepLabLargeFOV(num_classes, width, upsample)


def deeplab_largefov_crf(num_classes=21, width=1.0, **crf):
    return DeepLabLargeFOVCRF(num_classes, width, **crf)


def fcn8s(num_classes=21, width=1.0):
    return FCN8s(num_classes, width)


def edeconvnet(num_classes=21, width=1.0, crf_iterations=10):
    return EDeconvNet(num_classes, width, crf_iterations)


def decouplednet(num_classes=20, width=1.0, threshold=0.5, **_):
    return DecoupledNet(num_classes, width, threshold)


COMPACT_ENCODER = [[16], [32, 32], [64, 64], [64, 64], [64]]
COMPACT_DECODER = [[64], [64, 64], [64, 32], [32, 16], [16]]


class CompactSegNet(nn.Module):
    input_normalization = "unit"  # trained on rgb / 255 (deconvseg_fast.video.segmenter.preprocess)

    def __init__(self, num_classes=6, width=1.0):
        super().__init__()
        cin = 3
        for i, outs in enumerate(COMPACT_ENCODER, 1):
            blocks = []
            for c in outs:
                blocks.append(ConvBlock(cin, channels(c, width), 3, 1, bn=True))
                cin = channels(c, width)
            setattr(self, f"enc{i}", nn.Sequential(*blocks))
        _add_segnet_decoder(self, cin, COMPACT_DECODER, width, num_classes)

    def forward(self, x):
        return _segnet_forward(self, x)


def compact_segnet(num_classes=6, width=1.0, **_):
    return CompactSegNet(num_classes, width)
