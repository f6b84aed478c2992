"""Procedural scenes with exact ground truth: labels, forward flow and its validity.

A scene is drawn from one integer seed (``numpy.random.Generator(PCG64(seed))``) and then rendered
analytically, so every frame, label map and flow vector is a closed-form function of the seed and the
frame index -- nothing is downloaded or stored.

Geometry. Pixel ``p = (x, y)`` is the centre of column ``x``, row ``y``.

* The background is a periodic texture ``[P, P, 3]`` (``P = 512``) living in "world" coordinates.
  The camera maps pixel ``p`` of frame ``t`` to the world point ``w = o_t + k_t * p`` (``o_t``: pan,
  ``k_t = zoom_t / scale``), sampled bilinearly with wrap-around. The background point at ``p`` in
  frame ``t`` is therefore at ``(o_t + k_t p - o_{t+1}) / k_{t+1}`` in frame ``t + 1``; its flow is
  that minus ``p``.
* Each object is a rigid shape with centre ``c(t) = c0 + v t`` and angle ``theta(t) = theta0 + w t``.
  A pixel ``p`` covered by it in frame ``t`` has local coordinates ``q = R(-theta_t)(p - c_t)``, and
  the same material point is at ``c_{t+1} + R(theta_{t+1}) q`` in frame ``t + 1``. Its texture is a
  function of ``q``, so it moves with the object.
* Objects are drawn in a fixed order over the background (later ones occlude earlier ones); labels
  are the class of the top-most owner of each pixel centre (no anti-aliasing: labels are exact).
* ``valid[t]`` is True where the forward position ``p + flow`` rounds to a pixel inside frame
  ``t + 1`` that is owned by the same surface (background or the same object): False where that
  point becomes occluded, where frame ``t + 1``'s pixel shows something else (disocclusion seen from
  the other side) and where it leaves the frame.

Appearance. Lighting multiplies the albedo by a slowly varying global gain and a rotating linear
gradient; sensor noise is fresh Gaussian noise per frame (a per-frame segmenter therefore flickers a
little, which temporal smoothing can remove). Each object class has its own shape and its own colour
family and texture, each randomly varied per object; backgrounds are dark and desaturated.

Camera. The ``camera`` argument of ``render_video`` / ``render_image`` says how the scene is imaged
(a ``Camera``; the named ones are in ``CAMERAS``). It changes the pixels only, never the scene, the
labels, the flow or ``valid``.

* ``"standard"`` (the default, and the training data of the shipped model): the scene's own sensor
  noise, std drawn per scene in [2, 6] grey levels. On frames this clean a per-frame segmenter hardly
  flickers (the shipped model's temporal consistency is about 96 %), so there is little for temporal
  smoothing to fix.
* ``"low-light"``: a cheap camera at high gain in a dim scene (indoors at night). Amplifying a dim
  signal back to normal brightness amplifies the sensor noise with it, and in-camera noise reduction
  removes the finest grain but leaves coarse colour blotches. Modelled as three per-frame terms, fresh
  every frame: fine grain, Gaussian of std ``noise_std`` per pixel and channel; colour blotches, a
  Gaussian field of std ``blotch_std`` per channel, smooth over about ``blotch_size`` pixels (white
  noise on a grid ``blotch_size`` times coarser, upsampled bicubically); and exposure flicker (auto
  exposure hunting, mains-powered lamps), each frame's brightness multiplied by
  ``1 + flicker * z_t`` with z_t standard normal. This is the camera of ``deconvseg-fast video --demo``:
  the shipped model, trained on the standard camera, flickers badly under it, which is what a temporal
  CRF is for.

Deterministic: each term of frame t comes from its own generator seeded by ``(seed, t)``; the fine
grain is the same unit field for every camera, scaled by its std.
"""
from __future__ import annotations

import colorsys
import contextlib
import dataclasses
import math
import numbers
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as TF

