"""End-to-end video benchmark: the streaming pipeline on the default model, ours vs a reference
pipeline built from torch's own ops and pydensecrf, same clip, same run.

    deconvseg-fast bench --filter video            # every video case (about a minute on 2 cores)
    deconvseg-fast bench --filter video --quick    # tiny clip, seconds
    python -m benchmarks.video [--quick] [--frames N] [--filter SUBSTR]

Input: a generated clip (``deconvseg_fast.scenes.render_video``, seed 0, 360x480, 30 frames; quick:
90x120, 6 frames) encoded to a temporary .mp4 (libx264) and decoded again by the pipeline, so decode
is real work; the overlay video is encoded to another temporary .mp4.

Every row is one run of the real pipeline, ``deconvseg_fast.video.pipeline.segment_video`` (decode,
model, CRF and overlay + encode in their own threads), with a different segmenter:

* ``ours nocrf``    -- the default model (``deconvseg_fast.weights``) on deconvseg_fast's kernels;
* ``ours crf``      -- plus the dense CRF per frame (``functional.dense_crf``);
* ``ours temporal`` -- plus the temporal CRF instead (``TemporalCRF``, window TEMPORAL_WINDOW frames);
* ``reference crf`` -- the model's pure-torch twin (``deconvseg_fast.reference.models``, the same
  weights) and pydensecrf2's ``DenseCRF2D`` per frame, driven as DeepLab drives it (unary =
  -log softmax of the logits, float32 C-contiguous (L, H*W); Gaussian sxy 3 compat 3; bilateral
  sxy 80 srgb 13 compat 10; symmetric normalisation), through the same pipeline code.

All CRF rows use the same settings, with CRF_ITERATIONS mean-field iterations (DeepLab's 10, not the
Segmenter's default of 5). Everything but the model and the CRF is shared code, so the ratio
``ours fps / reference fps`` isolates the kernels.

Columns: fps = frames / wall time of the whole call (file open to file closed); per-stage ms are the
busy time of each stage's thread per frame (they overlap, so they add up to more than the wall per
frame on two cores); I/O % = (decode + overlay + encode busy time) / wall, the pipeline overhead the
issue bounds (target < 15 %); "outside model+CRF %" = (wall - model - CRF busy) / wall, the
pipeline's own overhead figure; mIoU (percent) against the clip's exact labels; check = agreement of the
labels with the reference pipeline's (ours crf: the same CRF model, so this checks equivalence).
A single pass per row (interleaving would need the whole clip twice): the 1-minute load average is
in the header, and a loaded machine distorts the ratio.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VIDEO_CSV_COLUMNS = [
    "timestamp", "git_commit", "torch_version", "pydensecrf_version", "device", "device_name", "threads",
    "load_avg_1m", "quick",
    "case", "impl", "crf", "frames", "height", "width", "batch", "crf_iterations", "temporal_window",
    "weights", "wall_s", "fps", "decode_ms", "model_ms", "crf_ms", "encode_ms", "io_pct",
    "outside_model_crf_pct", "speedup", "target", "miou", "check",
]

# DeepLab's CRF (benchmarks/crf.py DEEPLAB), in dense_crf's names; pydensecrf gets the same numbers.
CRF_SETTINGS = dict(gaussian_sxy=3.0, gaussian_weight=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0,
                    bilateral_weight=10.0)
CRF_ITERATIONS = 10
TEMPORAL_WINDOW = 3
TARGET_SPEEDUP = 2.0  # ours crf fps / reference crf fps
TARGET_IO_PCT = 15.0
FULL = dict(frames=30, height=360, width=480, batch=4)
QUICK = dict(frames=6, height=90, width=120, batch=2)


@dataclass(frozen=True)
class VideoCase:
    impl: str  # ours | reference
    crf: str  # none | frame | temporal
    frames: int
    height: int
    width: int
    batch: int

    @property
    def name(self) -> str:
        what = {"none": "nocrf", "frame": "crf", "temporal": f"temporal-crf w{TEMPORAL_WINDOW}"}[self.crf]
        return f"video {self.impl} {what} {self.width}x{self.height} f{self.frames}"


def cases(quick: bool = False, frames: int | None = None) -> list[VideoCase]:
    g = dict(QUICK if quick else FULL)
    if frames is not None:
        g["frames"] = frames
    # The two rows of the ratio run back to back, so load drift hits them alike.
    return [VideoCase("ours", "none", **g), VideoCase("ours", "temporal", **g),
            VideoCase("ours", "frame", **g), VideoCase("reference", "frame", **g)]


def select(all_cases: list[VideoCase], filter: str | None) -> list[VideoCase]:  # noqa: A002
    """``video`` (or no filter): every case; else cases whose name contains the filter. The ratio
    needs both CRF rows, so selecting one of them brings the other along."""
    if not filter or filter.lower() == "video":
        return list(all_cases)
    needle = filter.lower()
    picked = [c for c in all_cases if needle in c.name.lower()]
    if any(c.crf == "frame" for c in picked):
        picked += [c for c in all_cases if c.crf == "frame" and c not in picked]
    return [c for c in all_cases if c in picked]


# ---- the clip -------------------------------------------------------------------------------------
def make_clip(folder: str | os.PathLike, frames: int, height: int, width: int, seed: int = 0):
    """Render a clip, encode it to ``folder/clip.mp4``; returns (path, exact labels uint8 [T, H, W])."""
    from deconvseg_fast.scenes import render_video
    from deconvseg_fast.video.io import write_clip

    clip = render_video(seed, frames, height, width)
    path = Path(folder) / "clip.mp4"
    write_clip(path, clip.frames, clip.fps, audio=False)
    return str(path), clip.labels


# ---- the segmenters -------------------------------------------------------------------------------
def default_model():
    """(model, classes, palette, weights note): the shipped default model, or -- until its weights
    exist -- the same network with seeded random weights (the timing is the same; mIoU is not)."""
    from deconvseg_fast.video.io import VideoError
    from deconvseg_fast.video.segmenter import load_model

    try:
        model, classes, palette = load_model()
        return model, classes, palette, "default"
    except (VideoError, FileNotFoundError):  # the weights module, or its data file, not there yet
        from deconvseg_fast.models.compact import compact_segnet
        from deconvseg_fast.scenes import CLASSES, PALETTE

        torch.manual_seed(0)
        return compact_segnet().eval(), list(CLASSES), np.asarray(PALETTE), "random (no default weights)"


def reference_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The pure-torch twin of `model` (same architecture, torch's own ops) with its weights."""
    from deconvseg_fast.reference import models as R

    cfg = dict(getattr(model, "config", {}) or {})
    name = {"CompactSegNet": "compact_segnet"}.get(type(model).__name__)
    if name is None or not hasattr(R, name):
        raise RuntimeError(f"no pure-torch twin of {type(model).__name__} in deconvseg_fast.reference.models")
    twin = getattr(R, name)(cfg.get("num_classes", 6), cfg.get("width", 1.0)).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def pydensecrf_module():
    try:
        import pydensecrf.densecrf as pd
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken build
        raise RuntimeError(f"the reference pipeline needs pydensecrf ({type(e).__name__}: {e}); "
                           f"pip install pydensecrf2") from e
    return pd


