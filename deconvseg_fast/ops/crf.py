"""Permutohedral lattice: fake kernels, autograd, and the ``Lattice`` handle built on the ops.

``permutohedral_lattice(features [N, d])`` builds the lattice of one point set once;
``permutohedral_filter(values [N, C], *lattice, reverse)`` filters any number of channels with it.
The filter is linear in ``values`` with a symmetric blur, so its adjoint is the same filter with the
blur axes in reverse order: that is the backward. Gradients with respect to the features are not
provided (the lattice is piecewise constant in them). ``dense_crf_mean_field`` runs whole mean-field
inference in one call for inference without gradients, ``dense_crf_mean_field_batch`` the same for a
group of images (on the CPU one image per thread); with gradients, functional.dense_crf composes the
filter op instead.
"""
from __future__ import annotations

import torch

from ._common import triton_kernels

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


def _point_major(logits: torch.Tensor) -> bool:
    """Whether logits [..., L, N] are the transpose of a contiguous [..., N, L] tensor (pydensecrf's
    layout; a channels_last unary's for a batch). The mean-field ops return Q in the layout of their
    logits: this one, or contiguous."""
    return not logits.is_contiguous() and logits.transpose(-2, -1).is_contiguous()


def _empty_q(logits: torch.Tensor) -> torch.Tensor:
    """An empty float32 Q shaped and laid out as the mean-field ops return it for these logits."""
    if _point_major(logits):
        return logits.new_empty(logits.transpose(-2, -1).shape, dtype=torch.float32).transpose(-2, -1)
    return logits.new_empty(logits.shape, dtype=torch.float32)


@torch.library.register_fake("deconvseg::dense_crf_mean_field")
def _mean_field_fake(logits, lattices, pre, post, compat, iterations):
    return _empty_q(logits)


