"""The streaming pipeline: decode -> model -> CRF -> overlay + encode, overlapped in threads.

    decode thread ──q──> model thread ──q──> CRF thread ──q──> writer (calling thread)
       (PyAV)            (batches of B)      (per-frame or       (overlay, label PNGs,
        │                                     temporal CRF)        encode, audio mux)
        └── audio packets ─────────────────────────────────────────────^

Memory stays flat on a video of any length: every frame takes one slot of a semaphore when it is
decoded and gives it back when it is written, so at most ``max_in_flight`` frames exist at once (the
queues are bounded too). The bound is raised, if needed, to what the stages must hold to make
progress: a model batch plus the temporal CRF's look-ahead plus two.

Failure: every blocking call waits in short slices and checks one shared stop flag; the first
exception in any stage sets it, every stage returns within a slice, and ``segment_video`` raises
``PipelineError`` naming the stage. No stage can be left blocked on a queue.

Bad frames: an undecodable packet becomes a copy of the previous frame, a frame the decoder flags
as corrupt keeps its pixels; both skip the model and take the previous frame's labels (a one-line
warning each), so the frame count and timing are kept.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import resource
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .io import AudioItem, VideoError, VideoReader, VideoWriter
from .overlay import IGNORE, Overlay
from .segmenter import Segmenter, labels_of

log = logging.getLogger("deconvseg_fast.video")

_END = object()  # end-of-stream sentinel, passed down every queue
_SLICE = 0.05  # seconds a blocking call waits before looking at the stop flag


class PipelineError(VideoError):
    """A stage of the pipeline failed; ``stage`` names it, ``__cause__`` is the original exception."""

    def __init__(self, stage: str, error: BaseException):
        self.stage = stage
        text = " ".join(str(error).split()) or type(error).__name__
        super().__init__(text if isinstance(error, VideoError) else f"{stage} stage failed: "
                         f"{type(error).__name__}: {text[:400]}")


class _Stopped(Exception):
    pass


class _Item:
    __slots__ = ("index", "image", "pts", "problem", "logits", "labels")

    def __init__(self, index, image, pts, problem):
        self.index, self.image, self.pts, self.problem = index, image, pts, problem
        self.logits = None
        self.labels = None


class _Run:
    """Shared state of one run: the stop flag, the first error, stage timers, the in-flight count."""

    def __init__(self, max_in_flight: int):
        self.stop = threading.Event()
        self.error: PipelineError | None = None
        self.lock = threading.Lock()
        self.slots = threading.Semaphore(max_in_flight)
        self.in_flight = 0
        self.peak_in_flight = 0
        self.busy = collections.defaultdict(float)

    def fail(self, stage: str, error: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = error if isinstance(error, PipelineError) else PipelineError(stage, error)
                self.error.__cause__ = error
        self.stop.set()

    def put(self, q: queue.Queue, item) -> None:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                q.put(item, timeout=_SLICE)
                return
            except queue.Full:
                pass

    def get(self, q: queue.Queue):
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                return q.get(timeout=_SLICE)
            except queue.Empty:
                pass

    def acquire(self) -> None:
        while not self.slots.acquire(timeout=_SLICE):
            if self.stop.is_set():
                raise _Stopped
        with self.lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def release(self) -> None:
        with self.lock:
            self.in_flight -= 1
        self.slots.release()


def _thread(run: _Run, stage: str, fn) -> threading.Thread:
    def body():
        try:
            fn()
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - every failure must reach the caller
            run.fail(stage, e)

    t = threading.Thread(target=body, name=f"deconvseg-{stage}", daemon=True)
    t.start()
    return t


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def segment_video(input, output=None, segmenter: Segmenter | None = None, *, batch: int = 4,
                  max_frames: int | None = None, resize: tuple[int, int] | None = None,
                  labels_out=None, alpha: float = 0.5, legend: bool = True, progress: bool | None = None,
                  input_format: str | None = None, codec: str | None = None, max_in_flight: int | None = None,
                  on_labels: Callable[[int, np.ndarray], None] | None = None,
                  warn: Callable[[str], None] | None = None) -> dict:
    """Segment a video file or stream and write the overlay video; returns a summary dict.

    Args:
        input: a file path or a URL FFmpeg opens (``input_format`` forces a demuxer, e.g. "v4l2").
        output: the overlay video path (codec from its extension, or ``codec``), or None to write none.
        segmenter: a ``Segmenter``; None loads the shipped demo model (no CRF).
        batch: frames per model call. max_frames: stop after this many frames.
        resize: (H, W) to scale frames to before everything (the output is written at that size).
        labels_out: a directory for per-frame label PNGs (``{index:06d}.png``, values = class ids, 255 = none).
        alpha: overlay opacity. legend: draw the class key on each frame.
        progress: a tqdm bar on stderr (None: only when stderr is a terminal).
        max_in_flight: frames alive at once (default 2 * batch + CRF look-ahead + 4).
        on_labels: called as ``on_labels(index, labels uint8 [H, W])`` for every frame, in order.
        warn: called with each one-line warning (default: the ``deconvseg_fast.video`` logger).

    Returns ``{"frames", "wall_s", "fps", "stages_s": {"decode", "model", "crf", "encode"},
    "overhead_pct", "io_pct", "bad_frames", "peak_in_flight", "max_in_flight", "peak_rss_mb",
    "rss_growth_mb", "peak_cuda_mb", "rate", "size", "codec", "audio", "output"}``; ``stages_s`` are the
    busy seconds of each stage ("encode" includes the overlay, label PNGs and audio muxing),
    ``io_pct`` = (decode + encode) / wall and ``overhead_pct`` = (wall - model - crf) / wall.
    Raises VideoError (bad input, output or options) or PipelineError (a stage failed).
    """
    warnings: list[str] = []

    def _warn(message: str) -> None:
        warnings.append(message)
        (warn or log.warning)(message)

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise VideoError(f"--batch: expected an int >= 1, got {batch!r}")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise VideoError(f"--max-frames: expected an int >= 1, got {max_frames!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise VideoError(f"--alpha: expected a number in [0, 1], got {alpha}")
    if output is None and labels_out is None and on_labels is None:
        raise VideoError("nothing to write: give an output video, labels_out or on_labels")
    if segmenter is None:
        segmenter = Segmenter.from_options(warn=_warn)
    labels_dir = None
    if labels_out is not None:
        labels_dir = Path(labels_out)
        try:
            labels_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise VideoError(f"--labels-out: cannot create {labels_out}: {e.strerror or e}") from None
        if not os.access(labels_dir, os.W_OK):
            raise VideoError(f"--labels-out: {labels_out} is not writable")

    temporal = segmenter.temporal()  # (before opening files: nothing to close if it fails)
    reader = VideoReader(input, size=resize, input_format=input_format, warn=_warn)
    writer = None
    try:
        if output is not None:
            writer = VideoWriter(output, reader.width, reader.height, reader.rate, codec=codec,
                                 audio_stream=reader.audio_stream, audio_offset=reader.start_time, warn=_warn)
    except BaseException:
        reader.close()
        if writer is not None:
            writer.abort()
        raise

    lookahead = temporal.latency if temporal is not None else 0
    need = batch + lookahead + 2
    bound = max(need, max_in_flight if max_in_flight is not None else 2 * batch + lookahead + 4)
    run = _Run(bound)
    qsize = bound
    q_decoded, q_model, q_out = (queue.Queue(qsize) for _ in range(3))
    audio: collections.deque = collections.deque()
    audio_mode = writer.audio_mode if writer is not None else None
    codec_used = writer.codec if writer is not None else None

    # ---------------------------------------------------------------- stages
    def decode():
        last = None
        holding = False  # a slot is taken before decoding, so a frame never waits outside the bound
        try:
            it = reader.iterate(audio=audio_mode, max_frames=max_frames, stop=run.stop.is_set)
            while True:
                if not holding:
                    run.acquire()
                    holding = True
                t0 = time.perf_counter()
                ev = next(it, _END)
                run.busy["decode"] += time.perf_counter() - t0
                if ev is _END:
                    break
                if isinstance(ev, AudioItem):
                    audio.append(ev)
                    continue
                image = ev.image
                if image is None:  # undecodable: hold the previous picture (black before the first)
                    image = last if last is not None else np.zeros((reader.height, reader.width, 3), np.uint8)
                last = image
                holding = False
                run.put(q_decoded, _Item(ev.index, image, ev.pts, ev.problem))
        finally:
            if holding:
                run.release()
            reader.close()
        run.put(q_decoded, _END)

    def model():
        ended = False
        while not ended:
            items = []
            while len(items) < batch:
                it = run.get(q_decoded)
                if it is _END:
                    ended = True
                    break
                items.append(it)
            good = [it for it in items if it.problem is None]
            if good:
                t0 = time.perf_counter()
                y = segmenter.logits(np.stack([it.image for it in good]))
                if segmenter.crf:
                    for it, logit in zip(good, y):
                        it.logits = logit
                else:
                    for it, lab in zip(good, labels_of(y)):
                        it.labels = lab
                if y.device.type == "cuda":
                    torch.cuda.synchronize(y.device)
                run.busy["model"] += time.perf_counter() - t0
            for it in items:
                run.put(q_model, it)
        run.put(q_model, _END)

    def crf_per_frame():
        while True:
            it = run.get(q_model)
            if it is _END:
                break
            if it.logits is not None:
                t0 = time.perf_counter()
                q = segmenter.refine(it.logits[None], it.image[None])
                it.labels = labels_of(q)[0]
                it.logits = None
                run.busy["crf"] += time.perf_counter() - t0
            run.put(q_out, it)
        run.put(q_out, _END)

    def crf_temporal():
        # Every frame enters the temporal CRF so its windows stay contiguous in time: a bad frame
        # enters as a repeat of the last good frame's picture and logits (its own labels are then
        # the previous frame's anyway). Bad frames before the first good one skip it.
        pending: collections.deque = collections.deque()  # items pushed, waiting for their Q
        last_in = None
        pushed = 0

        def take(results):
            for idx, q in results:
                item = pending.popleft()
                assert item.tcrf_index == idx, (item.tcrf_index, idx)
                item.it.labels = labels_of(q[None])[0]
                run.put(q_out, item.it)

        while True:
            it = run.get(q_model)
            if it is _END:
                break
            if it.logits is not None:
                last_in = (it.image, it.logits)
            elif last_in is None:  # nothing pushed yet, so nothing is ahead of it
                run.put(q_out, it)
                continue
            t0 = time.perf_counter()
            results = temporal.push(*last_in)
            pending.append(_Pushed(it, pushed))
            pushed += 1
            it.logits = None
            run.busy["crf"] += time.perf_counter() - t0
            take(results)
        t0 = time.perf_counter()
        results = temporal.flush()
        run.busy["crf"] += time.perf_counter() - t0
        take(results)
        run.put(q_out, _END)

    class _Pushed:
        __slots__ = ("it", "tcrf_index")

        def __init__(self, it, index):
            self.it, self.tcrf_index = it, index

    # ---------------------------------------------------------------- writer (this thread)
    bar = None
    if progress is None:
        progress = sys.stderr.isatty()
    if progress:
        from tqdm import tqdm

        total = reader.frame_count
        if max_frames is not None:
            total = min(total, max_frames) if total else max_frames
        bar = tqdm(total=total, unit="frame", file=sys.stderr, dynamic_ncols=True, leave=False,
                   desc=Path(str(input)).name[:30])

    if segmenter.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(segmenter.device)
    rss0 = rss_peak = _rss_mb()
    start = time.perf_counter()
    threads = [_thread(run, "decode", decode), _thread(run, "model", model)]
    if segmenter.crf:
        threads.append(_thread(run, "crf", crf_temporal if temporal is not None else crf_per_frame))
        source = q_out
    else:
        source = q_model
    frames = bad = 0
    last_labels = None
    overlay = None
    interrupted = None
    try:
        while True:
            it = run.get(source)
            if it is _END:
                break
            t0 = time.perf_counter()
            labels = it.labels
            if it.problem is not None or labels is None:
                labels = last_labels
                bad += 1
            else:
                last_labels = labels
            if writer is not None:
                if overlay is None:  # built here: a model without a config names its classes on its first call
                    known = segmenter.palette is not None and bool(segmenter.classes)
                    overlay = Overlay(segmenter.palette if known else np.zeros((0, 3), np.uint8), alpha,
                                      segmenter.classes if known else [], legend=legend and known)
                while audio:
                    writer.write_audio(audio.popleft())
                writer.write(overlay(it.image, labels), it.pts)
            if labels_dir is not None or on_labels is not None:
                lab = labels if labels is not None else np.full(it.image.shape[:2], IGNORE, np.uint8)
                if labels_dir is not None:
                    _save_png(labels_dir / f"{it.index:06d}.png", lab)
                if on_labels is not None:
                    on_labels(it.index, lab)
            run.busy["encode"] += time.perf_counter() - t0
            frames += 1
            it.image = None
            run.release()
            if bar is not None:
                bar.update(1)
            if frames % 32 == 0:
                rss_peak = max(rss_peak, _rss_mb())
        if writer is not None:
            t0 = time.perf_counter()
            while audio:
                writer.write_audio(audio.popleft())
            writer.close()
            run.busy["encode"] += time.perf_counter() - t0
            writer = None
    except _Stopped:
        pass
    except KeyboardInterrupt as e:
        interrupted = e
        run.fail("writer", VideoError("interrupted"))
    except BaseException as e:  # noqa: BLE001
        run.fail("writer", e if not isinstance(e, OSError) else VideoError(f"output: {e}"))
    finally:
        wall = time.perf_counter() - start
        if bar is not None:
            bar.close()
        deadline = time.monotonic() + 10.0
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        if writer is not None:  # an error: finish what was written so the file stays playable
            try:
                writer.close()
            except Exception:
                writer.abort()
    if interrupted is not None:
        raise interrupted
    if run.error is not None:
        raise run.error
    stages = {k: run.busy.get(k, 0.0) for k in ("decode", "model", "crf", "encode")}
    rss_peak = max(rss_peak, _rss_mb())
    return {
        "frames": frames,
        "wall_s": wall,
        "fps": frames / wall if wall > 0 else float("nan"),
        "stages_s": stages,
        "io_pct": 100.0 * (stages["decode"] + stages["encode"]) / wall if wall > 0 else float("nan"),
        "overhead_pct": 100.0 * max(0.0, wall - stages["model"] - stages["crf"]) / wall if wall > 0 else float("nan"),
        "bad_frames": bad,
        "warnings": warnings,
        "peak_in_flight": run.peak_in_flight,
        "max_in_flight": bound,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "rss_growth_mb": rss_peak - rss0,
        "peak_cuda_mb": (torch.cuda.max_memory_allocated(segmenter.device) / 2**20
                         if segmenter.device.type == "cuda" else None),
        "rate": reader.rate,
        "size": (reader.height, reader.width),
        "codec": codec_used,
        "audio": {"copy": "copy", "decode": "transcode"}.get(audio_mode),
        "output": str(output) if output is not None else None,
    }


def _save_png(path: Path, labels: np.ndarray) -> None:
    from PIL import Image

    try:
        Image.fromarray(labels, mode="L").save(path, compress_level=1)
    except OSError as e:
        raise VideoError(f"--labels-out: cannot write {path}: {e.strerror or e}") from None


def format_summary(s: dict) -> str:
    """The end-of-run summary as printed by the CLI (a few aligned lines)."""
    st = s["stages_s"]
    rate = s["rate"]
    rate_text = f"{rate.numerator}/{rate.denominator}" if isinstance(rate, Fraction) and rate.denominator != 1 else str(rate)
    lines = [
        f"frames: {s['frames']} ({s['bad_frames']} bad)  size: {s['size'][0]}x{s['size'][1]}  rate: {rate_text} fps"
        f"  codec: {s['codec'] or '-'}  audio: {s['audio'] or 'none'}",
        f"wall: {s['wall_s']:.2f} s  throughput: {s['fps']:.2f} fps",
        "stage busy time: " + "  ".join(f"{k} {v:.2f} s ({100 * v / s['wall_s'] if s['wall_s'] else 0:.0f}%)"
                                         for k, v in (("decode", st["decode"]), ("model", st["model"]),
                                                      ("crf", st["crf"]), ("encode+overlay", st["encode"]))),
        f"pipeline overhead: {s['overhead_pct']:.1f}% of wall outside model+CRF; "
        f"decode+encode+overlay = {s['io_pct']:.1f}% of wall",
        f"memory: peak RSS {s['peak_rss_mb']:.0f} MiB (growth during the run {s['rss_growth_mb']:+.0f} MiB)"
        + (f", peak CUDA {s['peak_cuda_mb']:.0f} MiB" if s.get("peak_cuda_mb") is not None else "")
        + f"; frames in flight: peak {s['peak_in_flight']} of {s['max_in_flight']}",
    ]
    if s.get("output"):
        lines.insert(0, f"wrote {s['output']}")
    return "\n".join(lines)
