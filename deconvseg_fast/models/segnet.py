"""SegNet (Badrinarayanan et al.), CamVid configuration: 360x480 input, 11 classes.

Encoder: VGG16's 13 convolutions, each conv-BN-ReLU, five 2x2 stride-2 max-pools that keep their
switches (Caffe rounds pooled sizes up: ``ceil_mode=True``). Decoder: each stage unpools to the
exact pre-pool size of its mirror stage (so odd sizes round-trip) then convolves
(512,512,512 | 512,512,256 | 256,256,128 | 128,64 | 64), then a 3x3 convolution to the classes
(no BN, no ReLU). Output: logits [N, num_classes, H, W].

The switches are kept in the "packed" format (2 bits each, 1/32 of torch's int64 indices): the
switches of all five pools live from the encoder to the decoder, so they dominate what a forward
pass holds on to besides the activations.
"""
from __future__ import annotations

import torch

from ._layers import (
    ConvBlock,
    add_switch_decoder,
    decode_with_switches,
    encode_with_switches,
    to_channels_last,
    use_channels_last,
    vgg_stages,
)

DECODER = [[512, 512, 512], [512, 512, 256], [256, 256, 128], [128, 64], [64]]


class SegNet(torch.nn.Module):
    def __init__(self, num_classes: int = 11, width: float = 1.0, index_format: str = "packed"):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "index_format": index_format}
        stages = vgg_stages(width, bn=True)
        for i, blocks in enumerate(stages, 1):
            setattr(self, f"enc{i}", torch.nn.Sequential(*blocks))
        cin = add_switch_decoder(self, stages[-1][-1].conv.out_channels, DECODER, width, index_format)
        self.classifier = torch.nn.Conv2d(cin, num_classes, 3, padding=1)
        use_channels_last(self)

    def vgg_blocks(self) -> list[ConvBlock]:
        return [b for i in range(1, 6) for b in getattr(self, f"enc{i}")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, saved = encode_with_switches(self, to_channels_last(x), "enc")
        return self.classifier(decode_with_switches(self, x, saved)).contiguous()


def segnet(num_classes: int = 11, width: float = 1.0, index_format: str = "packed") -> SegNet:
    """SegNet with the CamVid head. ``width`` multiplies every channel count (1.0 = the paper's;
    tests use small values); ``index_format`` is the switch format ("packed", "window" or "flat")."""
    return SegNet(num_classes, width, index_format)
