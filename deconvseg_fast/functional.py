"""Public functions with torch-compatible signatures: switch pooling and the dense CRF.

``max_pool2d`` and ``max_unpool2d`` take the same arguments, with the same defaults, as
``torch.nn.functional``'s, plus ``index_format`` (see docs/switches.md):

* ``"flat"``   int64 ``h*W + w`` switches, bit-identical to torch's ``return_indices``;
* ``"window"`` uint8 position inside the window (1/8 of torch's memory);
* ``"packed"`` 2 bits per switch for 2x2 windows (1/32 of torch's memory).
"""
from __future__ import annotations

import math
import os

import torch

from .ops import crf as _crf
from .ops import conv as _conv
from .ops import pooling as _pooling
from .ops import proposals as _proposals

__all__ = ["max_pool2d", "max_unpool2d", "permutohedral_filter", "dense_crf"]

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


# ------------------------------------------------------------------------------------------------
# Fully connected CRF on the permutohedral lattice
# ------------------------------------------------------------------------------------------------

NORMALIZATIONS = ("symmetric", "before", "after", "none")


def permutohedral_filter(values: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Gaussian filter of ``values`` [B, C, *spatial] in the space of ``features`` [B, d, *spatial].

    ``features`` are already divided by their standard deviations. Each output point is the sum over
    all points of exp(-|f_i - f_j|^2 / 2) * value_j, approximated on the permutohedral lattice (the
    point's own value included). float32 and float64 values; differentiable in ``values``.
    """
    for t, name in ((values, "values"), (features, "features")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 3:
            raise ValueError(f"{name} must be [B, channels, *spatial] with at least one spatial dim, got {t.dim()} dims")
    if values.shape[0] != features.shape[0] or values.shape[2:] != features.shape[2:]:
        raise ValueError(
            f"values {list(values.shape)} and features {list(features.shape)} must share batch and spatial sizes")
    if values.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"values must be float32 or float64, got {values.dtype}")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got {features.dtype}")
    B, C = values.shape[:2]
    outs = []
    for b in range(B):
        lattice = _crf.Lattice(features[b].reshape(features.shape[1], -1))
        outs.append(lattice.filter_points(values[b].reshape(C, -1).t()).t().reshape(values.shape[1:]))
    return torch.stack(outs) if outs else values.clone()


def _lattice_memory(n: int, dims=(2, 5)) -> int:
    """Upper bound on the bytes building the lattices of ``n`` points with ``dims`` features each takes
    (worst case: every simplex corner its own vertex); dense_crf's are (x, y) and (x, y, r, g, b).
    Per corner: offset, weight and chunk-to-global index (4 bytes each), its key in the chunk's and in
    the global table (4 d each), and their slots (at most 4 ints per key, since a table doubles when
    half full); then the neighbours, 2 ints per vertex and axis."""
    total = 0
    for d in dims:
        corners = n * (d + 1)
        total += corners * (12 + 8 * d + 32) + (d + 1) * corners * 2 * 4
    return total


def _mean_field_memory(lattices, n: int, labels: int, itemsize: int) -> int:
    """Bytes mean field allocates once the lattices (and so their vertex counts) are known: per kernel
    the splat parts and two blur buffers of [M+1, padded labels], plus Q, logits and messages."""
    lanes = -(-labels * itemsize // 64) * 64 // itemsize
    buffers = sum((_crf.SPLAT_PARTS + 2) * (lat.num_vertices + 1) * lanes * itemsize for lat in lattices)
    return buffers + 2 * n * lanes * itemsize + 8 * n * labels * itemsize


def _refuse_if_too_big(need: int, unary: torch.Tensor, what: str = "one image") -> None:
    available = _available_memory(unary.device)
    if need > available:
        raise MemoryError(f"unary of size {list(unary.shape)}: the CRF of {what} may need up to "
                          f"{need / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB available")


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 62


def _positive(value, name: str) -> float:
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def _check_crf_inputs(unary, image, image_name: str, batch: str, batch_words: str,
                      finite: bool = True) -> tuple[int, int, int, int]:
    """dense_crf's and dense_crf_video's checks of unary [B, L, H, W] and its images [B, 3, H, W];
    ``batch`` names the first dim in messages ("B" or "T"). Returns (B, L, H, W). finite=False leaves
    the NaN/Inf check to the fused CPU mean-field op, which makes it in its first read of the logits
    (one read of the unary fewer)."""
    if not isinstance(unary, torch.Tensor) or not isinstance(image, torch.Tensor):
        raise TypeError(f"unary and {image_name} must be torch.Tensors")
    if unary.dim() != 4:
        raise ValueError(f"unary must be a 4-D [{batch}, L, H, W] tensor, got {unary.dim()} dims")
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"{image_name} must be a [{batch}, 3, H, W] tensor, got {list(image.shape)}")
    B, L, H, W = unary.shape
    if image.shape[0] != B or image.shape[2:] != unary.shape[2:]:
        raise ValueError(f"{image_name} {list(image.shape)} must match unary {list(unary.shape)} in "
                         f"{batch_words}, height and width")
    if unary.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"unary must be float32 or float64, got {unary.dtype}")
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise ValueError(f"{image_name} must be uint8 or floating point in 0..255, got {image.dtype}")
    if L < 1 or H < 1 or W < 1:
        raise ValueError(f"unary must have at least one label and one pixel, got {list(unary.shape)}")
    # A sum is finite when every element is (checked without allocating a mask); only a sum that
    # overflowed needs the element-wise look.
    if finite and not torch.isfinite(unary.sum()) and not torch.isfinite(unary).all():
        raise ValueError("unary must be finite (found NaN or Inf)")
    return B, L, H, W


def _check_crf_options(labels: int, iterations, normalization, compat) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if compat is not None:
        if not isinstance(compat, torch.Tensor) or tuple(compat.shape) != (labels, labels):
            raise ValueError(f"compat must be None (Potts) or an [L, L] = [{labels}, {labels}] tensor, got "
                             f"{list(compat.shape) if isinstance(compat, torch.Tensor) else type(compat).__name__}")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _mean_field(unary_ln, lattices, norms, weights, compat, normalization, iterations, needs_grad, unary, what):
    """Mean field of one point set: unary_ln [L, N] -> Q [L, N]. The fused C++ op for float32 inference;
    with gradients (or float64) the composed, differentiable path. ``unary`` and ``what`` (the caller's
    whole input and what one point set is) only word the refusal when it would not fit in memory."""
    labels, n = unary_ln.shape
    _refuse_if_too_big(_mean_field_memory(lattices, n, labels, unary_ln.element_size()), unary, what)
    if needs_grad or unary_ln.dtype != torch.float32:
        logits = unary_ln.t()  # [N, L]: the filter op's point-major layout
        return _mean_field_composed(logits, lattices, norms, weights, compat, normalization, iterations).t()
    return _mean_field_fused(unary_ln, lattices, norms, weights, compat, normalization, iterations)


def dense_crf(
    unary: torch.Tensor,
    image: torch.Tensor,
    *,
    iterations: int = 10,
    gaussian_sxy: float = 3.0,
    gaussian_weight=3.0,
    bilateral_sxy: float = 80.0,
    bilateral_srgb: float = 13.0,
    bilateral_weight=10.0,
    compat: torch.Tensor | None = None,
    normalization: str = "symmetric",
) -> torch.Tensor:
    """Mean-field inference of a fully connected CRF (Krähenbühl & Koltun 2011), batched.

    unary: [B, L, H, W] logits (higher = more likely); image: [B, 3, H, W], uint8 or float in 0..255.
    Two Gaussian edge potentials: an appearance-free one over (x, y) / gaussian_sxy and a bilateral
    one over (x, y) / bilateral_sxy and (r, g, b) / bilateral_srgb, weighted by gaussian_weight and
    bilateral_weight (floats, or 0-d tensors that may require grad). compat: None for Potts, or an
    [L, L] label-compatibility (penalty) matrix mu, so that Potts is mu = 1 - I. Returns Q, the
    marginals [B, L, H, W]; differentiable in unary, the weights and compat.
    """
    needs_grad = _needs_grad(unary, gaussian_weight, bilateral_weight, compat)
    fused_cpu = (isinstance(unary, torch.Tensor) and not needs_grad and unary.dtype == torch.float32
                 and unary.device.type == "cpu")
    B, L, H, W = _check_crf_inputs(unary, image, "image", "B", "batch size", finite=not fused_cpu)
    _check_crf_options(L, iterations, normalization, compat)
    sg = _positive(gaussian_sxy, "gaussian_sxy")
    sb = _positive(bilateral_sxy, "bilateral_sxy")
    sc = _positive(bilateral_srgb, "bilateral_srgb")
    _refuse_if_too_big(_lattice_memory(H * W), unary)

    if B == 0:
        return torch.softmax(unary, 1)
    dtype = unary.dtype
    gaussian, (xs, ys) = _grid_lattice(1, H, W, sg, None, unary.device)
    g_norm = _grid_norm(gaussian, 1, H, W, sg, None, normalization, dtype)
    weights = (gaussian_weight, bilateral_weight)
    # Fused CPU inference of a batch: every image's lattices first, then one call for the whole
    # batch, which runs the images one per thread (ops/crf.py mean_field_batch) and returns the
    # batch's Q without a copy. Otherwise one image at a time, each on every thread.
    fused_batch = fused_cpu and B > 1
    out, sets = [], []
    for b in range(B):
        bilateral = _crf.Lattice.from_points(_bilateral_points(((xs, sb), (ys, sb)), image[b].reshape(3, -1), sc))
        lattices = (gaussian, bilateral)
        norms = (g_norm, _crf_norm(bilateral, H * W, normalization, dtype))
        if fused_batch:
            sets.append((lattices, norms))
            continue
        q = _mean_field(unary[b].reshape(L, -1), lattices, norms, weights, compat, normalization, iterations,
                        needs_grad, unary, "one image")
        out.append(q.reshape(L, H, W))
    if fused_batch:
        at_once = min(B, torch.get_num_threads())
        need = at_once * max(_mean_field_memory(lattices, H * W, L, 4) for lattices, _norms in sets)
        _refuse_if_too_big(need, unary, "one image" if at_once == 1 else f"{at_once} images at once (one per thread)")
        q = _mean_field_fused_batch(unary.reshape(B, L, -1), sets, weights, compat, normalization, iterations)
        return q.reshape(B, L, H, W)
    return out[0].unsqueeze(0) if B == 1 else torch.stack(out)


__all__.append("dense_crf_video")


def dense_crf_video(
    unary: torch.Tensor,
    frames: torch.Tensor,
    *,
    iterations: int = 10,
    gaussian_sxy: float = 3.0,
    gaussian_st: float = 1.0,
    gaussian_weight=3.0,
    bilateral_sxy: float = 80.0,
    bilateral_st: float = 2.0,
    bilateral_srgb: float = 13.0,
    bilateral_weight=10.0,
    compat: torch.Tensor | None = None,
    normalization: str = "symmetric",
) -> torch.Tensor:
    """Temporal fully connected CRF: mean field over T consecutive frames jointly (one point set).

    unary: [T, L, H, W] logits of T consecutive frames; frames: [T, 3, H, W], uint8 or float in 0..255.
    The same model as ``dense_crf`` (same arguments, conventions and checks), except that the N = T*H*W
    pixels of the clip are one fully connected graph: the appearance-free kernel is a Gaussian over
    (x, y) / gaussian_sxy and t / gaussian_st, the bilateral one over (x, y) / bilateral_sxy,
    t / bilateral_st and (r, g, b) / bilateral_srgb, with t the frame index (so the standard deviations
    are in frames). Each Gaussian is filtered on one 3-D resp. 6-D permutohedral lattice and the
    mean field is the same op as dense_crf's (fused C++ without gradients, composed with them).
    Returns Q [T, L, H, W]; differentiable in unary, the weights and compat.

    Defaults. The bilateral kernel carries the temporal evidence, because colour keeps it on the same
    object while the object moves: ``bilateral_st = 2`` frames pools about +-2 frames (a frame 4 away
    weighs exp(-2) = 14 %), so errors that change from frame to frame average out, while the motion
    over that span stays small next to bilateral_sxy. The appearance-free kernel reaches only
    gaussian_sxy = 3 px, which a moving object leaves within a frame or two, so ``gaussian_st = 1``
    keeps it near-local in time (the same pixel one frame away weighs exp(-1/2) = 0.61). Measured on
    generated moving-object clips with flickering unaries (docs/crf.md, "Temporal CRF"):
    bilateral_st = 2 beats 0.5 and 1 and ties with 4; gaussian_st from 0.5 to 4 changes nothing.
    A single frame (T = 1) is exactly ``dense_crf`` (a constant t adds nothing to any distance).
    """
    T, L, H, W = _check_crf_inputs(unary, frames, "frames", "T", "number of frames")
    _check_crf_options(L, iterations, normalization, compat)
    sg = _positive(gaussian_sxy, "gaussian_sxy")
    sgt = _positive(gaussian_st, "gaussian_st")
    sb = _positive(bilateral_sxy, "bilateral_sxy")
    sbt = _positive(bilateral_st, "bilateral_st")
    sc = _positive(bilateral_srgb, "bilateral_srgb")
    if T <= 1:
        return dense_crf(unary, frames, iterations=iterations, gaussian_sxy=sg, gaussian_weight=gaussian_weight,
                         bilateral_sxy=sb, bilateral_srgb=sc, bilateral_weight=bilateral_weight, compat=compat,
                         normalization=normalization)
    n = T * H * W
    _refuse_if_too_big(_lattice_memory(n, (3, 6)), unary, "one clip")
    dtype = unary.dtype
    gaussian, (xs, ys, ts) = _grid_lattice(T, H, W, sg, sgt, unary.device)
    colors = frames.transpose(0, 1).reshape(3, n)
    bilateral = _crf.Lattice.from_points(_bilateral_points(((xs, sb), (ys, sb), (ts, sbt)), colors, sc))
    lattices = (gaussian, bilateral)
    norms = (_grid_norm(gaussian, T, H, W, sg, sgt, normalization, dtype), _crf_norm(bilateral, n, normalization, dtype))
    needs_grad = _needs_grad(unary, gaussian_weight, bilateral_weight, compat)
    q = _mean_field(unary.transpose(0, 1).reshape(L, n), lattices, norms, (gaussian_weight, bilateral_weight),
                    compat, normalization, iterations, needs_grad, unary, "one clip")
    return q.reshape(L, T, H, W).transpose(0, 1).contiguous()


def _bilateral_points(positions, colors: torch.Tensor, srgb: float) -> torch.Tensor:
    """The bilateral kernel's lattice points [N, k + 3] float32: each position [N] divided by its
    standard deviation ((position, std) pairs), then the colors [3, N] (any dtype, 0..255) in float32
    divided by srgb. Filled column by column with parallel element-wise ops (torch.stack along dim 1
    copies single-threaded); the same values as ``torch.stack([x / s, ..., c.float() / srgb], 1)``."""
    k = len(positions)
    points = torch.empty(colors.shape[1], k + 3, dtype=torch.float32, device=colors.device)
    for j, (x, s) in enumerate(positions):
        torch.div(x, s, out=points[:, j])
    if colors.dtype not in (torch.uint8, torch.float32):
        colors = colors.to(torch.float32)  # rounded first, as .float() does (float64 would divide first)
    # One pass: uint8 and float32 colors are divided in float32 as they are converted (a copy and
    # an in-place division, each over the strided columns, took about twice as long).
    torch.div(colors.t(), srgb, out=points[:, k:])
    return points


_GRID_LATTICES: dict = {}


def _grid_lattice(t: int, h: int, w: int, sxy: float, st: float | None, device: torch.device):
    """The appearance-free lattice over (x, y) / sxy, and t / st for t > 1 frames, depends only on the
    sizes: keep the last two. Returns it and the pixel coordinates (xs, ys[, ts]), each [t*h*w]."""
    key = (t, h, w, sxy, st, device)
    if key not in _GRID_LATTICES:
        f32 = dict(dtype=torch.float32, device=device)
        grid = torch.meshgrid(torch.arange(t, **f32), torch.arange(h, **f32), torch.arange(w, **f32), indexing="ij")
        ts, ys, xs = (c.reshape(-1) for c in grid)
        coords = (xs, ys) if t == 1 else (xs, ys, ts)
        scaled = [xs / sxy, ys / sxy] + ([] if t == 1 else [ts / st])
        _GRID_LATTICES[key] = (_crf.Lattice(torch.stack(scaled)), coords)
        while len(_GRID_LATTICES) > 2:
            _GRID_LATTICES.pop(next(iter(_GRID_LATTICES)))
    return _GRID_LATTICES[key]


def _grid_norm(lattice, t: int, h: int, w: int, sxy: float, st: float | None, normalization: str, dtype):
    key = (t, h, w, sxy, st, normalization, dtype, lattice.tensors[0].device)
    cache = _GRID_NORMS
    if key not in cache:
        cache[key] = _crf_norm(lattice, t * h * w, normalization, dtype)
        while len(cache) > 2:
            cache.pop(next(iter(cache)))
    return cache[key]


_GRID_NORMS: dict = {}


def _mean_field_composed(logits, lattices, norms, weights, compat, normalization, iterations):
    # Differentiable: every step is a torch op or the filter op (whose backward is its transpose).
    q = torch.softmax(logits, dim=1)
    for _ in range(iterations):
        message = sum(w * _crf_apply(lat, norm, normalization, q) for lat, norm, w in zip(lattices, norms, weights))
        q = torch.softmax(logits + message if compat is None else logits - message @ compat.to(logits.dtype).t(), dim=1)
    return q


def _fused_norms(n: int, norms, normalization, device):
    """The fused op's pre / post [K, N] normalisations of one point set."""
    ones = torch.ones(n, device=device)
    pre = torch.stack([norm.view(-1) if normalization in ("symmetric", "before") else ones for norm in norms])
    post = pre if normalization in ("symmetric", "none") else torch.stack(
        [norm.view(-1) if normalization == "after" else ones for norm in norms])  # one array read, not two
    return pre, post


def _fused_compat(labels: int, weights, compat, device):
    """The fused op's compat [K, L, L]: each kernel's weight times the compatibility (Potts: -I)."""
    eye = torch.eye(labels, device=device)
    return torch.stack([float(w) * (compat.detach().float() if compat is not None else -eye) for w in weights])


def _mean_field_fused(logits, lattices, norms, weights, compat, normalization, iterations):
    # Inference only: one C++ call runs every iteration (slice, compatibility, softmax fused).
    # logits [L, N] -> Q [L, N].
    labels, n = logits.shape
    pre, post = _fused_norms(n, norms, normalization, logits.device)
    return _crf.mean_field(logits, lattices, pre, post, _fused_compat(labels, weights, compat, logits.device),
                           iterations)


def _mean_field_fused_batch(logits, sets, weights, compat, normalization, iterations):
    # The same for a whole batch in one call, one image per thread on the CPU: logits [B, L, N],
    # sets: each image's (lattices, norms) -> Q [B, L, N].
    _, labels, n = logits.shape
    norms = [_fused_norms(n, image_norms, normalization, logits.device) for _lattices, image_norms in sets]
    pre = torch.stack([image_pre for image_pre, _post in norms])
    post = torch.stack([image_post for _pre, image_post in norms])
    return _crf.mean_field_batch(logits, [lattices for lattices, _norms in sets], pre, post,
                                 _fused_compat(labels, weights, compat, logits.device), iterations)


def _crf_norm(lattice, n: int, normalization: str, dtype) -> torch.Tensor | None:
    # densecrf's DenseKernel normalisation, from the filter response to a constant image.
    if normalization == "none":
        return None
    ones = torch.ones(n, 1, dtype=dtype, device=lattice.tensors[0].device)
    response = lattice.filter_points(ones)
    return (response + 1e-20).rsqrt() if normalization == "symmetric" else 1.0 / (response + 1e-20)


def _crf_apply(lattice, norm, normalization: str, q: torch.Tensor) -> torch.Tensor:
    if normalization in ("symmetric", "before"):
        q = q * norm
    filtered = lattice.filter_points(q)
    return filtered * norm if normalization in ("symmetric", "after") else filtered


# ------------------------------------------------------------------------------------------------
# Proposal paste-and-aggregate (DeconvNet's instance-wise inference)
# ------------------------------------------------------------------------------------------------

__all__.append("paste_aggregate")


def paste_aggregate(
    scores: torch.Tensor,
    boxes: torch.Tensor,
    image_index: torch.Tensor,
    output_size,
    mode: str = "max",
    fill: float | None = None,
) -> torch.Tensor:
    """Pastes per-proposal score maps into their images and aggregates them pixel-wise.

    DeconvNet's instance-wise inference (Noh et al. 2015, section 5.1): the network runs on object
    proposals, and the proposals' score maps are combined into the image by pixel-wise max or sum.
    See docs/proposals.md for the full contract.

    Args:
        scores: ``[P, C, h, w]`` score maps, one per proposal (float32/float64/float16/bfloat16).
        boxes: ``[P, 4]`` floating-point ``(x1, y1, x2, y2)`` in image pixel coordinates, where pixel
            ``(y, x)`` covers ``[x, x+1) x [y, y+1)``. A box is rounded outwards to the pixels it
            touches, columns ``floor(x1) .. ceil(x2) - 1`` and rows ``floor(y1) .. ceil(y2) - 1``;
            a box with ``x2 <= x1`` or ``y2 <= y1`` is empty and contributes nothing. Coordinates
            must be finite and within +-2**24.
        image_index: ``[P]`` int64, the image of the batch each proposal belongs to, in ``[0, B)``.
        output_size: ``(B, H, W)``.
        mode: ``"max"`` or ``"sum"`` over the proposals covering a pixel.
        fill: value of pixels no proposal covers; default ``0`` for ``"sum"`` and ``-inf`` for
            ``"max"`` (the identity of each reduction).

    Each map is resized to its rounded box exactly as ``F.interpolate(map, size=(box_h, box_w),
    mode="bilinear", align_corners=False)`` would (computed in float32, float64 for float64), the
    part inside the image is kept (boxes are clipped), and pixels take the max over the covering
    proposals (equal maxima: the lowest proposal index wins; NaN propagates, the first NaN wins) or
    their sum (added in increasing proposal index). Returns ``[B, C, H, W]`` contiguous, dtype of
    ``scores``. Differentiable w.r.t. ``scores``: "sum" back-propagates the adjoint of the
    bilinear paste, "max" sends each pixel's gradient to its winning proposal only.

    Raises ``ValueError`` for NaN/Inf or out-of-range box coordinates and for ``image_index``
    outside ``[0, B)``; nothing is written outside the output.
    """
    size = _proposals.check_args(scores, boxes, image_index, output_size, mode)
    if fill is None:
        fill = 0.0 if mode == "sum" else float("-inf")
    out, _winner = _ops.paste_aggregate.default(scores, boxes, image_index, size, mode, float(fill))
    return out


# ------------------------------------------------------------------------------------------------
# Atrous (dilated) convolution with a fused epilogue
# ------------------------------------------------------------------------------------------------

__all__.append("atrous_conv2d")


def _same_padding(weight: torch.Tensor, stride, dilation) -> tuple[list[int], list[int]]:
    """torch's padding="same": symmetric padding, and the odd remainder on the bottom/right."""
    if stride != (1, 1):
        raise ValueError(f"padding='same' needs stride 1 (as in torch), got stride {stride}")
    sym, extra = [], []
    for i in range(2):
        total = dilation[i] * (weight.shape[2 + i] - 1)
        sym.append(total // 2)
        extra.append(total - 2 * (total // 2))
    return sym, extra


def pack_conv_weight(weight: torch.Tensor, stride=1, padding=0, dilation=1, *, input_size=None) -> torch.Tensor:
    """``weight`` reordered once for oneDNN (CPU, float32/bfloat16): pass the result to
    ``atrous_conv2d`` as its ``weight``, with the same stride, padding and dilation, and the CPU
    convolution skips the weight reorder it otherwise repeats on every call (the ReLU then runs as
    oneDNN's post-op). ``input_size`` ``[N, C_in, H, W]``, when known, lets oneDNN pick the layout
    for that input. The packed weight is an inference-only copy: no gradients flow through it and
    later changes to ``weight`` are not seen. ``deconvseg_fast.freeze(model)`` does this for
    every convolution of a model; results agree with ``F.conv2d`` to float rounding.
    """
    return _conv.pack_weight(weight, stride, padding, dilation, input_size=input_size)


def atrous_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    activation: str | None = None,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dilated ("atrous") 2-D convolution with a fused epilogue, groups = 1.

    ``act((conv2d(input, weight, bias, stride, padding, dilation) * scale) + shift)``, where
    ``scale``/``shift`` (``[C_out]``, optional, keyword-only) are a folded eval-mode batch-norm
    (``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``) and ``activation`` is
    ``None`` or ``"relu"``. Without them it is ``torch.nn.functional.conv2d`` (+ ``relu``), same
    arguments and defaults, including 3-D unbatched input and ``padding="same"``/``"valid"``. On the
    CPU the convolution is ATen's (oneDNN) and the epilogue runs in place in one pass, so the result
    is bit-identical to ``F.conv2d`` (+ ``F.relu``) when there is no scale/shift -- except where the
    kernel is as large as its unpadded input (one output pixel: a GEMM, summed in another order),
    for NCHW float32 calls whose taps are mostly padding (oneDNN with a weight packed for the call,
    which skips them) and for packed weights (``pack_conv_weight``): those agree to float
    rounding. On CUDA a Triton implicit GEMM applies the whole epilogue before its single rounding.
    """
    x, squeeze = _as_batched(input, "input")
    padding_extra = None
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
        if padding == "valid":
            padding = 0
        else:
            s, _, d = _conv.stride_padding_dilation(stride, 0, dilation)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
                _conv.check_args(x, weight, bias, scale, shift, stride, 0, dilation, activation)
            padding, padding_extra = _same_padding(weight, s, d)
    s, p, d, act = _conv.check_args(x, weight, bias, scale, shift, stride, padding, dilation, activation)
    if padding_extra is not None and any(padding_extra):
        x = torch.nn.functional.pad(x, (0, padding_extra[1], 0, padding_extra[0]))
    y = _ops.atrous_conv2d.default(x, weight, bias, scale, shift, list(s), list(p), list(d), act)
    return y.squeeze(0) if squeeze else y
