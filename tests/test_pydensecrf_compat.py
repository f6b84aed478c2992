"""deconvseg_fast.compat.pydensecrf against pydensecrf itself (PyPI pydensecrf2, pinned in
requirements.txt), the oracle: same calls on both modules, same inputs, compare the outputs.

- Real photographs (scikit-image's bundled samples, no download) with a noisy unary from a colour
  clustering, DeepLab's CRF parameters: MAP labels and marginals Q.
- Small images: every method, every normalisation and compatibility type, the utils functions
  (bit-identical), the W/H conventions on non-square images, and bad input (same exception type,
  pydensecrf's message, plus the argument name).

The bounds on Q, and why: both sides run the same float32 algorithm (Krähenbühl's lattice and mean
field). Our lattice sums the same splat products in another order (threads, SIMD), and our fused
mean-field op uses a fast exp; each changes a value by ~1e-7 relative, and ten rounds of filter +
softmax carry that forward. Almost everywhere Q then agrees to ~1e-6; at the rare pixel whose two
best labels are nearly tied, mean field amplifies it. Measured on the four photographs below with
DeepLab's parameters: max |dQ| 1.5e-4 (one near-tied pixel of astronaut 401x401, 21 labels; the
others <= 2e-5), mean |dQ| <= 3e-7, MAP agreement >= 99.999 %. Asserted: max 1e-3, mean 2e-6
(6-7x room for other thread counts and compilers), MAP >= 99.5 % (the issue's requirement). Real
errors are far larger: a wrong normalisation, a swapped x/y, a missing phantom lattice point or a
sign error moves Q by 1e-2 to 1 (each mutation tried while writing these tests failed them).
"""
import re

import numpy as np
import pytest
import torch

pd = pytest.importorskip("pydensecrf.densecrf", reason="the oracle: pip install pydensecrf2")
pd_utils = pytest.importorskip("pydensecrf.utils")

import deconvseg_fast.compat.pydensecrf.densecrf as od  # noqa: E402
import deconvseg_fast.compat.pydensecrf.utils as od_utils  # noqa: E402

BOTH = pytest.mark.parametrize("m", [pd, od], ids=["pydensecrf", "ours"])

# Bounds on |Q_ours - Q_pydensecrf| (see the module docstring for the measurements behind them).
Q_MAX_ABS = 1e-3
Q_MEAN_ABS = 2e-6
MAP_AGREEMENT = 0.995


# ---- inputs -----------------------------------------------------------------------------------------
def photo(name: str, width: int) -> np.ndarray:
    """A scikit-image sample photo resized to `width` (aspect kept): (H, W, 3) uint8 C-contiguous."""
    skdata = pytest.importorskip("skimage.data")
    transform = pytest.importorskip("skimage.transform")
    im = getattr(skdata, name)()
    h = round(im.shape[0] * width / im.shape[1])
    small = transform.resize(im, (h, width), order=1, anti_aliasing=True, preserve_range=True)
    return np.ascontiguousarray(small.round().astype(np.uint8))


def noisy_unary(img: np.ndarray, n_labels: int, seed: int = 0, noise: float = 1.0) -> np.ndarray:
    """(L, H*W) float32 unary: a coarse colour clustering (a few k-means steps), softened and
    corrupted by Gaussian noise in the logits, so that mean field has work to do."""
    rng = np.random.default_rng(seed)
    h, w, _ = img.shape
    px = img.reshape(-1, 3).astype(np.float64)
    centres = px[rng.choice(len(px), n_labels, replace=False)]
    for _ in range(4):
        nearest = ((px[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        for label in range(n_labels):
            if (nearest == label).any():
                centres[label] = px[nearest == label].mean(0)
    logits = -((px[:, None] - centres[None]) ** 2).sum(-1) / (2 * 40.0 ** 2)
    logits += rng.normal(0.0, noise, logits.shape)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return od_utils.unary_from_softmax(np.ascontiguousarray(p.T.reshape(n_labels, h, w)))


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Blocky random colours (regions for the bilateral term to follow) plus a little noise."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, ((h + 7) // 8, (w + 7) // 8, 3))
    im = np.repeat(np.repeat(blocks, 8, 0), 8, 1)[:h, :w] + rng.integers(-10, 11, (h, w, 3))
    return np.ascontiguousarray(np.clip(im, 0, 255).astype(np.uint8))


def random_unary(n_labels: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n_labels, n)) * 4).astype(np.float32)


def deeplab_crf(m, img, U, iterations=10):
    h, w, _ = img.shape
    d = m.DenseCRF2D(w, h, U.shape[0])
    d.setUnaryEnergy(U)
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=10)
    return np.array(d.inference(iterations))