CLASSES: tuple[str, ...] = ("background", "disc", "box", "triangle", "ring", "bar")
# Display colours (background dark). Not the rendered colours: those are per-object textures.
PALETTE = np.array([[20, 20, 24], [230, 60, 40], [50, 110, 235], [60, 200, 70], [200, 70, 210], [245, 210, 40]],
                   dtype=np.uint8)

_TEX = 512  # background texture period (world pixels)
_BASE = 360.0  # the image size (min of H, W) at which scale == 1


@contextlib.contextmanager
def _one_thread():
    """Run torch's ops single-threaded: the renderer's are many small ones, for which waking a second
    thread costs more than it gains (4x slower frames measured on 2 cores). Results are the same.
    The setting is process-wide: while a frame renders, torch work in other Python threads runs
    single-threaded too."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_unit_range(value, name: str, low: float, high: float) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or not low <= value <= high):
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Camera:
    """How a scene is imaged (module docstring, "Camera"). All noise is fresh every frame.

    ``noise_std``: std of the fine-grain Gaussian noise per pixel and channel, in grey levels (0..255);
    None: the scene's own (drawn in [2, 6]). ``blotch_std``: std of the coarse colour noise per channel,
    grey levels (0: none). ``blotch_size``: its grain in pixels (an int >= 2). ``flicker``: relative std
    of the per-frame exposure gain (0: none; z_t is clipped to +-3)."""
    noise_std: float | None = None
    blotch_std: float = 0.0
    blotch_size: int = 8
    flicker: float = 0.0

    def __post_init__(self):
        if self.noise_std is not None:
            _check_unit_range(self.noise_std, "noise_std", 0.0, 255.0)
        _check_unit_range(self.blotch_std, "blotch_std", 0.0, 255.0)
        if isinstance(self.blotch_size, bool) or not isinstance(self.blotch_size, numbers.Integral) \
                or self.blotch_size < 2:
            raise ValueError(f"blotch_size must be an int >= 2, got {self.blotch_size!r}")
        _check_unit_range(self.flicker, "flicker", 0.0, 0.3)


# "low-light" is the video demo's camera (module docstring). Under it the shipped model's per-frame
# mIoU on the demo clip (seed 0) falls from 93.5 % to 47.3 % and its temporal consistency from 95.7 %
# to 36.9 % (BENCHMARKS.md, "Video").
CAMERAS: dict[str, Camera] = {
    "standard": Camera(),
    "low-light": Camera(noise_std=15.0, blotch_std=30.0, blotch_size=16, flicker=0.05),
}


def _check_camera(camera) -> Camera:
    if isinstance(camera, Camera):
        return camera
    if isinstance(camera, str) and camera in CAMERAS:
        return CAMERAS[camera]
    raise ValueError(f"camera must be one of {sorted(CAMERAS)} or a Camera, got {camera!r}")


@dataclasses.dataclass
class Clip:
    """A rendered video: ``frames`` uint8 [T, H, W, 3]; ``labels`` uint8 [T, H, W]; ``flow`` float32
    [T-1, H, W, 2] (dx, dy) taking each pixel of frame t to its position in frame t + 1; ``valid`` bool
    [T-1, H, W] (see the module docstring); ``fps`` frames per second."""
    frames: np.ndarray
    labels: np.ndarray
    flow: np.ndarray
    valid: np.ndarray
    fps: Fraction


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(seed)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)),
                    dtype=np.float32) * 255.0


def _periodic_noise(rng: np.random.Generator, size: int, cutoff: float, channels: int) -> np.ndarray:
    """Smooth periodic noise [size, size, channels] in about [-1, 1] with a Gaussian spectrum of
    standard deviation ``cutoff`` cycles/pixel. White noise is low-passed in the Fourier domain (the
    FFT makes it tile seamlessly, which the wrapping camera needs) on a grid 4x coarser, then
    upsampled bilinearly with wrap-around: the spectrum has no energy near the coarse Nyquist
    frequency for the cutoffs used here (<= 0.08), so this costs 1/16 of the work for the same look."""
    small = size // 4
    white = torch.from_numpy(rng.standard_normal((channels, small, small), dtype=np.float32))
    f = torch.fft.fftfreq(small)
    r2 = f[:, None] ** 2 + f[None, : small // 2 + 1] ** 2
    c = cutoff * 4
    out = torch.fft.irfft2(torch.fft.rfft2(white) * torch.exp(-r2 / (2 * c * c)), s=(small, small))
    out = TF.pad(out[None], (1, 1, 1, 1), mode="circular")
    out = TF.interpolate(out, scale_factor=4, mode="bilinear", align_corners=False)[0, :, 4:4 + size, 4:4 + size]
    out /= 3 * out.std() + 1e-6
    return out.permute(1, 2, 0).numpy()


def _background_texture(rng: np.random.Generator) -> np.ndarray:
    """A dark, desaturated periodic texture [P, P, 3] float32 (albedo 0..255): noise, stripes or tiles."""
    P = _TEX
    kind = int(rng.integers(3))
    hue = rng.random()
    c1 = _hsv(hue, rng.uniform(0.05, 0.3), rng.uniform(0.2, 0.4))
    c2 = _hsv(hue + rng.uniform(-0.15, 0.15), rng.uniform(0.05, 0.3), rng.uniform(0.1, 0.35))
    xx = np.arange(P, dtype=np.float32)[None, :]
    yy = np.arange(P, dtype=np.float32)[:, None]
    fine = _periodic_noise(rng, P, rng.uniform(0.03, 0.08), 1)[..., 0]
    if kind == 0:  # cloudy noise
        m = 0.5 + _periodic_noise(rng, P, rng.uniform(0.005, 0.02), 1)[..., 0]
    elif kind == 1:  # stripes at an integer wave vector (periodic in P)
        kx, ky = (int(v) for v in rng.integers(-8, 9, size=2))
        if kx == 0 and ky == 0:
            kx = 5
        m = 0.5 + 0.5 * np.sin(2 * np.pi * (kx * xx + ky * yy) / P + rng.uniform(0, 2 * np.pi))
    else:  # tiles with mortar lines; tile size divides P
        ts = int(rng.choice([32, 64, 128]))
        tile_rand = rng.random((P // ts, P // ts)).astype(np.float32)
        m = np.repeat(np.repeat(tile_rand, ts, 0), ts, 1)
        mortar = ((xx % ts) < 2) | ((yy % ts) < 2)
        m = np.where(mortar, 0.0, m)
    m = torch.from_numpy(np.clip(m + 0.15 * fine, 0, 1).astype(np.float32))[..., None]
    return torch.lerp(torch.from_numpy(c2), torch.from_numpy(c1), m).numpy()


@dataclasses.dataclass
class _Object:
    cls: int
    c0: np.ndarray  # centre at t = 0, [2] (x, y), pixels
    v: np.ndarray  # velocity, [2] pixels / frame
    theta0: float
    omega: float  # rad / frame
    r: float  # size, pixels
    aspect: float  # box: height / width
    color: np.ndarray  # [3] albedo
    color2: np.ndarray  # [3] second texture colour
    freq: float  # texture frequency (per pixel or per radian)
    reach: float  # radius of a disc containing the shape

    def pose(self, t: int):
        c = self.c0 + self.v * t
        th = self.theta0 + self.omega * t
        return c, th

    def inside(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        r = self.r
        if self.cls == 1:  # disc
            return u * u + v * v <= r * r
        if self.cls == 2:  # box
            return (np.abs(u) <= r) & (np.abs(v) <= r * self.aspect)
        if self.cls == 3:  # equilateral triangle, circumradius r, apex up (-v)
            a = r * 0.5  # inradius
            s3 = math.sqrt(3.0) / 2
            return (v <= a) & (s3 * u - 0.5 * v <= a) & (-s3 * u - 0.5 * v <= a)
        if self.cls == 4:  # ring
            d2 = u * u + v * v
            return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
        return (np.abs(u) <= r * 1.4) & (np.abs(v) <= r * 0.28)  # bar

    def texture(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Albedo [n, 3] at local coordinates (u, v)."""
        c, c2, r, f = self.color, self.color2, self.r, self.freq
        if self.cls == 1:  # disc: radial shading with faint concentric rings
            rho = np.sqrt(u * u + v * v) / r
            m = (1.15 - 0.5 * rho * rho + 0.12 * np.sin(rho * f))[:, None]
            return c * m
        if self.cls == 2:  # box: two-colour checker
            m = ((np.floor(u / f) + np.floor(v / f)) % 2)[:, None].astype(np.float32)
            return c * m + c2 * (1 - m)
        if self.cls == 3:  # triangle: stripes parallel to its base
            m = (np.sin(v * f) > 0)[:, None].astype(np.float32)
            return c * (0.7 + 0.35 * m)
        if self.cls == 4:  # ring: angular segments
            m = (0.75 + 0.3 * np.sin(np.arctan2(v, u) * f))[:, None]
            return c * m
        m = (np.sin(u * f) > 0)[:, None].astype(np.float32)  # bar: hazard bands across its length
        return c * m + c2 * (1 - m)


