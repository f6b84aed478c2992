"""The temporal CRF: dense_crf_video against its brute-force oracle, and the TemporalCRF scheduler."""
import pytest
import torch

import deconvseg_fast.functional as F
from deconvseg_fast.ops.crf import Lattice
from deconvseg_fast.reference import crf as ref
from deconvseg_fast.video import temporal
from deconvseg_fast.video.temporal import TemporalCRF

# Small standard deviations so that a 10x12 clip has structure at the kernels' scale.
SMALL = dict(gaussian_sxy=3, gaussian_st=1.0, bilateral_sxy=8, bilateral_st=2.0, bilateral_srgb=30)


def clip(frames=4, h=10, w=12, labels=3, seed=0, speed=1):
    """A region boundary moving right by `speed` px per frame, a fixed horizontal one, image noise,
    and a noisy unary that roughly follows the regions (fresh noise each frame: it flickers)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(frames, 3, h, w)
    region = torch.zeros(frames, h, w, dtype=torch.long)
    for t in range(frames):
        x0 = w // 3 + speed * t
        img[t, 0, :, x0:] = 200
        region[t, :, x0:] = 1
    img[:, 2, h // 2:, :] += 120
    region[:, h // 2:, :] += 2
    img = (img + 25 * torch.rand(frames, 3, h, w, generator=g)).clamp(0, 255).round().to(torch.uint8)
    unary = 1.5 * torch.nn.functional.one_hot(region % labels, labels).permute(0, 3, 1, 2).float()
    return unary + 1.2 * torch.randn(frames, labels, h, w, generator=g), img


@pytest.mark.parametrize("kernel", ["gaussian", "bilateral"])
def test_filter_approximates_the_dense_gaussian_in_space_time(kernel):
    # The (x, y, t) and (x, y, t, r, g, b) lattices the video CRF builds; normalised filters compared
    # as in test_crf.py (the lattice's Gaussian differs in width and scale, which normalising divides
    # out). Measured: mean relative error 0.38 % (3-D) and 0.35 % (6-D), max 1.8 % and 1.5 %; the
    # bounds are test_crf.py's 2-D ones: mean <= 1.5 %, max <= 8 %.
    _, img = clip()
    fg, fb = ref.video_features(img.float(), 3, 1.0, 8, 2.0, 30)
    f = (fg if kernel == "gaussian" else fb).float()
    n = f.shape[0]
    v = torch.cat([torch.rand(n, 3, generator=torch.Generator().manual_seed(1)) + 0.1, torch.ones(n, 1)], 1)
    ours, exact = Lattice(f.t()).filter_points(v).double(), ref.gaussian_filter(v, f)
    ours, exact = ours[:, :3] / ours[:, 3:], exact[:, :3] / exact[:, 3:]  # normalised by the constant's response
    rel = (ours - exact).abs() / exact.abs()
    assert rel.mean() <= 0.015 and rel.max() <= 0.08, (rel.mean(), rel.max())


def test_dense_crf_video_matches_brute_force_mean_field():
    # The same mean field over all T*H*W pixels with the exact kernels. Frame 1 has no evidence at all
    # (a uniform unary), so its labels can only come from the other frames. Measured: max |dQ| 7.8e-4,
    # MAP labels all equal; bounds as test_crf.py's for dense_crf: max |dQ| <= 1e-2, MAP >= 99 %.
    unary, img = clip()
    unary[1] = 0
    q = F.dense_crf_video(unary, img, iterations=5, **SMALL)
    qr = ref.dense_crf_video(unary, img.float(), iterations=5, **SMALL)
    assert q.shape == unary.shape and q.dtype == torch.float32 and q.is_contiguous()
    assert (q.double() - qr).abs().max() <= 1e-2
    assert (q.argmax(1) == qr.argmax(1)).float().mean() >= 0.99
    torch.testing.assert_close(q.sum(1), torch.ones(4, 10, 12))
    # The frames are coupled: a per-frame CRF leaves frame 1 near uniform (measured max |dQ| to the
    # joint oracle 0.67), the joint one gives it its neighbours' regions.
    per_frame = F.dense_crf(unary, img, iterations=5, gaussian_sxy=3, bilateral_sxy=8, bilateral_srgb=30)
    assert (per_frame[1].double() - qr[1]).abs().max() >= 0.3
    assert (q[1].argmax(0) == qr[1].argmax(0)).float().mean() >= 0.99


def test_dense_crf_video_compat_and_float64():
    unary, img = clip(frames=3, labels=3)
    mu = torch.tensor([[0.0, 1.0, 0.3], [1.0, 0.0, 1.0], [0.3, 1.0, 0.0]])
    q = F.dense_crf_video(unary, img, iterations=4, compat=mu, **SMALL)
    qr = ref.dense_crf_video(unary, img.float(), iterations=4, compat=mu, **SMALL)
    # A compat that makes labels 0 and 2 cheap to confuse leaves pixels where they are nearly tied;
    # there the lattice's filter error (< 2 %, above) moves Q most. Measured: max |dQ| 0.040 (14 of
    # 1080 entries above 0.01), mean 7.7e-4, MAP all equal. Bounds: max 0.1, mean 5e-3, MAP 99 %.
    d = (q.double() - qr).abs()
    assert d.max() <= 0.1 and d.mean() <= 5e-3
    assert (q.argmax(1) == qr.argmax(1)).float().mean() >= 0.99
    # float64 runs the composed path on the same lattices: the same result up to float32 rounding.
    q64 = F.dense_crf_video(unary.double(), img, iterations=4, compat=mu, **SMALL)
    assert q64.dtype == torch.float64
    torch.testing.assert_close(q64.float(), q, rtol=1e-5, atol=1e-5)
    potts = F.dense_crf_video(unary, img, iterations=4, compat=1 - torch.eye(3), **SMALL)
    torch.testing.assert_close(potts, F.dense_crf_video(unary, img, iterations=4, **SMALL), rtol=1e-5, atol=1e-6)


def test_single_frame_is_dense_crf_exactly():
    # A constant t adds nothing to any distance, so T = 1 is dense_crf itself, bit for bit.
    unary, img = clip(frames=1, h=13, w=15, labels=4)
    for st in (1e-3, 2.0, 1e6):
        q = F.dense_crf_video(unary, img, iterations=5, gaussian_st=st, bilateral_st=st)
        assert torch.equal(q, F.dense_crf(unary, img, iterations=5))


def test_a_repeated_frame_with_huge_st_behaves_like_dense_crf():
    # Two copies of one frame, st so large that both are at the same t: in exact arithmetic each
    # normalised message is the single frame's, so Q is dense_crf's. On the lattice the extra t axis
    # changes the rounding of the simplices; measured max |dQ| 3.2e-4, MAP all equal; bounds as above.
    unary, img = clip(frames=1, h=13, w=15, labels=4)
    kw = dict(iterations=5, gaussian_sxy=3, bilateral_sxy=8, bilateral_srgb=30)
    single = F.dense_crf(unary, img, **kw)
    q = F.dense_crf_video(unary.repeat(2, 1, 1, 1), img.repeat(2, 1, 1, 1), gaussian_st=1e5, bilateral_st=1e5, **kw)
    for t in range(2):
        assert (q[t] - single[0]).abs().max() <= 1e-2
        assert (q[t].argmax(0) == single[0].argmax(0)).float().mean() >= 0.99


@pytest.mark.parametrize("normalization", ["symmetric", "before", "after", "none"])
def test_fused_inference_equals_the_differentiable_path(normalization):
    unary, img = clip(frames=3, labels=5)
    kw = dict(iterations=5, normalization=normalization, **SMALL)
    fused = F.dense_crf_video(unary, img, **kw)
    composed = F.dense_crf_video(unary.clone().requires_grad_(), img, **kw)
    assert composed.requires_grad
    torch.testing.assert_close(fused, composed.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.sum(1), torch.ones(3, 10, 12))


def test_dense_crf_video_gradcheck_unary_weights_compat():
    unary, img = clip(frames=2, h=2, w=3, labels=2)
    u = unary.double().requires_grad_()
    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    mu = (1.0 - torch.eye(2, dtype=torch.float64)).requires_grad_()

    def crf(u, w, mu):
        return F.dense_crf_video(u, img, iterations=2, bilateral_weight=w, compat=mu, **SMALL)

    assert torch.autograd.gradcheck(crf, (u, w, mu))


def test_empty_and_tiny_clips():
    assert F.dense_crf_video(torch.zeros(0, 3, 4, 4), torch.zeros(0, 3, 4, 4)).shape == (0, 3, 4, 4)
    q = F.dense_crf_video(torch.randn(3, 2, 1, 1), torch.zeros(3, 3, 1, 1, dtype=torch.uint8), iterations=2)
    torch.testing.assert_close(q.sum(1), torch.ones(3, 1, 1))


def video(unary=(2, 2, 4, 4), frames=(2, 3, 4, 4), **kw):
    """dense_crf_video on a zero clip of the given shapes (or on the tensors given)."""
    unary = torch.zeros(unary) if isinstance(unary, tuple) else unary
    frames = torch.zeros(frames, dtype=torch.uint8) if isinstance(frames, tuple) else frames
    return F.dense_crf_video(unary, frames, **kw)


@pytest.mark.parametrize("kwargs,match", [
    (dict(unary=(2, 4, 4)), r"unary must be a 4-D \[T, L, H, W\]"),
    (dict(unary=torch.full((2, 2, 4, 4), float("nan"))), "unary must be finite"),
    (dict(frames=(2, 4, 4, 3)), r"frames must be a \[T, 3, H, W\]"),
    (dict(frames=(3, 3, 4, 4)), "frames .* number of frames"),
    (dict(frames=(2, 3, 4, 5)), "frames .* height and width"),
    (dict(frames=torch.zeros(2, 3, 4, 4, dtype=torch.int32)), "frames must be uint8"),
    (dict(gaussian_st=0.0), "gaussian_st"),
    (dict(bilateral_st=-2.0), "bilateral_st"),
    (dict(bilateral_st=float("inf")), "bilateral_st"),
    (dict(gaussian_sxy=0.0), "gaussian_sxy"),
    (dict(compat=torch.eye(3)), "compat"),
    (dict(iterations=-1), "iterations"),
    (dict(normalization="l2"), "normalization"),
])
def test_dense_crf_video_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        video(**kwargs)


def test_too_large_clip_is_refused(monkeypatch):
    # First by the lattice bound alone, then by the mean-field buffers once the vertices are known.
    for available, labels in ((1 << 20, 21), (F._lattice_memory(4 * 64 * 64, (3, 6)), 200)):
        monkeypatch.setattr(F, "_available_memory", lambda device: available)
        with pytest.raises(MemoryError, match="unary of size .* one clip"):
            video((4, labels, 64, 64), (4, 3, 64, 64))


# ------------------------------------------------------------------------------------------------
# TemporalCRF
# ------------------------------------------------------------------------------------------------

def run_stream(crf, unary, frames, layout="hwc"):
    """Pushes a clip (frames as [H, W, 3] or [3, H, W] tensors, or [H, W, 3] numpy arrays);
    returns [(push number or 'flush', index, Q)] in emission order."""
    out = []
    for t in range(unary.shape[0]):
        frame = frames[t] if layout == "chw" else frames[t].permute(1, 2, 0)
        frame = frame.numpy() if layout == "numpy" else frame
        out += [(t, i, q) for i, q in crf.push(frame, unary[t])]
    out += [("flush", i, q) for i, q in crf.flush()]
    return out


@pytest.mark.parametrize("window,hop", [(1, None), (2, None), (3, None), (4, None), (5, None), (8, None),
                                        (6, 2), (5, 5)])
def test_schedule_every_frame_once_in_order_central_bounded(monkeypatch, window, hop):
    calls = []

    def fake(unary, frames, **kw):  # records each window's frames; Q tells which window it came from
        calls.append([int(v) for v in unary[:, 0, 0, 0]])
        return torch.full_like(unary, float(len(calls) - 1))

    monkeypatch.setattr(temporal, "dense_crf_video", fake)
    crf = TemporalCRF(window, hop=hop)
    h = crf.hop
    for n in (1, 2, 3, window - 1, window, window + 1, 2 * window + 1, 17):
        if n < 1:
            continue
        calls.clear()
        crf.reset()
        unary = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 2, 3, 4)
        out = []
        for t in range(n):
            out += [(t, i, q) for i, q in crf.push(torch.zeros(3, 4, 3, dtype=torch.uint8), unary[t])]
        regular = list(calls)  # the windows run by pushes
        out += [("flush", i, q) for i, q in crf.flush()]
        assert [i for _, i, _ in out] == list(range(n)), (n, out)
        assert all(len(c) == window and c[0] % h == 0 for c in regular)
        for when, i, q in out:
            win = calls[int(q[0, 0, 0])]
            assert i in win and len(win) == min(window, n) and win == list(range(win[0], win[0] + len(win)))
            if when == "flush":
                assert win[-1] == n - 1  # the last min(W, n) frames
            else:
                assert i <= when <= i + crf.latency  # emitted by a later push, within the latency
                # The most central among the regular windows [k h, k h + W) of this clip holding it;
                # of equally central ones the earliest (less latency).
                holding = [c for c in regular if i in c]
                best = min(abs(c.index(i) - (window - 1) / 2) for c in holding)
                assert win == next(c for c in holding if abs(c.index(i) - (window - 1) / 2) == best), (n, i, win)
        # At most one window per push, plus one at flush; consecutive regular windows overlap.
        assert len(calls) <= n // h + 1
        for a, b in zip(regular, regular[1:]):
            assert b[0] - a[0] == h and len(set(a) & set(b)) == window - h


def test_window_one_is_per_frame_dense_crf():
    unary, img = clip(frames=5, h=9, w=11, labels=4)
    out = run_stream(TemporalCRF(1, iterations=4), unary, img)
    assert [(w, i) for w, i, _ in out] == [(t, t) for t in range(5)]  # no latency
    for _, i, q in out:
        assert torch.equal(q, F.dense_crf(unary[i:i + 1], img[i:i + 1], iterations=4)[0])


@pytest.mark.parametrize("layout", ["hwc", "chw", "numpy"])
def test_stream_equals_dense_crf_video_on_its_windows(layout):
    # window 4, hop 2, centre 1: window [0, 4) gives frames 0..2, [2, 6) gives 3, 4; at flush the
    # last window [3, 7) gives frames 5, 6.
    unary, img = clip(frames=7, labels=3)
    crf = TemporalCRF(4, iterations=3, **SMALL)
    assert (crf.hop, crf.center) == (2, 1)
    out = run_stream(crf, unary, img, layout)
    assert [(w, i) for w, i, _ in out] == [(3, 0), (3, 1), (3, 2), (5, 3), (5, 4), ("flush", 5), ("flush", 6)]
    for first, frames in ((0, (0, 1, 2)), (2, (3, 4)), (3, (5, 6))):
        q = F.dense_crf_video(unary[first:first + 4], img[first:first + 4], iterations=3, **SMALL)
        for i in frames:
            assert torch.equal(out[i][2], q[i - first])


def test_clip_shorter_than_the_window_is_one_joint_crf():
    unary, img = clip(frames=3, labels=3)
    out = run_stream(TemporalCRF(8, iterations=3, **SMALL), unary, img)
    assert [(w, i) for w, i, _ in out] == [("flush", 0), ("flush", 1), ("flush", 2)]
    torch.testing.assert_close(torch.stack([q for _, _, q in out]),
                               F.dense_crf_video(unary, img, iterations=3, **SMALL), rtol=0, atol=0)
    one = run_stream(TemporalCRF(3, iterations=3), unary[:1], img[:1])
    assert torch.equal(one[0][2], F.dense_crf(unary[:1], img[:1], iterations=3)[0])


def test_temporal_crf_bad_input():
    for window in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="window"):
            TemporalCRF(window)
    for hop in (0, 4, 1.0):
        with pytest.raises(ValueError, match="hop"):
            TemporalCRF(3, hop=hop)
    with pytest.raises(ValueError, match="bilateral_st"):
        TemporalCRF(3, bilateral_st=0)
    with pytest.raises(ValueError, match="iterations"):
        TemporalCRF(3, iterations=-2)
    with pytest.raises(TypeError, match="bilateral_sd"):
        TemporalCRF(3, bilateral_sd=2.0)

    crf = TemporalCRF(3, iterations=1)
    frame, unary = torch.zeros(4, 5, 3, dtype=torch.uint8), torch.zeros(2, 4, 5)
    crf.push(frame, unary)
    with pytest.raises(ValueError, match="frame size changed"):
        crf.push(torch.zeros(4, 6, 3, dtype=torch.uint8), torch.zeros(2, 4, 6))
    with pytest.raises(ValueError, match="unary size changed"):
        crf.push(frame, torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="frame must be"):
        crf.push(torch.zeros(4, 5, 4, dtype=torch.uint8), unary)
    with pytest.raises(ValueError, match="frame must be"):
        crf.push(torch.zeros(4, 5, 3, dtype=torch.int32), unary)
    with pytest.raises(ValueError, match="unary must be"):
        crf.push(frame, torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="unary must be"):
        crf.push(frame, torch.zeros(2, 4, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="frame must be"):
        crf.push([[0]], unary)
    assert len(crf.flush()) == 1
    with pytest.raises(RuntimeError, match="after flush"):
        crf.push(frame, unary)
    crf.reset()  # a new video may have another size
    crf.push(torch.zeros(3, 2, 2, dtype=torch.uint8), torch.zeros(2, 2, 2))
    assert [i for i, _ in crf.flush()] == [0]
