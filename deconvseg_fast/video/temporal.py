"""Streaming temporal CRF: ``dense_crf_video`` over overlapping sliding windows of a video."""
from __future__ import annotations

import inspect
from collections import deque

import torch

from ..functional import dense_crf_video

__all__ = ["TemporalCRF"]

_CRF_PARAMS = [name for name, p in inspect.signature(dense_crf_video).parameters.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "iterations"]


class TemporalCRF:
    """Sliding-window temporal CRF for a stream of frames: each frame's marginals come from one joint
    mean field over ``window`` consecutive frames (``deconvseg_fast.functional.dense_crf_video``).

    Scheme. With W = ``window`` and hop h (default ceil(W / 2)), window k covers frames
    [k h, k h + W) and runs as soon as its last frame is pushed. It outputs the h frames at its
    central positions [c, c + h), c = ceil((W - h) / 2): every frame sits in several windows and is
    taken from the one where it is most central (ties go to the earlier window, for less latency).
    The first window also outputs the frames before its centre (frames 0 .. c-1, which no earlier
    window holds). ``flush()`` at the end of the video runs one last window over the last
    min(W, frames) frames (none if no frame came since the last window: that one's are used) and
    outputs every frame not yet output, so a clip shorter than the window is one joint CRF over the
    whole clip.

    Guarantees: every frame is output exactly once and in order; consecutive windows share W - h
    frames, so their marginals agree at the seams; a frame is output at most W - 1 pushes after its
    own (W - 1 - c in steady state; ``latency``); each push runs at most one window, so each output
    frame costs W / h frames of joint CRF, about 2 for the default hop (plus at most one window at
    the end; a joint frame costs about 1.3 single-frame CRFs, see docs/crf.md). ``window=1`` is
    exactly per-frame ``dense_crf``.

    ``iterations`` and ``crf_params`` (``gaussian_sxy``, ``gaussian_st``, ``bilateral_st``,
    ``compat``, ...) are ``dense_crf_video``'s keyword arguments and defaults. Inference runs
    without autograd (the fused mean-field op).
    """

    def __init__(self, window: int, *, hop: int | None = None, iterations: int = 10, **crf_params):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if hop is None:
            hop = -(-window // 2)
        if isinstance(hop, bool) or not isinstance(hop, int) or not 1 <= hop <= window:
            raise ValueError(f"hop must be an int in 1..window = 1..{window}, got {hop!r}")
        unknown = sorted(set(crf_params) - set(_CRF_PARAMS))
        if unknown:
            raise TypeError(f"unknown crf_params {unknown}; dense_crf_video takes {_CRF_PARAMS}")
        self.window, self.hop = window, hop
        self.center = -(-(window - hop) // 2)  # c: first output position inside a window
        self.params = dict(crf_params, iterations=iterations)
        # Check every value now rather than at the first full window: a two-frame, one-pixel clip.
        compat = crf_params.get("compat")
        labels = compat.shape[0] if isinstance(compat, torch.Tensor) and compat.dim() == 2 else 1
        dense_crf_video(torch.zeros(2, labels, 1, 1), torch.zeros(2, 3, 1, 1), **self.params)
        self.reset()

    @property
    def latency(self) -> int:
        """The most pushes a frame waits before it is output (before flush)."""
        return self.window - 1

    def reset(self) -> None:
        """Forget the stream: the next push is frame 0 of a new video (of any size)."""
        self._frames: deque = deque(maxlen=self.window)  # the last W (frame [3, H, W], unary [L, H, W])
        self._pushed = 0  # frames pushed so far
        self._next_out = 0  # index of the next frame to output
        self._start = 0  # first frame of the next regular window
        self._shape = None  # (L, H, W) of the stream
        self._flushed = False
        self._pending = None  # (frames pushed, first frame, Q) of a window's frames not output yet

    def push(self, frame, unary: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Adds the next frame (uint8 or float 0..255, [H, W, 3] or [3, H, W]) and its unary logits
        [L, H, W]; returns the frames that are now final, as (index, Q [L, H, W]) in order."""
        if self._flushed:
            raise RuntimeError("push() after flush(): the stream has ended; call reset() to start a new video")
        frame, unary = self._check(frame, unary)
        self._frames.append((frame, unary))
        self._pushed += 1
        if self._pushed < self._start + self.window:
            return []
        out = self._run(self._start, self._start + self.center + self.hop)
        self._start += self.hop
        return out

    def flush(self) -> list[tuple[int, torch.Tensor]]:
        """Ends the stream: returns every frame not output yet, as (index, Q [L, H, W]) in order."""
        self._flushed = True
        if self._next_out >= self._pushed:
            return []
        return self._run(max(0, self._pushed - self.window), self._pushed)

    def _run(self, first: int, stop: int) -> list[tuple[int, torch.Tensor]]:
        # One joint CRF over frames first .. pushed-1 (the buffer's tail); outputs next_out .. stop-1.
        # A flush right after a regular window needs no new one: that window's last frames are kept.
        if self._pending is not None and self._pending[0] == self._pushed:
            _, first, q = self._pending
        else:
            held = list(self._frames)[first - self._pushed:]
            with torch.no_grad():
                q = dense_crf_video(torch.stack([u for _, u in held]), torch.stack([f for f, _ in held]),
                                    **self.params)
        out = [(i, q[i - first].clone()) for i in range(self._next_out, stop)]
        self._pending = (self._pushed, stop, q[stop - first:].clone()) if stop < self._pushed else None
        self._next_out = stop
        return out

    def _check(self, frame, unary):
        if not isinstance(unary, torch.Tensor) or unary.dim() != 3:
            raise ValueError(f"unary must be an [L, H, W] tensor, got "
                             f"{list(unary.shape) if isinstance(unary, torch.Tensor) else type(unary).__name__}")
        if unary.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"unary must be float32 or float64 logits, got {unary.dtype}")
        if not isinstance(frame, torch.Tensor):
            if not hasattr(frame, "__array__"):
                raise TypeError(f"frame must be a torch.Tensor or an array, got {type(frame).__name__}")
            frame = torch.as_tensor(frame)
        size = tuple(unary.shape[1:])
        if frame.dim() == 3 and tuple(frame.shape[:2]) == size and frame.shape[2] == 3:
            frame = frame.permute(2, 0, 1)
        elif not (frame.dim() == 3 and frame.shape[0] == 3 and tuple(frame.shape[1:]) == size):
            raise ValueError(f"frame must be [H, W, 3] or [3, H, W] with the unary's H, W = {size}, "
                             f"got {list(frame.shape)}")
        if frame.dtype != torch.uint8 and not frame.is_floating_point():
            raise ValueError(f"frame must be uint8 or floating point in 0..255, got {frame.dtype}")
        if self._shape is None:
            self._shape = tuple(unary.shape)
        elif tuple(unary.shape) != self._shape:
            what = "frame" if tuple(unary.shape[1:]) != self._shape[1:] else "unary"
            raise ValueError(f"{what} size changed mid-stream: unary {list(unary.shape)}, the stream's is "
                             f"{list(self._shape)} (call reset() to start a new video)")
        return frame.to(device=unary.device, dtype=torch.float32), unary
