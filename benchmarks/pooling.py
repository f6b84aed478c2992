"""Benchmark cases for the pooling family: max-pool with switches, max-unpool and both backwards.

Each case is plain data (`PoolingCase`); `PoolingCase.build(device)` allocates its inputs once and
returns `(ours_fn, torch_fn, bytes_moved, flops)`, two zero-argument callables that run the same
work through deconvseg_fast and through torch, plus the traffic and arithmetic our op needs, so a
runner can time both in the same run and turn times into ratios and bandwidths.

`shape` is always the pool's input `[N, C, H, W]` (which is also unpool's output): the four ops of
one geometry then share one label, and the pooled shape follows from the geometry.

torch's references, one per op:
- max_pool2d:            `F.max_pool2d(..., return_indices=True)` (int64 switches).
- max_unpool2d:          `F.max_unpool2d`.
- max_pool2d_backward:   `aten.max_pool2d_with_indices_backward`, the kernel autograd calls for
                         max_pool2d (derivatives.yaml, `max_pool2d_with_indices: self:`).
- max_unpool2d_backward: derivatives.yaml gives `max_unpool2d: self: max_pool_double_backward(grad,
                         indices, 2)`; that C++ function (FunctionsManual.cpp) is
                         `grad.contiguous(indices.suggest_memory_format()).view(N, C, -1)
                         .gather(-1, indices.view(N, C, -1)).view(indices.sizes())`.
                         `_torch_unpool_backward` below runs the same ATen calls, so the forward
                         unpool that `torch.autograd.grad` would also re-run stays out of the time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

OPS = ("max_pool2d", "max_unpool2d", "max_pool2d_backward", "max_unpool2d_backward")
INDEX_FORMATS = ("flat", "window", "packed")
MEMORY_FORMATS = ("contiguous", "channels_last")

# Bytes one switch occupies in each format (packed: four 2-bit codes per byte, see docs/switches.md).
TORCH_SWITCH_BYTES = 8  # torch's return_indices is always int64


class BuiltCase(NamedTuple):
    ours_fn: Callable[[], object]
    torch_fn: Callable[[], object]
    bytes_moved: int
    flops: int


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class PoolingCase:
    op: str
    shape: tuple[int, int, int, int]  # pool input [N, C, H, W] == unpool output
    index_format: str = "flat"
    memory_format: str = "contiguous"
    kernel_size: tuple[int, int] = (2, 2)
    stride: tuple[int, int] = (2, 2)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False
    dtype: torch.dtype = torch.float32
    tag: str = ""  # the network the geometry comes from, for the label only

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op: expected one of {OPS}, got {self.op!r}")
        if self.index_format not in INDEX_FORMATS:
            raise ValueError(f"index_format: expected one of {INDEX_FORMATS}, got {self.index_format!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format: expected one of {MEMORY_FORMATS}, got {self.memory_format!r}")
        if self.index_format == "packed" and self.kernel_size != (2, 2):
            raise ValueError(f"index_format: 'packed' needs a 2x2 kernel, got kernel_size={self.kernel_size}")
        # torch's max_unpool2d has no dilation argument, so there would be no reference to compare with.
        if self.op.startswith("max_unpool2d") and self.dilation != (1, 1):
            raise ValueError(f"dilation: unpool cases need dilation (1, 1) (torch has no dilated unpool), "
                             f"got {self.dilation}")

    # ---- geometry (docs/switches.md) -------------------------------------------------------------
    @property
    def pooled_hw(self) -> tuple[int, int]:
        out = []
        for size, k, s, p, d in zip(self.shape[2:], self.kernel_size, self.stride, self.padding,
                                    self.dilation):
            span = size + 2 * p - d * (k - 1) - 1
            o = (span + (s - 1 if self.ceil_mode else 0)) // s + 1
            if self.ceil_mode and (o - 1) * s >= size + p:
                o -= 1
            out.append(o)
        return out[0], out[1]

    @property
    def pooled_shape(self) -> tuple[int, int, int, int]:
        return (self.shape[0], self.shape[1], *self.pooled_hw)

    @property
    def num_windows(self) -> int:
        return math.prod(self.pooled_shape)

    @property
    def name(self) -> str:
        k, s, p = self.kernel_size, self.stride, self.padding
        geom = f"k{k[0]}x{k[1]} s{s[0]}" + (f" p{p[0]}" if any(p) else "")
        mf = " CL" if self.memory_format == "channels_last" else ""
        shape = "x".join(map(str, self.shape))
        return f"{self.op}[{self.index_format}] {shape} {geom}{mf}"

    # ---- exact traffic ---------------------------------------------------------------------------
    def switch_bytes(self) -> int:
        """Bytes of our switch tensor for this case's format."""
        n, c, ho, wo = self.pooled_shape
        if self.index_format == "flat":
            return n * c * ho * wo * 8
        if self.index_format == "window":
            return n * c * ho * wo
        return n * c * ho * math.ceil(wo / 4)  # packed: byte q holds ow = 4q .. 4q+3

    def torch_switch_bytes(self) -> int:
        return self.num_windows * TORCH_SWITCH_BYTES

    def bytes_moved(self) -> int:
        """The bytes our op must read plus write (compulsory traffic, each tensor touched once)."""
        es = torch.empty((), dtype=self.dtype).element_size()
        plane = math.prod(self.shape) * es       # pool input / unpool output / pool grad_input
        pooled = self.num_windows * es           # pool values / unpool input
        sw = self.switch_bytes()
        if self.op == "max_pool2d":
            return plane + pooled + sw           # read x; write values and switches
        if self.op == "max_unpool2d":
            return pooled + sw + plane           # read values, switches; write every output element (zeros too)
        if self.op == "max_pool2d_backward":
            return pooled + sw + plane           # read grad_out, switches; write all of grad_input
        # max_unpool2d_backward gathers one element per window, but those elements are spread over
        # every row of the window, so every cache line (CPU) / 32-byte sector (GPU) of grad_output is
        # touched anyway: count the whole plane as read.
        return plane + sw + pooled

    def flops(self) -> int:
        """Arithmetic our op does: comparisons for the pool, additions for its backward."""
        if self.op == "max_pool2d":
            return self.num_windows * self.kernel_size[0] * self.kernel_size[1]
        if self.op == "max_pool2d_backward":
            return self.num_windows  # one accumulation per window
        return 0  # unpool and its backward only move data

    # ---- inputs and the two callables ------------------------------------------------------------
    def _layout(self, t: torch.Tensor) -> torch.Tensor:
        if self.memory_format == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        return t.contiguous()

    def build(self, device: str | torch.device = "cpu", seed: int = 0) -> BuiltCase:
        """Allocate this case's inputs once on `device`; return callables that only run the op."""
        import deconvseg_fast.functional as DF  # noqa: N812 (mirrors `F`)

        ops = torch.ops.deconvseg
        gen = torch.Generator(device="cpu").manual_seed(seed)

        def randn(shape):
            # Generated on CPU so every device sees the same numbers for the same seed.
            return self._layout(torch.randn(shape, generator=gen, dtype=torch.float32)
                                .to(dtype=self.dtype, device=device))

        k, s, p, d = (list(v) for v in (self.kernel_size, self.stride, self.padding, self.dilation))
        fmt, ceil = self.index_format, self.ceil_mode
        h, w = self.shape[2:]
        x = randn(self.shape)

        def ours_pool():
            return DF.max_pool2d(x, k, s, p, d, ceil, return_indices=True, index_format=fmt)

        def torch_pool():
            return F.max_pool2d(x, k, s, p, d, ceil_mode=ceil, return_indices=True)

        if self.op == "max_pool2d":
            ours_fn, torch_fn = ours_pool, torch_pool
        else:
            # Each side consumes switches produced by its own pool, as in a real network.
            values, switches = ours_pool()
            t_values, t_indices = torch_pool()
            if self.op == "max_unpool2d":
                def ours_fn():
                    return DF.max_unpool2d(values, switches, k, s, p, output_size=[h, w],
                                           index_format=fmt, dilation=d)

                def torch_fn():
                    return F.max_unpool2d(t_values, t_indices, k, s, p, output_size=[h, w])
            elif self.op == "max_pool2d_backward":
                grad_out = randn(self.pooled_shape)

                def ours_fn():
                    return ops.max_pool2d_switches_backward(grad_out, switches, [h, w], k, s, p, d, fmt)

                def torch_fn():
                    # Autograd hands this kernel the saved input `x` (it reads only its layout).
                    return torch.ops.aten.max_pool2d_with_indices_backward(
                        grad_out, x, k, s, p, d, ceil, t_indices)
            else:  # max_unpool2d_backward
                grad_out = randn(self.shape)
                hp, wp = self.pooled_hw

                def ours_fn():
                    return ops.max_unpool2d_backward(grad_out, switches, [hp, wp], k, s, p, d, fmt)

                def torch_fn():
                    return _torch_unpool_backward(grad_out, t_indices)

        return BuiltCase(ours_fn, torch_fn, self.bytes_moved(), self.flops())

    def check(self, ours_out, torch_out) -> str:
        """'exact', 'close' or 'MISMATCH' for one pair of outputs of ours_fn / torch_fn.

        Compares what both sides produce in the same form: values (and flat switches) for the pool,
        the output for the others. Compact switches are the test suite's job, not the benchmark's.
        """
        pairs = []
        if self.op == "max_pool2d":
            pairs.append((ours_out[0], torch_out[0]))
            if self.index_format == "flat":
                pairs.append((ours_out[1], torch_out[1]))
        else:
            pairs.append((ours_out, torch_out))
        verdict = "exact"
        for a, b in pairs:
            if a.shape != b.shape or a.dtype != b.dtype:
                return "MISMATCH"
            if torch.equal(a, b):
                continue
            if a.is_floating_point() and torch.allclose(a, b, equal_nan=True):
                verdict = "close"
            else:
                return "MISMATCH"
        return verdict


