"""FCN-8s (Long, Shelhamer & Darrell, CVPR 2015), the staged VOC model.

VGG16 with conv1_1 padded by 100 (so any input size gives valid crops), five 2x2 stride-2 pools
rounding up (Caffe), fc6 as a 7x7 convolution to 4096 and fc7 as 1x1 to 4096 (ReLU, dropout),
score_fr, and the skip architecture: x2 upsampling (4x4 stride-2 transposed convolution, no bias)
fused with score_pool4 (crop 5), x2 again fused with score_pool3 (crop 9), x8 (16x16 stride 8) and
the final crop 31 to the input size. Conv+ReLU runs use our atrous op with the ReLU fused; the pools
keep no switches. The learned upsamplings stay ``torch.nn.ConvTranspose2d`` (strided, not ours).
Weights and activations are channels_last (``use_channels_last``; 1.12x -> 1.25x against the twin at
375x500, batch 1), the output NCHW.
"""
from __future__ import annotations

import torch

from ..nn import MaxPool2d
from ._layers import ConvBlock, channels, to_channels_last, use_channels_last, vgg_stages


class FCN8s(torch.nn.Module):
    def __init__(self, num_classes: int = 21, width: float = 1.0):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width}
        stages = vgg_stages(width, bn=False, pad1=100)
        for i, blocks in enumerate(stages, 1):
            setattr(self, f"conv{i}", torch.nn.Sequential(*blocks))
        c3 = stages[2][-1].conv.out_channels
        c4 = stages[3][-1].conv.out_channels
        c5 = stages[4][-1].conv.out_channels
        fc = channels(4096, width)
        n = num_classes
        self.pool = MaxPool2d(2, 2, ceil_mode=True)
        self.fc6 = ConvBlock(c5, fc, 7, 0, bn=False)
        self.drop6 = torch.nn.Dropout2d(0.5)
        self.fc7 = ConvBlock(fc, fc, 1, 0, bn=False)
        self.drop7 = torch.nn.Dropout2d(0.5)
        self.score_fr = torch.nn.Conv2d(fc, n, 1)
        self.score_pool4 = torch.nn.Conv2d(c4, n, 1)
        self.score_pool3 = torch.nn.Conv2d(c3, n, 1)
        self.upscore2 = torch.nn.ConvTranspose2d(n, n, 4, 2, bias=False)
        self.upscore_pool4 = torch.nn.ConvTranspose2d(n, n, 4, 2, bias=False)
        self.upscore8 = torch.nn.ConvTranspose2d(n, n, 16, 8, bias=False)
        use_channels_last(self)

    def vgg_blocks(self) -> list[ConvBlock]:
        return [b for i in range(1, 6) for b in getattr(self, f"conv{i}")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        h = self.pool(self.conv1(to_channels_last(x)))
        h = self.pool(self.conv2(h))
        pool3 = h = self.pool(self.conv3(h))
        pool4 = h = self.pool(self.conv4(h))
        h = self.pool(self.conv5(h))
        h = self.score_fr(self.drop7(self.fc7(self.drop6(self.fc6(h)))))
        up2 = self.upscore2(h)
        s4 = self.score_pool4(pool4)[:, :, 5:5 + up2.shape[2], 5:5 + up2.shape[3]]
        up4 = self.upscore_pool4(up2 + s4)
        s3 = self.score_pool3(pool3)[:, :, 9:9 + up4.shape[2], 9:9 + up4.shape[3]]
        up8 = self.upscore8(up4 + s3)
        return up8[:, :, 31:31 + H, 31:31 + W].contiguous()


def fcn8s(num_classes: int = 21, width: float = 1.0) -> FCN8s:
    """FCN-8s for PASCAL VOC; ``width`` multiplies every channel count (tests use small values)."""
    return FCN8s(num_classes, width)