def assert_q_close(ours, theirs, max_abs=Q_MAX_ABS, mean_abs=Q_MEAN_ABS):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.float32
    diff = np.abs(ours - theirs)
    assert diff.max() <= max_abs, f"max |dQ| = {diff.max():.3g} > {max_abs}"
    assert diff.mean() <= mean_abs, f"mean |dQ| = {diff.mean():.3g} > {mean_abs}"


# ---- real photographs, DeepLab's parameters --------------------------------------------------------
# Pixel counts: astronaut 401x401 = 160801 (4k+1), chelsea 449x299 (4k+3), coffee 500x333 (4k),
# rocket 321x214 (4k+2): densecrf's SSE lattice adds (-N) % 4 phantom points, see
# test_phantom_lattice_points.
@pytest.mark.parametrize("name, n_labels, width", [
    ("astronaut", 21, 401), ("chelsea", 5, 449), ("coffee", 12, 500), ("rocket", 8, 321),
])
def test_photographs_match_pydensecrf(name, n_labels, width):
    img = photo(name, width)
    assert img.shape[0] * img.shape[1] % 4 == {"astronaut": 1, "chelsea": 3, "coffee": 0,
                                               "rocket": 2}[name]
    U = noisy_unary(img, n_labels)
    ours, theirs = deeplab_crf(od, img, U), deeplab_crf(pd, img, U)

    agreement = (ours.argmax(0) == theirs.argmax(0)).mean()
    assert agreement >= MAP_AGREEMENT, f"MAP labels agree on {agreement:.4%} of pixels"
    assert_q_close(ours, theirs)
    # The test is not vacuous: the CRF changed a large share of the unary's own decisions.
    assert (theirs.argmax(0) != U.argmin(0)).mean() > 0.2


@pytest.mark.parametrize("n_points", [20, 21, 22, 23])
def test_phantom_lattice_points(n_points, monkeypatch):
    """densecrf's SSE build elevates points four at a time and hashes the padding lanes (features
    all zero) into the lattice too; their vertices relay values in the blur. With a few points
    spread around the origin of feature space that changes Q by 0.03 to 0.4 when N % 4 != 0."""
    rng = np.random.default_rng(7)
    f = np.ascontiguousarray((rng.random((5, n_points)) * 3 - 0.5).astype(np.float32))
    U = (rng.random((3, n_points)) * 3).astype(np.float32)

    def run(m):
        d = m.DenseCRF(n_points, 3)
        d.setUnaryEnergy(U)
        d.addPairwiseEnergy(f, 5.0)
        return np.array(d.inference(5))

    theirs = run(pd)
    assert_q_close(run(od), theirs)
    monkeypatch.setattr(od, "_SSE_BLOCK", 1)  # no phantoms: this test can fail
    if n_points % 4:
        assert np.abs(run(od) - theirs).max() > 20 * Q_MAX_ABS
    else:
        assert_q_close(run(od), theirs)


# ---- small images: every method ---------------------------------------------------------------------
H, W, L = 19, 27, 4  # non-square, W != H, so that a W/H mix-up cannot go unnoticed


def both(build):
    """Run build(module) on pydensecrf and on ours; return (ours, theirs)."""
    return build(od), build(pd)


@pytest.mark.parametrize("normalization", ["NO_NORMALIZATION", "NORMALIZE_BEFORE",
                                           "NORMALIZE_AFTER", "NORMALIZE_SYMMETRIC"])
