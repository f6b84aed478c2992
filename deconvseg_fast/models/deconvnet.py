"""DeconvNet (Noh, Hong & Han, ICCV 2015) and EDeconvNet (+ FCN-8s, then the dense CRF).

DeconvNet: VGG16-BN encoder with five 2x2 stride-2 pools that keep their switches (packed, 2 bits
each; ``ceil_mode=True`` as Caffe), fc6 7x7 -> 4096 and fc7 1x1 -> 4096 (each conv-BN-ReLU), fc6-deconv
7x7 -> 512 (a transposed convolution: 1x1 -> 7x7 at 224x224, conv-BN-ReLU), then unpool5 ... unpool1,
each to the exact pre-pool size, each followed by 3x3 deconvolutions (512,512,512 | 512,512,256 |
256,256,128 | 128,64 | 64,64) with BN and ReLU, and a 1x1 convolution to the classes.

The network is trained and run on 224x224 object proposals; ``forward`` takes such crops. Any size
whose pool5 is at least 7x7 (>= 193 pixels per side) works, odd ones included.
``segment_instances`` is the paper's instance-wise inference (section 5.1): crop each caller box,
resize it to 224x224, segment it, and aggregate the score maps into the image by pixel-wise max or
sum with ``functional.paste_aggregate``.
"""
from __future__ import annotations

import torch

from .. import functional as F
from ..nn import DenseCRF
from ._layers import (
    ConvBlock,
    add_switch_decoder,
    channels,
    decode_with_switches,
    encode_with_switches,
    to_channels_last,
    use_channels_last,
    vgg_stages,
)

DECODER = [[512, 512, 512], [512, 512, 256], [256, 256, 128], [128, 64], [64, 64]]
PROPOSAL_SIZE = 224


def crop_proposals(image: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor | None,
                   size: int = PROPOSAL_SIZE) -> torch.Tensor:
    """Crops [P, C, size, size] of ``image`` [B, C, H, W] at ``boxes`` [P, 4] (x1, y1, x2, y2), batched
    (two gathers, no per-box loop).

    A box is rounded outwards to the pixels it touches (as ``paste_aggregate`` does, so a crop and its
    paste cover the same pixels) and resized like ``F.interpolate(image[..., y_lo:y_hi, x_lo:x_hi],
    size, mode="bilinear", align_corners=False)``; pixels of a box outside the image replicate the
    border.
    """
    B, C, H, W = image.shape
    P = boxes.shape[0]
    idx = (torch.zeros(P, dtype=torch.long, device=image.device) if image_index is None
           else image_index.to(device=image.device, dtype=torch.long))
    b = boxes.detach().to(device=image.device, dtype=torch.float64)
    lo = torch.floor(b[:, :2]).long()  # [P, 2] (x_lo, y_lo)
    hi = torch.maximum(torch.ceil(b[:, 2:]).long(), lo + 1)  # at least one pixel
    # F.interpolate(align_corners=False)'s taps in the box, in its arithmetic (float32 for
    # float32/16 images, float64 for float64): src = (n / size) * (i + 0.5) - 0.5, clamped at 0.
    acc = torch.float64 if image.dtype == torch.float64 else torch.float32
    n = (hi - lo).to(acc)  # [P, 2] box width, height
    t = torch.arange(size, device=image.device, dtype=acc) + 0.5
    src = ((n / size)[:, :, None] * t - 0.5).clamp_min(0)  # [P, 2, size]
    i0 = src.long()  # floor (src >= 0)
    i0 = torch.minimum(i0, (hi - lo - 1)[:, :, None])
    lam = (src - i0.to(acc)).clamp(0, 1)
    i1 = torch.minimum(i0 + 1, (hi - lo - 1)[:, :, None])
    # Absolute pixel indices, border-replicated where the box leaves the image.
    lim = torch.tensor([W - 1, H - 1], device=image.device)[None, :, None]
    a0 = (lo[:, :, None] + i0).clamp(min=0).minimum(lim)
    a1 = (lo[:, :, None] + i1).clamp(min=0).minimum(lim)
    src_img = image.index_select(0, idx).to(acc)  # [P, C, H, W]

    def rows(a):  # [P, size] row indices -> [P, C, size, W]
        return src_img.gather(2, a[:, None, :, None].expand(P, C, size, W))

    ly = lam[:, 1][:, None, :, None]
    r = rows(a0[:, 1]) * (1 - ly) + rows(a1[:, 1]) * ly  # [P, C, size, W]

    def cols(a):
        return r.gather(3, a[:, None, None, :].expand(P, C, size, size))

    lx = lam[:, 0][:, None, None, :]
    return (cols(a0[:, 0]) * (1 - lx) + cols(a1[:, 0]) * lx).to(image.dtype)


