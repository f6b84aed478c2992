"""``convert(model)``: swap torch.nn layers of an existing model for deconvseg_fast's.

What is swapped (recursively, in place on a copy unless ``inplace=True``):

* ``nn.MaxPool2d`` -> ``deconvseg_fast.nn.MaxPool2d`` (same arguments);
* ``nn.MaxUnpool2d`` -> ``deconvseg_fast.nn.MaxUnpool2d``;
* ``nn.Conv2d`` with dilation > 1 -> ``deconvseg_fast.nn.AtrousConv2d`` (same parameters);
* with ``fuse`` (default: when the model is in eval mode), runs inside an ``nn.Sequential`` of
  ``Conv2d -> BatchNorm2d [-> ReLU]`` and ``Conv2d -> ReLU`` become one ``AtrousConv2d`` with the
  batch-norm folded into its weight and bias and the ReLU fused; the BN and ReLU slots become
  ``nn.Identity`` so indices into the Sequential (``features[7]``) keep their meaning. Folding uses
  the running statistics, so it is an eval-mode transformation: a folded model is not trainable
  the same way (its BN is gone).

Switch formats: by default converted pools keep ``index_format="flat"`` -- exactly torch's int64
indices, safe whatever the model does with them. ``index_format="window"`` or ``"packed"`` asks for
compact switches in every pool with ``return_indices=True`` (and dilation 1) and every unpool;
"packed" applies to 2x2 kernels and falls back to "window" for others. Use it only when each pool's
indices go to nothing but a ``MaxUnpool2d`` with the same kernel_size, stride and padding (SegNet
and DeconvNet style), because those unpools are what can decode them.
"""
from __future__ import annotations

import copy

from torch import nn

from ..nn import MaxPool2d, MaxUnpool2d


def _atrous_cls():
    try:
        from ..nn import AtrousConv2d
    except ImportError as e:  # pragma: no cover - only while the conv module is missing
        raise ImportError("convert/fuse_conv_bn need deconvseg_fast.nn.AtrousConv2d") from e
    return AtrousConv2d


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _compact(requested: str, kernel_size, dilation=1) -> str:
    k = _pair(kernel_size)
    if requested == "flat" or _pair(dilation) != (1, 1):
        return "flat"
    if requested == "packed" and k != (2, 2):
        requested = "window"
    if requested == "window" and k[0] * k[1] > 256:
        return "flat"
    return requested


def _fusable_conv(m) -> bool:
    return (type(m) is nn.Conv2d or type(m) is _atrous_cls() and getattr(m, "activation", None) is None) \
        and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, activation: str | None = None):
    """One ``AtrousConv2d`` computing ``activation(bn(conv(x)))`` with ``bn`` in eval mode:
    ``weight * s`` and ``(bias - running_mean) * s + beta``, ``s = gamma / sqrt(running_var + eps)``.
    The inputs are not modified."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"conv: groups must be 1 for AtrousConv2d, got {conv.groups}")
    if bn is not None:
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"bn must be an nn.BatchNorm2d or None, got {type(bn).__name__}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"bn: num_features {bn.num_features} != conv.out_channels {conv.out_channels}")
        if bn.running_mean is None:
            raise ValueError("bn: needs running statistics (track_running_stats=True) to be folded")
    out = _atrous_cls().from_conv(conv, bn, activation)
    return out.train(conv.training)


def _swap_leaf(m: nn.Module, index_format: str):
    t = type(m)
    if t is nn.MaxPool2d:
        fmt = _compact(index_format, m.kernel_size, m.dilation) if m.return_indices else "flat"
        new = MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, m.return_indices, m.ceil_mode,
                        index_format=fmt)
        return new.train(m.training)
    if t is nn.MaxUnpool2d:
        return MaxUnpool2d(m.kernel_size, m.stride, m.padding,
                           index_format=_compact(index_format, m.kernel_size)).train(m.training)
    if t is nn.Conv2d and any(d > 1 for d in _pair(m.dilation)) and m.groups == 1 \
            and m.padding_mode == "zeros":
        return fuse_conv_bn(m)
    return None


def _fuse_sequential(seq: nn.Sequential) -> None:
    mods = list(seq._modules.items())
    i = 0
    while i < len(mods):
        name, m = mods[i]
        if m is not None and _fusable_conv(m):
            j = i + 1
            bn = None
            if j < len(mods) and type(mods[j][1]) is nn.BatchNorm2d and not mods[j][1].training \
                    and mods[j][1].running_mean is not None and mods[j][1].num_features == m.out_channels:
                bn = mods[j][1]
                j += 1
            relu = j < len(mods) and type(mods[j][1]) is nn.ReLU
            if bn is not None or relu:
                fused = fuse_conv_bn(m, bn, "relu" if relu else None)
                seq._modules[name] = fused
                for k in range(i + 1, j + (1 if relu else 0)):
                    seq._modules[mods[k][0]] = nn.Identity()
                i = j + (1 if relu else 0)
                continue
        i += 1


def _walk(module: nn.Module, index_format: str, fuse: bool) -> None:
    if fuse and isinstance(module, nn.Sequential):
        _fuse_sequential(module)
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _swap_leaf(child, index_format)
        if new is not None:
            module._modules[name] = new
        else:
            _walk(child, index_format, fuse)


def convert(model: nn.Module, *, inplace: bool = False, index_format: str = "flat", fuse: bool | None = None
            ) -> nn.Module:
    """Return ``model`` with torch's pooling, unpooling and dilated convolutions swapped for ours
    (and, with ``fuse`` -- default: the model is in eval mode -- conv-BN-ReLU runs fused). See the
    module docstring for the rules."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if index_format not in ("flat", "window", "packed"):
        raise ValueError(f"index_format must be 'flat', 'window' or 'packed', got {index_format!r}")
    if not inplace:
        model = copy.deepcopy(model)
    fuse = (not model.training) if fuse is None else bool(fuse)
    new = _swap_leaf(model, index_format)
    if new is not None:
        return new
    _walk(model, index_format, fuse)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Prepare ``model`` for CPU inference, in place: eval mode, and every deconvseg_fast
    convolution (``AtrousConv2d``, the seed networks' blocks) reorders its weight for oneDNN once
    instead of on every call. Returns ``model``.

    The packed weights are used for float32/bfloat16 CPU calls that need no gradient (under
    ``torch.no_grad()`` / ``torch.inference_mode()``); anything else runs the plain weights.
    ``model.train()`` drops them; an in-place change torch tracks (``load_state_dict``, an
    optimizer step, ``weight.copy_``) repacks on the next call; a write it does not track (through
    ``.data`` or a NumPy view) is not seen -- call ``freeze`` again after one. Packed weights are
    never saved, copied or pickled, and GPU models are unaffected.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model.eval()
    for m in model.modules():
        pack = getattr(m, "pack_weights", None)
        if callable(pack):
            pack()
    return model
