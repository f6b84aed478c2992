"""Video input and output on PyAV: a reader that never raises on a bad frame, a writer that keeps the
frame rate and the audio, and the choice of encoder from what the local FFmpeg has.

Timestamps: the writer's video time base is 1 / frame rate, so a 30000/1001 input is written at
exactly 30000/1001 (no rounding to 29.97) and a frame's output pts is its time since the first
frame counted in frames. Audio is copied packet by packet when the output container accepts the
input's codec, else decoded here and re-encoded by the writer (PyAV resamples to the encoder's
format); either way it is shifted by the same offset as the video, so sync is kept.
"""
from __future__ import annotations

import dataclasses
import os
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import numpy as np


class VideoError(Exception):
    """A problem with the user's input, output or options, worded for a one-line CLI error."""


# Encoders to try per output extension, best first. Only software encoders: a hardware one
# (h264_nvenc...) is listed by FFmpeg even where no device can run it.
VIDEO_CODECS: dict[str, tuple[str, ...]] = {
    ".mp4": ("libx264", "mpeg4"), ".m4v": ("libx264", "mpeg4"), ".mov": ("libx264", "mpeg4"),
    ".mkv": ("libx264", "libvpx-vp9", "mpeg4", "ffv1"), ".webm": ("libvpx-vp9", "libvpx"),
    ".avi": ("mpeg4", "libx264", "mjpeg"), ".ts": ("libx264", "mpeg2video"),
    ".mpg": ("mpeg2video",), ".mpeg": ("mpeg2video",),
}
# Audio encoders to transcode to when the container cannot take the input's audio codec as is.
AUDIO_CODECS: dict[str, tuple[str, ...]] = {
    ".mp4": ("aac",), ".m4v": ("aac",), ".mov": ("aac",), ".mkv": ("libopus", "aac", "flac"),
    ".webm": ("libopus", "opus", "vorbis"), ".avi": ("libmp3lame", "mp3", "pcm_s16le"),
    ".ts": ("aac", "mp2"), ".mpg": ("mp2",), ".mpeg": ("mp2",),
}
# Encoder options that make each codec fast enough to keep up with a real-time pipeline.
_ENCODER_OPTIONS = {
    # zerolatency: no lookahead or B-frames, so frames leave the encoder at once (live streams) and
    # ultrafast: 1.4 ms of CPU per 360x480 frame against veryfast's 3.3 ms, for ~1.5x the bytes.
    "libx264": {"preset": "ultrafast", "tune": "zerolatency", "crf": "20"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "row-mt": "1", "crf": "32", "b": "0"},
    "libvpx": {"deadline": "realtime", "cpu-used": "8"},
}
# Muxers that cannot answer avformat_query_codec list too few codecs in PyAV's supported_codecs;
# what they do accept (canonical codec names):
_KNOWN_ACCEPTS = {
    ".ts": {"h264", "hevc", "mpeg2video", "mpeg1video", "aac", "mp2", "mp3", "ac3", "opus"},
    ".mpg": {"mpeg2video", "mpeg1video", "mp2", "mp3", "ac3"}, ".mpeg": {"mpeg2video", "mpeg1video", "mp2", "mp3", "ac3"},
}
_CHROMA_SUBSAMPLED = {"libx264", "mpeg4", "libvpx-vp9", "libvpx", "mpeg2video"}


def _av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - PyAV is a dependency of the video extra
        raise VideoError("video needs PyAV: pip install av") from e
    return av


def _has_encoder(name: str) -> bool:
    av = _av()
    try:
        av.Codec(name, "w")
    except Exception:  # UnknownCodecError, or an encoder FFmpeg lists but cannot open
        return False
    return True


def choose_video_codec(path, available: Callable[[str], bool] | None = None) -> str:
    """The encoder for ``path``'s extension: the first of ``VIDEO_CODECS[ext]`` the local FFmpeg has."""
    ext = Path(str(path)).suffix.lower()
    if ext not in VIDEO_CODECS:
        raise VideoError(f"output: unknown video extension {ext or '(none)'!r} for {path}; "
                         f"use one of {', '.join(sorted(VIDEO_CODECS))}")
    available = available or _has_encoder
    for name in VIDEO_CODECS[ext]:
        if available(name):
            return name
    raise VideoError(f"output: this FFmpeg has no encoder for {ext} (tried {', '.join(VIDEO_CODECS[ext])}); "
                     f"pick another extension, e.g. .mkv or .avi")