def _reference_segmenter_class():
    from deconvseg_fast.video.segmenter import Segmenter

    class ReferenceSegmenter(Segmenter):
        """The twin model through Segmenter's own preprocessing, and pydensecrf's DenseCRF2D per frame
        in place of dense_crf (``refine``): what a user of torch + pydensecrf would run."""

        def __init__(self, twin, **kwargs):
            super().__init__(twin, crf=True, crf_iterations=CRF_ITERATIONS, **kwargs)
            self.pd = pydensecrf_module()

        @torch.inference_mode()
        def refine(self, logits: torch.Tensor, frames) -> torch.Tensor:
            frames = np.asarray(frames)
            B, L, H, W = logits.shape
            out = torch.empty(B, L, H, W)
            for b in range(B):
                unary = np.ascontiguousarray(
                    (-torch.log_softmax(logits[b].float().cpu(), 0)).reshape(L, H * W).numpy())
                d = self.pd.DenseCRF2D(W, H, L)  # width first: pydensecrf's order
                d.setUnaryEnergy(unary)
                d.addPairwiseGaussian(sxy=CRF_SETTINGS["gaussian_sxy"], compat=CRF_SETTINGS["gaussian_weight"])
                d.addPairwiseBilateral(sxy=CRF_SETTINGS["bilateral_sxy"], srgb=CRF_SETTINGS["bilateral_srgb"],
                                       rgbim=np.ascontiguousarray(frames[b], dtype=np.uint8),
                                       compat=CRF_SETTINGS["bilateral_weight"])
                out[b] = torch.from_numpy(np.asarray(d.inference(CRF_ITERATIONS), dtype=np.float32).reshape(L, H, W))
            return out

    return ReferenceSegmenter


