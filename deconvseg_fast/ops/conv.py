"""Atrous convolution with a fused epilogue: validation, fake kernel, autograd, Triton registration.

``deconvseg::atrous_conv2d(input, weight, bias, scale, shift, stride, padding, dilation, activation)``
computes ``act((conv(input, weight) + bias) * scale + shift)`` with groups = 1; ``scale``/``shift``
are a folded batch-norm, ``activation`` is ``"none"`` or ``"relu"``. The CPU kernel is
csrc/cpu/conv.cpp (oneDNN convolution + one in-place epilogue pass), the CUDA kernel the Triton
implicit GEMM of kernels/conv.py. The C++ kernel validates its arguments too; the checks here give
every device the same ``ValueError`` messages before any kernel runs.
"""
from __future__ import annotations

import functools
import os

import torch
from torch._prims_common import suggest_memory_format

from ._common import pair, stride_padding_dilation, triton_kernels

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
ACTIVATIONS = ("none", "relu")
PACKED_DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def can_pack(dtype: torch.dtype) -> bool:
    """Whether this CPU can pack a weight of ``dtype``: float32 everywhere oneDNN is; bfloat16 only
    where oneDNN's bf16 reorder runs (AVX-512 BW/VL/DQ or AVX-NE-CONVERT), found by packing a tiny
    weight once."""
    if dtype not in PACKED_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    try:
        torch._C._nn.mkldnn_reorder_conv2d_weight(torch.zeros(1, 1, 1, 1, dtype=dtype).to_mkldnn(),
                                                  [0, 0], [1, 1], [1, 1], 1, None)
    except RuntimeError:
        return False
    return True

_ops = torch.ops.deconvseg


def check_activation(activation) -> str:
    """None / "none" / "relu" -> the schema's string, or a ValueError naming the argument."""
    if activation is None:
        return "none"
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None, 'none' or 'relu', got {activation!r}")
    return activation


def _check_vector(v, name: str, c_out: int, device, dtype=None) -> None:
    if v is None:
        return
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != c_out:
        raise ValueError(f"{name} must be a 1-D tensor of {c_out} elements (one per output channel), "
                         f"got shape {list(v.shape)}")
    if dtype is not None and v.dtype != dtype:
        raise ValueError(f"{name} must have the dtype of input ({dtype}), got {v.dtype}")
    if not v.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {v.dtype}")
    if v.device != device:
        raise ValueError(f"{name} must be on {device} like input, got {v.device}")


def _check_packed(input, weight, bias, scale, shift) -> None:
    """A packed weight (pack_weight) is for CPU inference: float32/bfloat16 and no gradients."""
    if input.device.type != "cpu" or input.is_mkldnn:
        raise ValueError(f"weight is a packed (MKLDNN) weight, which needs a dense CPU input, got {input.device} "
                         f"{'MKLDNN' if input.is_mkldnn else 'strided'} input")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, bias, scale, shift)):
        raise ValueError("weight is a packed weight, which is for inference only: run under torch.no_grad() or "
                         "torch.inference_mode(), or pass the plain weight (a model leaves its packed weights "
                         "behind in train mode)")