def parse_size(text: str) -> tuple[int, int]:
    """'360x480' -> (360, 480): height x width, each a positive even-or-odd int."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise VideoError(f"--resize: expected HxW like 360x480, got {text!r}") from None
    if h < 1 or w < 1 or h > 16384 or w > 16384:
        raise VideoError(f"--resize: height and width must be in 1..16384, got {text!r}")
    return h, w


@dataclasses.dataclass
class DecodedFrame:
    """One output slot. ``image`` is None only when the packet could not be decoded at all;
    ``problem`` says why the frame must not be trusted (then the previous prediction is reused)."""
    index: int
    image: np.ndarray | None  # [H, W, 3] uint8 RGB
    pts: int | None  # in frames since the first frame (1 / rate units)
    problem: str | None = None


@dataclasses.dataclass
class AudioItem:
    """An audio packet to copy (``packet``) or decoded audio frames to re-encode (``frames``)."""
    packet: object = None
    frames: list = dataclasses.field(default_factory=list)


class VideoReader:
    """Decode the first video stream of a file or a URL FFmpeg opens, as RGB uint8 frames.

    ``iterate()`` yields DecodedFrame and (when ``audio`` is "copy" or "decode") AudioItem in
    stream order. It never raises for a bad frame: an undecodable packet yields a DecodedFrame with
    ``image=None``, a frame the decoder flags as corrupt one with its image and a ``problem``, and
    each is reported once through ``warn``; a container that ends early (truncated) ends the
    iteration with a warning. Opening errors raise VideoError.
    """

    def __init__(self, source, *, size: tuple[int, int] | None = None, input_format: str | None = None,
                 timeout: float = 10.0, warn: Callable[[str], None] = lambda m: None):
        av = _av()
        self.source = str(source)
        self.warn = warn
        is_url = "://" in self.source
        if not is_url and input_format is None:
            p = Path(self.source)
            if not p.exists():
                raise VideoError(f"input: {source}: no such file")
            if p.is_dir():
                raise VideoError(f"input: {source} is a directory, not a video")
            if not os.access(p, os.R_OK):
                raise VideoError(f"input: {source}: permission denied")
        try:
            self.container = av.open(self.source, "r", format=input_format, timeout=timeout)
        except av.error.FFmpegError as e:
            raise VideoError(f"input: cannot open {source}: {_why(e)}") from None
        except OSError as e:
            raise VideoError(f"input: cannot open {source}: {e.strerror or e}") from None
        if not self.container.streams.video:
            self.container.close()
            raise VideoError(f"input: {source} has no video stream")
        self.stream = self.container.streams.video[0]
        # Slice threads only: with frame threads a broken packet reports its error on a later packet,
        # so the slot of the lost frame could not be placed by its own timestamp.
        self.stream.thread_type = "SLICE"
        ctx = self.stream.codec_context
        if not ctx.width or not ctx.height:
            self.container.close()
            raise VideoError(f"input: {source}: cannot read the video size (not a video file?)")
        self.in_height, self.in_width = ctx.height, ctx.width
        self.height, self.width = size if size else (ctx.height, ctx.width)
        rate = self.stream.guessed_rate or self.stream.average_rate or self.stream.base_rate
        if not rate or rate <= 0:
            rate = Fraction(25)
            warn(f"input: {source} does not say its frame rate; assuming 25 fps")
        self.rate = Fraction(rate)
        self.audio_stream = self.container.streams.audio[0] if self.container.streams.audio else None
        start = self.stream.start_time
        self._start = Fraction(start * self.stream.time_base) if start is not None and self.stream.time_base else None

    @property
    def frame_count(self) -> int | None:
        """The number of frames the container announces (None for streams and unknown)."""
        n = self.stream.frames
        if n:
            return int(n)
        if self.container.duration and self.container.duration > 0:
            return int(round(Fraction(self.container.duration, 1_000_000) * self.rate)) or None
        return None

    @property
    def start_time(self) -> Fraction:
        """Seconds of the first video frame: subtracted from every timestamp written."""
        return self._start or Fraction(0)

    def _to_rgb(self, frame) -> np.ndarray:
        if frame.width != self.width or frame.height != self.height or frame.format.name != "rgb24":
            frame = frame.reformat(width=self.width, height=self.height, format="rgb24",
                                   interpolation="BILINEAR")
        return frame.to_ndarray()

    def _time_of(self, pts, time_base) -> int | None:
        """A timestamp as a count of 1/rate since the first frame (None if unknown)."""
        if pts is None or not time_base:
            return None
        t = Fraction(pts * time_base)
        if self._start is None:
            self._start = t
        return round((t - self._start) * self.rate)

    def iterate(self, *, audio: str | None = None, max_frames: int | None = None,
                stop: Callable[[], bool] = lambda: False) -> Iterator[DecodedFrame | AudioItem]:
        av = _av()
        streams = [self.stream] + ([self.audio_stream] if audio and self.audio_stream is not None else [])
        state = {"index": 0, "last": None}
        missing: list[tuple[int | None, str]] = []  # undecodable packets not emitted yet: (pts, why)
        end_time = None  # seconds past which audio is dropped (after --max-frames)

        def full():
            return max_frames is not None and state["index"] >= max_frames

        def emit(frame, pts, problem=None):
            last = state["last"]
            pts = (0 if last is None else last + 1) if pts is None else max(pts, 0 if last is None else last + 1)
            state["last"] = pts
            index = state["index"]
            state["index"] += 1
            if frame is None:
                self.warn(f"input: frame {index}: undecodable packet ({problem}); "
                          f"reusing the previous frame and prediction")
                return DecodedFrame(index, None, pts, "undecodable packet")
            return self._decoded(index, frame, pts)

        def frames_out(frames):
            # A broken packet's slot goes where its timestamp says, i.e. before the first decoded
            # frame that comes after it in presentation order (decoders reorder B-frames).
            out = []
            for frame in frames:
                pts = self._time_of(frame.pts, frame.time_base)
                while missing and not full() and (pts is None or missing[0][0] is None or missing[0][0] < pts):
                    out.append(emit(None, *missing.pop(0)))
                if full():
                    break
                out.append(emit(frame, pts))
            return out

        demux = self.container.demux(*streams)
        while not stop() and not full():
            try:
                packet = next(demux)
            except StopIteration:
                break
            except (av.error.FFmpegError, OSError) as e:
                self.warn(f"input: stopped reading after frame {state['index']}: {_why(e)} (truncated or broken file?)")
                yield from frames_out(self._flush())
                break
            if packet.stream.type == "audio":
                if end_time is not None and packet.pts is not None and packet.time_base and \
                        packet.pts * packet.time_base >= end_time:
                    continue
                item = self._audio_item(packet, audio)
                if item is not None:
                    yield item
                continue
            try:
                frames = packet.decode()
            except (av.error.FFmpegError, ValueError) as e:
                frames = []
                if packet.size:  # (a size-0 packet is the end-of-stream flush)
                    missing.append((self._time_of(packet.pts, packet.time_base), _why(e)))
                    missing.sort(key=lambda m: -1 if m[0] is None else m[0])
            yield from frames_out(frames)
            if full() and end_time is None:
                end_time = self.start_time + Fraction(state["index"]) / self.rate
        while missing and not full() and not stop():
            yield emit(None, *missing.pop(0))
        announced, slack = self.stream.frames, 0
        if not announced:  # estimated from the duration: allow a frame of rounding
            announced, slack = self.frame_count, 1
        if not stop() and not full() and announced and state["index"] < announced - slack:
            self.warn(f"input: read {state['index']} of the {announced} frames the container announces "
                      f"(truncated file?)")

    def _decoded(self, index, frame, pts) -> DecodedFrame:
        problem = None
        if frame.is_corrupt:
            problem = "corrupt frame"
            self.warn(f"input: frame {index}: the decoder flags it as corrupt; reusing the previous prediction")
        return DecodedFrame(index, self._to_rgb(frame), pts, problem)

    def _flush(self):
        av = _av()
        try:
            return list(self.stream.codec_context.decode(None))
        except (av.error.FFmpegError, ValueError):
            return []

    def _audio_item(self, packet, mode):
        av = _av()
        if packet.size == 0 or packet.dts is None and mode == "copy":
            if mode == "decode":
                try:
                    return AudioItem(frames=list(packet.decode()))
                except (av.error.FFmpegError, ValueError):
                    return None
            return None
        if mode == "copy":
            return AudioItem(packet=packet)
        try:
            return AudioItem(frames=list(packet.decode()))
        except (av.error.FFmpegError, ValueError) as e:
            self.warn(f"input: skipped an undecodable audio packet ({_why(e)})")
            return None

    def close(self) -> None:
        try:
            self.container.close()
        except Exception:
            pass


class VideoWriter:
    """Encode RGB uint8 frames (and the input's audio) into ``path``; the codec comes from the
    extension (``choose_video_codec``) unless ``codec`` names one."""

    def __init__(self, path, width: int, height: int, rate: Fraction, *, codec: str | None = None,
                 audio_stream=None, audio_offset: Fraction = Fraction(0),
                 warn: Callable[[str], None] = lambda m: None):
        av = _av()
        self.path = str(path)
        self.codec = codec or choose_video_codec(path)
        p = Path(self.path)
        if p.is_dir():
            raise VideoError(f"output: {path} is a directory")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            self.container = av.open(self.path, "w")
        except (OSError, av.error.FFmpegError) as e:
            raise VideoError(f"output: cannot write {path}: {_why(e)}") from None
        try:
            if not _accepts(self.container, self.path, self.codec):
                raise VideoError(f"output: the {Path(self.path).suffix} container cannot hold {self.codec}")
            # 4:2:0 needs even sizes: pad by one edge row/column rather than fail.
            self.width, self.height = width, height
            if self.codec in _CHROMA_SUBSAMPLED:
                self.width, self.height = width + width % 2, height + height % 2
            self.rate = Fraction(rate)
            self.stream = self.container.add_stream(self.codec, rate=self.rate,
                                                    options=dict(_ENCODER_OPTIONS.get(self.codec, {})))
            self.stream.width, self.stream.height = self.width, self.height
            ctx = self.stream.codec_context
            ctx.time_base = 1 / self.rate
            if self.codec in ("mpeg4", "mpeg2video", "mjpeg"):
                ctx.bit_rate = int(max(1e6, self.width * self.height * float(self.rate) * 0.2))
            pix = {"ffv1": "yuv444p", "mjpeg": "yuvj420p"}.get(self.codec, "yuv420p")
            self.stream.pix_fmt = pix
            self.audio_mode, self.audio_out, self._audio_shift = None, None, 0
            if audio_stream is not None:
                self._add_audio(audio_stream, audio_offset, warn)
        except VideoError:
            self._abort()
            raise
        except (av.error.FFmpegError, ValueError, OSError) as e:
            self._abort()
            raise VideoError(f"output: cannot set up {self.codec} in {path}: {_why(e)}") from None
        self.frames = 0

    def _add_audio(self, in_stream, offset: Fraction, warn) -> None:
        name = in_stream.codec_context.name
        if _accepts(self.container, self.path, name):
            self.audio_out = self.container.add_stream_from_template(in_stream)
            self.audio_mode = "copy"
            tb = in_stream.time_base
            self._audio_shift = round(offset / tb) if tb else 0
            return
        ext = Path(self.path).suffix.lower()
        for enc in AUDIO_CODECS.get(ext, ()):
            if _has_encoder(enc) and _accepts(self.container, self.path, enc):
                ctx = in_stream.codec_context
                rate = ctx.sample_rate or 48000
                if enc in ("libopus", "opus"):
                    rate = 48000
                self.audio_out = self.container.add_stream(enc, rate=rate)
                try:
                    self.audio_out.layout = ctx.layout.name if ctx.layout.nb_channels <= 2 else "stereo"
                except Exception:
                    pass
                self.audio_mode = "decode"
                self._audio_next = None
                self._audio_offset = offset
                return
        warn(f"output: {Path(self.path).suffix} cannot hold {name} audio and no encoder fits; dropping the audio")

    def write(self, image: np.ndarray, pts: int) -> None:
        av = _av()
        h, w = image.shape[:2]
        if (h, w) != (self.height, self.width):
            image = np.pad(image, ((0, self.height - h), (0, self.width - w), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = pts
        frame.time_base = 1 / self.rate
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def write_audio(self, item: AudioItem) -> None:
        if self.audio_out is None:
            return
        if self.audio_mode == "copy" and item.packet is not None:
            packet = item.packet
            if packet.pts is not None:
                packet.pts -= self._audio_shift
            if packet.dts is not None:
                packet.dts -= self._audio_shift
            packet.stream = self.audio_out
            self.container.mux(packet)
        elif self.audio_mode == "decode":
            for frame in item.frames:
                if frame.pts is not None and frame.time_base:
                    t = Fraction(frame.pts * frame.time_base) - self._audio_offset
                    frame.pts = round(t * frame.sample_rate)
                    frame.time_base = Fraction(1, frame.sample_rate)
                    if frame.pts < 0:
                        continue
                for packet in self.audio_out.encode(frame):
                    self.container.mux(packet)

    def close(self) -> None:
        """Flush the encoders and finish the file."""
        try:
            for packet in self.stream.encode(None):
                self.container.mux(packet)
            if self.audio_mode == "decode":
                for packet in self.audio_out.encode(None):
                    self.container.mux(packet)
        finally:
            self.container.close()

    def _abort(self) -> None:
        try:
            self.container.close()
        except Exception:
            pass
        try:
            if Path(self.path).is_file() and Path(self.path).stat().st_size == 0:
                Path(self.path).unlink()
        except OSError:
            pass

    abort = _abort


def _canonical(name: str) -> str:
    av = _av()
    for mode in ("w", "r"):
        try:
            return av.Codec(name, mode).canonical_name
        except Exception:
            pass
    return name


def _accepts(container, path: str, name: str) -> bool:
    """Whether the output container can hold codec ``name`` (an encoder or a codec name)."""
    supported = container.supported_codecs
    canonical = _canonical(name)
    return (name in supported or canonical in supported
            or canonical in _KNOWN_ACCEPTS.get(Path(path).suffix.lower(), ()))


def _why(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return " ".join(str(text).split())  # one line


def write_clip(path, frames: np.ndarray, rate: Fraction = Fraction(30000, 1001), *, audio: bool = True,
               codec: str | None = None, audio_codec: str = "aac", sample_rate: int = 44100,
               options: dict | None = None) -> None:
    """Write frames uint8 [T, H, W, 3] to ``path`` at ``rate`` (plus, with ``audio``, a 440 Hz tone of
    the same duration). For tests and the demo; the codec comes from the extension by default."""
    av = _av()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    codec = codec or choose_video_codec(path)
    with av.open(str(path), "w", options=options or {}) as out:
        v = out.add_stream(codec, rate=Fraction(rate), options=dict(_ENCODER_OPTIONS.get(codec, {})))
        v.height, v.width = frames.shape[1:3]
        v.pix_fmt = "yuv420p"
        v.codec_context.time_base = 1 / Fraction(rate)
        a = None
        if audio:
            a = out.add_stream(audio_codec, rate=sample_rate)
            a.layout = "mono"
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            f.pts, f.time_base = i, 1 / Fraction(rate)
            for p in v.encode(f):
                out.mux(p)
        if a is not None:
            n = int(sample_rate * len(frames) / Fraction(rate))
            t = np.arange(n) / sample_rate
            tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            af = av.AudioFrame.from_ndarray(tone, format="flt", layout="mono")
            af.sample_rate, af.pts = sample_rate, 0
            for p in a.encode(af):
                out.mux(p)
            for p in a.encode(None):
                out.mux(p)
        for p in v.encode(None):
            out.mux(p)
