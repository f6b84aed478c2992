"""DeepLab-LargeFOV (Chen et al., ICLR 2015), with and without the fully connected CRF.

VGG16's convolutions without BN, each conv+ReLU one ``atrous_conv2d`` call with the ReLU fused.
pool1-3: 3x3 stride 2 pad 1; pool4: 3x3 stride 1 pad 1; conv5_x: dilation 2, pad 2; pool5: 3x3 s1 p1
then a 3x3 s1 p1 average pool (Caffe's, which counts the padding); fc6: 3x3, 1024 channels, dilation
12, pad 12, ReLU, dropout; fc7: 1x1, 1024, ReLU, dropout; fc8: 1x1 to the classes. The stride-8
logits are upsampled bilinearly to the input size (``align_corners=True``: DeepLab's Interp layer,
exactly x8 when H = 8k + 1 such as 321 or 513). The pools keep no switches (nothing unpools), so
they run our max-pool without returning indices; pools round up (Caffe's ``ceil_mode``). Weights
and activations are channels_last (``use_channels_last``), the logits NCHW.
"""
from __future__ import annotations

import torch
import torch.nn.functional as TF

from ..nn import DenseCRF, MaxPool2d
from ._layers import ConvBlock, channels, to_channels_last, use_channels_last, vgg_stages

# DeepLab's VOC settings for the CRF (w=3, theta_gamma=3; bilateral theta_alpha 80, theta_beta 13, w 10).
CRF_SETTINGS = dict(iterations=10, gaussian_sxy=3.0, gaussian_weight=3.0, bilateral_sxy=80.0,
                    bilateral_srgb=13.0, bilateral_weight=10.0)


class DeepLabLargeFOV(torch.nn.Module):
    def __init__(self, num_classes: int = 21, width: float = 1.0, upsample: bool = True):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "upsample": upsample}
        self.upsample = upsample
        stages = vgg_stages(width, bn=False, dilation5=2)
        for i, blocks in enumerate(stages, 1):
            setattr(self, f"conv{i}", torch.nn.Sequential(*blocks))
        c5 = stages[-1][-1].conv.out_channels
        fc = channels(1024, width)
        self.pool_s2 = MaxPool2d(3, 2, 1, ceil_mode=True)
        self.pool_s1 = MaxPool2d(3, 1, 1, ceil_mode=True)
        self.avgpool = torch.nn.AvgPool2d(3, 1, 1, ceil_mode=True, count_include_pad=True)
        self.fc6 = ConvBlock(c5, fc, 3, 12, 12, bn=False)
        self.drop6 = torch.nn.Dropout2d(0.5)
        self.fc7 = ConvBlock(fc, fc, 1, 0, bn=False)
        self.drop7 = torch.nn.Dropout2d(0.5)
        self.fc8 = torch.nn.Conv2d(fc, num_classes, 1)
        use_channels_last(self)

    def vgg_blocks(self) -> list[ConvBlock]:
        return [b for i in range(1, 6) for b in getattr(self, f"conv{i}")]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Stride-8 logits [N, classes, ceil(H/8), ceil(W/8)] (NCHW; the layers run channels_last)."""
        x = self.pool_s2(self.conv1(to_channels_last(x)))
        x = self.pool_s2(self.conv2(x))
        x = self.pool_s2(self.conv3(x))
        x = self.pool_s1(self.conv4(x))
        x = self.avgpool(self.pool_s1(self.conv5(x)))
        x = self.drop7(self.fc7(self.drop6(self.fc6(x))))
        return self.fc8(x).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        if not self.upsample:
            return y
        return TF.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=True)


def deeplab_largefov(num_classes: int = 21, width: float = 1.0, upsample: bool = True) -> DeepLabLargeFOV:
    """DeepLab-LargeFOV; logits at the input size (``upsample=False``: at stride 8)."""
    return DeepLabLargeFOV(num_classes, width, upsample)


class DeepLabLargeFOVCRF(torch.nn.Module):
    """DeepLab-LargeFOV, then our dense CRF on the bilinearly upsampled logits.

    ``forward(input, image)``: ``input`` [B, 3, H, W] normalised for the network, ``image`` the same
    picture in 0..255 (uint8 or float) for the bilateral kernel. Returns the marginals Q [B, classes, H, W].
    """

    def __init__(self, num_classes: int = 21, width: float = 1.0, **crf):
        super().__init__()
        settings = {**CRF_SETTINGS, **crf}
        self.config = {"num_classes": num_classes, "width": width, **crf}
        self.net = DeepLabLargeFOV(num_classes, width, upsample=True)
        self.crf = DenseCRF(num_classes, **settings)

    def forward(self, input: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.crf(self.net(input), image)


def deeplab_largefov_crf(num_classes: int = 21, width: float = 1.0, **crf) -> DeepLabLargeFOVCRF:
    """DeepLab-LargeFOV + dense CRF (10 mean-field iterations, DeepLab's VOC settings; override any
    ``DenseCRF`` argument by keyword)."""
    return DeepLabLargeFOVCRF(num_classes, width, **crf)
