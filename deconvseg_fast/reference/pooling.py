"""Readable oracles for the pooling ops and the switch formats (docs/switches.md).

Vectorised over (N, C, Ho, Wo) but a Python loop over window taps, so the scan order, the
tie rule (first wins) and the NaN rule (last NaN wins) are plain to see.
"""
from __future__ import annotations

import torch


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def pooled_extent(size, k, s, p, d, ceil_mode):
    num = size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)
    out = num // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def max_pool2d_switches(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, index_format="flat"):
    """x [N, C, H, W] -> (values [N, C, Ho, Wo], switches in `index_format`)."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride if stride is not None else kernel_size)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    N, C, H, W = x.shape
    Ho = pooled_extent(H, kh, sh, ph, dh, ceil_mode)
    Wo = pooled_extent(W, kw, sw, pw, dw, ceil_mode)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.to(acc)
    oh = torch.arange(Ho).view(Ho, 1)
    ow = torch.arange(Wo).view(1, Wo)
    best = torch.full((N, C, Ho, Wo), float("-inf"), dtype=acc)
    tap = torch.full((N, C, Ho, Wo), -1, dtype=torch.int64)
    for i in range(kh):
        for j in range(kw):
            h = oh * sh - ph + i * dh
            w = ow * sw - pw + j * dw
            valid = ((h >= 0) & (h < H) & (w >= 0) & (w < W)).expand(Ho, Wo)
            v = xa[:, :, h.clamp(0, H - 1).expand(Ho, Wo), w.clamp(0, W - 1).expand(Ho, Wo)]
            # The first in-bounds tap is the switch until something beats -inf.
            first = valid & (tap < 0)
            tap = torch.where(first, i * kw + j, tap)
            take = valid & ((v > best) | torch.isnan(v))
            best = torch.where(take, v, best)
            tap = torch.where(take, i * kw + j, tap)
    values = best.to(x.dtype)
    if index_format == "window":
        return values, tap.to(torch.uint8)
    if index_format == "packed":
        return values, pack(tap.to(torch.uint8))
    i, j = tap // kw, tap % kw
    flat = (oh * sh - ph + i * dh) * W + (ow * sw - pw + j * dw)
    return values, flat


def pack(codes):
    """uint8 2-bit codes [N, C, Ho, Wo] -> packed [N, C, Ho, ceil(Wo/4)], ow = 4q + t in bits 2t."""
    N, C, Ho, Wo = codes.shape
    Wq = (Wo + 3) // 4
    padded = torch.zeros((N, C, Ho, Wq * 4), dtype=torch.int64)
    padded[..., :Wo] = codes.to(torch.int64)
    g = padded.view(N, C, Ho, Wq, 4)
    return (g[..., 0] | (g[..., 1] << 2) | (g[..., 2] << 4) | (g[..., 3] << 6)).to(torch.uint8)


def unpack(packed, Wo):
    shifts = torch.tensor([0, 2, 4, 6])
    codes = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 3
    return codes.flatten(-2)[..., :Wo].to(torch.uint8)


def switches_to_flat(switches, index_format, pooled_hw, input_hw, kernel_size, stride=None, padding=0, dilation=1):
    """Any switch format -> torch's flat int64 indices (codes are trusted to be valid taps)."""
    if index_format == "flat":
        return switches.to(torch.int64)
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride if stride is not None else kernel_size)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    Ho, Wo = pooled_hw
    codes = unpack(switches, Wo) if index_format == "packed" else switches
    codes = codes.to(torch.int64)
    oh = torch.arange(Ho).view(Ho, 1)
    ow = torch.arange(Wo).view(1, Wo)
    return (oh * sh - ph + (codes // kw) * dh) * input_hw[1] + (ow * sw - pw + (codes % kw) * dw)


def max_unpool2d(x, flat, output_hw):
    """Scatter with a fixed winner: the last pooled element (row-major) pointing at a position."""
    N, C, Hp, Wp = x.shape
    H, W = output_hw
    pos = torch.arange(Hp * Wp).expand(N, C, Hp * Wp)
    winner = torch.full((N, C, H * W), -1, dtype=torch.int64)
    winner.scatter_reduce_(2, flat.reshape(N, C, -1), pos, reduce="amax")
    vals = x.reshape(N, C, -1).gather(2, winner.clamp(min=0))
    out = torch.where(winner >= 0, vals, torch.zeros((), dtype=x.dtype))
    return out.view(N, C, H, W)


def max_pool2d_backward(grad, flat, input_hw):
    """grad_input[p] = sum of grad[w] over windows w whose switch is p, in float64."""
    N, C = grad.shape[:2]
    H, W = input_hw
    out = torch.zeros((N, C, H * W), dtype=torch.float64)
    out.scatter_add_(2, flat.reshape(N, C, -1), grad.reshape(N, C, -1).to(torch.float64))
    return out.view(N, C, H, W).to(grad.dtype)
