"""``AtrousConv2d``: ``torch.nn.Conv2d`` (groups = 1) running ``deconvseg::atrous_conv2d``, plus
``activation`` and an optional folded batch-norm.

It subclasses ``nn.Conv2d``: same constructor arguments and defaults, same parameters and
state_dict keys (``weight``, ``bias``), so weights load either way and ``isinstance(m, nn.Conv2d)``
still holds. ``AtrousConv2d.from_conv(conv, bn, activation="relu")`` turns a conv -> BN -> ReLU run
into one module.
"""
from __future__ import annotations

import torch

from .. import functional as F
from ..ops.conv import can_pack, check_activation, pack_weight


class PackedWeight:
    """A convolution weight reordered for oneDNN (``deconvseg_fast.functional.pack_conv_weight``),
    held by a frozen module (``deconvseg_fast.freeze``) for CPU inference.

    ``get(source, make, input, *operands)`` returns the packed weight when it may be used for this
    call -- CPU float32/bfloat16 (bfloat16 where the CPU can pack it: ``ops.conv.can_pack``), no
    gradient asked for, not under torch.compile -- and ``None`` otherwise (the module then runs its
    plain weight). A pack is made per input size (oneDNN
    picks the layout for it; the last ``MAX_SIZES`` sizes are kept) from ``make()``, a dense copy
    of the weight. ``source`` is the parameter the packs come from: when its version counter or
    storage changes (``load_state_dict``, an optimizer step, any in-place op torch tracks) they
    are rebuilt. Writes torch does not track (through ``.data`` or a NumPy view) are not seen:
    that is what freezing means, as in ``torch.jit.freeze``. Packs are never saved, copied or
    pickled with the module.
    """

    MAX_SIZES = 4

    def __init__(self, stride, padding, dilation):
        self.geometry = (tuple(stride), tuple(padding), tuple(dilation))
        self.key = None
        self.packs: dict[tuple, torch.Tensor] = {}

    def get(self, source: torch.Tensor, make, input: torch.Tensor, *operands) -> torch.Tensor | None:
        if torch.compiler.is_compiling() or source.device.type != "cpu" or not can_pack(source.dtype) \
                or input.dtype != source.dtype or input.dim() != 4:
            return None
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, *operands)):
            return None
        if input.is_contiguous() or not input.is_contiguous(memory_format=torch.channels_last):
            return None  # NCHW: oneDNN's packed convolution answers NHWC and loses the copy back
        # inference tensors keep no version counter: their packs follow the storage only
        version = None if source.is_inference() else source._version
        key = (source.data_ptr(), version, source.dtype, tuple(source.shape))
        if self.key != key:
            self.packs.clear()
            self.key = key
        size = tuple(input.shape)
        packed = self.packs.pop(size, None)
        if packed is None:
            if len(self.packs) >= self.MAX_SIZES:
                self.packs.pop(next(iter(self.packs)))
            stride, padding, dilation = self.geometry
            packed = pack_weight(make(), stride, padding, dilation, input_size=size)
        self.packs[size] = packed  # most recently used last
        return packed


class FreezableMixin:
    """What ``deconvseg_fast.freeze`` needs from a module: ``pack_weights()`` makes ``self._pack``;
    ``train()``, a device/dtype move and ``load_state_dict`` keep working, and the pack never
    travels in a copy, a pickle or a state_dict."""

    _pack: PackedWeight | None = None

    def train(self, mode: bool = True):
        if mode:
            self._pack = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._pack = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = dict(super().__getstate__())  # nn.Module's own __getstate__ (a copy is popped)
        state.pop("_pack", None)
        return state


