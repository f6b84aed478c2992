"""``pydensecrf.utils``: unaries from labels or softmax outputs, and pairwise feature matrices.

Same arguments, same formulas, same dtypes and the same order of floating-point operations as
pydensecrf's utils, so the results are bit-identical (tests/test_pydensecrf_compat.py checks it).
These are numpy in, numpy out, like the originals; they feed ``DenseCRF.setUnaryEnergy`` and
``DenseCRF.addPairwiseEnergy``.
"""
from __future__ import annotations

from logging import warning
from numbers import Number

import numpy as np

__all__ = ["unary_from_labels", "unary_from_softmax", "create_pairwise_gaussian",
           "create_pairwise_bilateral", "compute_unary", "softmax_to_unary"]


def unary_from_labels(labels, n_labels, gt_prob, zero_unsure=True):
    """(n_labels, labels.size) float32 unary from a label map, trusting each label with `gt_prob`.

    Every variable gets energy -log(gt_prob) for its label and -log((1 - gt_prob) / (n_labels - 1))
    for the others. With `zero_unsure`, label value 0 means "unknown" (uniform, -log(1 / n_labels))
    and labels 1..n_labels map to rows 0..n_labels-1; otherwise labels 0..n_labels-1 are the rows.
    """
    assert 0 < gt_prob < 1, "`gt_prob must be in (0,1)."
    flat = labels.flatten()
    n = len(flat)
    other = -np.log((1.0 - gt_prob) / (n_labels - 1))
    mine = -np.log(gt_prob)
    U = np.full((n_labels, n), other, dtype="float32")
    rows = flat - 1 if zero_unsure else flat
    U[rows, np.arange(n)] = mine
    if zero_unsure:
        # Written last: these columns had a label-(-1) row set above, which this overwrites.
        U[:, flat == 0] = -np.log(1.0 / n_labels)
    return U


def compute_unary(labels, M, GT_PROB=0.5):  # noqa: N803 (pydensecrf's names)
    """Deprecated alias of `unary_from_labels` (kept because pydensecrf has it)."""
    warning("pydensecrf.compute_unary is deprecated, use unary_from_labels instead.")
    return unary_from_labels(labels, M, GT_PROB)


def unary_from_softmax(sm, scale=None, clip=1e-5):
    """Negative log of class probabilities `sm` (classes first, any further dims flattened).

    `scale` in (0, 1] mixes with the uniform distribution (``scale * sm + (1 - scale) / C``);
    `clip` is the smallest probability kept, so that the log stays finite (None: no clipping).
    Returns float32 (C, prod(other dims)).
    """
    num_cls = sm.shape[0]
    if scale is not None:
        assert 0 < scale <= 1, "`scale` needs to be in (0,1]"
        uniform = np.ones(sm.shape) / num_cls
        sm = scale * sm + (1 - scale) * uniform
    if clip is not None:
        sm = np.clip(sm, clip, 1.0)
    return -np.log(sm).reshape([num_cls, -1]).astype(np.float32)


def softmax_to_unary(sm, GT_PROB=1):  # noqa: N803
    """Deprecated alias of `unary_from_softmax` (kept because pydensecrf has it)."""
    warning("pydensecrf.softmax_to_unary is deprecated, use unary_from_softmax instead.")
    return unary_from_softmax(sm, None if GT_PROB == 1 else GT_PROB, clip=None)


def _scaled_grid(shape, sdims) -> np.ndarray:
    """float32 [len(shape), *shape]: the index along each axis (ij order), divided by sdims[axis]."""
    grid = np.array(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), dtype=np.float32)
    for axis, s in enumerate(sdims):
        grid[axis] /= s
    return grid


def create_pairwise_gaussian(sdims, shape):
    """Features for a smoothness kernel over an array of any `shape`: (len(sdims), prod(shape))
    float32, row i the coordinate along axis i divided by sdims[i].

    For an image, ``shape=(H, W)`` gives rows (y / sdims[0], x / sdims[1]): the same Gaussian as
    ``DenseCRF2D.addPairwiseGaussian`` with sxy = (sdims[1], sdims[0]), features listed y first.
    """
    grid = _scaled_grid(shape, sdims)
    return grid.reshape([len(sdims), -1])


def create_pairwise_bilateral(sdims, schan, img, chdim=-1):
    """Features for an appearance kernel: the scaled coordinates (as `create_pairwise_gaussian`)
    followed by the image channels divided by `schan` (a number for all channels, or one per
    channel). `chdim` is the channel axis of `img` (-1: a single-channel image without one).
    Returns float32 (len(sdims) + channels, number of pixels).
    """
    if chdim == -1:
        channels = img[np.newaxis].astype(np.float32)
    else:
        channels = np.rollaxis(img, chdim).astype(np.float32)
    if isinstance(schan, Number):
        channels /= schan
    else:
        for c, s in enumerate(schan):
            channels[c] /= s
    grid = _scaled_grid(channels.shape[1:], sdims)
    feats = np.concatenate([grid, channels])
    return feats.reshape([feats.shape[0], -1])
