"""The permutohedral lattice and the dense CRF against brute-force O(N^2) oracles (reference/crf.py)."""
import subprocess
import sys

import pytest
import torch

import deconvseg_fast.functional as F
import deconvseg_fast.nn as dnn
from deconvseg_fast.ops.crf import Lattice
from deconvseg_fast.reference import crf as ref

ops = torch.ops.deconvseg


def scene(h=14, w=17, labels=4, batch=1, seed=0):
    """A two-region image with noise and a noisy unary that roughly follows the regions."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(batch, 3, h, w)
    img[:, 0, :, w // 2:] = 200
    img[:, 2, h // 2:, :] += 120
    img = (img + 25 * torch.rand(batch, 3, h, w, generator=g)).clamp(0, 255).round().to(torch.uint8)
    region = (torch.arange(w) >= w // 2).long().view(1, w) + 2 * (torch.arange(h) >= h // 2).long().view(h, 1)
    unary = 1.5 * torch.nn.functional.one_hot(region % labels, labels).permute(2, 0, 1).float()
    unary = unary.unsqueeze(0) + 1.2 * torch.randn(batch, labels, h, w, generator=g)
    return unary, img


def grid_features(h, w, image, sxy, srgb):
    _, fb = ref.crf_features(h, w, image.float(), 1.0, sxy, srgb)
    return fb.float()


def test_filter_approximates_the_dense_gaussian():
    # The lattice's Gaussian has a slightly different width and scale than exp(-|f|^2/2), which the
    # CRF's normalisation divides out; so compare normalised filters. Measured on this scene: mean
    # relative error 0.53 %, max 3.3 %; bound with a margin: mean <= 1.5 %, max <= 8 %.
    unary, img = scene(16, 18)
    f = grid_features(16, 18, img[0], sxy=4.0, srgb=30.0)
    v = torch.rand(f.shape[0], 3, generator=torch.Generator().manual_seed(1)) + 0.1
    lat = Lattice(f.t())
    ours = lat.filter_points(v) / lat.filter_points(torch.ones(f.shape[0], 1))
    exact = ref.gaussian_filter(v, f) / ref.gaussian_filter(torch.ones(f.shape[0], 1), f)
    rel = (ours.double() - exact).abs() / exact.abs()
    assert rel.mean() <= 0.015 and rel.max() <= 0.08, (rel.mean(), rel.max())


@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 16])
def test_filter_is_linear_and_reverse_is_its_adjoint(d):
    g = torch.Generator().manual_seed(d)
    f = torch.rand(300, d, generator=g) * 3
    lat = Lattice(f.t())
    v = torch.randn(300, 5, generator=g, dtype=torch.float64)
    u = torch.randn(300, 5, generator=g, dtype=torch.float64)
    fv = lat.filter_points(v)
    torch.testing.assert_close(lat.filter_points(2 * v + u), 2 * fv + lat.filter_points(u))
    lhs = (fv * u).sum()
    rhs = (v * lat.filter_points(u, reverse=True)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    # float32 values run the same lattice in single precision.
    torch.testing.assert_close(lat.filter_points(v.float()), fv.float(), rtol=1e-5, atol=1e-5)


def test_filter_gradcheck():
    f = torch.rand(40, 3, generator=torch.Generator().manual_seed(0)) * 2
    lat = Lattice(f.t())
    v = torch.randn(40, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: lat.filter_points(t), (v,))
    assert torch.autograd.gradgradcheck(lambda t: lat.filter_points(t), (v,))


def test_permutohedral_filter_functional_on_volumes():
    # [B, C, D, H, W] values with [B, d, D, H, W] features (3-D volumes: x, y, z, intensity).
    g = torch.Generator().manual_seed(0)
    vals = torch.rand(2, 3, 4, 5, 6, generator=g)
    feats = torch.rand(2, 4, 4, 5, 6, generator=g) * 2
    out = F.permutohedral_filter(vals, feats)
    assert out.shape == vals.shape
    for b in range(2):
        lat = Lattice(feats[b].reshape(4, -1))
        torch.testing.assert_close(out[b].reshape(3, -1), lat.filter(vals[b].reshape(3, -1)), rtol=0, atol=0)


def test_dense_crf_matches_brute_force_mean_field():
    # Same mean field with the exact kernel. Measured: max |dQ| 9.3e-5, MAP labels all equal; the
    # bound leaves room for other compilers/CPUs: max |dQ| <= 1e-2, MAP agreement >= 99 %.
    unary, img = scene(14, 17, labels=4)
    q = F.dense_crf(unary, img, iterations=5, gaussian_sxy=3, bilateral_sxy=8, bilateral_srgb=30)
    qr = ref.dense_crf(unary[0], img[0].float(), iterations=5, gaussian_sxy=3, bilateral_sxy=8, bilateral_srgb=30)
    assert (q[0].double() - qr).abs().max() <= 1e-2
    assert (q[0].argmax(0) == qr.argmax(0)).float().mean() >= 0.99
    torch.testing.assert_close(q.sum(1), torch.ones(1, 14, 17))
    # The CRF must change something: it smooths the noisy unary towards the regions.
    assert not torch.equal(q.argmax(1), unary.argmax(1))


def test_dense_crf_compat_matrix_potts_equivalence():
    unary, img = scene(10, 12, labels=3)
    potts = F.dense_crf(unary, img, iterations=4)
    matrix = F.dense_crf(unary, img, iterations=4, compat=1.0 - torch.eye(3))
    torch.testing.assert_close(potts, matrix, rtol=1e-5, atol=1e-6)
    other = F.dense_crf(unary, img, iterations=4, compat=torch.rand(3, 3, generator=torch.Generator().manual_seed(0)))
    assert not torch.allclose(potts, other)


@pytest.mark.parametrize("normalization", ["symmetric", "before", "after", "none"])
def test_normalizations_run_and_sum_to_one(normalization):
    unary, img = scene(8, 9, labels=3, batch=2)
    q = F.dense_crf(unary, img, iterations=3, normalization=normalization)
    torch.testing.assert_close(q.sum(1), torch.ones(2, 8, 9))


def test_batch_equals_one_image_at_a_time():
    unary, img = scene(9, 11, labels=5, batch=3)
    q = F.dense_crf(unary, img, iterations=3)
    for b in range(3):
        assert torch.equal(q[b:b + 1], F.dense_crf(unary[b:b + 1], img[b:b + 1], iterations=3))


def test_dense_crf_gradcheck_unary_weights_compat():
    unary, img = scene(4, 5, labels=3)
    u = unary.double().requires_grad_()
    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    mu = (1.0 - torch.eye(3, dtype=torch.float64)).requires_grad_()

    def crf(u, w, mu):
        return F.dense_crf(u, img, iterations=2, bilateral_weight=w, bilateral_sxy=4, compat=mu)

    assert torch.autograd.gradcheck(crf, (u, w, mu))


def test_learnable_module_trains():
    unary, img = scene(8, 10, labels=3)
    crf = dnn.DenseCRF(3, iterations=3, learnable=True)
    names = {n for n, _ in crf.named_parameters()}
    assert names == {"gaussian_weight", "bilateral_weight", "compat"}
    torch.testing.assert_close(crf(unary, img), F.dense_crf(unary, img, iterations=3, compat=1 - torch.eye(3)),
                               rtol=1e-5, atol=1e-6)
    loss = -crf(unary.requires_grad_(), img)[:, 0].log().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in crf.parameters())
    assert unary.grad is not None
    fixed = dnn.DenseCRF(3, iterations=3)
    assert list(fixed.parameters()) == []
    torch.testing.assert_close(fixed(unary.detach(), img), F.dense_crf(unary.detach(), img, iterations=3))


def test_tiny_inputs():
    q = F.dense_crf(torch.randn(1, 1, 1, 1), torch.zeros(1, 3, 1, 1, dtype=torch.uint8))
    assert torch.equal(q, torch.ones(1, 1, 1, 1))
    q = F.dense_crf(torch.randn(2, 4, 1, 1), torch.zeros(2, 3, 1, 1, dtype=torch.uint8), iterations=2)
    torch.testing.assert_close(q.sum(1), torch.ones(2, 1, 1))
    assert F.dense_crf(torch.randn(0, 3, 4, 4), torch.zeros(0, 3, 4, 4)).shape == (0, 3, 4, 4)


def test_images_with_empty_splat_parts():
    # Under 30 pixels some of the eight splat parts are empty (csrc/cpu/crf.cpp part_begin), also
    # between non-empty ones. The fused float32 update must then agree with the composed float64
    # path (the filter op, another code path) to float32 rounding: 1e-5 against the ~1e-7 seen.
    g = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            for n in (2, 5, 10, 12, 16, 23, 29, 31):
                unary = torch.randn(1, 4, 1, n, generator=g) * 3
                img = torch.randint(0, 256, (1, 3, 1, n), generator=g, dtype=torch.uint8)
                q = F.dense_crf(unary, img, iterations=3)
                torch.testing.assert_close(q.double(), F.dense_crf(unary.double(), img, iterations=3),
                                           atol=1e-5, rtol=0)
    finally:
        torch.set_num_threads(threads)


DETERMINISM = """
import torch, deconvseg_fast.functional as F
g = torch.Generator().manual_seed(0)
unary = torch.randn(2, 6, 40, 50, generator=g)
img = (torch.rand(2, 3, 40, 50, generator=g) * 255).to(torch.uint8)
q = F.dense_crf(unary, img, iterations=4)
torch.save(q, "{path}")
"""


def test_same_bits_for_any_thread_count(tmp_path):
    results = []
    for threads in (1, 2, 2):
        path = tmp_path / f"q{len(results)}.pt"
        env = {"OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
        done = subprocess.run([sys.executable, "-c", DETERMINISM.format(path=path)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        results.append(torch.load(path))
    assert torch.equal(results[0], results[1]) and torch.equal(results[1], results[2])


def _sweeps(lattice):
    # The C++ rule for adding and blurring a lattice in one sweep: the reaches of its blur axes
    # (largest |neighbour row - row|, "no neighbour" excepted) add up to at most a quarter of its rows.
    nb = lattice.tensors[2].long()
    rows = torch.arange(1, nb.shape[1] + 1).view(1, -1, 1)
    reach = torch.where(nb == 0, 0, (nb - rows).abs()).amax((1, 2))
    return int(reach.sum()) <= nb.shape[1] // 4


@pytest.mark.parametrize("channels", [2, 8, 21])  # the portable rows, whole registers, a half register
def test_blur_sweep_gives_the_bits_of_the_phased_blur(channels):
    # One thread sweeps a pixel grid's lattice (every stage a few rows behind the one before); with
    # several threads a lattice alone runs in phases. Same rows, same operations: same bits.
    g = torch.Generator().manual_seed(3)
    lattice, _coords = F._grid_lattice(1, 96, 128, 3.0, None, torch.device("cpu"))
    assert _sweeps(lattice)
    values = torch.rand(96 * 128, channels, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        swept = lattice.filter_points(values)
        torch.set_num_threads(2)
        phased = lattice.filter_points(values)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(swept, phased)


def test_mean_field_sweep_and_phases_together_keep_the_bits():
    # dense_crf's pair at two or more threads: one thread folds the bilateral splat parts it wrote
    # into one (the pre-fold) and sweeps the Gaussian lattice while the others start the bilateral
    # one's phases, then joins them; one thread does both in turn.
    g = torch.Generator().manual_seed(4)
    unary = torch.randn(1, 21, 96, 128, generator=g)
    img = (torch.rand(1, 3, 96, 128, generator=g) * 255).to(torch.uint8)
    assert _sweeps(F._grid_lattice(1, 96, 128, 3.0, None, torch.device("cpu"))[0])
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(F.dense_crf(unary, img, iterations=3))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


PORTABLE = """
import torch, deconvseg_fast.functional as F
g = torch.Generator().manual_seed(0)
out = {{}}
for d in (2, 3, 5, 7):  # 2, 3, 5 have 16-point AVX-512 simplex kernels; 7 does not
    for spread in (0.3, 3.0, 40.0):
        f = torch.rand(1003, d, generator=g) * spread
        f[:64] = torch.round(f[:64] * 2) / 2  # points on rounding ties
        out[d, spread] = torch.ops.deconvseg.permutohedral_lattice(f)
