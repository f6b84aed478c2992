"""Permutohedral lattice: fake kernels, autograd, and the ``Lattice`` handle built on the ops.

``permutohedral_lattice(features [N, d])`` builds the lattice of one point set once;
``permutohedral_filter(values [N, C], *lattice, reverse)`` filters any number of channels with it.
The filter is linear in ``values`` with a symmetric blur, so its adjoint is the same filter with the
blur axes in reverse order: that is the backward. Gradients with respect to the features are not
provided (the lattice is piecewise constant in them). ``dense_crf_mean_field`` runs whole mean-field
inference in one call for inference without gradients; with gradients, functional.dense_crf
composes the filter op instead.
"""
from __future__ import annotations

import torch

_ops = torch.ops.deconvseg

MAX_DIM = 32  # csrc/include/permutohedral.h kMaxDim
SPLAT_PARTS = 8  # csrc/cpu/crf.cpp kSplatParts: per-part splat buffers of each lattice


@torch.library.register_fake("deconvseg::permutohedral_lattice")
def _lattice_fake(features):
    if features.dim() != 2 or features.dtype != torch.float32:
        raise ValueError("features must be a float32 [N, d] tensor")
    n, d = features.shape
    m = torch.library.get_ctx().new_dynamic_size()  # number of lattice vertices: data dependent
    i32 = dict(dtype=torch.int32, device=features.device)
    f32 = dict(dtype=torch.float32, device=features.device)
    return torch.empty((n, d + 1), **i32), torch.empty((n, d + 1), **f32), torch.empty((d + 1, m, 2), **i32)


@torch.library.register_fake("deconvseg::permutohedral_filter")
def _filter_fake(values, offsets, weights, neighbors, reverse):
    if values.dim() != 2 or values.shape[0] != offsets.shape[0]:
        raise ValueError(f"values must be a [N, C] tensor with N = {offsets.shape[0]} points")
    return values.new_empty(values.shape)


@torch.library.register_fake("deconvseg::permutohedral_splat_blur")
def _splat_blur_fake(values, scale, offsets, weights, neighbors, reverse):
    if values.dim() != 2 or values.shape[0] != offsets.shape[0]:
        raise ValueError(f"values must be a [N, C] tensor with N = {offsets.shape[0]} points")
    return values.new_empty((neighbors.shape[1] + 1, values.shape[1]))


@torch.library.register_fake("deconvseg::dense_crf_mean_field")
def _mean_field_fake(logits, lattices, pre, post, compat, iterations):
    return logits.new_empty(logits.shape)


def _filter_setup(ctx, inputs, output):
    _values, *lattice, reverse = inputs
    ctx.lattice = lattice
    ctx.reverse = reverse


def _filter_backward(ctx, grad):
    # The adjoint of slice . blur . splat is slice . blur^T . splat (splat and slice share weights);
    # each axis' blur is symmetric, so blur^T runs the axes in reverse order.
    g = _ops.permutohedral_filter.default(grad.contiguous(), *ctx.lattice, not ctx.reverse)
    return (g,) + (None,) * 4


torch.library.register_autograd("deconvseg::permutohedral_filter", _filter_backward, setup_context=_filter_setup)


class Lattice:
    """The permutohedral lattice of one point set, built once and reused by every filter call.

    ``features``: [d, N] float32 (pydensecrf's layout), already divided by the standard deviations.
    """

    def __init__(self, features: torch.Tensor):
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if features.dim() != 2:
            raise ValueError(f"features must be a 2-D [d, N] tensor, got {features.dim()} dims")
        if not 1 <= features.shape[0] <= MAX_DIM:
            raise ValueError(f"features must have 1 to {MAX_DIM} dimensions (rows), got {features.shape[0]}")
        if features.shape[1] == 0:
            raise ValueError("features must have at least one point (column)")
        f = features.detach().to(torch.float32).t().contiguous()
        if not torch.isfinite(f.sum()) and not torch.isfinite(f).all():
            raise ValueError("features must be finite (found NaN or Inf)")
        self.tensors = tuple(_ops.permutohedral_lattice.default(f))
        self.dim = features.shape[0]
        self.num_points = features.shape[1]

    @property
    def num_vertices(self) -> int:
        return self.tensors[2].shape[1]

    def filter(self, values: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """values [C, N] -> [C, N]: the lattice Gaussian filter (each point's own value included)."""
        if values.dim() != 2 or values.shape[1] != self.num_points:
            raise ValueError(f"values must be a [C, {self.num_points}] tensor, got {list(values.shape)}")
        return self.filter_points(values.t(), reverse).t()

    def filter_points(self, values: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """values [N, C] (point-major, the kernel's own layout) -> [N, C]."""
        if values.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"values must be float32 or float64, got {values.dtype}")
        if values.dim() != 2 or values.shape[0] != self.num_points:
            raise ValueError(f"values must be a [{self.num_points}, C] tensor, got {list(values.shape)}")
        return _ops.permutohedral_filter.default(values.contiguous(), *self.tensors, bool(reverse))


def mean_field(logits: torch.Tensor, lattices, pre: torch.Tensor, post: torch.Tensor, compat: torch.Tensor,
               iterations: int) -> torch.Tensor:
    """Mean-field inference without autograd, all iterations in one C++ call.

    logits [L, N] float32; lattices: K ``Lattice`` objects over the same N points; pre / post [K, N]:
    each kernel's per-point normalisation before splatting and after slicing (ones for none);
    compat [K, L, L]: each kernel's compatibility, subtracted (Potts of weight w is -w * I).
    Per iteration: Q <- softmax(logits - sum_k compat_k (post_k * filter_k(pre_k * Q))).
    Returns Q [L, N].
    """
    flat = [t for lat in lattices for t in lat.tensors]
    return _ops.dense_crf_mean_field.default(logits.float().contiguous(), flat, pre.float().contiguous(),
                                             post.float().contiguous(), compat.float().contiguous(), int(iterations))
