"""Max-pool with switches and max-unpool: validation, fake kernels, autograd, Triton registration.

Semantics of every op are in docs/switches.md. The C++ kernels validate their own arguments too
(they must stay memory-safe when called directly); the checks here give every device the same
``ValueError`` messages before any kernel runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch._prims_common import suggest_memory_format

FORMATS = ("flat", "window", "packed")
SWITCH_DTYPES = {"flat": torch.int64, "window": torch.uint8, "packed": torch.uint8}
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

from ._common import pair, stride_padding_dilation, triton_kernels

_ops = torch.ops.deconvseg


@dataclass(frozen=True)
class Geometry:
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def args(self) -> tuple[list[int], list[int], list[int], list[int]]:
        return list(self.kernel_size), list(self.stride), list(self.padding), list(self.dilation)


def check_format(index_format: str, kernel_size: tuple[int, int]) -> None:
    if index_format not in FORMATS:
        raise ValueError(f"index_format must be one of {FORMATS}, got {index_format!r}")
    if index_format == "window" and kernel_size[0] * kernel_size[1] > 256:
        raise ValueError(
            "index_format='window' stores a uint8 window position and needs kernel_size with at most "
            f"256 taps (16x16), got {kernel_size}"
        )
    if index_format == "packed" and tuple(kernel_size) != (2, 2):
        raise ValueError(f"index_format='packed' stores 2 bits per switch and needs kernel_size (2, 2), got {kernel_size}")


def geometry(kernel_size, stride, padding, dilation, index_format: str) -> Geometry:
    """Normalise and validate pooling hyper-parameters (torch's rules, plus the switch format's)."""
    k = pair(kernel_size, "kernel_size")
    if min(k) <= 0:
        raise ValueError(f"kernel_size must be positive, got {k}")
    default_stride = stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0)
    s, p, d = stride_padding_dilation(k if default_stride else stride, padding, dilation)
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"padding should be at most half of kernel_size, got padding {p} for kernel_size {k}")
    check_format(index_format, k)
    return Geometry(k, s, p, d)


def pooled_extent(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """torch's pooling_output_shape (same as csrc/include/pooling_geometry.h)."""
    num = size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)
    out = num // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def unpooled_extent(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size - 1) * s - 2 * p + d * (k - 1) + 1