class AtrousConv2d(FreezableMixin, torch.nn.Conv2d):
    """Drop-in for ``nn.Conv2d`` with ``activation=None | "relu"`` fused into the convolution.

    ``bn_scale`` / ``bn_shift`` are optional ``[out_channels]`` buffers (``None`` by default, and
    then absent from the state_dict): when set, the output is
    ``act((conv(x) + bias) * bn_scale + bn_shift)``, an eval-mode batch-norm folded into the
    convolution's epilogue. ``from_conv`` fills them (or folds the batch-norm into the weights).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, activation: str | None = None):
        if groups != 1:
            raise ValueError(f"groups must be 1 (AtrousConv2d has no grouped convolution), got {groups}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        for name, v in (("stride", self.stride), ("dilation", self.dilation)):
            if min(v) <= 0:
                raise ValueError(f"{name} must be positive, got {tuple(v)}")
        if not isinstance(self.padding, str) and min(self.padding) < 0:
            raise ValueError(f"padding must be non-negative, got {tuple(self.padding)}")
        check_activation(activation)
        self.activation = activation
        self.register_buffer("bn_scale", None)
        self.register_buffer("bn_shift", None)

    def set_folded_batch_norm(self, scale: torch.Tensor | None, shift: torch.Tensor | None) -> "AtrousConv2d":
        """Set (or clear, with None) the epilogue's per-channel scale and shift buffers."""
        for name, v in (("scale", scale), ("shift", shift)):
            if v is not None and (not isinstance(v, torch.Tensor) or v.shape != (self.out_channels,)):
                raise ValueError(f"{name} must be a tensor of shape [{self.out_channels}], got "
                                 f"{getattr(v, 'shape', type(v).__name__)}")
        self.bn_scale = None if scale is None else scale.detach().clone()
        self.bn_shift = None if shift is None else shift.detach().clone()
        return self

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            # as nn.Conv2d: pad with the mode first, then convolve without padding
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        weight = self.packed_weight(input)
        if weight is None:
            weight = self.weight
        return F.atrous_conv2d(input, weight, self.bias, self.stride, padding, self.dilation,
                               activation=self.activation, scale=self.bn_scale, shift=self.bn_shift)

    def pack_weights(self) -> "AtrousConv2d":
        """Reorder the weight once for oneDNN; eval-mode CPU float32/bfloat16 calls without
        gradients then skip the per-call reorder (``deconvseg_fast.freeze`` calls this)."""
        if isinstance(self.padding, str) or self.padding_mode != "zeros":
            return self  # padding resolved per call: keep the plain weight
        self._pack = PackedWeight(self.stride, self.padding, self.dilation)
        return self

    def packed_weight(self, input: torch.Tensor) -> torch.Tensor | None:
        """The packed weight this call may use, or None (not frozen, training, gradients, GPU...)."""
        if self._pack is None or self.training:
            return None
        return self._pack.get(self.weight, lambda: self.weight, input, self.weight, self.bias)

    def extra_repr(self) -> str:
        extra = super().extra_repr() + f", activation={self.activation!r}"
        if self.bn_scale is not None or self.bn_shift is not None:
            extra += ", folded_bn=True"
        return extra

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d | None = None,
                  activation: str | None = None, fold_into_weight: bool = True) -> "AtrousConv2d":
        """An ``AtrousConv2d`` computing ``act(bn(conv(x)))`` with ``bn`` in eval mode.

        ``fold_into_weight=True`` (default) scales the weights and bias (``w * s``,
        ``(b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``): the result is a plain conv
        whose state_dict loads into ``nn.Conv2d``. ``False`` keeps ``conv``'s weights and puts ``s``
        and ``beta - mean * s`` in the ``bn_scale``/``bn_shift`` buffers (the epilogue applies them
        after the accumulation, the same arithmetic as torch's eval batch-norm). The new module
        copies the tensors (it shares nothing with ``conv``/``bn``) and is on their device/dtype.
        """
        if not isinstance(conv, torch.nn.Conv2d):
            raise ValueError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"conv must have groups 1 (AtrousConv2d has no grouped convolution), got {conv.groups}")
        check_activation(activation)
        weight = conv.weight.detach()
        out = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  1, conv.bias is not None or (bn is not None and fold_into_weight), conv.padding_mode,
                  device=weight.device, dtype=weight.dtype, activation=activation)
        bias = conv.bias.detach() if conv.bias is not None else None
        with torch.no_grad():
            if bn is None:
                out.weight.copy_(weight)
                if bias is not None:
                    out.bias.copy_(bias)
                return out
            scale, shift = _bn_scale_shift(bn, conv.out_channels)
            if fold_into_weight:
                out.weight.copy_((weight.double() * scale.view(-1, 1, 1, 1)).to(weight.dtype))
                b = bias.double() if bias is not None else torch.zeros_like(scale)
                out.bias.copy_((b * scale + shift).to(weight.dtype))
            else:
                out.weight.copy_(weight)
                if bias is not None:
                    out.bias.copy_(bias)
                out.set_folded_batch_norm(scale.float(), shift.float())
        return out


def _bn_scale_shift(bn, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch-norm as y = x * scale + shift, in float64."""
    if not isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
        raise ValueError(f"bn must be a torch.nn.BatchNorm2d, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn must track running statistics (track_running_stats=True) to be folded")
    if bn.num_features != channels:
        raise ValueError(f"bn must have num_features = {channels} (the conv's out_channels), got {bn.num_features}")
    mean, var = bn.running_mean.detach().double(), bn.running_var.detach().double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift
