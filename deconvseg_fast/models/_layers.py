"""Building blocks shared by the seed networks.

``ConvBlock`` is conv [-> BatchNorm] [-> ReLU] with torch's parameter layout (``conv.weight``,
``conv.bias``, ``bn.*``), so its state_dict keys are those of the pure-torch twin in
``deconvseg_fast.reference.models``. Its forward runs on ``deconvseg_fast.functional.atrous_conv2d``:

* without BN, the ReLU is the op's fused epilogue in training and eval alike;
* with BN in eval mode, the batch-norm is folded into the epilogue (``scale``/``shift`` per output
  channel, computed from the running statistics on every call -- two [C] vectors, no weight copy)
  and the ReLU fused after it: one pass over the output instead of conv, bn, relu's three;
* with BN in training mode, conv -> ``torch.nn.functional.batch_norm`` (batch statistics, running
  averages updated) -> relu, exactly torch's.

``transposed=True`` keeps an ``nn.ConvTranspose2d``'s parameters (weight ``[C_in, C_out, k, k]``,
stride 1) -- DeconvNet's "deconvolution" layers -- and runs them as the equivalent convolution:
weight transposed to ``[C_out, C_in]`` and flipped spatially, padding ``dilation * (k - 1) - padding``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as TF

from .. import functional as F
from ..nn import AtrousConv2d, MaxPool2d, MaxUnpool2d
from ..nn.conv import FreezableMixin, PackedWeight


def channels(c: int, width: float) -> int:
    """Channel count ``c`` scaled by the ``width`` multiplier (tests shrink the networks with it)."""
    return max(1, int(round(c * width)))


def atrous(x, weight, bias, stride, padding, dilation, relu: bool, scale=None, shift=None):
    """``relu?((conv(x, weight) + bias) * scale + shift)`` on our atrous-convolution op."""
    return F.atrous_conv2d(x, weight, bias, stride, padding, dilation, activation="relu" if relu else None,
                           scale=scale, shift=shift)


def use_channels_last(net: torch.nn.Module) -> torch.nn.Module:
    """Store ``net``'s 4-D weights channels_last (NHWC strides; shapes, values and state_dict keys
    unchanged). The seed networks do this and feed their layers channels_last activations
    (``to_channels_last``): oneDNN's convolutions are fastest in that layout on the CPU -- 1.4x on
    SegNet's 64-channel 360x480 layers, 1.25x at 128 channels, the same from 256 channels up --
    and the Triton convolution reads channels_last operands directly; with the weights already in
    that layout no convolution reorders its weight on every call. Our pooling ops take either
    layout."""
    return net.to(memory_format=torch.channels_last)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A 4-D activation in channels_last strides (a copy only if it is not already)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def fold_bn(bn: torch.nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch-norm as ``y * scale + shift`` (per channel)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


class ConvBlock(FreezableMixin, torch.nn.Module):
    """conv (k x k, stride 1) [-> BatchNorm2d] [-> ReLU]; see the module docstring."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1,
                 dilation: int = 1, bn: bool = True, relu: bool = True, transposed: bool = False):
        super().__init__()
        if transposed:
            self.conv = torch.nn.ConvTranspose2d(in_channels, out_channels, kernel_size, 1, padding,
                                                 dilation=dilation)
        else:
            # Without BN the ReLU is the conv's fused epilogue (the module runs it itself).
            self.conv = AtrousConv2d(in_channels, out_channels, kernel_size, 1, padding, dilation=dilation,
                                     activation="relu" if relu and not bn else None)
        self.bn = torch.nn.BatchNorm2d(out_channels) if bn else None
        self.relu = relu
        self.transposed = transposed

    def _as_conv(self) -> bool:
        # A stride-1 transposed convolution is a convolution with padding d (k - 1) - p. That is the
        # same work when the padding does not grow (DeconvNet's 3x3 deconvolutions); fc6-deconv's
        # 7x7 on a 1x1 input would convolve 49 times as many zeros, so it stays a transposed conv.
        c = self.conv
        return not self.transposed or all(d * (k - 1) - p <= p for d, k, p in zip(c.dilation, c.kernel_size, c.padding))

    @staticmethod
    def _flip(w: torch.Tensor) -> torch.Tensor:
        """[C_in, C_out, k, k] -> [C_out, C_in, k, k] flipped in space, in ``w``'s memory format."""
        if w.is_contiguous() or not w.is_contiguous(memory_format=torch.channels_last):
            return w.transpose(0, 1).flip(-2, -1).contiguous()
        # channels_last memory is [C_in][kh kw][C_out]: flipping both spatial axes reverses the middle
        # index, then one transpose gives [C_out][kh kw][C_in] -- twice as fast as flip + contiguous.
        ci, co, kh, kw = w.shape
        m = w.permute(0, 2, 3, 1).reshape(ci, kh * kw, co).flip(1)
        return m.permute(2, 1, 0).contiguous().view(co, kh, kw, ci).permute(0, 3, 1, 2)

    def pack_weights(self) -> "ConvBlock":
        """For ``deconvseg_fast.freeze``: a transposed block packs its transposed-and-flipped
        weight (the plain blocks' AtrousConv2d packs its own)."""
        if self.transposed and self._as_conv():
            c = self.conv
            self._pack = PackedWeight(c.stride, self._conv_padding(), c.dilation)
        return self

    def _conv_padding(self):
        c = self.conv
        if not self.transposed:
            return c.padding
        return tuple(d * (k - 1) - p for d, k, p in zip(c.dilation, c.kernel_size, c.padding))

    def _conv_args(self, x: torch.Tensor):
        c = self.conv
        if not self.transposed:
            w = c.packed_weight(x)
        elif self._pack is not None and not self.training:
            w = self._pack.get(c.weight, lambda: self._flip(c.weight.detach()), x, c.weight, c.bias)
        else:
            w = None
        if w is None:
            w = self._flip(c.weight) if self.transposed else c.weight
        return w, c.bias, c.stride, self._conv_padding(), c.dilation

    def _outer_product(self, x: torch.Tensor) -> torch.Tensor | None:
        """A stride-1, unpadded transposed convolution of a 1x1 input (DeconvNet's fc6-deconv: 7x7
        from 1x1) is one matrix product, [N, C_in] x [C_in, C_out k k], with the weight flattened in
        its own memory order (a view). oneDNN's transposed convolution reorders the whole weight
        (411 MB for fc6-deconv) on every call instead: about 250 ms against 30 ms on 2 cores."""
        c = self.conv
        w = c.weight
        if x.dim() != 4 or tuple(x.shape[-2:]) != (1, 1) or tuple(c.stride) != (1, 1) or any(c.padding) \
                or any(c.output_padding) or tuple(c.dilation) != (1, 1) or x.dtype != w.dtype:
            return None
        n, ci = x.shape[:2]
        co, kh, kw = w.shape[1:]
        x2 = x.reshape(n, ci)
        if w.is_contiguous():  # memory [C_in][C_out][kh][kw]
            y = x2 @ w.reshape(ci, co * kh * kw)
            if c.bias is not None:
                y = y + c.bias.repeat_interleave(kh * kw)
            return y.view(n, co, kh, kw)
        if w.is_contiguous(memory_format=torch.channels_last):  # memory [C_in][kh][kw][C_out]
            y = x2 @ w.permute(0, 2, 3, 1).reshape(ci, kh * kw * co)
            if c.bias is not None:
                y = y + c.bias.repeat(kh * kw)
            return y.view(n, kh, kw, co).permute(0, 3, 1, 2)
        return None

    def _transposed_forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        y = self._outer_product(x)
        if y is None:
            y = TF.conv_transpose2d(x, c.weight, c.bias, c.stride, c.padding, c.output_padding, 1, c.dilation)
        if self.bn is not None:
            y = self.bn(y)
        return torch.relu(y) if self.relu else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is None and not self.transposed:
            return self.conv(x)
        if not self._as_conv():
            return self._transposed_forward(x)
        w, b, stride, pad, dil = self._conv_args(x)
        if self.bn is None:
            return atrous(x, w, b, stride, pad, dil, self.relu)
        if not self.training:
            scale, shift = fold_bn(self.bn)
            return atrous(x, w, b, stride, pad, dil, self.relu, scale, shift)
        y = atrous(x, w, b, stride, pad, dil, False)
        bn = self.bn
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        y = TF.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, momentum, bn.eps)
        return torch.relu(y) if self.relu else y

    def extra_repr(self) -> str:
        return f"relu={self.relu}, transposed={self.transposed}"


def vgg_stages(width: float, bn: bool, dilation5: int = 1, pad1: int = 1) -> list[list[ConvBlock]]:
    """VGG16's 13 convolutions as five stages of ConvBlocks (64,64 | 128,128 | 256 x3 | 512 x3 | 512 x3)."""
    cfg = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
    stages, cin = [], 3
    for s, outs in enumerate(cfg):
        blocks = []
        for j, c in enumerate(outs):
            cout = channels(c, width)
            d = dilation5 if s == 4 else 1
            p = pad1 if (s == 0 and j == 0) else d
            blocks.append(ConvBlock(cin, cout, 3, p, d, bn=bn))
            cin = cout
        stages.append(blocks)
    return stages


def add_switch_decoder(net: torch.nn.Module, cin: int, stages: list[list[int]], width: float, index_format: str,
                       transposed: bool = False) -> int:
    """Give ``net`` the 2x2 pool that keeps its switches (``net.pool``, Caffe's ceil mode), its
    unpool, and decoder stages ``dec5..dec1`` of 3x3 conv-BN-ReLU blocks with the output channels
    ``stages`` lists (first list: dec5). ``transposed``: the blocks keep ConvTranspose2d parameters
    (DeconvNet's "deconvolutions"). Returns the last stage's channels."""
    for i, outs in zip((5, 4, 3, 2, 1), stages):
        blocks = []
        for c in outs:
            blocks.append(ConvBlock(cin, channels(c, width), 3, 1, bn=True, transposed=transposed))
            cin = channels(c, width)
        setattr(net, f"dec{i}", torch.nn.Sequential(*blocks))
    net.pool = MaxPool2d(2, 2, ceil_mode=True, return_indices=True, index_format=index_format)
    net.unpool = MaxUnpool2d(2, 2, index_format=index_format)
    return cin


def encode_with_switches(net: torch.nn.Module, x: torch.Tensor, prefix: str):
    """The five VGG stages ``{prefix}1..5``, each followed by ``net.pool``; returns pool5 and, per
    stage, (switches, pre-pool size) -- the size lets the decoder unpool odd sizes exactly."""
    saved = []
    for i in range(1, 6):
        x = getattr(net, f"{prefix}{i}")(x)
        size = x.shape[-2:]
        x, switches = net.pool(x)
        saved.append((switches, size))
    return x, saved


def decode_with_switches(net: torch.nn.Module, x: torch.Tensor, saved, select: torch.Tensor | None = None):
    """The mirror of encode_with_switches: ``net.unpool`` then stage ``dec{i}`` for i = 5..1.
    ``select`` picks, per decoded row, the batch row whose switches it uses (DecoupledNet decodes
    one row per (image, class) pair)."""
    for i in range(5, 0, -1):
        switches, size = saved[i - 1]
        if select is not None:
            switches = switches.index_select(0, select)
        x = getattr(net, f"dec{i}")(net.unpool(x, switches, output_size=size))
    return x
