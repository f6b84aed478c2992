"""Weights: torchvision-format VGG16 / VGG16-BN state dicts into the encoders, and our checkpoints.

Nothing is downloaded: every function takes a local path (read with ``torch.load(weights_only=True)``)
or an already loaded state dict.

torchvision's layout: ``features.{i}.weight/bias`` for the 13 convolutions (VGG16: i = 0, 2, 5, 7,
10, 12, 14, 17, 19, 21, 24, 26, 28; VGG16-BN: i = 0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40
with the BatchNorm at i + 1), ``classifier.0`` (fc6, Linear 25088 -> 4096), ``classifier.3`` (fc7,
4096 -> 4096), ``classifier.6`` (fc8, 1000 ImageNet classes: never loaded).

How each model takes them:
* convolutions: copied in order into the model's 13 VGG blocks. BN statistics and affine go into
  the model's BN where it has one; a BN source into a BN-free model (DeepLab, FCN, DecoupledNet) is
  folded into the convolution; a BN-free source leaves a BN model's BN at its initial values.
* fc6 / fc7 (FCN-8s, DeconvNet, DecoupledNet's classifier): reshaped into convolutions,
  fc6 [4096, 25088] -> [4096, 512, 7, 7], fc7 [4096, 4096] -> [4096, 4096, 1, 1].
* DeepLab-LargeFOV (1024 channels, 3x3 fc6 with dilation 12) by decimation, as its authors did:
  fc6 keeps every 4th output filter (0, 4, ..., 4092) and every 3rd spatial tap of the 7x7 kernel
  (rows and columns 0, 3, 6): [4096, 512, 7, 7] -> [1024, 512, 3, 3]. VGG's fc6 sees pool5 at
  stride 32; LargeFOV's pool5 is at stride 8, so the dense 7x7 kernel corresponds to dilation 4, and
  keeping every 3rd tap of it to dilation 4 x 3 = 12. fc7 keeps every 4th output and every 4th input
  ([4096, 4096] -> [1024, 1024, 1, 1]) -- the inputs that survive are exactly fc6's kept outputs.
  Biases are decimated with their outputs. No rescaling (the network is fine-tuned afterwards).
"""
from __future__ import annotations

import os

import torch

VGG16_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
VGG16_BN_CONVS = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def _as_state_dict(source) -> dict:
    if isinstance(source, (str, os.PathLike)):
        source = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(source, dict):
        raise TypeError(f"source must be a path or a state dict, got {type(source).__name__}")
    return source


def _target(model: torch.nn.Module):
    """The network holding the VGG layers (EDeconvNet: its DeconvNet; the CRF wrappers: their net)."""
    for name in ("net", "deconvnet"):
        if hasattr(model, name) and not hasattr(model, "vgg_blocks"):
            return getattr(model, name)
    if not hasattr(model, "vgg_blocks"):
        raise TypeError(f"model: {type(model).__name__} has no VGG encoder to load into")
    return model


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"state dict: {name} has shape {list(src.shape)}, the model expects {list(dst.shape)} "
                         f"(width multipliers other than 1.0 cannot take VGG16 weights)")
    with torch.no_grad():
        dst.copy_(src)


