"""Proposal paste-and-aggregate: validation, fake kernels, autograd, the "cuda" kernels.

Semantics are in docs/proposals.md. The C++ kernels validate their arguments themselves (they must
stay memory-safe when called directly); the structural checks here give every device the same
``ValueError`` messages before any kernel runs. Checks of tensor *values* (finite boxes, image
indices in range) run inside the kernels -- the CPU kernel and the CUDA launcher below -- so that
the public function traces under torch.compile without data-dependent Python.

On "cuda" the forward is a Triton kernel (kernels/proposals.py). The backward there is a
composition of torch ops (`backward_composite`): per proposal, the adjoint of the separable
bilinear resize is grad_scores = Ay^T @ G @ Ax, with Ay [P, Hc, h] / Ax [P, Wc, w] the row/column
interpolation matrices of the clipped boxes (padded to the largest one) and G [P, C, Hc, Wc] the
output gradient gathered inside each box (masked by the winner for mode "max"). It is
deterministic (gathers and batched matmuls, no atomics) but materialises G: P*C*Hc*Wc elements.
"""
from __future__ import annotations

import torch

MODES = ("max", "sum")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Same limit as csrc/cpu/proposals.cpp.
MAX_COORD = float(2**24)

from ._common import triton_kernels

_ops = torch.ops.deconvseg


def _tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be 'max' or 'sum', got {mode!r}")


def check_output_size(output_size) -> list[int]:
    try:
        size = [int(v) for v in output_size]
    except (TypeError, ValueError):
        raise ValueError(f"output_size must be a sequence of 3 ints (B, H, W), got {output_size!r}") from None
    if len(size) != 3 or min(size) < 0:
        raise ValueError(f"output_size must be 3 non-negative ints (B, H, W), got {output_size!r}")
    return size


def check_boxes(boxes, image_index, P: int, device) -> None:
    _tensor(boxes, "boxes")
    _tensor(image_index, "image_index")
    if boxes.dim() != 2 or boxes.shape[0] != P or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be a [P, 4] tensor (x1, y1, x2, y2) with P = {P}, got {list(boxes.shape)}")
    if not boxes.dtype.is_floating_point:
        raise ValueError(f"boxes must be a floating-point tensor, got {boxes.dtype}")
    if image_index.dim() != 1 or image_index.shape[0] != P:
        raise ValueError(f"image_index must be a [P] tensor with P = {P}, got {list(image_index.shape)}")
    if image_index.dtype != torch.int64:
        raise ValueError(f"image_index must be int64, got {image_index.dtype}")
    for t, name in ((boxes, "boxes"), (image_index, "image_index")):
        if t.device != device:
            raise ValueError(f"{name} must be on {device} like scores, got {t.device}")


def check_args(scores, boxes, image_index, output_size, mode) -> list[int]:
    _tensor(scores, "scores")
    if scores.dim() != 4:
        raise ValueError(f"scores must be a 4-D [P, C, h, w] tensor, got {scores.dim()} dims")
    if scores.dtype not in FLOAT_DTYPES:
        raise ValueError(f"scores must be float32, float64, float16 or bfloat16, got {scores.dtype}")
    if scores.shape[2] == 0 or scores.shape[3] == 0:
        raise ValueError(f"scores must have non-zero height and width, got {list(scores.shape)}")
    check_boxes(boxes, image_index, scores.shape[0], scores.device)
    check_mode(mode)
    return check_output_size(output_size)