_HUES = {1: (0.0, 0.07), 2: (0.57, 0.66), 3: (0.26, 0.38), 4: (0.78, 0.88), 5: (0.12, 0.17)}


def _make_object(rng: np.random.Generator, H: int, W: int, s: float, frames: int) -> _Object:
    cls = int(rng.integers(1, len(CLASSES)))
    r = float(rng.uniform(25, 75)) * s
    hue = rng.uniform(*_HUES[cls])
    color = _hsv(hue, rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0))
    if cls == 2:
        color2 = _hsv(hue + rng.uniform(-0.03, 0.03), rng.uniform(0.3, 0.6), rng.uniform(0.85, 1.0))
        freq = float(rng.uniform(0.25, 0.5)) * r
    elif cls == 5:
        color2 = _hsv(hue, rng.uniform(0.2, 0.5), rng.uniform(0.12, 0.25))
        freq = float(2 * np.pi / (rng.uniform(0.35, 0.6) * r))
    elif cls == 1:
        color2, freq = color, float(rng.uniform(8, 16))
    elif cls == 3:
        color2, freq = color, float(2 * np.pi / (rng.uniform(0.2, 0.35) * r))
    else:
        color2, freq = color, float(rng.integers(5, 11))
    aspect = float(rng.uniform(0.6, 1.0))
    reach = {1: 1.0, 2: math.hypot(1.0, aspect), 3: 1.0, 4: 1.0, 5: math.hypot(1.4, 0.28)}[cls] * r
    speed = float(rng.uniform(0.3, 3.5)) * s
    heading = rng.uniform(0, 2 * np.pi)
    v = np.array([math.cos(heading), math.sin(heading)]) * speed
    # At a random time in the clip the object is at a random place inside the frame: it may enter
    # from a border before then and leave after.
    tc = float(rng.uniform(0, max(frames - 1, 0)))
    pc = np.array([rng.uniform(0.05, 0.95) * W, rng.uniform(0.05, 0.95) * H])
    omega = float(rng.uniform(-0.03, 0.03)) if rng.random() < 0.7 else 0.0
    return _Object(cls, pc - v * tc, v, float(rng.uniform(0, 2 * np.pi)), omega, r, aspect, color, color2, freq,
                   reach)


