"""Triton kernel for proposal paste-and-aggregate (DeconvNet's instance-wise inference).

The contract (box rounding, bilinear sampling, fill, tie and NaN rules) is docs/proposals.md. The
launcher takes proposal tables already validated and built by deconvseg_fast/ops/proposals.py
(`proposal_tables`) and runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.

Design
------
* A gather: each program owns a BLOCK_H x BLOCK_W tile of one (image, channel) plane of the
  output and loops over that image's proposals in increasing index order, so no two programs
  write the same element, there are no atomics, and the max (first maximum / first NaN wins) and
  the sum are evaluated in the same order as the C++ kernel and the oracle.
* Proposals of other images are never visited: the host groups the proposals by image
  (`order`, `start`). Proposals whose clipped box misses the tile are skipped by one scalar test.
* Sampling coordinates are separable: the row taps are computed on a [BLOCK_H] vector and the
  column taps on a [BLOCK_W] vector, then broadcast; only the four loads and the blend run per
  pixel. Scales (map size / box size) are computed on the host, in the same dtype and by the
  same IEEE division as the C++ kernel, because Triton's fp32 `/` is an approximate division.
* The tile is 8 x 64: rows of 64 consecutive columns give coalesced stores (output is contiguous
  NCHW); 512 lanes on 4 warps is 4 pixels per thread.
* Offsets of an (image, channel) plane and of a proposal's map are int64 (program id widened
  before the multiply); offsets inside one plane or map are int32 (the launcher checks they fit).
"""
import torch
import triton
import triton.language as tl

__all__ = ["paste_aggregate", "KERNELS"]

_NUM_WARPS = 4
_BLOCK_H = 8
_BLOCK_W = 64


@triton.jit
def _axis_taps(pos, lo, scale, n, ACC_FP64: tl.constexpr):
    # torch's bilinear source index (align_corners=False): src = scale * (pos - lo + 0.5) - 0.5,
    # clamped at 0; taps i0 <= i1 < n, weight l1 on i1 and 1 - l1 on i0.
    if ACC_FP64:
        d = (pos - lo).to(tl.float64)
    else:
        d = (pos - lo).to(tl.float32)
    src = scale * (d + 0.5) - 0.5
    src = tl.maximum(src, 0.0)
    i0 = tl.minimum(src.to(tl.int32), n - 1)  # truncation == floor for src >= 0
    l1 = tl.minimum(tl.maximum(src - i0.to(src.dtype), 0.0), 1.0)
    i1 = i0 + (i0 < n - 1).to(tl.int32)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def _paste_aggregate_kernel(
    s_ptr,  # [P, C, h, w] score maps, float dtype, any strides
    box_ptr,  # [P, 6] int32 contiguous: ya, yb, xa, xb (clipped box), ylo, xlo (unclipped corner)
    scale_ptr,  # [P, 2] float32 (float64 for float64 scores) contiguous: h / box height, w / box width
    order_ptr,  # [P] int32: proposal indices grouped by image, increasing within an image
    start_ptr,  # [B + 1] int32: image b's proposals are order[start[b]:start[b + 1]]
    out_ptr,  # [B, C, H, W] contiguous, dtype of scores
    win_ptr,  # [B, C, H, W] int32 contiguous (MAX only; any int32 pointer otherwise)
    C, H, W, h, w,
    ssp, ssc, ssh, ssw,  # strides of scores
    fill,  # value of pixels no proposal covers
    MAX: tl.constexpr,  # True: pixel-wise max (and winner); False: sum
    ACC_FP64: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    plane = tl.program_id(0).to(tl.int64)  # b * C + c
    b = plane // C
    c = plane % C
    y0 = tl.program_id(1) * BLOCK_H
    x0 = tl.program_id(2) * BLOCK_W
    ys = y0 + tl.arange(0, BLOCK_H)
    xs = x0 + tl.arange(0, BLOCK_W)
    if ACC_FP64:
        acc = tl.zeros([BLOCK_H, BLOCK_W], tl.float64)
    else:
        acc = tl.zeros([BLOCK_H, BLOCK_W], tl.float32)
    # covering proposal; for MAX the winner so far. -1 = no proposal covers the pixel yet.
    who = tl.full([BLOCK_H, BLOCK_W], -1, tl.int32)
    k0 = tl.load(start_ptr + b)
    k1 = tl.load(start_ptr + b + 1)
    for k in range(k0, k1):
        p = tl.load(order_ptr + k)
        bp = box_ptr + p.to(tl.int64) * 6
        ya = tl.load(bp + 0)
        yb = tl.load(bp + 1)
        xa = tl.load(bp + 2)
        xb = tl.load(bp + 3)
        if (ya < y0 + BLOCK_H) & (yb > y0) & (xa < x0 + BLOCK_W) & (xb > x0):
            ylo = tl.load(bp + 4)
            xlo = tl.load(bp + 5)
            sy = tl.load(scale_ptr + p.to(tl.int64) * 2)
            sx = tl.load(scale_ptr + p.to(tl.int64) * 2 + 1)
            i0, i1, ly0, ly1 = _axis_taps(ys, ylo, sy, h, ACC_FP64)
            j0, j1, lx0, lx1 = _axis_taps(xs, xlo, sx, w, ACC_FP64)
            inside = ((ys >= ya) & (ys < yb))[:, None] & ((xs >= xa) & (xs < xb))[None, :]
            base = s_ptr + p.to(tl.int64) * ssp + c * ssc
            r0 = base + (i0 * ssh)[:, None]
            r1 = base + (i1 * ssh)[:, None]
            c0 = (j0 * ssw)[None, :]
            c1 = (j1 * ssw)[None, :]
            v00 = tl.load(r0 + c0, mask=inside, other=0).to(acc.dtype)
            v01 = tl.load(r0 + c1, mask=inside, other=0).to(acc.dtype)
            v10 = tl.load(r1 + c0, mask=inside, other=0).to(acc.dtype)
            v11 = tl.load(r1 + c1, mask=inside, other=0).to(acc.dtype)
            lx0 = lx0[None, :]
            lx1 = lx1[None, :]
            # torch's upsample_bilinear2d evaluation order
            v = ly0[:, None] * (lx0 * v00 + lx1 * v01) + ly1[:, None] * (lx0 * v10 + lx1 * v11)
            if MAX:
                # strict > keeps the lowest index among equal maxima; the first NaN wins and stays
                take = inside & ((who < 0) | (v > acc) | ((v != v) & (acc == acc)))
                acc = tl.where(take, v, acc)
                who = tl.where(take, p, who)
            else:
                acc = tl.where(inside, acc + v, acc)
                who = tl.where(inside, p, who)
    res = tl.where(who >= 0, acc, fill)
    offs = plane * H * W + (ys * W)[:, None] + xs[None, :]
    omask = (ys < H)[:, None] & (xs < W)[None, :]
    tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=omask)
    if MAX:
        tl.store(win_ptr + offs, who, mask=omask)