def _opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def proposal_tables(boxes, image_index, output_size, score_hw, acc_dtype):
    """Validates box values and image indices (one host synchronisation) and rounds the boxes.

    Returns box_table [P, 6] int32 (ya, yb, xa, xb: the clipped box, empty for degenerate boxes;
    ylo, xlo: the unclipped first row/column), scale_table [P, 2] acc_dtype (h / box height,
    w / box width, by one IEEE division like the C++ kernel), order [P] int32 and start [B + 1]
    int32 (the proposals grouped by image, in increasing index within each image).
    """
    B, H, W = output_size
    h, w = score_hw
    bx = boxes.to(torch.float64)
    flags = torch.stack([
        (~torch.isfinite(bx)).any(),
        (bx.abs() > MAX_COORD).any(),
        ((image_index < 0) | (image_index >= B)).any(),
    ]).tolist()
    if flags[0]:
        raise ValueError("boxes must be finite, got NaN or Inf")
    if flags[1]:
        raise ValueError("boxes must have coordinates within +-2**24")
    if flags[2]:
        raise ValueError(f"image_index must be in [0, {B}) for a batch of {B} images")
    lo = torch.floor(bx[:, :2])  # x_lo, y_lo
    hi = torch.ceil(bx[:, 2:])  # x_hi, y_hi
    valid = (bx[:, 2:] > bx[:, :2]).all(dim=1, keepdim=True)
    limit = torch.tensor([W, H], dtype=torch.float64, device=bx.device)
    zero = torch.zeros_like(limit)
    a = torch.minimum(torch.maximum(lo, zero), limit)
    e = torch.minimum(torch.maximum(hi, zero), limit)
    e = torch.where(valid, torch.maximum(e, a), a)
    box_table = torch.stack([a[:, 1], e[:, 1], a[:, 0], e[:, 0], lo[:, 1], lo[:, 0]], dim=1).to(torch.int32)
    size = (hi - lo).flip(1).to(acc_dtype)  # box height, box width (>= 1 where valid)
    size = torch.where(valid, size, torch.ones_like(size))
    scale_table = torch.tensor([h, w], dtype=acc_dtype, device=bx.device) / size
    order = torch.sort(image_index, stable=True).indices.to(torch.int32)
    counts = torch.bincount(image_index, minlength=B) if image_index.numel() else torch.zeros(
        B, dtype=torch.int64, device=bx.device)
    start = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return box_table.contiguous(), scale_table.contiguous(), order.contiguous(), start.contiguous()


def _interp_matrix(pos, lo, scale, n, valid_len, acc_dtype):
    # pos [P, L] image rows/columns, lo [P, 1], scale [P, 1] -> [P, L, n] bilinear weights (rows
    # past valid_len [P, 1] are zero); the same arithmetic as the kernels.
    d = (pos - lo).to(acc_dtype)
    src = torch.clamp_min(scale * (d + 0.5) - 0.5, 0.0)
    i0 = torch.clamp_max(src.to(torch.int64), n - 1)
    l1 = torch.clamp(src - i0.to(acc_dtype), 0.0, 1.0)
    i1 = i0 + (i0 < n - 1).to(torch.int64)
    live = torch.arange(pos.shape[1], device=pos.device)[None, :] < valid_len
    l0 = torch.where(live, 1.0 - l1, torch.zeros_like(l1))
    l1 = torch.where(live, l1, torch.zeros_like(l1))
    m = torch.zeros(*pos.shape, n, dtype=acc_dtype, device=pos.device)
    m.scatter_(2, i0[..., None], l0[..., None])
    # i1 == i0 at the last source row: add (l0 + l1 in one rounding, as in the kernels' sum of taps)
    m.scatter_add_(2, i1[..., None], l1[..., None])
    return m


def backward_composite(grad_out, winner, boxes, image_index, score_size, mode):
    """paste_aggregate_backward from torch ops (any device); see the module docstring."""
    B, C, H, W = grad_out.shape
    P = boxes.shape[0]
    h, w = score_size
    acc = _opmath(grad_out.dtype)
    grad = torch.zeros((P, C, h, w), dtype=grad_out.dtype, device=grad_out.device)
    if grad.numel() == 0 or B * H * W == 0:
        return grad
    box_table, scale_table, _, _ = proposal_tables(boxes, image_index, (B, H, W), (h, w), acc)
    bt = box_table.to(torch.int64)
    ya, yb, xa, xb, ylo, xlo = bt.unbind(1)
    hc, wc = int((yb - ya).max()), int((xb - xa).max())
    if hc == 0 or wc == 0:
        return grad
    ys = ya[:, None] + torch.arange(hc, device=bt.device)[None, :]  # [P, hc]
    xs = xa[:, None] + torch.arange(wc, device=bt.device)[None, :]  # [P, wc]
    ay = _interp_matrix(ys, ylo[:, None], scale_table[:, :1], h, (yb - ya)[:, None], acc)  # [P, hc, h]
    ax = _interp_matrix(xs, xlo[:, None], scale_table[:, 1:], w, (xb - xa)[:, None], acc)  # [P, wc, w]
    yi = ys.clamp(0, H - 1)[:, :, None]
    xi = xs.clamp(0, W - 1)[:, None, :]
    inside = ((ys < yb[:, None])[:, :, None] & (xs < xb[:, None])[:, None, :])[:, None]  # [P, 1, hc, wc]
    bi = image_index[:, None, None]
    g = grad_out[bi, :, yi, xi].permute(0, 3, 1, 2)  # [P, C, hc, wc]
    keep = inside
    if mode == "max":
        won = winner[bi, :, yi, xi].permute(0, 3, 1, 2)
        keep = keep & (won == torch.arange(P, device=won.device, dtype=won.dtype)[:, None, None, None])
    g = torch.where(keep, g.to(acc), torch.zeros((), dtype=acc, device=g.device))
    out = ay.transpose(1, 2)[:, None] @ g @ ax[:, None]  # [P, C, h, w]
    return out.to(grad_out.dtype)