@pytest.mark.parametrize("compat", ["potts", "diagonal", "matrix"])
def test_normalizations_and_compatibilities(normalization, compat):
    img, U = random_image(H, W), random_unary(L, H * W)
    rng = np.random.default_rng(1)
    c = {"potts": 5.0, "diagonal": rng.random(L).astype(np.float32) * 5,
         "matrix": (rng.random((L, L)) * 5).astype(np.float32)}[compat]  # not symmetric on purpose

    def build(m):
        norm = getattr(m, normalization)
        d = m.DenseCRF2D(W, H, L)
        d.setUnaryEnergy(U)
        d.addPairwiseGaussian((2, 5), c, normalization=norm)
        d.addPairwiseBilateral((9, 4), (13, 20, 30), img, c, normalization=norm)
        return np.array(d.inference(5))

    ours, theirs = both(build)
    assert_q_close(ours, theirs)


@pytest.mark.parametrize("kernel", ["CONST_KERNEL", "DIAG_KERNEL", "FULL_KERNEL"])
def test_kernel_types(kernel):
    """The kernel type only matters to densecrf's learning code: inference is the same."""
    img, U = random_image(H, W), random_unary(L, H * W)

    def build(m):
        d = m.DenseCRF2D(W, H, L)
        d.setUnaryEnergy(U)
        d.addPairwiseBilateral(5, 13, img, 4, kernel=getattr(m, kernel))
        return np.array(d.inference(4))

    ours, theirs = both(build)
    assert_q_close(ours, theirs)


def test_dense_crf_with_util_features_and_add_pairwise_energy():
    """DenseCRF(N, L) + addPairwiseEnergy on utils' feature matrices, 3-D (volume) features too."""
    img, U = random_image(H, W), random_unary(L, H * W)
    g = pd_utils.create_pairwise_gaussian((3, 2), (H, W))
    b = pd_utils.create_pairwise_bilateral((10, 7), (13, 15, 17), img, chdim=2)
    vol_shape = (3, 9, 19)
    v = pd_utils.create_pairwise_gaussian((1, 2, 3), vol_shape)
    U3 = random_unary(L, int(np.prod(vol_shape)), seed=3)

    def build(m):
        d = m.DenseCRF(H * W, L)
        d.setUnaryEnergy(U)
        d.addPairwiseEnergy(g, compat=3)
        d.addPairwiseEnergy(b, compat=np.full(L, -6, np.float32),
                            kernel=m.FULL_KERNEL, normalization=m.NORMALIZE_AFTER)
        d3 = m.DenseCRF(U3.shape[1], L)
        d3.setUnaryEnergy(U3)
        d3.addPairwiseEnergy(v, compat=4)
        return np.array(d.inference(6)), np.array(d3.inference(3))

    (o2, o3), (t2, t3) = both(build)
    assert_q_close(o2, t2)
    assert_q_close(o3, t3)


def test_step_inference_and_kl_divergence():
    img, U = random_image(H, W), random_unary(L, H * W)

    def build(m):
        d = m.DenseCRF2D(W, H, L)
        d.setUnaryEnergy(U)
        d.addPairwiseGaussian(3, 3)
        d.addPairwiseBilateral(20, 13, img, 10)
        Q, tmp1, tmp2 = d.startInference()
        q0 = np.array(Q)
        kls = [d.klDivergence(Q)]
        for _ in range(3):
            d.stepInference(Q, tmp1, tmp2)  # updates Q in place
            kls.append(d.klDivergence(Q))
        return q0, np.array(Q), np.array(d.inference(3)), np.array(d.inference(0)), kls

    (q0, q3, inf3, inf0, kls), (tq0, tq3, tinf3, tinf0, tkls) = both(build)
    np.testing.assert_allclose(q0, tq0, rtol=0, atol=1e-6)  # both softmax(-U)
    np.testing.assert_array_equal(inf0, q0)
    # inference runs the fused C++ op (fast exp), stepInference torch's ops: not bit-identical.
    assert_q_close(q3, inf3)
    assert_q_close(q3, tq3)
    # KL: sums of ~N*L float32 terms on both sides; relative agreement to 1e-5.
    np.testing.assert_allclose(kls, tkls, rtol=1e-5)
    assert kls[-1] < kls[0]  # mean field lowers the KL divergence