def _torch_unpool_backward(grad: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The ATen calls of torch's `max_pool_double_backward(grad, indices, 2)` (unpool's backward)."""
    flat = (*indices.shape[:-2], -1)
    memory_format = torch._prims_common.suggest_memory_format(indices)
    return (grad.contiguous(memory_format=memory_format).view(flat)
            .gather(-1, indices.view(flat)).view(indices.shape))


# ---- the suite ------------------------------------------------------------------------------------
SEGNET_SHAPE = (4, 64, 360, 480)   # SegNet's first pool on CamVid, batch 4
DEEPLAB_SHAPE = (1, 64, 321, 321)  # DeepLab-LargeFOV pool1 on a 321x321 VOC crop
QUICK_SEGNET_SHAPE = (2, 16, 36, 48)
QUICK_DEEPLAB_SHAPE = (1, 16, 33, 33)


def cases(quick: bool = False) -> list[PoolingCase]:
    """The default suite; `quick` keeps every case but shrinks the shapes for a smoke test."""
    seg = QUICK_SEGNET_SHAPE if quick else SEGNET_SHAPE
    dl = QUICK_DEEPLAB_SHAPE if quick else DEEPLAB_SHAPE
    out = []
    # SegNet 2x2/2, NCHW: all four ops in every format.
    for op in OPS:
        for fmt in INDEX_FORMATS:
            out.append(PoolingCase(op, seg, fmt, tag="SegNet"))
    # Same geometry channels_last, against torch's channels_last kernels (forward ops).
    for op in ("max_pool2d", "max_unpool2d"):
        for fmt in INDEX_FORMATS:
            out.append(PoolingCase(op, seg, fmt, memory_format="channels_last", tag="SegNet"))
    # DeepLab pool1: 3x3/2 pad 1, overlapping windows (packed is 2x2-only).
    for fmt in ("flat", "window"):
        out.append(PoolingCase("max_pool2d", dl, fmt, kernel_size=(3, 3), stride=(2, 2),
                               padding=(1, 1), tag="DeepLab"))
    return out


def select(all_cases: list[PoolingCase], filter: str | None) -> list[PoolingCase]:  # noqa: A002
    """Cases whose name contains `filter` (case-insensitive); all of them when filter is empty."""
    if not filter:
        return list(all_cases)
    needle = filter.lower()
    return [c for c in all_cases if needle in c.name.lower()]
