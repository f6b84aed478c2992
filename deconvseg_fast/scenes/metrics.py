"""Segmentation scores (mean IoU, temporal consistency) and a small optical-flow estimator.

All functions take numpy arrays or torch tensors. Labels are integers in ``[0, num_classes)``.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn.functional as TF


def _labels(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.dtype == bool or not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must hold integer labels, got dtype {x.dtype}")
    return x


def _num_classes(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"num_classes must be a positive int, got {n!r}")
    return int(n)


def _check_range(x: np.ndarray, n: int, name: str) -> None:
    if x.size and (x.min() < 0 or x.max() >= n):
        raise ValueError(f"{name} has labels outside [0, num_classes={n}): min {x.min()}, max {x.max()}")


def confusion(pred, gt, num_classes: int) -> np.ndarray:
    """Confusion matrix int64 [K, K]: entry ``[g, p]`` counts the pixels of ground-truth class ``g``
    predicted as ``p``. ``pred`` and ``gt`` have the same shape (one map or a stack of frames)."""
    n = _num_classes(num_classes)
    p, g = _labels(pred, "pred"), _labels(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got {list(p.shape)} and {list(g.shape)}")
    _check_range(p, n, "pred")
    _check_range(g, n, "gt")
    idx = g.astype(np.int64).ravel() * n + p.astype(np.int64).ravel()
    return np.bincount(idx, minlength=n * n).reshape(n, n)


def _miou_from_confusion(cm: np.ndarray) -> float:
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    present = union > 0
    if not present.any():
        return float("nan")
    return float(100.0 * np.mean(tp[present] / union[present]))


def miou(pred, gt, num_classes: int) -> float:
    """Mean intersection over union in percent: IoU_c = TP / (TP + FP + FN) over all pixels of all
    frames, averaged over the classes that occur in ``pred`` or ``gt`` (others are skipped).
    NaN when the inputs are empty."""
    return _miou_from_confusion(confusion(pred, gt, num_classes))


def temporal_consistency(pred, flow, valid, num_classes: int) -> float:
    """How stable a segmentation is along the motion, in percent (100: perfectly consistent).

    For each pair (t, t + 1): frame t + 1's labels are warped back onto frame t by nearest-neighbour
    sampling, ``w_t(p) = pred[t + 1][round(p + flow[t](p))]`` (``round(x) = floor(x + 0.5)``).
    Pixels kept: ``valid[t]`` (all if ``valid`` is None) and ``p + flow`` rounding inside the frame.
    Over the kept pixels, IoU_c between ``pred[t]`` and ``w_t`` for each class c present in either;
    the pair's score is the mean over those classes. The result is the mean over the pairs that keep
    at least one pixel (NaN if none does).

    pred: integer [T, H, W]; flow: float [T-1, H, W, 2] as (dx, dy); valid: bool [T-1, H, W] or None.
    """
    n = _num_classes(num_classes)
    p = _labels(pred, "pred")
    if p.ndim != 3:
        raise ValueError(f"pred must be [T, H, W], got shape {list(p.shape)}")
    _check_range(p, n, "pred")
    T, H, W = p.shape
    f = flow.detach().cpu().numpy() if isinstance(flow, torch.Tensor) else np.asarray(flow)
    if f.shape != (max(T - 1, 0), H, W, 2):
        raise ValueError(f"flow must be [T-1, H, W, 2] = {[max(T - 1, 0), H, W, 2]}, got {list(f.shape)}")
    if not np.issubdtype(f.dtype, np.floating):
        raise TypeError(f"flow must be a float array, got dtype {f.dtype}")
    if valid is not None:
        valid = valid.detach().cpu().numpy() if isinstance(valid, torch.Tensor) else np.asarray(valid)
        if valid.shape != f.shape[:3]:
            raise ValueError(f"valid must be [T-1, H, W] = {list(f.shape[:3])}, got {list(valid.shape)}")
        if valid.dtype != bool:
            raise TypeError(f"valid must be a bool array, got dtype {valid.dtype}")
    xs = np.arange(W, dtype=np.float64)[None, :]
    ys = np.arange(H, dtype=np.float64)[:, None]
    scores = []
    for t in range(T - 1):
        tx = np.floor(xs + f[t, ..., 0] + 0.5).astype(np.int64)
        ty = np.floor(ys + f[t, ..., 1] + 0.5).astype(np.int64)
        keep = (tx >= 0) & (tx < W) & (ty >= 0) & (ty < H)
        if valid is not None:
            keep &= valid[t]
        if not keep.any():
            continue
        warped = p[t + 1][ty[keep], tx[keep]]
        scores.append(_miou_from_confusion(confusion(warped, p[t][keep], n)))
    return float(np.mean(scores)) if scores else float("nan")


def _gray(frame, name: str) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(frame) if not isinstance(frame, torch.Tensor) else frame)
    if x.ndim == 3 and x.shape[-1] == 3:
        x = x.to(torch.float32) @ torch.tensor([0.299, 0.587, 0.114])
    elif x.ndim == 2:
        x = x.to(torch.float32)
    else:
        raise ValueError(f"{name} must be [H, W, 3] or [H, W], got shape {list(x.shape)}")
    return x


def estimate_flow(frame0, frame1, *, levels: int | None = None, window: int = 9, iterations: int = 3) -> np.ndarray:
    """Dense forward flow float32 [H, W, 2] (dx, dy) such that ``frame1(p + flow(p)) ~ frame0(p)``.

    Coarse-to-fine Lucas-Kanade: a pyramid of 2x2 averages (down to about 24 pixels, or ``levels``
    levels); at each level, ``iterations`` Gauss-Newton steps that warp frame1 by the current flow
    (bilinear), then solve the 2x2 normal equations accumulated over a ``window`` x ``window`` box
    around each pixel (regularised so flat regions keep the coarser estimate), after a light blur.
    Frames: uint8 or float, [H, W, 3] (RGB) or [H, W]. Accurate to a fraction of a pixel on textured,
    rigidly moving regions; motion boundaries and untextured areas are blurred, as with any
    local method.
    """
    a, b = _gray(frame0, "frame0"), _gray(frame1, "frame1")
    if a.shape != b.shape:
        raise ValueError(f"frame0 and frame1 must have the same shape, got {list(a.shape)} and {list(b.shape)}")
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd int, got {window!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    H, W = a.shape
    if levels is None:
        levels = 1
        while min(H, W) >> levels >= 24:
            levels += 1
    elif isinstance(levels, bool) or not isinstance(levels, numbers.Integral) or levels < 1:
        raise ValueError(f"levels must be a positive int or None, got {levels!r}")
    # A 5-tap binomial blur first: sensor noise otherwise dominates the gradients of weak textures.
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    k2 = (k1[:, None] * k1[None, :])[None, None]
    a = TF.conv2d(TF.pad(a[None, None] / 255.0, (2, 2, 2, 2), mode="replicate"), k2)
    b = TF.conv2d(TF.pad(b[None, None] / 255.0, (2, 2, 2, 2), mode="replicate"), k2)
    pa, pb = [a], [b]
    for _ in range(levels - 1):
        if min(pa[-1].shape[-2:]) < 2:
            break
        pa.append(TF.avg_pool2d(pa[-1], 2, ceil_mode=True))
        pb.append(TF.avg_pool2d(pb[-1], 2, ceil_mode=True))
    flow = torch.zeros(1, 2, *pa[-1].shape[-2:])
    kx = torch.tensor([[[[-0.5, 0.0, 0.5]]]])
    ky = kx.transpose(-1, -2)
    for A, B in zip(reversed(pa), reversed(pb)):
        h, w = A.shape[-2:]
        if flow.shape[-2:] != (h, w):
            sy, sx = h / flow.shape[-2], w / flow.shape[-1]
            flow = TF.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
            flow = flow * torch.tensor([sx, sy]).view(1, 2, 1, 1)
        gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        for _ in range(iterations):
            px = (gx + flow[0, 0]) / max(w - 1, 1) * 2 - 1
            py = (gy + flow[0, 1]) / max(h - 1, 1) * 2 - 1
            grid = torch.stack([px, py], -1)[None]
            Bw = TF.grid_sample(B, grid, mode="bilinear", padding_mode="border", align_corners=True)
            Ix = TF.conv2d(TF.pad(Bw, (1, 1, 0, 0), mode="replicate"), kx)
            Iy = TF.conv2d(TF.pad(Bw, (0, 0, 1, 1), mode="replicate"), ky)
            It = Bw - A
            r = window // 2
            box = lambda z: TF.avg_pool2d(TF.pad(z, (r, r, r, r), mode="replicate"), window, 1)  # noqa: E731
            sxx, syy, sxy = box(Ix * Ix), box(Iy * Iy), box(Ix * Iy)
            sxt, syt = box(Ix * It), box(Iy * It)
            reg = 1e-4  # in (intensity / 255)^2: flat regions keep the coarser level's flow
            sxx, syy = sxx + reg, syy + reg
            det = sxx * syy - sxy * sxy
            du = -(syy * sxt - sxy * syt) / det
            dv = -(sxx * syt - sxy * sxt) / det
            step = torch.cat([du, dv], 1).clamp(-2.0, 2.0)
            flow = flow + step
    return flow[0].permute(1, 2, 0).contiguous().numpy()