# ----------------------------------------------------------------------------------------------
# Fake kernels: exact shapes, dtypes and strides (outputs are always contiguous).
# ----------------------------------------------------------------------------------------------

@torch.library.register_fake("deconvseg::paste_aggregate")
def _paste_fake(scores, boxes, image_index, output_size, mode, fill):
    B, H, W = check_args(scores, boxes, image_index, output_size, mode)
    C = scores.shape[1]
    out = scores.new_empty((B, C, H, W))
    winner = scores.new_empty((B, C, H, W) if mode == "max" else (0,), dtype=torch.int32)
    return out, winner


def _check_backward(grad_out, winner, boxes, image_index, score_size, mode):
    _tensor(grad_out, "grad_out")
    _tensor(winner, "winner")
    if grad_out.dim() != 4 or grad_out.dtype not in FLOAT_DTYPES:
        raise ValueError(f"grad_out must be a 4-D float tensor, got {grad_out.dim()} dims of {grad_out.dtype}")
    check_mode(mode)
    if len(score_size) != 2 or min(score_size) <= 0:
        raise ValueError(f"score_size must be two positive ints (h, w), got {score_size!r}")
    check_boxes(boxes, image_index, boxes.shape[0] if boxes.dim() else 0, grad_out.device)
    if mode == "max" and (winner.dtype != torch.int32 or winner.shape != grad_out.shape):
        raise ValueError(f"winner must be an int32 tensor shaped like grad_out {list(grad_out.shape)}, "
                         f"got {winner.dtype} {list(winner.shape)}")


@torch.library.register_fake("deconvseg::paste_aggregate_backward")
def _paste_backward_fake(grad_out, winner, boxes, image_index, score_size, mode):
    _check_backward(grad_out, winner, boxes, image_index, score_size, mode)
    return grad_out.new_empty((boxes.shape[0], grad_out.shape[1], *score_size))


# ----------------------------------------------------------------------------------------------
# Autograd w.r.t. scores. The backward is the op paste_aggregate_backward: for "sum" the adjoint
# of the bilinear paste, for "max" the same restricted to the pixels each proposal won. No
# gradient flows to boxes (rounded to integers) or image_index. No double backward.
# ----------------------------------------------------------------------------------------------

def _setup(ctx, inputs, output):
    scores, boxes, image_index, _output_size, mode, _fill = inputs
    ctx.save_for_backward(output[1], boxes, image_index)
    ctx.score_size = [scores.shape[2], scores.shape[3]]
    ctx.mode = mode


def _backward(ctx, grad_out, _grad_winner):
    winner, boxes, image_index = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 6
    grad = _ops.paste_aggregate_backward.default(grad_out, winner, boxes, image_index, ctx.score_size, ctx.mode)
    return (grad,) + (None,) * 5


torch.library.register_autograd("deconvseg::paste_aggregate", _backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------
# "cuda": the Triton forward (imported on first use) and the composite backward.
# ----------------------------------------------------------------------------------------------

def _triton():
    return triton_kernels("proposals")


def triton_forward(scores, boxes, image_index, output_size, mode, fill):
    """The "cuda" kernel of paste_aggregate (also runs on CPU tensors under TRITON_INTERPRET=1)."""
    size = check_args(scores, boxes, image_index, output_size, mode)
    tables = proposal_tables(boxes, image_index, size, scores.shape[2:], _opmath(scores.dtype))
    return _triton().paste_aggregate(scores, *tables, size, mode, fill)


def _cuda_backward(grad_out, winner, boxes, image_index, score_size, mode):
    _check_backward(grad_out, winner, boxes, image_index, score_size, mode)
    return backward_composite(grad_out, winner, boxes, image_index, list(score_size), mode)


torch.library.register_kernel("deconvseg::paste_aggregate", "cuda", triton_forward)
torch.library.register_kernel("deconvseg::paste_aggregate_backward", "cuda", _cuda_backward)