def build_segmenter(case: VideoCase, model, classes, palette, device: str = "cpu"):
    """On device "cuda" both models run there; pydensecrf stays on the CPU (as in benchmarks/crf.py)."""
    from deconvseg_fast.video.segmenter import Segmenter

    if case.impl == "reference":
        return _reference_segmenter_class()(reference_twin(model), classes=classes, palette=palette,
                                            device=device)
    if case.crf == "none":
        return Segmenter(model, classes=classes, palette=palette, device=device)
    return Segmenter(model, classes=classes, palette=palette, device=device, crf=True, crf_iterations=CRF_ITERATIONS,
                     crf_params=dict(CRF_SETTINGS),
                     temporal_window=TEMPORAL_WINDOW if case.crf == "temporal" else 1)


# ---- running --------------------------------------------------------------------------------------
def run_case(case: VideoCase, clip_path: str, out_dir: str, segmenter) -> tuple[dict, np.ndarray]:
    """One pass of segment_video; (its summary, labels uint8 [T, H, W])."""
    from deconvseg_fast.video.pipeline import segment_video

    labels: dict[int, np.ndarray] = {}
    out = Path(out_dir) / (case.name.replace(" ", "_") + ".mp4")
    summary = segment_video(clip_path, str(out), segmenter=segmenter, batch=case.batch, progress=False,
                            on_labels=lambda i, lab: labels.__setitem__(i, lab))
    if sorted(labels) != list(range(summary["frames"])):
        raise RuntimeError(f"{case.name}: labels for frames {sorted(labels)[:5]}..., expected 0..{summary['frames'] - 1}")
    return summary, np.stack([labels[i] for i in range(summary["frames"])])


def _warm_up(segmenter, height: int, width: int) -> None:
    """One model call and one CRF call on a blank frame: first-call costs (allocator, one-time set-up)
    stay out of the timed pass."""
    frames = np.zeros((1, height, width, 3), np.uint8)
    y = segmenter.logits(frames)
    if segmenter.crf:
        segmenter.refine(y, frames)