def pack_weight(weight: torch.Tensor, stride=1, padding=0, dilation=1, input_size=None) -> torch.Tensor:
    """``weight`` [C_out, C_in, kH, kW] reordered once into oneDNN's blocked layout for this
    geometry (an MKLDNN-layout tensor, CPU float32/bfloat16), so that atrous_conv2d on the CPU
    skips the reorder that every plain-weight call repeats. The result is a copy: later changes
    to ``weight`` are not seen. Pass it as ``weight`` to atrous_conv2d with the same stride,
    padding and dilation (others work, but may reorder again). ``input_size`` [N, C_in, H, W] lets
    oneDNN choose the layout for that input: without it some shapes (1x1 kernels, a kernel as
    large as its input at batch > 1) get a layout that is reordered back on every call."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4 or min(weight.shape) == 0:
        raise ValueError(f"weight must be a non-empty 4-D [C_out, C_in, kH, kW] tensor, got shape {list(weight.shape)}")
    if weight.device.type != "cpu":
        raise ValueError(f"weight must be a CPU tensor to be packed (packing is oneDNN's, CPU only), got {weight.device}")
    if weight.dtype not in PACKED_DTYPES:
        raise ValueError(f"weight must be float32 or bfloat16 to be packed, got {weight.dtype}")
    if not torch.backends.mkldnn.is_available():
        raise RuntimeError("weight: packing needs torch built with oneDNN (torch.backends.mkldnn.is_available())")
    if not can_pack(weight.dtype):
        raise RuntimeError(f"weight: this CPU cannot pack {weight.dtype} weights (oneDNN's bfloat16 reorder needs "
                           "AVX-512 BW/VL/DQ or AVX-NE-CONVERT): pack a float32 weight, or pass the plain weight")
    s, p, d = stride_padding_dilation(stride, padding, dilation)
    if input_size is not None:
        input_size = [int(v) for v in input_size]
        if len(input_size) != 4 or input_size[1] != weight.shape[1] or min(input_size) <= 0:
            raise ValueError(f"input_size must be [N, C_in={weight.shape[1]}, H, W] with positive sizes, "
                             f"got {input_size}")
    dense = weight.detach().contiguous()
    return torch._C._nn.mkldnn_reorder_conv2d_weight(dense.to_mkldnn(), list(p), list(s), list(d), 1, input_size)


def check_args(input, weight, bias, scale, shift, stride, padding, dilation, activation):
    """Validate everything; returns (stride, padding, dilation, activation) normalised."""
    for t, name, what in ((input, "input", "[N, C_in, H, W]"), (weight, "weight", "[C_out, C_in, kH, kW]")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D {what} tensor, got {t.dim()} dims")
    if input.dtype not in FLOAT_DTYPES:
        raise ValueError(f"input must be float32, float64, float16 or bfloat16, got {input.dtype}")
    if weight.dtype != input.dtype:
        raise ValueError(f"weight must have the dtype of input ({input.dtype}), got {weight.dtype}")
    if weight.device != input.device:
        raise ValueError(f"weight must be on {input.device} like input, got {weight.device}")
    if input.shape[1] == 0:
        raise ValueError(f"input must have at least one channel, got shape {list(input.shape)}")
    if weight.shape[1] != input.shape[1]:
        raise ValueError(f"weight must have C_in = {input.shape[1]} input channels like input (groups = 1), "
                         f"got weight of shape {list(weight.shape)}")
    if min(weight.shape) == 0:
        raise ValueError(f"weight must be non-empty, got shape {list(weight.shape)}")
    if weight.is_mkldnn:
        _check_packed(input, weight, bias, scale, shift)
    c_out = weight.shape[0]
    _check_vector(bias, "bias", c_out, input.device, input.dtype)
    _check_vector(scale, "scale", c_out, input.device)
    _check_vector(shift, "shift", c_out, input.device)
    s, p, d = stride_padding_dilation(stride, padding, dilation)
    act = check_activation(activation)
    for dim in range(2):
        span = d[dim] * (weight.shape[2 + dim] - 1) + 1
        if input.shape[2 + dim] + 2 * p[dim] < span:
            raise ValueError(
                f"input of size {list(input.shape)} is too small for a kernel of extent {span} "
                f"(dilation {d[dim]}) with padding {p[dim]} in dim {2 + dim}")
    return s, p, d, act


def output_hw(input, weight, stride, padding, dilation) -> tuple[int, int]:
    return tuple((input.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
                 for i in range(2))


# ----------------------------------------------------------------------------------------------
# Fake kernel: exact shapes, dtypes and strides.
# ----------------------------------------------------------------------------------------------

@torch.library.register_fake("deconvseg::atrous_conv2d")
def _fake(input, weight, bias, scale, shift, stride, padding, dilation, activation):
    s, p, d, _ = check_args(input, weight, bias, scale, shift, stride, padding, dilation, activation)
    if input.device.type == "cpu" and not weight.is_mkldnn:
        # The CPU kernel returns at::convolution's output (the epilogue runs in place), so asking
        # aten.convolution's own fake kernel gives its layout rule (backend-dependent) exactly.
        return torch.ops.aten.convolution.default(input, weight, bias, list(s), list(p), list(d), False, [0, 0], 1)
    if weight.is_mkldnn:  # a packed weight: the output takes the input's memory format
        memory_format = suggest_memory_format(input)
    else:
        from deconvseg_fast.kernels.conv import output_memory_format  # noqa: PLC0415 (imports triton)
        memory_format = output_memory_format(input, weight)
    ho, wo = output_hw(input, weight, s, p, d)
    return torch.empty((input.shape[0], weight.shape[0], ho, wo), dtype=input.dtype, device=input.device,
                       memory_format=memory_format)


# ----------------------------------------------------------------------------------------------
# Autograd. The convolution's input and weight gradients are ATen's convolution backward
# (aten.convolution_backward, i.e. oneDNN on the CPU, cuDNN on CUDA) applied to the gradient of
# the epilogue; the epilogue's own gradients (ReLU mask, bias, scale, shift) are per-channel
# reductions. Everything is an ATen op, so double backward works too. On the CPU all of it is
# deterministic for a fixed thread count; on CUDA cuDNN's weight gradient is deterministic under
# torch.use_deterministic_algorithms(True), torch's own switch for its convolutions.
# ----------------------------------------------------------------------------------------------

def _setup(ctx, inputs, output):
    input, weight, bias, scale, shift, stride, padding, dilation, activation = inputs
    ctx.geom = (list(pair(stride, "stride")), list(pair(padding, "padding")), list(pair(dilation, "dilation")))
    relu = activation == "relu"
    ctx.save_for_backward(input, weight, bias, scale, shift, output if relu else None)


def _channel_sum(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # reduced precision sums in fp32 (like torch's bias gradient), then back to the parameter dtype
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.sum(dim=(0, 2, 3), dtype=acc).to(dtype)


def _backward(ctx, grad):
    input, weight, bias, scale, shift, out = ctx.saved_tensors
    stride, padding, dilation = ctx.geom
    need = ctx.needs_input_grad
    g = grad
    if out is not None:
        g = torch.ops.aten.threshold_backward.default(g, out, 0)  # torch.relu's own backward
    grad_shift = _channel_sum(g, shift.dtype) if shift is not None and need[4] else None
    grad_scale = None
    if scale is not None and need[3]:
        # d/dscale needs conv + bias, which the forward overwrote in place: recompute it (only
        # when a scale is being trained; folded inference buffers never ask for it).
        z = torch.ops.aten.convolution.default(input, weight, bias, stride, padding, dilation, False, [0, 0], 1)
        grad_scale = _channel_sum(g * z, scale.dtype)
    gz = g if scale is None else (g * scale.view(1, -1, 1, 1)).to(input.dtype)
    grad_bias = _channel_sum(gz, bias.dtype) if bias is not None and need[2] else None
    grad_input = grad_weight = None
    if need[0] or need[1]:
        grad_input, grad_weight, _ = torch.ops.aten.convolution_backward.default(
            gz, input, weight, None, stride, padding, dilation, False, [0, 0], 1, [need[0], need[1], False])
    return grad_input, grad_weight, grad_bias, grad_scale, grad_shift, None, None, None, None


torch.library.register_autograd("deconvseg::atrous_conv2d", _backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------
# Triton kernel for "cuda" (kernels/conv.py, imported on the first CUDA call so importing the
# package needs no triton). The formulation is "auto" unless DECONVSEG_ATROUS_ALGORITHM or
# set_cuda_algorithm() says "direct" or "space_to_batch".
# ----------------------------------------------------------------------------------------------

_cuda_algorithm = os.environ.get("DECONVSEG_ATROUS_ALGORITHM", "auto")


def set_cuda_algorithm(algorithm: str) -> None:
    """Pick the GPU formulation: "auto" (default rule, see kernels/conv.py), "direct" or
    "space_to_batch" (used for stride-1 calls only; strided calls always run "direct")."""
    global _cuda_algorithm
    if algorithm not in ("auto", "direct", "space_to_batch"):
        raise ValueError(f"algorithm must be 'auto', 'direct' or 'space_to_batch', got {algorithm!r}")
    _cuda_algorithm = algorithm


def _triton():
    return triton_kernels("conv")


def _cuda_atrous_conv2d(input, weight, bias, scale, shift, stride, padding, dilation, activation):
    s, p, d, act = check_args(input, weight, bias, scale, shift, stride, padding, dilation, activation)
    algorithm = _cuda_algorithm
    if algorithm == "space_to_batch" and s != (1, 1):
        algorithm = "direct"
    return _triton().atrous_conv2d(input, weight, bias, scale, shift, s, p, d, act == "relu", algorithm=algorithm)


torch.library.register_kernel("deconvseg::atrous_conv2d", "cuda", _cuda_atrous_conv2d)
