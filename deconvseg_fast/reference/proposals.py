"""Readable oracle for proposal paste-and-aggregate (docs/proposals.md).

A Python loop over proposals in index order: each score map is resized to its rounded box with
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` in float64, the part
inside the image is pasted, and the image keeps the pixel-wise max (first maximum / first NaN
wins) or the sum. The box must fit in memory at its full (unclipped) size -- fine for tests.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def round_box(box) -> tuple[int, int, int, int] | None:
    """(x1, y1, x2, y2) floats -> integer pixel box [x_lo, x_hi) x [y_lo, y_hi), or None if empty."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x2 > x1 and y2 > y1):
        return None
    return math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)


def paste_aggregate(scores, boxes, image_index, output_size, mode="max", fill=None, return_winner=False):
    """scores [P, C, h, w], boxes [P, 4], image_index [P] -> out [B, C, H, W] (dtype of scores).

    With ``return_winner`` also the int64 [B, C, H, W] index of the proposal that won each pixel
    (max) or of the last one covering it (sum), -1 where none does.
    """
    B, H, W = output_size
    P, C = scores.shape[:2]
    if fill is None:
        fill = 0.0 if mode == "sum" else float("-inf")
    acc = torch.zeros(B, C, H, W, dtype=torch.float64)
    who = torch.full((B, C, H, W), -1, dtype=torch.int64)
    for p in range(P):
        rb = round_box(boxes[p])
        if rb is None:
            continue
        x_lo, y_lo, x_hi, y_hi = rb
        b = int(image_index[p])
        ya, yb = min(max(y_lo, 0), H), min(max(y_hi, 0), H)
        xa, xb = min(max(x_lo, 0), W), min(max(x_hi, 0), W)
        if ya >= yb or xa >= xb:
            continue
        resized = F.interpolate(scores[p : p + 1].double(), size=(y_hi - y_lo, x_hi - x_lo),
                                mode="bilinear", align_corners=False)[0]
        v = resized[:, ya - y_lo : yb - y_lo, xa - x_lo : xb - x_lo]
        a = acc[b, :, ya:yb, xa:xb]
        w = who[b, :, ya:yb, xa:xb]
        if mode == "sum":
            a += v
            w.fill_(p)
        else:
            take = (w < 0) | (v > a) | (torch.isnan(v) & ~torch.isnan(a))
            a.copy_(torch.where(take, v, a))
            w.copy_(torch.where(take, torch.full_like(w, p), w))
    out = torch.where(who >= 0, acc, torch.full_like(acc, fill)).to(scores.dtype)
    return (out, who) if return_winner else out