def run_video(device: str = "cpu", quick: bool = False, csv_path: str | None = None,
              filter: str | None = None, *, markdown: bool = False, stream=None, progress=None,  # noqa: A002
              frames: int | None = None) -> list[dict]:
    from benchmarks.runner import BenchmarkConfigError, append_csv, environment, pydensecrf_version
    from deconvseg_fast.scenes import miou

    stream = sys.stdout if stream is None else stream
    progress = sys.stderr if progress is None else progress
    if device not in ("cpu", "cuda"):
        raise BenchmarkConfigError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    selected = select(cases(quick, frames), filter)
    if not selected:
        raise BenchmarkConfigError(f"filter: no video case contains {filter!r}; cases are: "
                                   f"{', '.join(c.name for c in cases(quick, frames))}")
    no_ref = None
    try:
        pydensecrf_module()
    except RuntimeError as e:  # ours is still timed; the rows say why there is no ratio
        no_ref = str(e)
        selected = [c for c in selected if c.impl != "reference"]
        print(f"warning: {no_ref}; the video rows have no reference", file=progress, flush=True)
    env = environment(device)
    model, classes, palette, weights = default_model()
    g = selected[0]
    rows, by_key = [], {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deconvseg_bench_video_") as tmp:
        clip_path, gt = make_clip(tmp, g.frames, g.height, g.width)
        for i, case in enumerate(selected, 1):
            print(f"[video {i}/{len(selected)}] {case.name}", file=progress, flush=True)
            seg = build_segmenter(case, model, classes, palette, device)
            _warm_up(seg, case.height, case.width)
            summary, labels = run_case(case, clip_path, tmp, seg)
            by_key[(case.impl, case.crf)] = (summary, labels)
            n = summary["frames"]
            st = summary["stages_s"]
            rows.append({
                **env, "pydensecrf_version": pydensecrf_version(), "quick": quick,
                "case": case.name, "impl": case.impl, "crf": case.crf, "frames": n,
                "height": case.height, "width": case.width, "batch": case.batch,
                "crf_iterations": CRF_ITERATIONS if case.crf != "none" else 0,
                "temporal_window": TEMPORAL_WINDOW if case.crf == "temporal" else 1, "weights": weights,
                "wall_s": summary["wall_s"], "fps": summary["fps"],
                **{f"{k}_ms": 1e3 * st[k] / max(n, 1) for k in ("decode", "model", "crf", "encode")},
                "io_pct": summary["io_pct"], "outside_model_crf_pct": summary["overhead_pct"],
                "miou": miou(labels, gt[:n], len(classes)),
            })
    ref = by_key.get(("reference", "frame"))
    for r in rows:
        r["target"] = None
        r["speedup"] = None if ref is None else r["fps"] / ref[0]["fps"]
        if r["impl"] == "reference":
            r["check"] = "reference"
            continue
        if r["crf"] == "frame":
            r["target"] = TARGET_SPEEDUP
        if ref is None:
            r["check"] = no_ref or "no reference row"
            continue
        ours = by_key[(r["impl"], r["crf"])][1]
        agree = 100.0 * float((ours == ref[1]).mean())
        r["check"] = f"{agree:.2f}% = ref crf labels" if r["crf"] == "frame" else f"{agree:.1f}% = ref crf"
    print(table(rows, markdown), file=stream)
    print(f"\n{len(rows)} video cases in {time.perf_counter() - t0:.1f} s", file=stream)
    if csv_path and rows:
        append_csv(rows, csv_path, VIDEO_CSV_COLUMNS)
        print(f"appended {len(rows)} rows to {csv_path}", file=stream)
    return rows


# ---- output ---------------------------------------------------------------------------------------
def table(rows: list[dict], markdown: bool = False) -> str:
    from benchmarks.runner import _aligned

    if not rows:
        return "no video rows"
    env = rows[0]
    head = (f"deconvseg_fast video pipeline vs torch + pydensecrf2 {env['pydensecrf_version']} | "
            f"{env['device']}: {env['device_name']} | threads: {env['threads']} | load {env['load_avg_1m']} | "
            f"torch {env['torch_version']} | commit {env['git_commit']} | {env['timestamp']}")
    headers = ["case", "frames", "fps", "vs ref", "decode ms", "model ms", "CRF ms", "overlay+enc ms",
               "I/O % wall", "outside model+CRF %", "mIoU %", "check"]
    right = set(headers) - {"case", "check"}
    cells = [[r["case"], str(r["frames"]), f"{r['fps']:.2f}",
              "-" if r["speedup"] is None or r["impl"] == "reference" else f"{r['speedup']:.2f}x",
              f"{r['decode_ms']:.1f}", f"{r['model_ms']:.1f}", f"{r['crf_ms']:.1f}", f"{r['encode_ms']:.1f}",
              f"{r['io_pct']:.1f}", f"{r['outside_model_crf_pct']:.1f}", f"{r['miou']:.1f}", r["check"]]
             for r in rows]
    legend = (f"one pass of segment_video per row over a {rows[0]['height']}x{rows[0]['width']} generated "
              f"clip (libx264 in and out), batch {rows[0]['batch']}, model weights: {rows[0]['weights']}; "
              f"CRF: {CRF_ITERATIONS} iterations, gaussian sxy 3 w 3, bilateral sxy 80 srgb 13 w 10; "
              f"temporal: window {TEMPORAL_WINDOW}; per-stage ms = busy time of that stage's thread per "
              f"frame (the stages overlap); vs ref = fps / reference crf fps; I/O = decode + overlay + encode")
    parts = [f"**{head}**" if markdown else head, "", _aligned(headers, cells, markdown, right), "",
             f"_{legend}_" if markdown else legend]
    targets = []
    ours = [r for r in rows if r["impl"] == "ours" and r["crf"] == "frame" and r["speedup"] is not None]
    if ours:
        s = ours[0]["speedup"]
        targets.append(f"ours crf vs reference crf: {s:.2f}x vs target {TARGET_SPEEDUP:g}x: "
                       f"{'met' if s >= TARGET_SPEEDUP else 'NOT met'}")
    io = [r for r in rows if r["impl"] == "ours"]
    if io:
        worst = max(io, key=lambda r: r["io_pct"])
        targets.append(f"I/O share of wall (ours, worst row {worst['case']}): {worst['io_pct']:.1f}% vs "
                       f"target < {TARGET_IO_PCT:g}%: {'met' if worst['io_pct'] < TARGET_IO_PCT else 'NOT met'}")
    if targets:
        parts += ["", "targets: " + "; ".join(targets)]
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--frames", type=int, default=None, help="clip length (default 30, quick 6)")
    p.add_argument("--filter", default=None)
    p.add_argument("--csv", default=None)
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    run_video(a.device, a.quick, a.csv, a.filter, markdown=a.markdown, frames=a.frames)
    return 0


if __name__ == "__main__":
    sys.exit(main())