def test_unary_variants():
    """setUnary(ConstUnary), setUnary(LogisticUnary), setUnaryEnergy(u, f), and no unary at all."""
    img, U = random_image(H, W), random_unary(L, H * W)
    n = H * W
    rng = np.random.default_rng(2)
    f = np.ascontiguousarray((np.eye(n) + 0.01 * rng.random((n, n))).astype(np.float32))

    def build(m):
        out = []
        for how in ("const", "logistic", "u_f", "none"):
            d = m.DenseCRF2D(W, H, L)
            if how == "const":
                d.setUnary(m.ConstUnary(U))
            elif how == "logistic":
                d.setUnary(m.LogisticUnary(U, f))
            elif how == "u_f":
                d.setUnaryEnergy(U, f)
            d.addPairwiseBilateral(20, 13, img, 10)
            out.append(np.array(d.inference(3)))
        return out

    ours, theirs = both(build)
    for o, t in zip(ours, theirs):
        assert_q_close(o, t)
    np.testing.assert_array_equal(ours[1], ours[2])
    np.testing.assert_allclose(ours[3], 1.0 / L, atol=1e-6)  # no unary: uniform, as densecrf


def test_return_type_and_layout():
    """Q converts with np.array like pydensecrf's eigen.MatrixXf: (L, N) float32, column-major."""
    U = random_unary(L, H * W)

    def build(m):
        d = m.DenseCRF2D(W, H, L)
        d.setUnaryEnergy(U)
        d.addPairwiseGaussian(3, 3)
        return d.inference(2)

    ours, theirs = both(build)
    a, b = np.asarray(ours), np.asarray(theirs)
    assert a.shape == b.shape == (L, H * W) and a.dtype == b.dtype == np.float32
    assert a.flags["F_CONTIGUOUS"] == b.flags["F_CONTIGUOUS"]
    np.testing.assert_array_equal(np.argmax(ours, axis=0), np.argmax(theirs, axis=0))
    assert isinstance(ours, np.ndarray)


def test_constants_match():
    for name in ("CONST_KERNEL", "DIAG_KERNEL", "FULL_KERNEL", "NO_NORMALIZATION",
                 "NORMALIZE_BEFORE", "NORMALIZE_AFTER", "NORMALIZE_SYMMETRIC"):
        ours, theirs = getattr(od, name), getattr(pd, name)
        assert int(ours) == int(theirs) and ours.name == theirs.name
        assert isinstance(ours, int)
    assert [m.name for m in od.KernelType] == [m.name for m in pd.KernelType]
    assert [m.name for m in od.NormalizationType] == [m.name for m in pd.NormalizationType]


def test_deterministic_and_input_not_modified():
    img, U = random_image(H, W), random_unary(L, H * W)
    U_copy, img_copy = U.copy(), img.copy()
    a = deeplab_crf(od, img, U, 5)
    b = deeplab_crf(od, img, U, 5)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(U, U_copy)
    np.testing.assert_array_equal(img, img_copy)


def test_torch_tensor_inputs():
    img, U = random_image(H, W), random_unary(L, H * W)
    d = od.DenseCRF2D(W, H, L)
    d.setUnaryEnergy(torch.from_numpy(U))
    d.addPairwiseGaussian(3, torch.full((L,), -3.0))
    d.addPairwiseBilateral(80, 13, torch.from_numpy(img), 10)
    e = od.DenseCRF2D(W, H, L)
    e.setUnaryEnergy(U)
    e.addPairwiseGaussian(3, np.full(L, -3.0, np.float32))
    e.addPairwiseBilateral(80, 13, img, 10)
    np.testing.assert_array_equal(np.array(d.inference(3)), np.array(e.inference(3)))


@pytest.mark.parametrize("h, w, n_labels", [(1, 1, 2), (1, 7, 3), (6, 1, 3), (5, 4, 1)])
def test_degenerate_sizes(h, w, n_labels):
    img, U = random_image(h, w), random_unary(n_labels, h * w)
    ours, theirs = deeplab_crf(od, img, U, 3), deeplab_crf(pd, img, U, 3)
    assert_q_close(ours, theirs)


def test_zero_variables():
    for m in (pd, od):
        assert np.array(m.DenseCRF(0, 3).inference(2)).shape == (3, 0)


@pytest.mark.parametrize("w, h", [(0, 5), (5, 0), (0, 0)])
def test_empty_images(w, h):
    # Ours only: pydensecrf's buffer conversion raises IndexError on the empty unary.
    d = od.DenseCRF2D(w, h, 3)
    d.setUnaryEnergy(np.zeros((3, 0), np.float32))
    d.addPairwiseGaussian(3, 3)
    d.addPairwiseBilateral(80, 13, np.zeros((h, w, 3), np.uint8), 10)
    assert np.array(d.inference(2)).shape == (3, 0)
    assert d.klDivergence(d.inference(1)) == 0.0