def paste_aggregate(scores, box_table, scale_table, order, start, output_size, mode, fill):
    """(out [B, C, H, W] contiguous, winner [B, C, H, W] int32 for "max" / [0] int32 for "sum").

    box_table [P, 6] int32, scale_table [P, 2], order [P] int32, start [B + 1] int32 come from
    deconvseg_fast.ops.proposals.proposal_tables (validated boxes and image indices).
    """
    B, H, W = output_size
    P, C, h, w = scores.shape
    is_max = mode == "max"
    out = torch.empty((B, C, H, W), dtype=scores.dtype, device=scores.device)
    winner = torch.empty((B, C, H, W) if is_max else (0,), dtype=torch.int32, device=scores.device)
    if out.numel() == 0:
        return out, winner
    if P == 0:  # no kernel launch on empty (possibly null) table pointers
        out.fill_(fill)
        if is_max:
            winner.fill_(-1)
        return out, winner
    if H * W + _BLOCK_H * W + _BLOCK_W >= 2**31 or (h - 1) * abs(scores.stride(2)) + (w - 1) * abs(
            scores.stride(3)) >= 2**31:
        raise ValueError(f"one image plane ({H}x{W}) or score map ({h}x{w}) has too many elements "
                         "for the Triton kernel's 32-bit in-plane offsets")
    grid = (B * C, triton.cdiv(H, _BLOCK_H), triton.cdiv(W, _BLOCK_W))
    _paste_aggregate_kernel[grid](
        scores, box_table, scale_table, order, start, out, winner if is_max else start,
        C, H, W, h, w, *scores.stride(), float(fill),
        MAX=is_max, ACC_FP64=scores.dtype == torch.float64,
        BLOCK_H=_BLOCK_H, BLOCK_W=_BLOCK_W, num_warps=_NUM_WARPS)
    return out, winner


# ---------------------------------------------------------------------------------------------
# AOT compilation targets (tests/test_triton_compile.py)
# ---------------------------------------------------------------------------------------------
_PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16", "fp64": "*fp64"}


def _kernel_entries():
    entries = []
    names = _paste_aggregate_kernel.arg_names
    for dt in ("fp32", "fp16", "bf16", "fp64"):
        for is_max in (True, False):
            acc64 = dt == "fp64"
            const = dict(MAX=is_max, ACC_FP64=acc64, BLOCK_H=_BLOCK_H, BLOCK_W=_BLOCK_W)
            types = [_PTR[dt], "*i32", "*fp64" if acc64 else "*fp32", "*i32", "*i32", _PTR[dt], "*i32"]
            types += ["i32"] * 9 + ["fp32"] + ["constexpr"] * len(const)
            entries.append((_paste_aggregate_kernel, dict(zip(names, types)), const))
    return entries


KERNELS = _kernel_entries()