@torch.library.register_fake("deconvseg::dense_crf_mean_field_batch")
def _mean_field_batch_fake(logits, lattices, pre, post, compat, iterations):
    return _empty_q(logits)


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
        self._build(features.detach().to(torch.float32).t().contiguous())

    @classmethod
    def from_points(cls, points: torch.Tensor) -> "Lattice":
        """The lattice of ``points`` [N, d] float32 (the op's own point-major layout, no transpose)."""
        if points.dim() != 2 or points.dtype != torch.float32:
            raise ValueError(f"points must be a float32 [N, d] tensor, got {points.dtype} {list(points.shape)}")
        lattice = cls.__new__(cls)
        lattice._build(points.contiguous())
        return lattice

    def _build(self, f: torch.Tensor) -> None:
        # The op refuses NaN/Inf and out-of-range features itself (CPU and CUDA).
        self.tensors = tuple(_ops.permutohedral_lattice.default(f))
        self.num_points, self.dim = f.shape

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
    Returns Q [L, N]. Logits that are the transpose of a contiguous [N, L] tensor (pydensecrf's
    layout) are read as they are, and Q comes back in that layout too; any other layout is made
    contiguous [L, N].
    """
    return _call_mean_field(_ops.dense_crf_mean_field.default, logits, lattices, pre, post, compat, iterations)


def mean_field_batch(logits: torch.Tensor, lattice_sets, pre: torch.Tensor, post: torch.Tensor,
                     compat: torch.Tensor, iterations: int) -> torch.Tensor:
    """``mean_field`` of B images of N points each in one call: logits [B, L, N] float32;
    lattice_sets: per image, its K ``Lattice`` objects; pre / post [B, K, N]; compat [K, L, L],
    shared. Returns Q [B, L, N], each image's the same bits ``mean_field`` gives it, in the logits'
    layout if they are the transpose of a contiguous [B, N, L] (else contiguous). On the CPU the
    images run one per thread (see csrc/cpu/crf.cpp): no barrier inside an image, and each core's
    caches hold one image's lattice. On the AVX-512 test host that beat splitting each image over
    the threads; on an AVX2-only one the two were equal in the bench (BENCHMARKS.md).
    """
    lattices = [lat for lats in lattice_sets for lat in lats]
    return _call_mean_field(_ops.dense_crf_mean_field_batch.default, logits, lattices, pre, post, compat,
                            iterations)


def _call_mean_field(op, logits, lattices, pre, post, compat, iterations):
    # Both mean-field ops take float32 operands; point-major logits are passed as they are.
    flat = [t for lat in lattices for t in lat.tensors]
    logits = logits.float()
    if not _point_major(logits):
        logits = logits.contiguous()
    return op(logits, flat, pre.float().contiguous(), post.float().contiguous(), compat.float().contiguous(),
              int(iterations))


# ----------------------------------------------------------------------------------------------
# Mean field on "cuda": the splat and blur of every kernel is the permutohedral_splat_blur op, the
# rest of each iteration (slice, compatibility, softmax) one fused Triton update
# (deconvseg_fast/kernels/crf.py). The kernels module (and triton) is imported on the first call,
# so importing the package compiles nothing and works without triton.
# ----------------------------------------------------------------------------------------------

def _triton():
    return triton_kernels("crf")


def _check_lattice(offsets, weights, neighbors):
    # csrc/cpu/crf.cpp view_lattice's shape and dtype checks, with its messages.
    if not all(isinstance(t, torch.Tensor) for t in (offsets, weights, neighbors)):
        raise TypeError("lattices must be a list of tensors")
    if offsets.dim() != 2 or offsets.dtype != torch.int32:
        raise ValueError("offsets must be an int32 [N, d+1] tensor")
    if weights.shape != offsets.shape or weights.dtype != torch.float32:
        raise ValueError("weights must be a float32 tensor shaped like offsets")
    d1 = offsets.shape[1]
    if not 2 <= d1 <= MAX_DIM + 1:
        raise ValueError(f"offsets must have d+1 columns for 1 <= d <= {MAX_DIM}, got {d1}")
    if neighbors.dim() != 3 or neighbors.shape[0] != d1 or neighbors.shape[2] != 2 or neighbors.dtype != torch.int32:
        raise ValueError("neighbors must be an int32 [d+1, M, 2] tensor")


def _check_mean_field(logits, lattices, pre, post, compat, iterations):
    """The CPU op's argument checks, with its ValueError messages; returns (L, N, K)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError("logits must be a float32 [L, N] tensor")
    lattices = list(lattices)
    if len(lattices) % 3 != 0 or not lattices:
        raise ValueError(f"lattices must hold 3 tensors per kernel, got {len(lattices)}")
    if iterations < 0:
        raise ValueError(f"iterations must be non-negative, got {iterations}")
    L, N = logits.shape
    K = len(lattices) // 3
    for name, t in (("pre", pre), ("post", post)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (K, N) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be a float32 [K, N] tensor")
    if not isinstance(compat, torch.Tensor) or tuple(compat.shape) != (K, L, L) or compat.dtype != torch.float32:
        raise ValueError("compat must be a float32 [K, L, L] tensor")
    for k in range(K):
        _check_lattice(*lattices[3 * k:3 * k + 3])
        if lattices[3 * k].shape[0] != N:
            raise ValueError(f"lattice {k} has {lattices[3 * k].shape[0]} points, logits have {N}")
    device = logits.device
    for name, t in [("pre", pre), ("post", post), ("compat", compat)] + [("lattices", t) for t in lattices]:
        if t.device != device:
            raise ValueError(f"{name} must be on {device} like logits, got {t.device}")
    return L, N, K


def _mean_field_cuda(logits, lattices, pre, post, compat, iterations):
    """dense_crf_mean_field for "cuda": logits [L, N] -> Q [L, N], in the logits' layout as the CPU op."""
    L, N, K = _check_mean_field(logits, lattices, pre, post, compat, iterations)
    lats = [tuple(t.contiguous() for t in lattices[3 * k:3 * k + 3]) for k in range(K)]
    pre, post, compat = pre.contiguous(), post.contiguous(), compat.contiguous()
    # One host synchronisation for every data-dependent check: vertex indices in range (the Triton
    # update gathers at them; the CPU op refuses them with these messages) and which compats are
    # diagonal (Potts: the update skips the [L, L] product). Any non-zero off-diagonal entry,
    # NaN included, makes a compat general, as in the CPU op.
    flags = []
    for off, _w, nb in lats:
        m = nb.shape[1]
        flags += [((off < 0) | (off >= m)).any(), ((nb < 0) | (nb > m)).any()]
    off_diag = compat.clone()
    off_diag.diagonal(dim1=1, dim2=2).zero_()
    flags.append((off_diag != 0).flatten(1).any(dim=1))
    host = torch.cat([f.reshape(-1) for f in flags]).tolist()
    for k, (off, _w, nb) in enumerate(lats):
        m = nb.shape[1]
        if host[2 * k]:
            raise ValueError(f"offsets hold out-of-range vertices (expected 0..{m - 1})")
        if host[2 * k + 1]:
            raise ValueError(f"neighbors hold out-of-range vertices (expected 0..{m})")
    diagonal = [not g for g in host[2 * K:]]

    result = _empty_q(logits)
    if result.numel() == 0:
        return result
    tc = _triton()
    logits_nl = logits.t()  # [N, L] view; the update reads the logits through strides
    # Q point-major [N, L] (what the splat reads) between iterations; the last update writes the
    # [L, N] result through a transposed view.
    q = torch.empty((N, L), dtype=torch.float32, device=logits.device) if iterations else result.t()
    tc.mean_field_update(logits_nl, q, [])
    for it in range(iterations):
        blurred = [_ops.permutohedral_splat_blur.default(q, pre[k], *lats[k], False) for k in range(K)]
        out = result.t() if it == iterations - 1 else q
        kernels = [(lats[k][0], lats[k][1], blurred[k], post[k], compat[k], diagonal[k]) for k in range(K)]
        tc.mean_field_update(logits_nl, out, kernels)
    return result


torch.library.register_kernel("deconvseg::dense_crf_mean_field", "cuda", _mean_field_cuda)


def _mean_field_batch_cuda(logits, lattices, pre, post, compat, iterations):
    """dense_crf_mean_field_batch for "cuda": one image after another (each fills the GPU)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.dtype != torch.float32:
        raise ValueError("logits must be a float32 [B, L, N] tensor")
    B, L, N = logits.shape
    lattices = list(lattices)
    if B == 0:
        if iterations < 0:
            raise ValueError(f"iterations must be non-negative, got {iterations}")
        return logits.new_empty((0, L, N))
    if not lattices or len(lattices) % (3 * B) != 0:
        raise ValueError(f"lattices must hold 3 tensors per kernel per image, got {len(lattices)}")
    per_image = len(lattices) // B
    K = per_image // 3
    for name, t in (("pre", pre), ("post", post)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, K, N) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be a float32 [B, K, N] tensor")
    if not _point_major(logits):
        logits = logits.contiguous()
    result = _empty_q(logits)  # the CPU op's layout rule
    for b in range(B):
        result[b].copy_(_mean_field_cuda(logits[b], lattices[b * per_image:(b + 1) * per_image], pre[b], post[b],
                                         compat, iterations))
    return result


torch.library.register_kernel("deconvseg::dense_crf_mean_field_batch", "cuda", _mean_field_batch_cuda)
