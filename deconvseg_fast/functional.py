"""Public functions with torch-compatible signatures.

``max_pool2d`` and ``max_unpool2d`` take the same arguments, with the same defaults, as
``torch.nn.functional``'s, plus ``index_format`` (see docs/switches.md):

* ``"flat"``   int64 ``h*W + w`` switches, bit-identical to torch's ``return_indices``;
* ``"window"`` uint8 position inside the window (1/8 of torch's memory);
* ``"packed"`` 2 bits per switch for 2x2 windows (1/32 of torch's memory).
"""
from __future__ import annotations

import torch

from .ops import pooling as _pooling

__all__ = ["max_pool2d", "max_unpool2d"]

_ops = torch.ops.deconvseg


def _as_batched(input: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() == 3:
        return input.unsqueeze(0), True
    if input.dim() != 4:
        raise ValueError(f"{name} must be a 3-D (C, H, W) or 4-D (N, C, H, W) tensor, got {input.dim()} dims")
    return input, False


def _internal_format(kernel_size: tuple[int, int]) -> str:
    # Switches that are only kept for autograd use the smallest format that fits the window.
    if kernel_size == (2, 2):
        return "packed"
    return "window" if kernel_size[0] * kernel_size[1] <= 256 else "flat"


def max_pool2d(
    input: torch.Tensor,
    kernel_size,
    stride=None,
    padding=0,
    dilation=1,
    ceil_mode: bool = False,
    return_indices: bool = False,
    index_format: str = "flat",
):
    """Max-pool that returns its switches in the same pass.

    Same as ``torch.nn.functional.max_pool2d``; with ``return_indices=True`` also returns the
    switches in ``index_format``.
    """
    x, squeeze = _as_batched(input, "input")
    _pooling.check_float(x, "input")
    g = _pooling.geometry(kernel_size, stride, padding, dilation, index_format)
    _pooling.pool_output_hw(x, g, ceil_mode)
    fmt = index_format if return_indices else _internal_format(g.kernel_size)
    values, switches = _ops.max_pool2d_switches.default(x, *g.args(), bool(ceil_mode), fmt)
    if squeeze:
        values, switches = values.squeeze(0), switches.squeeze(0)
    return (values, switches) if return_indices else values


def _unpool_output_size(input: torch.Tensor, g: _pooling.Geometry, output_size) -> list[int]:
    """torch's rule: defaults per dim, or a user size strictly within (default - s, default + s)."""
    hp, wp = input.shape[-2:]
    default = [
        _pooling.unpooled_extent(hp, g.kernel_size[0], g.stride[0], g.padding[0], g.dilation[0]),
        _pooling.unpooled_extent(wp, g.kernel_size[1], g.stride[1], g.padding[1], g.dilation[1]),
    ]
    if output_size is None:
        size = default
    else:
        try:
            size = [int(v) for v in output_size]
        except (TypeError, ValueError):
            raise ValueError(f"output_size must be a sequence of ints, got {output_size!r}") from None
        if len(size) in (3, 4):
            size = size[-2:]
        if len(size) != 2:
            raise ValueError(f"output_size must have 2 elements (H, W) (or 3/4 with batch and channels), got {output_size!r}")
        for d in range(2):
            lo, hi = default[d] - g.stride[d], default[d] + g.stride[d]
            if not lo < size[d] < hi:
                raise ValueError(
                    f"output_size {size} is invalid: dim {d} must be between {lo} and {hi} (exclusive) "
                    f"for a {hp}x{wp} input with this kernel_size/stride/padding"
                )
    if min(size) <= 0:
        raise ValueError(f"output_size must be positive, got {size}")
    return size


def max_unpool2d(
    input: torch.Tensor,
    indices: torch.Tensor,
    kernel_size,
    stride=None,
    padding=0,
    output_size=None,
    index_format: str = "flat",
    dilation=1,
) -> torch.Tensor:
    """Scatters ``input`` back to the positions its switches point at; zeros elsewhere.

    Same as ``torch.nn.functional.max_unpool2d`` for ``index_format="flat"``; accepts the compact
    formats too. Where two switches point at one position the later pooled element (row-major)
    wins, as in torch's CPU loop. Switches outside the output plane raise on every device.
    """
    x, squeeze = _as_batched(input, "input")
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dim() != input.dim():
        raise ValueError(f"indices must have the same number of dims as input ({input.dim()}), got {indices.dim()}")
    idx = indices.unsqueeze(0) if squeeze else indices
    _pooling.check_float(x, "input")
    g = _pooling.geometry(kernel_size, stride, padding, dilation, index_format)
    _pooling.check_indices(idx, x, x.shape[-2:], index_format)
    size = _unpool_output_size(x, g, output_size)
    out = _ops.max_unpool2d.default(x, idx, *g.args(), size, index_format)
    return out.squeeze(0) if squeeze else out