# ---- W/H conventions --------------------------------------------------------------------------------
def test_width_height_conventions():
    """DenseCRF2D(W, H, L); unary (L, H*W) row-major over (H, W); image (H, W, 3); x = column.

    Anisotropic standard deviations (sx != sy) make a swapped x/y change the result."""
    h, w = 13, 31
    img, U = random_image(h, w), random_unary(L, h * w)

    def build(m):
        d = m.DenseCRF2D(w, h, L)
        d.setUnaryEnergy(U)
        d.addPairwiseGaussian((1.0, 8.0), 3)
        d.addPairwiseBilateral((30.0, 2.0), 13, img, 10)
        return np.array(d.inference(5))

    ours, theirs = both(build)
    assert_q_close(ours, theirs)

    # The same pairwise terms through addPairwiseEnergy with features built by hand in densecrf's
    # order (x / sx, y / sy, r / sr, g / sg, b / sb): bit-identical.
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    gauss = np.stack([xs / np.float32(1.0), ys / np.float32(8.0)]).reshape(2, -1)
    bil = np.concatenate([np.stack([xs / np.float32(30.0), ys / np.float32(2.0)]),
                          np.moveaxis(img, 2, 0).astype(np.float32) / np.float32(13.0)])
    d = od.DenseCRF(h * w, L)
    d.setUnaryEnergy(U)
    d.addPairwiseEnergy(np.ascontiguousarray(gauss), 3)
    d.addPairwiseEnergy(np.ascontiguousarray(bil.reshape(5, -1)), 10)
    np.testing.assert_array_equal(np.array(d.inference(5)), ours)

    # Swapping the axes really does change Q (so the check above can fail).
    swapped = od.DenseCRF2D(w, h, L)
    swapped.setUnaryEnergy(U)
    swapped.addPairwiseGaussian((8.0, 1.0), 3)
    swapped.addPairwiseBilateral((2.0, 30.0), 13, img, 10)
    assert np.abs(np.array(swapped.inference(5)) - ours).max() > 1e-2


@BOTH
def test_transposed_image_is_rejected(m):
    h, w = 13, 31
    d = m.DenseCRF2D(w, h, L)
    with pytest.raises(ValueError, match="Bad shape for pairwise bilateral"):
        d.addPairwiseBilateral(80, 13, np.ascontiguousarray(random_image(w, h)), 10)
    if m is od:
        with pytest.raises(ValueError, match=r"rgbim: .*Need \(13, 31, 3\).*W=31, H=13"):
            d.addPairwiseBilateral(80, 13, np.ascontiguousarray(random_image(w, h)), 10)


# ---- utils: bit-identical ---------------------------------------------------------------------------
def assert_identical(ours, theirs):
    assert type(ours) is type(theirs) and ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("zero_unsure", [True, False])
@pytest.mark.parametrize("gt_prob", [0.5, 0.7, 0.95])
def test_unary_from_labels(zero_unsure, gt_prob):
    rng = np.random.default_rng(4)
    n = 6
    labels = rng.integers(0 if not zero_unsure else 0, n + (1 if zero_unsure else 0), (11, 17))
    assert_identical(od_utils.unary_from_labels(labels, n, gt_prob, zero_unsure),
                     pd_utils.unary_from_labels(labels, n, gt_prob, zero_unsure))


