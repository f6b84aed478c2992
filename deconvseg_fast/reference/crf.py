"""Brute-force oracles for the dense CRF: the exact O(N^2) Gaussian filter and mean field.

Same structure as deconvseg_fast.functional.dense_crf, with the permutohedral lattice replaced by
the dense kernel matrix exp(-|f_i - f_j|^2 / 2), in float64. For small images only.
"""
from __future__ import annotations

import torch


def gaussian_filter(values: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """values [N, C], features [N, d] -> [N, C]: sum_j exp(-|f_i - f_j|^2 / 2) values_j (self included)."""
    f = features.to(torch.float64)
    k = torch.exp(-0.5 * torch.cdist(f, f).square())
    return k @ values.to(torch.float64)


def crf_features(h: int, w: int, image: torch.Tensor, gaussian_sxy: float, bilateral_sxy: float, bilateral_srgb: float):
    """(x, y)/sxy and (x, y)/sxy, rgb/srgb for one [3, H, W] image, as [N, 2] and [N, 5]."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    xy = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)
    rgb = image.reshape(3, -1).t().to(torch.float64)
    return xy / gaussian_sxy, torch.cat([xy / bilateral_sxy, rgb / bilateral_srgb], 1)


def dense_crf(unary, image, iterations=10, gaussian_sxy=3.0, gaussian_weight=3.0, bilateral_sxy=80.0,
              bilateral_srgb=13.0, bilateral_weight=10.0, compat=None):
    """unary [L, H, W] logits, image [3, H, W] -> Q [L, H, W] (float64), symmetric normalisation."""
    L, H, W = unary.shape
    fg, fb = crf_features(H, W, image, gaussian_sxy, bilateral_sxy, bilateral_srgb)
    logits = unary.reshape(L, -1).t().to(torch.float64)
    q = mean_field(logits, ((fg, gaussian_weight), (fb, bilateral_weight)), iterations, compat)
    return q.t().reshape(L, H, W)


def mean_field(logits, kernels, iterations, compat=None):
    """logits [N, L]; kernels: (features [N, d], weight) pairs -> Q [N, L], symmetric normalisation."""
    n = logits.shape[0]
    normed = []
    for f, w in kernels:
        norm = gaussian_filter(torch.ones(n, 1), f).rsqrt()
        normed.append((f, norm, w))
    q = torch.softmax(logits, 1)
    for _ in range(iterations):
        msg = sum(w * norm * gaussian_filter(norm * q, f) for f, norm, w in normed)
        q = torch.softmax(logits + msg if compat is None else logits - msg @ compat.to(torch.float64).t(), 1)
    return q


def video_features(frames: torch.Tensor, gaussian_sxy: float, gaussian_st: float, bilateral_sxy: float,
                   bilateral_st: float, bilateral_srgb: float):
    """(x, y)/sxy, t/st and (x, y)/sxy, t/st, rgb/srgb for a [T, 3, H, W] clip, as [N, 3] and [N, 6],
    points in (t, y, x) order."""
    T, _, H, W = frames.shape
    ts, ys, xs = (c.reshape(-1) for c in torch.meshgrid(
        *(torch.arange(s, dtype=torch.float64) for s in (T, H, W)), indexing="ij"))
    rgb = frames.transpose(0, 1).reshape(3, -1).t().to(torch.float64)
    fg = torch.stack([xs / gaussian_sxy, ys / gaussian_sxy, ts / gaussian_st], 1)
    fb = torch.cat([torch.stack([xs / bilateral_sxy, ys / bilateral_sxy, ts / bilateral_st], 1), rgb / bilateral_srgb], 1)
    return fg, fb


def dense_crf_video(unary, frames, iterations=10, gaussian_sxy=3.0, gaussian_st=1.0, gaussian_weight=3.0,
                    bilateral_sxy=80.0, bilateral_st=2.0, bilateral_srgb=13.0, bilateral_weight=10.0, compat=None):
    """unary [T, L, H, W] logits, frames [T, 3, H, W] -> Q [T, L, H, W] (float64): one fully connected
    CRF over all T*H*W pixels of the clip, symmetric normalisation."""
    T, L, H, W = unary.shape
    fg, fb = video_features(frames, gaussian_sxy, gaussian_st, bilateral_sxy, bilateral_st, bilateral_srgb)
    logits = unary.transpose(0, 1).reshape(L, -1).t().to(torch.float64)
    q = mean_field(logits, ((fg, gaussian_weight), (fb, bilateral_weight)), iterations, compat)
    return q.t().reshape(L, T, H, W).transpose(0, 1)