def load_vgg16(model: torch.nn.Module, source, *, fc: bool = True) -> torch.nn.Module:
    """Load a torchvision ``vgg16`` or ``vgg16_bn`` state dict (path or dict) into ``model``'s encoder.

    BN-ness of the source is detected from its keys. ``fc=False`` skips fc6/fc7. Returns ``model``.
    For EDeconvNet, load the two members separately (``load_vgg16(m.deconvnet, ...)``,
    ``load_vgg16(m.fcn, ...)``); this function loads its DeconvNet.
    """
    sd = _as_state_dict(source)
    net = _target(model)
    has_bn = "features.1.running_mean" in sd
    idx = VGG16_BN_CONVS if has_bn else VGG16_CONVS
    missing = [f"features.{i}.weight" for i in idx if f"features.{i}.weight" not in sd]
    if missing:
        raise KeyError(f"state dict: not a torchvision vgg16{'_bn' if has_bn else ''} state dict, missing {missing[:3]}")
    blocks = net.vgg_blocks()
    with torch.no_grad():
        for block, i in zip(blocks, idx):
            w, b = sd[f"features.{i}.weight"], sd[f"features.{i}.bias"]
            if has_bn and block.bn is None:
                g = sd[f"features.{i + 1}.weight"]
                var, mean, beta = (sd[f"features.{i + 1}.{k}"] for k in ("running_var", "running_mean", "bias"))
                scale = g * torch.rsqrt(var + 1e-5)  # torchvision's BatchNorm2d eps
                w, b = w * scale.reshape(-1, 1, 1, 1), (b - mean) * scale + beta
            _copy(block.conv.weight, w, f"features.{i}.weight")
            _copy(block.conv.bias, b, f"features.{i}.bias")
            if has_bn and block.bn is not None:
                for k in _BN_KEYS:
                    _copy(getattr(block.bn, k), sd[f"features.{i + 1}.{k}"], f"features.{i + 1}.{k}")
        if fc and hasattr(net, "fc6") and "classifier.0.weight" in sd:
            _load_fc(net, sd)
    return model


def _load_fc(net, sd) -> None:
    w6, b6 = sd["classifier.0.weight"], sd["classifier.0.bias"]
    w7, b7 = sd["classifier.3.weight"], sd["classifier.3.bias"]
    fc6, fc7 = net.fc6.conv, net.fc7.conv
    w6 = w6.reshape(w6.shape[0], -1, 7, 7)
    if tuple(fc6.kernel_size) == (3, 3):  # DeepLab-LargeFOV: decimate (module docstring)
        w6, b6 = w6[::4, :, ::3, ::3], b6[::4]
        w7, b7 = w7[::4, ::4], b7[::4]
    _copy(fc6.weight, w6, "classifier.0.weight")
    _copy(fc6.bias, b6, "classifier.0.bias")
    _copy(fc7.weight, w7.reshape(w7.shape[0], w7.shape[1], 1, 1), "classifier.3.weight")
    _copy(fc7.bias, b7, "classifier.3.bias")


def _builders() -> dict:
    from . import (compact_segnet, deconvnet, decouplednet, deeplab_largefov, deeplab_largefov_crf, edeconvnet,
                   fcn8s, segnet)
    return {f.__name__: f for f in (segnet, deconvnet, deeplab_largefov, deeplab_largefov_crf, fcn8s,
                                    edeconvnet, decouplednet, compact_segnet)}


_CLASS_TO_BUILDER = {"SegNet": "segnet", "DeconvNet": "deconvnet", "DeepLabLargeFOV": "deeplab_largefov",
                     "DeepLabLargeFOVCRF": "deeplab_largefov_crf", "FCN8s": "fcn8s",
                     "EDeconvNet": "edeconvnet", "DecoupledNet": "decouplednet",
                     "CompactSegNet": "compact_segnet"}


def save_checkpoint(model: torch.nn.Module, path) -> None:
    """Save ``{"arch", "config", "state_dict"}`` -- plain tensors and Python literals, so
    ``torch.load(weights_only=True)`` reads it back."""
    arch = _CLASS_TO_BUILDER.get(type(model).__name__)
    if arch is None or not hasattr(model, "config"):
        raise TypeError(f"model: save_checkpoint takes a deconvseg_fast.models network, got {type(model).__name__}")
    torch.save({"arch": arch, "config": dict(model.config), "state_dict": model.state_dict()}, path)


def load_checkpoint(path, map_location="cpu") -> torch.nn.Module:
    """Rebuild the network a ``save_checkpoint`` file describes and load its weights (eval mode)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or "arch" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"path: {path} is not a deconvseg_fast checkpoint (no 'arch'/'state_dict')")
    builders = _builders()
    if ckpt["arch"] not in builders:
        raise ValueError(f"path: unknown arch {ckpt['arch']!r}; known: {sorted(builders)}")
    model = builders[ckpt["arch"]](**ckpt.get("config", {}))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
