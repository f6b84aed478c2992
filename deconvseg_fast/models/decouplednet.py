"""DecoupledNet (Hong, Noh & Han, NIPS 2015): classification, bridging, and a binary decoder per class.

* Classification network: VGG16's convolutions (conv+ReLU, fused) with five 2x2 stride-2 pools that
  keep their switches (packed), fc6 7x7 -> 4096, fc7 1x1 -> 4096 (ReLU, dropout), fc8 1x1 to the
  classes, averaged over positions (one score per class at 224x224) -> multi-label logits [B, C].
* Bridging layers, once per (image, present class): the class-specific saliency -- the gradient of
  that class's score with respect to pool5, obtained by back-propagating the one score -- is
  concatenated with pool5 and passed through two fully connected layers: a 7x7 convolution to 1024
  and a 7x7 transposed convolution back to pool5's size and channels (conv-BN-ReLU each).
* Decoder: DeconvNet's (unpool with the image's switches, 3x3 deconvolutions 512,512,512 |
  512,512,256 | 256,256,128 | 128,64 | 64,64, BN, ReLU), then 1x1 to 2 (background, foreground).
  All (image, class) pairs go through the decoder as one batch.

``forward(x, classes=None)`` returns ``(segmentation, class_logits)``: segmentation is
[B, C + 1, H, W] probabilities -- channel 0 background = 1 - max foreground over the present classes,
channel c + 1 the foreground probability of class c (0 where the class is absent). ``classes``
[B, C] bool selects the present classes (ground truth, say); by default a class is present when its
sigmoid score exceeds ``threshold``.
"""
from __future__ import annotations

import torch

from ._layers import ConvBlock, add_switch_decoder, channels, decode_with_switches, encode_with_switches, vgg_stages
from .deconvnet import DECODER


class DecoupledNet(torch.nn.Module):
    def __init__(self, num_classes: int = 20, width: float = 1.0, threshold: float = 0.5,
                 index_format: str = "packed"):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "threshold": threshold,
                       "index_format": index_format}
        self.num_classes = num_classes
        self.threshold = threshold
        stages = vgg_stages(width, bn=False)
        for i, blocks in enumerate(stages, 1):
            setattr(self, f"conv{i}", torch.nn.Sequential(*blocks))
        c5 = stages[-1][-1].conv.out_channels
        fc = channels(4096, width)
        self.fc6 = ConvBlock(c5, fc, 7, 0, bn=False)
        self.drop6 = torch.nn.Dropout2d(0.5)
        self.fc7 = ConvBlock(fc, fc, 1, 0, bn=False)
        self.drop7 = torch.nn.Dropout2d(0.5)
        self.fc8 = torch.nn.Conv2d(fc, num_classes, 1)
        bridge = channels(1024, width)
        self.bridge1 = ConvBlock(2 * c5, bridge, 7, 0, bn=True)
        self.bridge2 = ConvBlock(bridge, c5, 7, 0, bn=True, transposed=True)
        cin = add_switch_decoder(self, c5, DECODER, width, index_format, transposed=True)
        self.score = torch.nn.Conv2d(cin, 2, 1)

    def vgg_blocks(self) -> list[ConvBlock]:
        return [b for i in range(1, 6) for b in getattr(self, f"conv{i}")]

    def classify(self, pool5: torch.Tensor) -> torch.Tensor:
        h = self.fc8(self.drop7(self.fc7(self.drop6(self.fc6(pool5)))))
        return h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, classes: torch.Tensor | None = None):
        x, saved = encode_with_switches(self, x, "conv")
        if x.shape[-2] < 7 or x.shape[-1] < 7:
            raise ValueError(f"input: DecoupledNet needs pool5 of at least 7x7 (inputs >= 193x193), got "
                             f"pool5 {list(x.shape[-2:])}")
        B = x.shape[0]
        # Saliency: d score[b, c] / d pool5[b]. The head treats images independently, so one backward
        # of scores[:, c].sum() gives every image's saliency for class c.
        with torch.enable_grad():
            pool5 = x if (self.training and x.requires_grad) else x.detach().requires_grad_(True)
            logits = self.classify(pool5)
            present = (torch.sigmoid(logits.detach()) > self.threshold) if classes is None else classes.bool()
            pairs = present.nonzero()  # [K, 2] (image, class), row-major
            wanted = sorted(set(pairs[:, 1].tolist()))
            sal = {}
            for j, c in enumerate(wanted):
                (g,) = torch.autograd.grad(logits[:, c].sum(), pool5, create_graph=self.training,
                                           retain_graph=self.training or j + 1 < len(wanted))
                sal[c] = g
        if not self.training:
            logits = logits.detach()
        H, W = saved[0][1]
        seg = x.new_zeros((B, self.num_classes + 1, H, W))
        seg[:, 0] = 1.0
        if pairs.shape[0] == 0:
            return seg, logits
        b_idx, c_idx = pairs[:, 0], pairs[:, 1]
        g = torch.stack([sal[c][b] for b, c in pairs.tolist()])  # [K, C5, h, w]
        h = self.bridge2(self.bridge1(torch.cat([x.index_select(0, b_idx), g], 1)))
        h = decode_with_switches(self, h, saved, select=b_idx)
        fg = torch.softmax(self.score(h), 1)[:, 1]  # [K, H, W]
        seg = seg.index_put((b_idx, c_idx + 1), fg)
        flat = fg.reshape(fg.shape[0], -1)
        best = flat.new_zeros((B, flat.shape[1])).scatter_reduce(0, b_idx[:, None].expand_as(flat), flat, "amax")
        best = best.reshape(B, H, W)
        seg = torch.cat([(1.0 - best).unsqueeze(1), seg[:, 1:]], 1)
        return seg, logits


def decouplednet(num_classes: int = 20, width: float = 1.0, threshold: float = 0.5,
                 index_format: str = "packed") -> DecoupledNet:
    """DecoupledNet for PASCAL VOC's 20 object classes; ``width`` multiplies every channel count."""
    return DecoupledNet(num_classes, width, threshold, index_format)