# The filter's adds and blurs: vectorised rows for channels padded to a multiple of 8 (1 is not).
lattice = out[5, 3.0]
for channels in (1, 5, 8, 21):
    out["filter", channels] = (torch.ops.deconvseg.permutohedral_filter(torch.randn(1003, channels, generator=g),
                                                                        *lattice, False),)
img = (torch.rand(2, 3, 30, 41, generator=g) * 255).to(torch.uint8)
# Label counts that fill whole registers, end in a half register (8 labels), or in part of one.
for labels in (1, 3, 8, 16, 21, 40, 60, 70):
    unary = torch.randn(2, labels, 30, 41, generator=g)
    out["crf", labels] = F.dense_crf(unary, img, iterations=3)
compat = torch.rand(21, 21, generator=g)
out["crf compat"] = F.dense_crf(torch.randn(1, 21, 30, 41, generator=g), img[:1], iterations=3, compat=compat)
torch.save(out, "{path}")
"""


def test_simd_kernels_match_the_portable_code(tmp_path):
    # Every path this machine has, against the portable loops: the default (AVX-512 where there is
    # one), DECONVSEG_DISABLE_AVX512=1 (AVX2 where there is one) and both disabled (portable). The
    # lattice must be the same bits (its simplex math is exact float arithmetic in a fixed order),
    # and so must the filter (its adds and blurs are the same element-wise operations at any width);
    # mean field differs only by the rounding of its fused multiply-adds, exp polynomial and sums.
    results = []
    for disable in (("0", "0"), ("1", "0"), ("1", "1")):
        path = tmp_path / f"lattice{''.join(disable)}.pt"
        env = {"DECONVSEG_DISABLE_AVX512": disable[0], "DECONVSEG_DISABLE_AVX2": disable[1],
               "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
        done = subprocess.run([sys.executable, "-c", PORTABLE.format(path=path)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        results.append(torch.load(path))
    portable = results[-1]
    for fast in results[:-1]:
        for key in fast:
            if key[0] == "crf" or key == "crf compat":
                torch.testing.assert_close(fast[key], portable[key], rtol=0, atol=1e-5)
            else:
                for a, b in zip(fast[key], portable[key]):
                    assert torch.equal(a, b), key


def test_opcheck():
    f = torch.rand(60, 3, generator=torch.Generator().manual_seed(0)) * 2
    lat = ops.permutohedral_lattice(f)
    for dtype in (torch.float32, torch.float64):
        v = torch.randn(60, 4, dtype=dtype, requires_grad=True)
        for reverse in (False, True):
            torch.library.opcheck(ops.permutohedral_filter.default, (v, *lat, reverse))


def _mean_field_inputs(labels, h=9, w=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    rgb = torch.rand(h * w, 3, generator=g) * 20
    lattices = [Lattice.from_points(torch.stack([xs.reshape(-1) / 3, ys.reshape(-1) / 3], 1)),
                Lattice.from_points(torch.cat([torch.stack([xs.reshape(-1) / 8, ys.reshape(-1) / 8], 1), rgb], 1))]
    pre = torch.rand(2, h * w, generator=g) + 0.5
    compat = torch.stack([-3 * torch.eye(labels), -torch.rand(labels, labels, generator=g)])
    return torch.randn(labels, h * w, generator=g), lattices, pre, compat


@pytest.mark.parametrize("labels", [1, 5, 21, 70])  # registers (fixed and general corners) and the portable path
@pytest.mark.parametrize("iterations", [0, 3])
def test_mean_field_keeps_the_logits_layout(labels, iterations):
    # Point-major logits (the transpose of a contiguous [N, L], pydensecrf's layout) are read in
    # place and give Q in that layout, with the same bits as label-major ones.
    from deconvseg_fast.ops.crf import mean_field
    logits, lattices, pre, compat = _mean_field_inputs(labels)
    for lats, pr, cm in ((lattices, pre, compat), (lattices[1:], pre[1:], compat[1:])):
        q = mean_field(logits, lats, pr, pr, cm, iterations)
        point_major = logits.t().contiguous().t()
        q_pm = mean_field(point_major, lats, pr, pr, cm, iterations)
        assert q.is_contiguous() and (labels == 1 or not q_pm.is_contiguous()) and q_pm.t().is_contiguous()
        assert torch.equal(q, q_pm)
        # Any other layout is made contiguous first.
        strided = torch.randn(labels, 2 * logits.shape[1])[:, ::2]
        strided.copy_(logits)
        assert torch.equal(mean_field(strided, lats, pr, pr, cm, iterations), q)


@pytest.mark.parametrize("point_major", [False, True])
def test_opcheck_mean_field(point_major):
    logits, lattices, pre, compat = _mean_field_inputs(5)
    if point_major:
        logits = logits.t().contiguous().t()
    flat = [t for lat in lattices for t in lat.tensors]
    torch.library.opcheck(ops.dense_crf_mean_field.default, (logits, flat, pre, pre, compat, 2))


def _batch_inputs(labels, images=3):
    # Each image its own lattices, logits and normalisation; one compat for the batch.
    sets = [_mean_field_inputs(labels, seed=seed) for seed in range(images)]
    logits = torch.stack([s[0] for s in sets])
    pre = torch.stack([s[2] for s in sets])
    return logits, [s[1] for s in sets], pre, sets[0][3]


@pytest.mark.parametrize("labels", [1, 5, 21, 70])  # registers (fixed corners) and the portable path
@pytest.mark.parametrize("iterations", [0, 3])
def test_mean_field_batch_is_each_image_alone(labels, iterations):
    # The batch op runs its images one per thread, and those left over after the last full round on
    # every thread: each image must get the single-image op's bits, for any thread count, in
    # either layout.
    from deconvseg_fast.ops.crf import mean_field, mean_field_batch
    logits, lattice_sets, pre, compat = _batch_inputs(labels)
    expect = torch.stack([mean_field(logits[b], lattice_sets[b], pre[b], pre[b], compat, iterations)
                          for b in range(3)])
    point_major = logits.transpose(1, 2).contiguous().transpose(1, 2)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            q = mean_field_batch(logits, lattice_sets, pre, pre, compat, iterations)
            assert q.is_contiguous() and torch.equal(q, expect), t
            q_pm = mean_field_batch(point_major, lattice_sets, pre, pre, compat, iterations)
            assert q_pm.transpose(1, 2).is_contiguous() and torch.equal(q_pm, expect), t
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("point_major", [False, True])
def test_opcheck_mean_field_batch(point_major):
    logits, lattice_sets, pre, compat = _batch_inputs(5, images=2)
    if point_major:
        logits = logits.transpose(1, 2).contiguous().transpose(1, 2)
    flat = [t for lats in lattice_sets for lat in lats for t in lat.tensors]
    torch.library.opcheck(ops.dense_crf_mean_field_batch.default, (logits, flat, pre, pre, compat, 2))


@pytest.mark.parametrize("labels", [5, 21, 70])  # registers (fixed corners) and the portable path
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_mean_field_ops_refuse_non_finite_logits(labels, bad):
    # The fused ops check the logits in their first read (dense_crf leaves the check to them), in
    # either layout, single image or batch, any iteration count, wherever the bad value sits.
    from deconvseg_fast.ops.crf import mean_field, mean_field_batch
    logits, lattice_sets, pre, compat = _batch_inputs(labels, images=2)
    logits[1, labels - 1, 98] = bad  # the last label of the last point: the end of every copy
    point_major = logits.transpose(1, 2).contiguous().transpose(1, 2)
    for lg in (logits, point_major):
        for iterations in (0, 2):
            with pytest.raises(ValueError, match="unary must be finite"):
                mean_field(lg[1], lattice_sets[1], pre[1], pre[1], compat, iterations)
            with pytest.raises(ValueError, match="unary must be finite"):
                mean_field_batch(lg, lattice_sets, pre, pre, compat, iterations)
        assert torch.isfinite(mean_field(lg[0], lattice_sets[0], pre[0], pre[0], compat, 2)).all()


def test_mean_field_batch_bad_input():
    logits, lattice_sets, pre, compat = _batch_inputs(5, images=2)
    flat = [t for lats in lattice_sets for lat in lats for t in lat.tensors]
    op = ops.dense_crf_mean_field_batch
    with pytest.raises(ValueError, match=r"logits must be a float32 \[B, L, N\] tensor"):
        op(logits[0], flat, pre, pre, compat, 2)
    with pytest.raises(ValueError, match="lattices must hold 3 tensors per kernel per image, got 9"):
        op(logits, flat[:9], pre, pre, compat, 2)
    with pytest.raises(ValueError, match=r"pre must be a float32 \[B, K, N\] tensor"):
        op(logits, flat, pre[:1], pre, compat, 2)
    with pytest.raises(ValueError, match=r"post must be a float32 \[B, K, N\] tensor"):
        op(logits, flat, pre, pre.double(), compat, 2)
    with pytest.raises(ValueError, match="iterations must be non-negative"):
        op(logits, flat, pre, pre, compat, -1)
    other = Lattice.from_points(torch.rand(logits.shape[2] + 1, 2))
    with pytest.raises(ValueError, match="lattice 1 of image 1 has 100 points, logits have 99"):
        op(logits, flat[:9] + list(other.tensors), pre, pre, compat, 2)
    assert op(logits[:0], [], pre[:0], pre[:0], compat, 2).shape == (0, 5, 99)


def test_torch_compile_fullgraph_filter():
    lat = Lattice(torch.rand(3, 50, generator=torch.Generator().manual_seed(0)) * 2)

    def smooth(q):
        return torch.softmax(q + lat.filter_points(torch.softmax(q, 1)), 1)

    compiled = torch.compile(smooth, fullgraph=True, backend="aot_eager")
    q = torch.randn(50, 4, requires_grad=True)
    out = compiled(q)
    torch.testing.assert_close(out, smooth(q))
    out.sum().backward()
    assert q.grad is not None


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32, torch.float64])
def test_bilateral_points_are_the_stacked_columns(dtype):
    g = torch.Generator().manual_seed(0)
    colors = (torch.rand(3, 301, generator=g) * 255).to(dtype)
    xs, ys = torch.rand(301, generator=g) * 500, torch.rand(301, generator=g) * 375
    expect = torch.stack([xs / 80.0, ys / 80.0, *(colors.to(torch.float32) / 13.0)], 1)
    got = F._bilateral_points(((xs, 80.0), (ys, 80.0)), colors, 13.0)
    assert got.is_contiguous() and torch.equal(got, expect)


def test_torch_compile_fullgraph_mean_field_batch():
    logits, lattice_sets, pre, compat = _batch_inputs(5, images=2)
    flat = [t for lats in lattice_sets for lat in lats for t in lat.tensors]

    def run(x):
        return ops.dense_crf_mean_field_batch(torch.log_softmax(x, 1), flat, pre, pre, compat, 2)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(logits), run(logits))


BAD_CRF = [
    (dict(unary=torch.full((1, 2, 4, 4), float("nan"))), ValueError, "unary must be finite"),
    (dict(unary=torch.full((1, 2, 4, 4), float("inf"))), ValueError, "unary must be finite"),
    (dict(unary=torch.randn(2, 4, 4)), ValueError, "unary"),
    (dict(unary=torch.randn(1, 2, 4, 4).to(torch.float16)), ValueError, "unary"),
    (dict(image=torch.zeros(1, 3, 4, 5)), ValueError, "image"),
    (dict(image=torch.zeros(1, 1, 4, 4)), ValueError, "image"),
    (dict(image=torch.zeros(2, 3, 4, 4)), ValueError, "image"),
    (dict(image=torch.zeros(1, 3, 4, 4, dtype=torch.int32)), ValueError, "image"),
    (dict(gaussian_sxy=0.0), ValueError, "gaussian_sxy"),
    (dict(bilateral_sxy=-1.0), ValueError, "bilateral_sxy"),
    (dict(bilateral_srgb=float("nan")), ValueError, "bilateral_srgb"),
    (dict(compat=torch.eye(3)), ValueError, "compat"),
    (dict(iterations=-1), ValueError, "iterations"),
    (dict(normalization="l2"), ValueError, "normalization"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_CRF)
def test_dense_crf_bad_input(kwargs, exc, match):
    args = dict(unary=torch.randn(1, 2, 4, 4), image=torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        F.dense_crf(args.pop("unary"), args.pop("image"), **args)


def test_too_large_is_refused_before_allocating(monkeypatch):
    monkeypatch.setattr(F, "_available_memory", lambda device: 1 << 20)
    with pytest.raises(MemoryError, match="unary of size"):
        F.dense_crf(torch.zeros(1, 21, 64, 64), torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    # Enough for the lattices but not for the mean-field buffers, sized once the vertices are known.
    monkeypatch.setattr(F, "_available_memory", lambda device: F._lattice_memory(64 * 64))
    with pytest.raises(MemoryError, match="unary of size"):
        F.dense_crf(torch.zeros(1, 200, 64, 64), torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_batch_refusal_counts_the_images_run_at_once(monkeypatch):
    # A batch runs one image per thread, so its mean-field buffers exist once per thread at a time.
    unary, img = torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    monkeypatch.setattr(F, "_mean_field_memory", lambda *args: 1 << 30)
    monkeypatch.setattr(F, "_available_memory", lambda device: (3 << 30) // 2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(MemoryError, match="2 images at once"):
            F.dense_crf(unary, img, iterations=1)
        assert F.dense_crf(unary[:1], img[:1], iterations=1).shape == (1, 3, 16, 16)
        torch.set_num_threads(1)
        assert F.dense_crf(unary, img, iterations=1).shape == (2, 3, 16, 16)
    finally:
        torch.set_num_threads(threads)


def test_lattice_bad_input():
    with pytest.raises(ValueError, match="finite"):
        Lattice(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="dimensions"):
        Lattice(torch.rand(33, 4))
    with pytest.raises(ValueError, match="1e6"):
        Lattice(torch.tensor([[0.0, 3e7]]))
    with pytest.raises(ValueError, match="values"):
        Lattice(torch.rand(2, 4)).filter(torch.rand(3, 5))
    with pytest.raises(ValueError, match="features"):
        ops.permutohedral_lattice(torch.rand(4, 2, dtype=torch.float64))
    # Lattice tensors are plain op inputs: corrupt ones are refused, never read out of bounds.
    lat = list(ops.permutohedral_lattice(torch.rand(10, 2) * 3))
    v = torch.rand(10, 2)
    for i, bad in ((0, 10**6), (0, -1), (2, 10**6), (2, -5)):
        broken = [t.clone() for t in lat]
        broken[i].view(-1)[0] = bad
        with pytest.raises(ValueError, match="out-of-range"):
            ops.permutohedral_filter(v, *broken, False)
    with pytest.raises(ValueError, match="num_labels"):
        dnn.DenseCRF(0)
    with pytest.raises(ValueError, match="labels"):
        dnn.DenseCRF(3)(torch.randn(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("normalization", ["symmetric", "before", "after", "none"])
@pytest.mark.parametrize("use_compat", [False, True])
@pytest.mark.parametrize("labels", [1, 5, 21, 40, 70])  # 16, 32 and 48 padded labels in registers; 80 not
def test_fused_inference_equals_the_differentiable_path(normalization, use_compat, labels):
    # Without gradients dense_crf runs one fused C++ op; with them it composes the filter op.
    # They differ only in float rounding (the fused softmax uses its own exp, rel. error < 2e-7).
    unary, img = scene(11, 13, labels=labels, batch=2)
    # Scaled so the messages keep the same size whatever the number of labels: unnormalised sums over
    # 70 labels would otherwise reach logits of ~1e3, where float32 rounding alone moves Q by ~1e-4.
    compat = torch.rand(labels, labels, generator=torch.Generator().manual_seed(0)) * (5 / labels) if use_compat else None
    kw = dict(iterations=5, normalization=normalization, compat=compat)
    fused = F.dense_crf(unary, img, **kw)
    composed = F.dense_crf(unary.clone().requires_grad_(), img, **kw)
    torch.testing.assert_close(fused, composed.detach(), rtol=1e-5, atol=1e-5)
