"""The generated scenes (deconvseg_fast.scenes): determinism, exact ground truth, metrics, flow.

Small frames (about 120x160) keep the file fast; the renderer's geometry does not depend on size.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from deconvseg_fast.scenes import (CAMERAS, CLASSES, PALETTE, Camera, Clip, confusion, estimate_flow, miou,
                                   render_image, render_video, temporal_consistency)

K = len(CLASSES)


def warp_nearest(labels_next: np.ndarray, flow: np.ndarray):
    """labels_next sampled at round(p + flow(p)) and the in-bounds mask (independent of the library's code)."""
    H, W = labels_next.shape
    tx = np.floor(np.arange(W)[None, :] + flow[..., 0].astype(np.float64) + 0.5).astype(np.int64)
    ty = np.floor(np.arange(H)[:, None] + flow[..., 1].astype(np.float64) + 0.5).astype(np.int64)
    inb = (tx >= 0) & (tx < W) & (ty >= 0) & (ty < H)
    return labels_next[ty.clip(0, H - 1), tx.clip(0, W - 1)], inb


def warp_bilinear(img: np.ndarray, flow: np.ndarray) -> np.ndarray:
    H, W = img.shape[:2]
    x = np.arange(W)[None, :] + flow[..., 0].astype(np.float64)
    y = np.arange(H)[:, None] + flow[..., 1].astype(np.float64)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    xa, xb = x0.clip(0, W - 1), (x0 + 1).clip(0, W - 1)
    ya, yb = y0.clip(0, H - 1), (y0 + 1).clip(0, H - 1)
    I = img.astype(np.float64)
    return (I[ya, xa] * (1 - fx) * (1 - fy) + I[ya, xb] * fx * (1 - fy) + I[yb, xa] * (1 - fx) * fy
            + I[yb, xb] * fx * fy)


# -- renderer ------------------------------------------------------------------------------------------

def test_classes_and_palette():
    assert CLASSES[0] == "background" and len(set(CLASSES)) == K >= 4
    assert PALETTE.dtype == np.uint8 and PALETTE.shape == (K, 3)
    assert PALETTE[0].max() < 64  # background displays dark
    assert len({tuple(c) for c in PALETTE}) == K


def test_render_image_shapes_and_determinism():
    img, lab = render_image(7, 90, 130)
    assert img.dtype == np.uint8 and img.shape == (90, 130, 3)
    assert lab.dtype == np.uint8 and lab.shape == (90, 130)
    img2, lab2 = render_image(7, 90, 130)
    np.testing.assert_array_equal(img, img2)
    np.testing.assert_array_equal(lab, lab2)
    img3, _ = render_image(8, 90, 130)
    assert not np.array_equal(img, img3)
    assert lab.max() < K and (lab > 0).any() and (lab == 0).any()


def test_every_class_occurs():
    seen = set()
    for seed in range(12):
        seen |= set(np.unique(render_image(seed, 72, 96)[1]).tolist())
    assert seen == set(range(K))


def test_noise_is_fresh_per_frame_and_optional():
    a, la = render_image(3, 60, 80)
    b, lb = render_image(3, 60, 80, noise=False)
    np.testing.assert_array_equal(la, lb)
    d = a.astype(np.int16) - b
    assert 1.0 < d.std() < 10.0  # sensor noise of a few grey levels


def test_render_video_shapes_dtypes_determinism():
    c = render_video(5, 4, 64, 96)
    assert isinstance(c, Clip) and c.fps == Fraction(30000, 1001)
    assert c.frames.shape == (4, 64, 96, 3) and c.frames.dtype == np.uint8
    assert c.labels.shape == (4, 64, 96) and c.labels.dtype == np.uint8
    assert c.flow.shape == (3, 64, 96, 2) and c.flow.dtype == np.float32
    assert c.valid.shape == (3, 64, 96) and c.valid.dtype == bool
    d = render_video(5, 4, 64, 96, fps=25)
    assert d.fps == 25
    for name in ("frames", "labels", "flow", "valid"):
        np.testing.assert_array_equal(getattr(c, name), getattr(d, name))
    one = render_video(5, 1, 32, 48)
    assert one.frames.shape == (1, 32, 48, 3) and one.flow.shape == (0, 32, 48, 2) and one.valid.shape == (0, 32, 48)


@pytest.mark.parametrize("seed", [1, 2])
def test_video_moves_and_objects_enter_or_leave(seed):
    c = render_video(seed, 60, 96, 128)
    assert np.abs(c.flow).max() > 0.5  # things move
    assert not np.array_equal(c.labels[0], c.labels[-1])
    # Objects enter or leave: some class goes from absent to present or back.
    present = np.stack([np.bincount(c.labels[t].ravel(), minlength=K) > 0 for t in range(60)])
    assert (present[1:] != present[:-1]).any()


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_labels_consistent_with_flow(seed):
    """GT labels of t+1 warped back by the exact flow reproduce GT of t on valid pixels."""
    c = render_video(seed, 6, 120, 160)
    for t in range(5):
        warped, inb = warp_nearest(c.labels[t + 1], c.flow[t])
        v = c.valid[t]
        assert not (v & ~inb).any()  # valid pixels land inside the frame
        assert v.mean() > 0.9  # most of the frame stays visible from one frame to the next
        assert (warped[v] == c.labels[t][v]).mean() >= 0.99


@pytest.mark.parametrize("seed", [0, 1])
def test_flow_matches_pixels(seed):
    """Without noise and lighting changes, frame t+1 sampled at p + flow(p) reproduces frame t.
    Checked where the motion is visible (valid pixels whose colour changes by > 4 grey levels between
    the frames): the warped frame's error is well below the unwarped one's and the negated flow's.
    (Not near zero: bilinear resampling of the unfiltered, sharp-edged textures costs several grey
    levels at texture edges.)"""
    c = render_video(seed, 3, 120, 160, noise=False, lighting=False)
    for t in range(2):
        zero = np.abs(c.frames[t + 1].astype(np.float64) - c.frames[t]).mean(-1)
        v = c.valid[t] & (zero > 4)
        assert v.sum() > 500
        err = np.abs(warp_bilinear(c.frames[t + 1], c.flow[t]) - c.frames[t]).mean(-1)[v]
        neg = np.abs(warp_bilinear(c.frames[t + 1], -c.flow[t]) - c.frames[t]).mean(-1)[v]
        assert err.mean() < 0.6 * zero[v].mean()
        assert np.median(err) < 0.6 * np.median(neg)


def test_valid_marks_occlusion_and_exit():
    c = render_video(6, 30, 90, 120)
    assert (~c.valid).any()
    # any pixel whose forward position leaves the frame is invalid
    for t in range(29):
        _, inb = warp_nearest(c.labels[t + 1], c.flow[t])
        assert not (c.valid[t] & ~inb).any()


def _unclipped(clean: np.ndarray, margin: float) -> np.ndarray:
    """Samples (per channel) far enough from 0 and 255 that added noise is rarely clipped."""
    return (clean >= margin) & (clean <= 255 - margin)


def _corr(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float:
    return float(np.corrcoef(a[keep], b[keep])[0, 1])


def test_low_light_camera_changes_pixels_only_and_is_deterministic():
    std = render_video(4, 3, 72, 96)
    low = render_video(4, 3, 72, 96, camera="low-light")
    assert CAMERAS["low-light"] == Camera(noise_std=15.0, blotch_std=30.0, blotch_size=16, flicker=0.05)
    for name in ("labels", "flow", "valid"):  # the same scene, only filmed differently
        np.testing.assert_array_equal(getattr(low, name), getattr(std, name))
    again = render_video(4, 3, 72, 96, camera=CAMERAS["low-light"])
    np.testing.assert_array_equal(low.frames, again.frames)
    np.testing.assert_array_equal(render_video(4, 3, 72, 96, camera="standard").frames, std.frames)
    clean = render_video(4, 3, 72, 96, noise=False).frames.astype(np.float64)
    assert np.abs(low.frames - clean).std() > 4 * np.abs(std.frames - clean).std()
    img, lab = render_image(4, 72, 96, camera="low-light")
    np.testing.assert_array_equal(lab, render_image(4, 72, 96)[1])
    assert not np.array_equal(img, render_image(4, 72, 96)[0])


def test_camera_noise_levels_grain_and_freshness():
    T, Hh, Ww = 3, 120, 160
    clean = render_video(7, T, Hh, Ww, noise=False).frames.astype(np.float64)
    # Fine grain: the requested std, white (no correlation between neighbours), fresh every frame.
    keep = _unclipped(clean, 55)
    assert keep.sum() > 2000
    fine = render_video(7, T, Hh, Ww, camera=Camera(noise_std=15.0)).frames - clean
    assert fine[keep].std() == pytest.approx(15.0, rel=0.08)
    nb = keep[:, :, 1:] & keep[:, :, :-1]
    assert abs(_corr(fine[:, :, 1:], fine[:, :, :-1], nb)) < 0.1
    assert abs(_corr(fine[1], fine[0], keep[0] & keep[1])) < 0.1
    # Blotches: the requested std, smooth over their grain (neighbours nearly equal), fresh every frame.
    keep = _unclipped(clean, 100)
    assert keep.sum() > 2000
    blot = render_video(7, T, Hh, Ww, camera=Camera(noise_std=0.0, blotch_std=30.0, blotch_size=16)).frames - clean
    assert blot[keep].std() == pytest.approx(30.0, rel=0.2)
    nb = keep[:, :, 1:] & keep[:, :, :-1]
    assert _corr(blot[:, :, 1:], blot[:, :, :-1], nb) > 0.95
    assert abs(_corr(blot[1], blot[0], keep[0] & keep[1])) < 0.3
    # Flicker: one gain per frame (uniform within the frame), different frames get different gains.
    gains = []
    flick = render_video(7, T, Hh, Ww, camera=Camera(noise_std=0.0, flicker=0.1)).frames.astype(np.float64)
    for t in range(T):
        bright = (clean[t] > 60) & (flick[t] < 250)
        ratio = flick[t][bright] / clean[t][bright]
        assert ratio.std() < 0.02
        gains.append(ratio.mean())
    assert max(gains) - min(gains) > 0.02
    # lighting=False holds the exposure too (for checking the flow against the pixels).
    steady = render_video(7, T, Hh, Ww, noise=False, lighting=False, camera=Camera(noise_std=0.0, flicker=0.1))
    np.testing.assert_array_equal(steady.frames, render_video(7, T, Hh, Ww, noise=False, lighting=False).frames)


@pytest.mark.parametrize("call,match", [
    (lambda: render_image(-1), "seed"),
    (lambda: render_image(1.5), "seed"),
    (lambda: render_image(0, height=0), "height"),
    (lambda: render_image(0, width=-3), "width"),
    (lambda: render_image(0, scale=0), "scale"),
    (lambda: render_video(0, 0), "frames"),
    (lambda: render_video(0, 2.0), "frames"),
    (lambda: render_video(0, 2, fps=-1), "fps"),
    (lambda: render_video(0, 2, fps="fast"), "fps"),
    (lambda: render_video(0, 2, camera="night"), "camera"),
    (lambda: render_video(0, 2, camera=None), "camera"),
    (lambda: render_image(0, camera="night"), "camera"),
    (lambda: Camera(noise_std=-1.0), "noise_std"),
    (lambda: Camera(noise_std=float("nan")), "noise_std"),
    (lambda: Camera(blotch_std=300.0), "blotch_std"),
    (lambda: Camera(blotch_size=1), "blotch_size"),
    (lambda: Camera(blotch_size=8.0), "blotch_size"),
    (lambda: Camera(flicker=0.5), "flicker"),
    (lambda: Camera(flicker=True), "flicker"),
])
def test_render_bad_arguments(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


# -- metrics -------------------------------------------------------------------------------------------

def test_confusion_and_miou_known_values():
    pred = np.array([0, 0, 1, 1])
    gt = np.array([0, 1, 1, 1])
    np.testing.assert_array_equal(confusion(pred, gt, 3), [[1, 0, 0], [1, 2, 0], [0, 0, 0]])
    # class 0: 1 / 2, class 1: 2 / 3, class 2 absent from both: skipped
    assert miou(pred, gt, 3) == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert miou(torch.tensor(pred), torch.tensor(gt), 3) == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert miou(gt, gt, 3) == 100.0
    assert miou(np.array([2, 2, 2, 2]), gt, 3) == 0.0
    # a stack of frames counts all pixels together
    stack_p = np.stack([pred.reshape(2, 2), gt.reshape(2, 2)])
    stack_g = np.stack([gt.reshape(2, 2), gt.reshape(2, 2)])
    # class 0: TP 2, FP 1 -> 2/3; class 1: TP 5, FN 1 -> 5/6
    assert miou(stack_p, stack_g, 3) == pytest.approx(100 * (2 / 3 + 5 / 6) / 2)


def test_temporal_consistency_known_values():
    pred = np.array([[[0, 0, 1, 1]], [[0, 0, 0, 1]]], dtype=np.uint8)  # [T=2, H=1, W=4]
    shift = np.zeros((1, 1, 4, 2), dtype=np.float32)
    shift[..., 0] = 1.0  # everything moves one pixel right
    assert temporal_consistency(pred, shift, None, 2) == 100.0  # the last pixel leaves: dropped
    still = np.zeros_like(shift)
    # class 0: 2 / 3, class 1: 1 / 2
    assert temporal_consistency(pred, still, None, 2) == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
    valid = np.array([[[True, True, False, True]]])
    assert temporal_consistency(pred, still, valid, 2) == 100.0
    # the mean runs over pairs: a third frame equal to the second adds a perfect pair
    pred3 = np.concatenate([pred, pred[1:]])
    still3 = np.zeros((2, 1, 4, 2), dtype=np.float32)
    assert temporal_consistency(torch.from_numpy(pred3), torch.from_numpy(still3), None, 2) == pytest.approx(
        (100 * (2 / 3 + 1 / 2) / 2 + 100) / 2)


def test_temporal_consistency_of_ground_truth_is_high():
    c = render_video(1, 5, 90, 120)
    assert temporal_consistency(c.labels, c.flow, c.valid, K) > 99.0
    cls = int(np.bincount(c.labels.ravel(), minlength=K)[1:].argmax()) + 1  # the commonest object class
    flicker = c.labels.copy()
    odd = flicker[1::2]
    odd[odd == cls] = 1 + cls % (K - 1)  # every other frame calls it another class
    assert temporal_consistency(flicker, c.flow, c.valid, K) < 90.0


@pytest.mark.parametrize("call,match", [
    (lambda: miou(np.zeros(4, int), np.zeros(5, int), 2), "pred and gt"),
    (lambda: miou(np.zeros(4), np.zeros(4, int), 2), "pred"),
    (lambda: miou(np.zeros(4, int), np.full(4, 3), 2), "gt has labels outside"),
    (lambda: miou(np.zeros(4, int), np.zeros(4, int), 0), "num_classes"),
    (lambda: confusion([0, 1], np.zeros(2, int), 2), "pred"),
    (lambda: temporal_consistency(np.zeros((2, 4), int), np.zeros((1, 4, 2)), None, 2), "pred"),
    (lambda: temporal_consistency(np.zeros((2, 3, 4), int), np.zeros((1, 3, 4, 3)), None, 2), "flow"),
    (lambda: temporal_consistency(np.zeros((2, 3, 4), int), np.zeros((1, 3, 4, 2)), np.ones((1, 3, 3), bool), 2),
     "valid"),
    (lambda: estimate_flow(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)), "frame0 and frame1"),
    (lambda: estimate_flow(np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 4), np.uint8)), "frame0"),
    (lambda: estimate_flow(np.zeros((8, 8)), np.zeros((8, 8)), window=4), "window"),
    (lambda: estimate_flow(np.zeros((8, 8)), np.zeros((8, 8)), levels=0), "levels"),
])
def test_metric_bad_arguments(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


@pytest.mark.parametrize("dx,dy", [(3, -2), (-5, 4), (1, 1)])
def test_estimate_flow_recovers_translation(dx, dy):
    """A rendered frame and the same frame shifted by (dx, dy) whole pixels: the estimated field's
    median is within 0.05 px of the shift, and more than 40 % of the interior pixels (a 16-pixel border
    left out) are within 0.5 px. Local Lucas-Kanade on weakly textured backgrounds gets no better, and
    a zero or wrong-direction field fails both."""
    img = render_image(11, 160, 220)[0]
    f0 = img[8:136, 8:200]
    f1 = img[8 - dy:136 - dy, 8 - dx:200 - dx]  # f1(p + (dx, dy)) == f0(p)
    flow = estimate_flow(f0, f1)
    assert flow.shape == (128, 192, 2) and flow.dtype == np.float32
    inner = flow[16:-16, 16:-16]
    assert abs(np.median(inner[..., 0]) - dx) < 0.05
    assert abs(np.median(inner[..., 1]) - dy) < 0.05
    err = np.hypot(inner[..., 0] - dx, inner[..., 1] - dy)
    assert (err < 0.5).mean() > 0.4


def test_estimate_flow_on_rendered_motion():
    """On a rendered pair with camera and object motion, sensor noise and lighting change: the
    median end-point error over valid pixels is below 0.7 px."""
    c = render_video(5, 2, 180, 240)
    flow = estimate_flow(c.frames[0], torch.from_numpy(c.frames[1]))
    epe = np.hypot(*(flow - c.flow[0]).transpose(2, 0, 1))[c.valid[0]]
    assert np.median(epe) < 0.7
