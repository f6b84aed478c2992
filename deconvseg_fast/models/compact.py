"""CompactSegNet: a small SegNet for real-time CPU video, the default model of ``deconvseg_fast.weights``.

The SegNet recipe -- conv-BN-ReLU encoder stages, five 2x2 stride-2 max-pools that keep their
switches (ceil mode), a decoder that unpools to each stage's exact pre-pool size and convolves, a 3x3
classifier without BN -- with far fewer channels and convolutions than VGG16's:

    encoder  16 | 32, 32 | 64, 64 | 64, 64 | 64           (each followed by the switch pool)
    decoder  64 | 64, 64 | 64, 32 | 32, 16 | 16           (dec5 .. dec1, each after an unpool)
    classifier 3x3 -> num_classes

(``width`` multiplies every channel count.) At full resolution it runs only one 3->16 and one 16->16
convolution and the classifier: those dominate the cost of a 360x480 frame, so the deeper stages
can afford 64 channels. Receptive field of the bottleneck: about 200 pixels, enough to tell the
generated scenes' object classes apart by shape. Runs on deconvseg_fast's kernels: atrous
convolution with BN and ReLU fused in eval mode, packed 2-bit switches.
"""
from __future__ import annotations

import torch

from ._layers import (
    ConvBlock,
    add_switch_decoder,
    channels,
    decode_with_switches,
    encode_with_switches,
    to_channels_last,
    use_channels_last,
)

ENCODER = [[16], [32, 32], [64, 64], [64, 64], [64]]
DECODER = [[64], [64, 64], [64, 32], [32, 16], [16]]


class CompactSegNet(torch.nn.Module):
    input_normalization = "unit"  # trained on rgb / 255 (deconvseg_fast.video.segmenter.preprocess)

    def __init__(self, num_classes: int = 6, width: float = 1.0, index_format: str = "packed"):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(width, (int, float)) or isinstance(width, bool) or width <= 0:
            raise ValueError(f"width must be a positive number, got {width!r}")
        self.config = {"num_classes": num_classes, "width": width, "index_format": index_format}
        cin = 3
        for i, outs in enumerate(ENCODER, 1):
            blocks = []
            for c in outs:
                blocks.append(ConvBlock(cin, channels(c, width), 3, 1, bn=True))
                cin = channels(c, width)
            setattr(self, f"enc{i}", torch.nn.Sequential(*blocks))
        cin = add_switch_decoder(self, cin, DECODER, width, index_format)
        self.classifier = torch.nn.Conv2d(cin, num_classes, 3, padding=1)
        use_channels_last(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 3, H, W] (any H, W >= 1) -> logits [N, num_classes, H, W]."""
        x, saved = encode_with_switches(self, to_channels_last(x), "enc")
        return self.classifier(decode_with_switches(self, x, saved)).contiguous()


def compact_segnet(num_classes: int | None = None, width: float = 1.0, index_format: str = "packed") -> CompactSegNet:
    """CompactSegNet; ``num_classes`` defaults to the generated scenes' classes
    (``len(deconvseg_fast.scenes.CLASSES)``)."""
    if num_classes is None:
        from ..scenes.render import CLASSES
        num_classes = len(CLASSES)
    return CompactSegNet(num_classes, width, index_format)