def check_float(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D [N, C, H, W] tensor, got {t.dim()} dims")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def switch_shape(n: int, c: int, h: int, w: int, index_format: str) -> tuple[int, int, int, int]:
    return (n, c, h, (w + 3) // 4 if index_format == "packed" else w)


def check_indices(indices, ref: torch.Tensor, hw: Sequence[int], index_format: str) -> None:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    want_dtype = SWITCH_DTYPES[index_format]
    if indices.dtype != want_dtype:
        raise ValueError(f"indices must be {want_dtype} for index_format={index_format!r}, got {indices.dtype}")
    want = switch_shape(ref.shape[0], ref.shape[1], hw[0], hw[1], index_format)
    if tuple(indices.shape) != want:
        raise ValueError(f"indices must have shape {list(want)} to match the pooled tensor, got {list(indices.shape)}")
    if indices.device != ref.device:
        raise ValueError(f"indices must be on {ref.device} like the values, got {indices.device}")


def pool_output_hw(input: torch.Tensor, g: Geometry, ceil_mode: bool) -> tuple[int, int]:
    H, W = input.shape[-2:]
    if input.shape[1] == 0 or H == 0 or W == 0:
        raise ValueError(f"input must have non-zero channels, height and width, got {list(input.shape)}")
    ho = pooled_extent(H, g.kernel_size[0], g.stride[0], g.padding[0], g.dilation[0], ceil_mode)
    wo = pooled_extent(W, g.kernel_size[1], g.stride[1], g.padding[1], g.dilation[1], ceil_mode)
    if ho <= 0 or wo <= 0:
        raise ValueError(
            f"input of size {list(input.shape)} is too small for kernel_size {g.kernel_size} with dilation "
            f"{g.dilation} and padding {g.padding}: the output would be {ho}x{wo}"
        )
    return ho, wo


def _empty_like_layout(ref: torch.Tensor, shape, dtype) -> torch.Tensor:
    # Outputs follow torch: channels_last when the input suggests it, else contiguous.
    return torch.empty(shape, dtype=dtype, device=ref.device, memory_format=suggest_memory_format(ref))


# ----------------------------------------------------------------------------------------------
# Fake kernels (torch.compile, meta tensors): exact shapes, dtypes and strides.
# ----------------------------------------------------------------------------------------------

@torch.library.register_fake("deconvseg::max_pool2d_switches")
def _pool_fake(input, kernel_size, stride, padding, dilation, ceil_mode, index_format):
    check_float(input, "input")
    g = geometry(kernel_size, stride, padding, dilation, index_format)
    ho, wo = pool_output_hw(input, g, ceil_mode)
    n, c = input.shape[:2]
    values = _empty_like_layout(input, (n, c, ho, wo), input.dtype)
    switches = _empty_like_layout(input, switch_shape(n, c, ho, wo, index_format), SWITCH_DTYPES[index_format])
    return values, switches


@torch.library.register_fake("deconvseg::max_unpool2d")
def _unpool_fake(input, indices, kernel_size, stride, padding, dilation, output_size, index_format):
    check_float(input, "input")
    geometry(kernel_size, stride, padding, dilation, index_format)
    check_indices(indices, input, input.shape[-2:], index_format)
    return _empty_like_layout(input, (*input.shape[:2], *output_size), input.dtype)


@torch.library.register_fake("deconvseg::max_pool2d_switches_backward")
def _pool_backward_fake(grad_output, indices, input_size, kernel_size, stride, padding, dilation, index_format):
    check_float(grad_output, "grad_output")
    geometry(kernel_size, stride, padding, dilation, index_format)
    check_indices(indices, grad_output, grad_output.shape[-2:], index_format)
    return _empty_like_layout(grad_output, (*grad_output.shape[:2], *input_size), grad_output.dtype)


@torch.library.register_fake("deconvseg::max_unpool2d_backward")
def _unpool_backward_fake(grad_output, indices, input_size, kernel_size, stride, padding, dilation, index_format):
    check_float(grad_output, "grad_output")
    geometry(kernel_size, stride, padding, dilation, index_format)
    check_indices(indices, grad_output, input_size, index_format)
    return _empty_like_layout(grad_output, (*grad_output.shape[:2], *input_size), grad_output.dtype)


# ----------------------------------------------------------------------------------------------
# Autograd. Every backward is itself one of the four ops, so double backward works too:
# pool backward is a scatter-add whose adjoint is the gather (unpool backward), and vice versa.
# ----------------------------------------------------------------------------------------------

def _pool_setup(ctx, inputs, output):
    input, kernel_size, stride, padding, dilation, _ceil_mode, index_format = inputs
    ctx.save_for_backward(output[1])
    ctx.hw = tuple(input.shape[-2:])
    ctx.geom = (kernel_size, stride, padding, dilation, index_format)


def _pool_backward(ctx, grad_values, _grad_switches):
    (switches,) = ctx.saved_tensors
    if grad_values is None:
        return (None,) * 7
    grad = _ops.max_pool2d_switches_backward.default(grad_values, switches, list(ctx.hw), *ctx.geom)
    return (grad,) + (None,) * 6


def _unpool_setup(ctx, inputs, output):
    input, indices, kernel_size, stride, padding, dilation, _output_size, index_format = inputs
    ctx.save_for_backward(indices)
    ctx.hw = tuple(input.shape[-2:])
    ctx.geom = (kernel_size, stride, padding, dilation, index_format)


def _unpool_backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    return (_ops.max_unpool2d_backward.default(grad, indices, list(ctx.hw), *ctx.geom),) + (None,) * 7


def _grad_op_setup(ctx, inputs, output):
    grad_output, indices, _input_size, kernel_size, stride, padding, dilation, index_format = inputs
    ctx.save_for_backward(indices)
    ctx.hw = tuple(grad_output.shape[-2:])
    ctx.geom = (kernel_size, stride, padding, dilation, index_format)


def _pool_backward_backward(ctx, gg):
    (indices,) = ctx.saved_tensors
    return (_ops.max_unpool2d_backward.default(gg, indices, list(ctx.hw), *ctx.geom),) + (None,) * 7


def _unpool_backward_backward(ctx, gg):
    (indices,) = ctx.saved_tensors
    return (_ops.max_pool2d_switches_backward.default(gg, indices, list(ctx.hw), *ctx.geom),) + (None,) * 7


torch.library.register_autograd("deconvseg::max_pool2d_switches", _pool_backward, setup_context=_pool_setup)
torch.library.register_autograd("deconvseg::max_unpool2d", _unpool_backward, setup_context=_unpool_setup)
torch.library.register_autograd(
    "deconvseg::max_pool2d_switches_backward", _pool_backward_backward, setup_context=_grad_op_setup
)
torch.library.register_autograd(
    "deconvseg::max_unpool2d_backward", _unpool_backward_backward, setup_context=_grad_op_setup
)


# ----------------------------------------------------------------------------------------------
# Triton kernels for "cuda". The kernels module (and triton) is imported on the first CUDA call,
# so importing the package stays cheap and works without triton.
# ----------------------------------------------------------------------------------------------

def _triton():
    return triton_kernels("pooling")


def _cuda_pool(input, kernel_size, stride, padding, dilation, ceil_mode, index_format):
    check_float(input, "input")
    g = geometry(kernel_size, stride, padding, dilation, index_format)
    out_hw = pool_output_hw(input, g, ceil_mode)
    return _triton().max_pool2d_switches(input, g.kernel_size, g.stride, g.padding, g.dilation, out_hw, index_format)


def _cuda_unpool(input, indices, kernel_size, stride, padding, dilation, output_size, index_format):
    check_float(input, "input")
    g = geometry(kernel_size, stride, padding, dilation, index_format)
    check_indices(indices, input, input.shape[-2:], index_format)
    return _triton().max_unpool2d(
        input, indices, g.kernel_size, g.stride, g.padding, g.dilation, tuple(output_size), index_format
    )


def _cuda_pool_backward(grad_output, indices, input_size, kernel_size, stride, padding, dilation, index_format):
    check_float(grad_output, "grad_output")
    g = geometry(kernel_size, stride, padding, dilation, index_format)
    check_indices(indices, grad_output, grad_output.shape[-2:], index_format)
    return _triton().max_pool2d_switches_backward(
        grad_output, indices, tuple(input_size), g.kernel_size, g.stride, g.padding, g.dilation, index_format
    )


def _cuda_unpool_backward(grad_output, indices, input_size, kernel_size, stride, padding, dilation, index_format):
    check_float(grad_output, "grad_output")
    g = geometry(kernel_size, stride, padding, dilation, index_format)
    check_indices(indices, grad_output, input_size, index_format)
    return _triton().max_unpool2d_backward(
        grad_output, indices, tuple(input_size), g.kernel_size, g.stride, g.padding, g.dilation, index_format
    )


TRITON_LAUNCHERS = {
    "max_pool2d_switches": _cuda_pool,
    "max_unpool2d": _cuda_unpool,
    "max_pool2d_switches_backward": _cuda_pool_backward,
    "max_unpool2d_backward": _cuda_unpool_backward,
}

for _name, _fn in TRITON_LAUNCHERS.items():
    torch.library.register_kernel(f"deconvseg::{_name}", "cuda", _fn)