class DeconvNet(torch.nn.Module):
    def __init__(self, num_classes: int = 21, width: float = 1.0, index_format: str = "packed"):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "index_format": index_format}
        stages = vgg_stages(width, bn=True)
        for i, blocks in enumerate(stages, 1):
            setattr(self, f"enc{i}", torch.nn.Sequential(*blocks))
        c5 = stages[-1][-1].conv.out_channels
        fc = channels(4096, width)
        self.fc6 = ConvBlock(c5, fc, 7, 0, bn=True)
        self.fc7 = ConvBlock(fc, fc, 1, 0, bn=True)
        self.fc6_deconv = ConvBlock(fc, c5, 7, 0, bn=True, transposed=True)
        cin = add_switch_decoder(self, c5, DECODER, width, index_format, transposed=True)
        self.score = torch.nn.Conv2d(cin, num_classes, 1)
        use_channels_last(self)

    def vgg_blocks(self) -> list[ConvBlock]:
        return [b for i in range(1, 6) for b in getattr(self, f"enc{i}")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Proposal-level forward: crops [P, 3, 224, 224] (normalised) -> logits [P, classes, 224, 224]."""
        x, saved = encode_with_switches(self, to_channels_last(x), "enc")
        if x.shape[-2] < 7 or x.shape[-1] < 7:
            raise ValueError(f"input: DeconvNet needs pool5 of at least 7x7 (inputs >= 193x193), got "
                             f"pool5 {list(x.shape[-2:])}")
        x = self.fc6_deconv(self.fc7(self.fc6(x)))
        return self.score(decode_with_switches(self, x, saved)).contiguous()

    @torch.no_grad()
    def segment_instances(self, image: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor | None = None,
                          mode: str = "max", batch_size: int = 16) -> torch.Tensor:
        """Instance-wise inference: image [B, 3, H, W] (normalised), boxes [P, 4] (x1, y1, x2, y2),
        image_index [P] (default: all from image 0) -> aggregated scores [B, classes, H, W].

        Each box is cropped and resized to 224x224, segmented, and its score map pasted back into
        its box; overlapping pastes are combined by pixel-wise ``mode`` ("max" or "sum"). Pixels no
        box covers are 0 (pass the whole image as one of the boxes to cover every pixel)."""
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must be [P, 4] (x1, y1, x2, y2), got {list(boxes.shape)}")
        idx = (torch.zeros(boxes.shape[0], dtype=torch.long, device=image.device) if image_index is None
               else image_index.to(device=image.device, dtype=torch.long))
        crops = crop_proposals(image, boxes, idx)
        if crops.shape[0]:
            scores = torch.cat([self(c) for c in crops.split(batch_size)])
        else:
            scores = crops.new_zeros((0, self.score.out_channels, PROPOSAL_SIZE, PROPOSAL_SIZE))
        B, _, H, W = image.shape
        return F.paste_aggregate(scores, boxes.to(scores.dtype), idx, (B, H, W), mode, fill=0.0)


def deconvnet(num_classes: int = 21, width: float = 1.0, index_format: str = "packed") -> DeconvNet:
    """DeconvNet for PASCAL VOC (21 classes incl. background). ``width`` multiplies every channel
    count (1.0 = the paper's; tests use small values)."""
    return DeconvNet(num_classes, width, index_format)


class EDeconvNet(torch.nn.Module):
    """EDeconvNet: the average of DeconvNet's and FCN-8s' class probabilities, then the dense CRF.

    ``forward(input, image, boxes=None, image_index=None, mode="max")``: ``input`` [B, 3, H, W] is
    the normalised image both networks see, ``image`` [B, 3, H, W] the same image in 0..255 (uint8 or
    float) for the CRF's bilateral kernel. With ``boxes`` DeconvNet runs instance-wise
    (``DeconvNet.segment_instances``) and its aggregated scores are turned into probabilities;
    without, it runs on the whole image (H, W >= 193). Returns the CRF marginals [B, classes, H, W].
    """

    def __init__(self, num_classes: int = 21, width: float = 1.0, crf_iterations: int = 10):
        super().__init__()
        from .fcn import FCN8s

        self.config = {"num_classes": num_classes, "width": width, "crf_iterations": crf_iterations}
        self.deconvnet = DeconvNet(num_classes, width)
        self.fcn = FCN8s(num_classes, width)
        self.crf = DenseCRF(num_classes, iterations=crf_iterations)

    def probabilities(self, input: torch.Tensor, boxes=None, image_index=None, mode: str = "max") -> torch.Tensor:
        if boxes is None:
            deconv = self.deconvnet(input)
        else:
            deconv = self.deconvnet.segment_instances(input, boxes, image_index, mode)
        return 0.5 * (torch.softmax(deconv, 1) + torch.softmax(self.fcn(input), 1))

    def forward(self, input: torch.Tensor, image: torch.Tensor, boxes=None, image_index=None,
                mode: str = "max") -> torch.Tensor:
        p = self.probabilities(input, boxes, image_index, mode)
        # The CRF takes logits; log p is one (softmax(log p) = p). The clamp keeps it finite.
        return self.crf(torch.log(p.clamp_min(1e-8)), image)


def edeconvnet(num_classes: int = 21, width: float = 1.0, crf_iterations: int = 10) -> EDeconvNet:
    """EDeconvNet (DeconvNet + FCN-8s probability average, then the dense CRF)."""
    return EDeconvNet(num_classes, width, crf_iterations)