@pytest.mark.parametrize("scale, clip", [(None, 1e-5), (0.8, 1e-5), (None, None), (1.0, 0.01)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_unary_from_softmax(scale, clip, dtype):
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 3, (5, 9, 13))
    sm = np.exp(logits) / np.exp(logits).sum(0)
    sm[0, 0, 0] = 0.0  # exercises the clipping (and log(0) when clip is None)
    sm = sm.astype(dtype)
    with np.errstate(divide="ignore"):
        assert_identical(od_utils.unary_from_softmax(sm, scale, clip),
                         pd_utils.unary_from_softmax(sm, scale, clip))


@pytest.mark.parametrize("sdims, shape", [((3, 3), (19, 27)), ((80, 40), (5, 7)),
                                          ((1, 2, 3), (4, 5, 6))])
def test_create_pairwise_gaussian(sdims, shape):
    assert_identical(od_utils.create_pairwise_gaussian(sdims, shape),
                     pd_utils.create_pairwise_gaussian(sdims, shape))


@pytest.mark.parametrize("schan, chdim, img_shape", [
    ((13, 13, 13), 2, (19, 27, 3)), (13, 2, (19, 27, 3)), ((5, 7, 9, 11), 0, (4, 6, 8)),
    (7, -1, (10, 12)), ((3.5,), -1, (10, 12)),
])
def test_create_pairwise_bilateral(schan, chdim, img_shape):
    rng = np.random.default_rng(6)
    img = rng.integers(0, 256, img_shape).astype(np.uint8)
    sdims = (80, 60)
    assert_identical(od_utils.create_pairwise_bilateral(sdims, schan, img, chdim),
                     pd_utils.create_pairwise_bilateral(sdims, schan, img, chdim))


def test_utils_assertions():
    for mod in (od_utils, pd_utils):
        with pytest.raises(AssertionError, match="gt_prob"):
            mod.unary_from_labels(np.zeros(4, int), 3, 1.5)
        with pytest.raises(AssertionError, match="scale"):
            mod.unary_from_softmax(np.full((2, 3), 0.5), scale=0)


# ---- bad input: pydensecrf's exception type and message, plus the argument's name -----------------
U_OK = random_unary(2, 12)
IM_OK = np.zeros((3, 4, 3), np.uint8)
_readonly = U_OK.copy()
_readonly.flags.writeable = False

# (id, call on a fresh DenseCRF2D(4, 3, 2), exception type, pydensecrf's message, our argument name)
BAD_INPUTS = [
    ("unary float64", lambda d: d.setUnaryEnergy(U_OK.astype(np.float64)), ValueError,
     "Buffer dtype mismatch, expected 'float' but got 'double'", "u"),
    ("unary int32", lambda d: d.setUnaryEnergy(U_OK.astype(np.int32)), ValueError,
     "Buffer dtype mismatch, expected 'float' but got 'int'", "u"),
    ("unary 1-D", lambda d: d.setUnaryEnergy(U_OK.ravel()), ValueError,
     "Buffer has wrong number of dimensions (expected 2, got 1)", "u"),
    ("unary Fortran order", lambda d: d.setUnaryEnergy(np.asfortranarray(U_OK)), ValueError,
     "ndarray is not C-contiguous", "u"),
    ("unary strided", lambda d: d.setUnaryEnergy(np.zeros((2, 24), np.float32)[:, ::2]),
     ValueError, "ndarray is not C-contiguous", "u"),
    ("unary wrong shape", lambda d: d.setUnaryEnergy(np.zeros((3, 12), np.float32)), ValueError,
     "Bad shape for unary energy (Need (2, 12), got (3, 12))", "u"),
    ("unary transposed", lambda d: d.setUnaryEnergy(np.zeros((12, 2), np.float32)), ValueError,
     "Bad shape for unary energy (Need (2, 12), got (12, 2))", "u"),
    ("unary None", lambda d: d.setUnaryEnergy(None), TypeError,
     "Argument 'u' must not be None", "u"),
    ("unary list", lambda d: d.setUnaryEnergy([[0.0] * 12] * 2), TypeError,
     "a bytes-like object is required, not 'list'", "u"),
    ("unary read-only", lambda d: d.setUnaryEnergy(_readonly), ValueError,
     "buffer source array is read-only", "u"),
    ("image transposed", lambda d: d.addPairwiseBilateral(3, 5, np.zeros((4, 3, 3), np.uint8), 3),
     ValueError, "Bad shape for pairwise bilateral (Need (3, 4, 3), got", "rgbim"),
    ("image RGBA", lambda d: d.addPairwiseBilateral(3, 5, np.zeros((3, 4, 4), np.uint8), 3),
     ValueError, "addPairwiseBilateral only works for RGB images.", "rgbim"),
    ("image float32", lambda d: d.addPairwiseBilateral(3, 5, IM_OK.astype(np.float32), 3),
     ValueError, "Buffer dtype mismatch, expected 'unsigned char' but got 'float'", "rgbim"),
    ("image 2-D", lambda d: d.addPairwiseBilateral(3, 5, IM_OK[..., 0].copy(), 3), ValueError,
     "Buffer has wrong number of dimensions (expected 3, got 2)", "rgbim"),
    ("image strided", lambda d: d.addPairwiseBilateral(3, 5, np.zeros((3, 4, 6), np.uint8)[..., ::2],
                                                       3), ValueError,
     "ndarray is not C-contiguous", "rgbim"),
    ("image None", lambda d: d.addPairwiseBilateral(3, 5, None, 3), TypeError,
     "Argument 'rgbim' must not be None", "rgbim"),
    ("sxy too short", lambda d: d.addPairwiseBilateral((3,), 5, IM_OK, 3), IndexError,
     "tuple index out of range", "sxy"),
    ("sxy string", lambda d: d.addPairwiseGaussian("a", 3), TypeError,
     "must be real number, not str", "sxy"),
    ("kernel string", lambda d: d.addPairwiseGaussian(3, 3, kernel="a"), TypeError,
     "an integer is required", "kernel"),
    ("compat list", lambda d: d.addPairwiseGaussian(3, [1.0, 2.0]), TypeError,
     "memoryview: a bytes-like object is required, not 'list'", "compat"),
    ("compat None", lambda d: d.addPairwiseGaussian(3, None), TypeError,
     "memoryview: a bytes-like object is required, not 'NoneType'", "compat"),
    ("compat float64 vector", lambda d: d.addPairwiseGaussian(3, np.ones(2)), ValueError,
     "Buffer dtype mismatch, expected 'float' but got 'double'", "compat"),
    ("compat 3-D", lambda d: d.addPairwiseGaussian(3, np.ones((2, 2, 2), np.float32)), ValueError,
     "LabelCompatibility of dimension >2 not meaningful.", "compat"),
    ("compat 0-D array", lambda d: d.addPairwiseGaussian(3, np.array(2.0, np.float32)), ValueError,
     "LabelCompatibility of dimension >2 not meaningful.", "compat"),
    ("compat Fortran matrix",
     lambda d: d.addPairwiseGaussian(3, np.asfortranarray(np.arange(4, dtype=np.float32)
                                                          .reshape(2, 2))),
     ValueError, "ndarray is not C-contiguous", "compat"),
    ("features wrong N", lambda d: d.addPairwiseEnergy(np.zeros((2, 11), np.float32), 3),
     ValueError, "Bad shape for pairwise energy (Need (?, 12), got (2, 11))", "features"),
    ("features float64", lambda d: d.addPairwiseEnergy(np.zeros((2, 12)), 3), ValueError,
     "Buffer dtype mismatch, expected 'float' but got 'double'", "features"),
    ("size string", lambda d: type(d)("4", 3, 2), TypeError, "an integer is required", "w"),
    ("step on a plain list", lambda d: d.stepInference([[0.5] * 12] * 2, None, None), TypeError,
     "Argument 'Q' has incorrect type", "Q"),
]


@pytest.mark.parametrize("call, exc, message, arg", [b[1:] for b in BAD_INPUTS],
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_like_pydensecrf(call, exc, message, arg):
    with pytest.raises(exc, match=re.escape(message)):
        call(pd.DenseCRF2D(4, 3, 2))
    with pytest.raises(exc, match=rf"^{re.escape(arg)}\b.*{re.escape(message)}"):
        call(od.DenseCRF2D(4, 3, 2))


# Where pydensecrf accepts the input and then crashes, corrupts memory or computes garbage, ours
# refuses it; these have no pydensecrf counterpart to compare with.
OUR_ERRORS = [
    ("negative width", lambda: od.DenseCRF2D(-4, 3, 2), ValueError, r"^w: .*non-negative"),
    ("fractional size", lambda: od.DenseCRF(4.5, 2), TypeError, r"^nvar: expected an integer"),
    ("kernel out of range", lambda: od.DenseCRF2D(4, 3, 2).addPairwiseGaussian(3, 3, kernel=7),
     ValueError, r"^kernel: expected one of CONST_KERNEL"),
    ("normalization out of range",
     lambda: od.DenseCRF2D(4, 3, 2).addPairwiseGaussian(3, 3, normalization=-1),
     ValueError, r"^normalization: expected one of NO_NORMALIZATION"),
    ("zero sxy", lambda: od.DenseCRF2D(4, 3, 2).addPairwiseGaussian(0, 3), ValueError,
     r"^sxy\[0\]: standard deviations must be positive"),
    ("negative srgb", lambda: od.DenseCRF2D(4, 3, 2).addPairwiseBilateral(3, (1, -2, 3), IM_OK, 3),
     ValueError, r"^srgb\[1\]: standard deviations must be positive"),
    ("nan sxy", lambda: od.DenseCRF2D(4, 3, 2).addPairwiseGaussian((1, float("nan")), 3),
     ValueError, r"^sxy\[1\]: standard deviations must be positive"),
    ("compat vector length", lambda: od.DenseCRF2D(4, 3, 2).addPairwiseGaussian(
        3, np.ones(3, np.float32)), ValueError, r"^compat: .*one weight per label.*\(2,\)"),
    ("compat matrix shape", lambda: od.DenseCRF2D(4, 3, 2).addPairwiseGaussian(
        3, np.ones((2, 3), np.float32)), ValueError, r"^compat: .*\(labels, labels\)"),
    ("features NaN", lambda: od.DenseCRF(3, 2).addPairwiseEnergy(
        np.array([[0, np.nan, 1]], np.float32), 3), ValueError, r"^features: must be finite"),
    ("features no rows", lambda: od.DenseCRF(3, 2).addPairwiseEnergy(
        np.zeros((0, 3), np.float32), 3), ValueError, r"^features: need at least one"),
    ("logistic f shape", lambda: od.DenseCRF(3, 2).setUnaryEnergy(
        np.zeros((2, 3), np.float32), np.eye(2, dtype=np.float32)), ValueError,
     r"^f: Bad shape .*Need \(3, 3\)"),
    ("step Q wrong shape", lambda: od.DenseCRF(3, 2).stepInference(
        np.zeros((3, 2), np.float32), None, None), ValueError, r"^Q: Bad shape .*Need \(2, 3\)"),
    ("step Q float64", lambda: od.DenseCRF(3, 2).stepInference(
        np.zeros((2, 3)), None, None), ValueError, r"^Q: .*writeable float32"),
    ("kl Q wrong shape", lambda: od.DenseCRF(3, 2).klDivergence(np.zeros((3, 3), np.float32)),
     ValueError, r"^Q: Bad shape"),
    ("setUnary not a Unary", lambda: od.DenseCRF(3, 2).setUnary(np.zeros((2, 3), np.float32)),
     TypeError, r"^u: .*expected Unary"),
    ("extra constructor argument", lambda: od.DenseCRF2D(4, 3, 2, 9), TypeError, "positional argument"),
    ("no addPairwiseGaussian on DenseCRF", lambda: od.DenseCRF(12, 2).addPairwiseGaussian(3, 3),
     AttributeError, "addPairwiseGaussian"),
]


@pytest.mark.parametrize("call, exc, match", [b[1:] for b in OUR_ERRORS], ids=[b[0] for b in OUR_ERRORS])
def test_bad_input_ours(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("n_labels", [1, 3])
def test_inputs_are_copied(n_labels):
    # densecrf copies the unary, the image's features and addPairwiseEnergy's features: changing the
    # caller's arrays afterwards changes nothing. A one-label unary is the case a transposing view
    # makes easy to miss (its transpose is already contiguous); its Q is 1 whatever the unary, so
    # the KL divergence, which reads the unary, checks it.
    img, U = random_image(H, W), random_unary(n_labels, H * W)
    feats = od_utils.create_pairwise_gaussian(sdims=(3, 3), shape=(H, W))
    d = od.DenseCRF2D(W, H, n_labels)
    d.setUnaryEnergy(U)
    d.addPairwiseBilateral(80, 13, img, 10)
    d.addPairwiseEnergy(feats, 3)
    q, kl = np.array(d.inference(3)), d.klDivergence(d.inference(3))
    U[:] = 0.0
    img[:] = 0
    feats[:] = 0.0
    assert d.klDivergence(d.inference(3)) == kl
    np.testing.assert_array_equal(np.array(d.inference(3)), q)
