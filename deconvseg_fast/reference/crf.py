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
    kernels = []
    for f, w in ((fg, gaussian_weight), (fb, bilateral_weight)):
        norm = gaussian_filter(torch.ones(H * W, 1), f).rsqrt()
        kernels.append((f, norm, w))
    q = torch.softmax(logits, 1)
    for _ in range(iterations):
        msg = sum(w * norm * gaussian_filter(norm * q, f) for f, norm, w in kernels)
        q = torch.softmax(logits + msg if compat is None else logits - msg @ compat.to(torch.float64).t(), 1)
    return q.t().reshape(L, H, W)