class _Scene:
    def __init__(self, seed: int, frames: int, H: int, W: int, scale: float | None = None):
        rng = np.random.Generator(np.random.PCG64(seed))
        self.seed, self.H, self.W = seed, H, W
        self.s = s = float(min(H, W) / _BASE if scale is None else scale)
        self.tex = torch.from_numpy(_background_texture(rng))
        # camera: pan (world px / frame), slow oscillating zoom
        pan_speed = rng.uniform(0.0, 2.0)
        a = rng.uniform(0, 2 * np.pi)
        self.pan = np.array([math.cos(a), math.sin(a)]) * pan_speed
        self.o0 = rng.uniform(0, _TEX, size=2)
        self.zoom_amp = rng.uniform(0.0, 0.04)
        self.zoom_period = rng.uniform(60, 200)
        self.zoom_phase = rng.uniform(0, 2 * np.pi)
        # lighting
        self.gain0 = rng.uniform(0.85, 1.15)
        self.gain_amp = rng.uniform(0.0, 0.12)
        self.gain_period = rng.uniform(80, 300)
        self.gain_phase = rng.uniform(0, 2 * np.pi)
        self.grad_amp = rng.uniform(0.0, 0.3)
        self.grad_angle = rng.uniform(0, 2 * np.pi)
        self.grad_turn = rng.uniform(-0.01, 0.01)
        self.noise = rng.uniform(2.0, 6.0)
        n = int(rng.integers(4, 10)) + frames // 30
        self.objects = [_make_object(rng, H, W, s, frames) for _ in range(n)]
        self.xs = np.arange(W, dtype=np.float32)
        self.ys = np.arange(H, dtype=np.float32)

    # -- camera -------------------------------------------------------------------------------------
    def camera(self, t: int):
        zoom = 1.0 + self.zoom_amp * math.sin(2 * math.pi * t / self.zoom_period + self.zoom_phase)
        # zoom about the image centre: w = o_t + k_t p with o_t absorbing the centring
        k = zoom / self.s
        centre = np.array([self.W / 2, self.H / 2])
        o = self.o0 + self.pan * t + (1.0 / self.s - k) * centre
        return o, k

    def lighting(self, t: int) -> np.ndarray:
        g = self.gain0 + self.gain_amp * math.sin(2 * math.pi * t / self.gain_period + self.gain_phase)
        a = self.grad_angle + self.grad_turn * t
        span = float(max(self.H, self.W))
        gx = (self.xs - self.W / 2) * (math.cos(a) * self.grad_amp / span)
        gy = (self.ys - self.H / 2) * (math.sin(a) * self.grad_amp / span)
        return (g * (1.0 + gy[:, None] + gx[None, :])).astype(np.float32)

    def _background(self, t: int) -> np.ndarray:
        o, k = self.camera(t)
        wx = (o[0] + k * self.xs).astype(np.float64)
        wy = (o[1] + k * self.ys).astype(np.float64)
        x0, y0 = np.floor(wx), np.floor(wy)
        fx = (wx - x0).astype(np.float32)[None, :, None]
        fy = (wy - y0).astype(np.float32)[:, None, None]
        # The camera neither rotates nor shears, so bilinear sampling is separable: rows, then columns.
        x0 = torch.from_numpy(x0.astype(np.int64) % _TEX)
        y0 = torch.from_numpy(y0.astype(np.int64) % _TEX)
        x1, y1 = (x0 + 1) % _TEX, (y0 + 1) % _TEX
        fx, fy = torch.from_numpy(fx), torch.from_numpy(fy)
        rows = torch.lerp(self.tex.index_select(0, y0), self.tex.index_select(0, y1), fy)  # [H, P, 3]
        out = torch.lerp(rows.index_select(1, x0), rows.index_select(1, x1), fx)  # [H, W, 3]
        return out.numpy()

    def _background_flow(self, t: int) -> np.ndarray:
        o0, k0 = self.camera(t)
        o1, k1 = self.camera(t + 1)
        fx = ((o0[0] - o1[0]) + (k0 - k1) * self.xs) / k1
        fy = ((o0[1] - o1[1]) + (k0 - k1) * self.ys) / k1
        flow = np.empty((self.H, self.W, 2), dtype=np.float32)
        flow[..., 0] = fx[None, :]
        flow[..., 1] = fy[:, None]
        return flow

    # -- one frame ------------------------------------------------------------------------------------
    def render(self, t: int, with_flow: bool, noise: bool = True, camera: Camera = CAMERAS["standard"]):
        """Frame t: image uint8 [H, W, 3], labels uint8 [H, W], owner int16 [H, W] (0: background,
        i + 1: object i) and, if ``with_flow``, the forward flow float32 [H, W, 2] to frame t + 1.
        ``camera`` changes the image only."""
        with _one_thread():
            return self._render(t, with_flow, noise, camera)

    def _render(self, t: int, with_flow: bool, noise: bool, camera: Camera):
        H, W = self.H, self.W
        albedo = self._background(t)
        labels = np.zeros((H, W), dtype=np.uint8)
        owner = np.zeros((H, W), dtype=np.int16)
        flow = self._background_flow(t) if with_flow else None
        for i, ob in enumerate(self.objects):
            c, th = ob.pose(t)
            x0 = max(int(math.floor(c[0] - ob.reach)), 0)
            x1 = min(int(math.ceil(c[0] + ob.reach)) + 1, W)
            y0 = max(int(math.floor(c[1] - ob.reach)), 0)
            y1 = min(int(math.ceil(c[1] + ob.reach)) + 1, H)
            if x0 >= x1 or y0 >= y1:
                continue
            dx = (self.xs[x0:x1] - c[0])[None, :]
            dy = (self.ys[y0:y1] - c[1])[:, None]
            cs, sn = math.cos(th), math.sin(th)
            u = cs * dx + sn * dy  # R(-theta) (p - c)
            v = -sn * dx + cs * dy
            m = ob.inside(u, v)
            if not m.any():
                continue
            uu, vv = u[m], v[m]
            albedo[y0:y1, x0:x1][m] = ob.texture(uu, vv)
            labels[y0:y1, x0:x1][m] = ob.cls
            owner[y0:y1, x0:x1][m] = i + 1
            if with_flow:
                c1, th1 = ob.pose(t + 1)
                cs1, sn1 = math.cos(th1), math.sin(th1)
                px = c1[0] + cs1 * uu - sn1 * vv
                py = c1[1] + sn1 * uu + cs1 * vv
                yy, xx = np.nonzero(m)
                flow[y0 + yy, x0 + xx, 0] = px - (x0 + xx)
                flow[y0 + yy, x0 + xx, 1] = py - (y0 + yy)
        img = albedo * self.lighting(t)[..., None]
        if camera.flicker:
            z = float(torch.randn((), generator=self._generator(t, 1)).clamp(-3.0, 3.0))
            img *= np.float32(1.0 + camera.flicker * z)
        if noise:
            std = self.noise if camera.noise_std is None else camera.noise_std
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + t) % (1 << 63))
            img += torch.randn((H, W, 3), generator=g).numpy() * np.float32(std)
            if camera.blotch_std:
                img += self._blotches(t, camera.blotch_size) * np.float32(camera.blotch_std)
        img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        return img, labels, owner, flow

    def _generator(self, t: int, stream: int) -> torch.Generator:
        # Streams other than the fine grain's (which keeps its historical seed).
        return torch.Generator().manual_seed((self.seed * 1_000_033 + t * 7919 + stream * 104_729) % (1 << 63))

    def _blotches(self, t: int, size: int) -> np.ndarray:
        """Smooth colour noise [H, W, 3] of unit std (the frame's sample std), grain ``size`` pixels."""
        H, W = self.H, self.W
        h, w = -(-H // size) + 3, -(-W // size) + 3
        coarse = torch.randn((1, 3, h, w), generator=self._generator(t, 2))
        field = TF.interpolate(coarse, scale_factor=size, mode="bicubic", align_corners=False)
        field = field[0, :, size:size + H, size:size + W]
        field = field / (field.std(correction=0) + 1e-6)
        return field.permute(1, 2, 0).numpy()


def _forward_valid(flow: np.ndarray, owner0: np.ndarray, owner1: np.ndarray) -> np.ndarray:
    H, W = owner0.shape
    tx = np.floor(np.arange(W, dtype=np.float32)[None, :] + flow[..., 0] + 0.5).astype(np.int64)
    ty = np.floor(np.arange(H, dtype=np.float32)[:, None] + flow[..., 1] + 0.5).astype(np.int64)
    inb = (tx >= 0) & (tx < W) & (ty >= 0) & (ty < H)
    same = owner1[np.clip(ty, 0, H - 1), np.clip(tx, 0, W - 1)] == owner0
    return inb & same


def render_image(seed: int, height: int = 360, width: int = 480, *, scale: float | None = None,
                 noise: bool = True, camera: str | Camera = "standard") -> tuple[np.ndarray, np.ndarray]:
    """One still scene: ``(image uint8 [H, W, 3], labels uint8 [H, W])``, deterministic for ``seed``.

    ``scale``: size of objects and textures relative to a 360-pixel-high frame (default
    ``min(height, width) / 360``: the same scene layout at any resolution). A 180x240 image with
    ``scale=1.0`` looks like a crop of a 360x480 one. ``noise=False`` leaves out the sensor noise.
    ``camera``: "standard", "low-light" or a ``Camera`` (module docstring, "Camera")."""
    seed = _check_seed(seed)
    camera = _check_camera(camera)
    height = _check_int(height, "height", 1)
    width = _check_int(width, "width", 1)
    if scale is not None and not (isinstance(scale, numbers.Real) and scale > 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    with _one_thread():
        img, labels, _, _ = _Scene(seed, 1, height, width, scale).render(0, False, noise, camera)
    return img, labels


def render_video(seed: int, frames: int, height: int = 360, width: int = 480,
                 fps: Fraction = Fraction(30000, 1001), *, noise: bool = True, lighting: bool = True,
                 camera: str | Camera = "standard") -> Clip:
    """A clip of ``frames`` frames with exact labels, forward flow and flow validity (``Clip``).

    Deterministic for ``seed``. ``noise=False`` leaves out the sensor noise and ``lighting=False``
    holds the lighting constant, the camera's gain flicker included (both for checking the flow
    against the pixels). ``camera``: "standard" (the default, the shipped model's training data),
    "low-light" (strong per-frame sensor noise, colour blotches and exposure flicker: the video
    demo's camera) or a ``Camera``; see the module docstring. The camera changes the frames only:
    labels, flow and valid are those of the standard camera for the same seed."""
    seed = _check_seed(seed)
    camera = _check_camera(camera)
    frames = _check_int(frames, "frames", 1)
    height = _check_int(height, "height", 1)
    width = _check_int(width, "width", 1)
    try:
        fps = Fraction(fps)
    except (TypeError, ValueError):
        raise TypeError(f"fps must be a number or Fraction, got {fps!r}") from None
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    with _one_thread():
        return _render_clip(seed, frames, height, width, fps, noise, lighting, camera)


def _render_clip(seed, frames, height, width, fps, noise, lighting, camera) -> Clip:
    scene = _Scene(seed, frames, height, width)
    if not lighting:
        scene.gain_amp = 0.0
        scene.grad_turn = 0.0
        camera = dataclasses.replace(camera, flicker=0.0)
    T, H, W = frames, height, width
    out = np.empty((T, H, W, 3), dtype=np.uint8)
    labels = np.empty((T, H, W), dtype=np.uint8)
    flow = np.empty((max(T - 1, 0), H, W, 2), dtype=np.float32)
    valid = np.empty((max(T - 1, 0), H, W), dtype=bool)
    prev_owner = None
    for t in range(T):
        img, lab, owner, f = scene.render(t, t < T - 1, noise, camera)
        out[t], labels[t] = img, lab
        if f is not None:
            flow[t] = f
        if prev_owner is not None:
            valid[t - 1] = _forward_valid(flow[t - 1], prev_owner, owner)
        prev_owner = owner
    return Clip(out, labels, flow, valid, fps)
