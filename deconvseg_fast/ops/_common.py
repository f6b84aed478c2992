"""Helpers every op family's registration module shares: argument normalisation and the lazy
import of the Triton kernels (importing the package never imports triton or compiles anything)."""
from __future__ import annotations

import importlib

import torch


def pair(value, name: str) -> tuple[int, int]:
    """An int or a pair of ints as a 2-tuple, or a ValueError naming the argument."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, torch.SymInt):
        return (value, value)
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(items) == 1:
        items = items * 2
    if len(items) != 2 or not all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return (items[0], items[1])


def stride_padding_dilation(stride, padding, dilation):
    """The three 2-D window hyper-parameters as pairs, with torch's rules: stride and dilation
    positive, padding non-negative; a ValueError names the argument."""
    s, p, d = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    if min(s) <= 0:
        raise ValueError(f"stride must be positive, got {s}")
    if min(d) <= 0:
        raise ValueError(f"dilation must be positive, got {d}")
    if min(p) < 0:
        raise ValueError(f"padding must be non-negative, got {p}")
    return s, p, d


def triton_kernels(family: str):
    """deconvseg_fast.kernels.<family>, imported on first use by a CUDA launcher."""
    try:
        return importlib.import_module(f"deconvseg_fast.kernels.{family}")
    except ImportError as exc:  # pragma: no cover - needs a CUDA machine without triton
        raise RuntimeError(f"the CUDA kernels of deconvseg_fast need triton (pip install triton): {exc}") from exc
