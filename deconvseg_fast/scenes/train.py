"""Train the default model (CompactSegNet) on generated scenes, on the CPU, in minutes.

Data: an endless stream of procedurally generated frames (``render._Scene``), so there is nothing
to download and no epoch: a pool of scenes is kept, each batch draws (scene, frame index) pairs from
it at random, and a few pool entries are replaced by fresh scenes every step. Training frames are
180x240 at a random object/texture scale in [0.5, 1.1] (0.5: a whole 360x480 scene shrunk; 1.0: a
crop of one at full scale), randomly mirrored, so the model sees the object sizes of 360x480 video.

Seeds: training scene seeds are ``1_000_000 * (seed + 1) + k`` (k = 0, 1, ...); the held-back
evaluation clip uses seeds below 1_000_000 (``EVAL_SEEDS``), so it is never trained on.

Reproducible: the same ``seed``, ``steps``, ``batch_size`` and thread count give the same weights
(torch and numpy generators are seeded, deterministic algorithms are switched on for the run).
"""
from __future__ import annotations

import math
import numbers
import os
import time

import numpy as np
import torch
import torch.nn.functional as TF

from .metrics import confusion, miou, temporal_consistency
from .render import CLASSES, _Scene, render_video
from ..weights import preprocess

EVAL_SEEDS = (424242, 737373)  # < 1_000_000: disjoint from every training seed
TRAIN_SIZE = (180, 240)
POOL = 48  # scenes kept in the pool
POOL_REFRESH = 2  # scenes replaced per step
SCENE_FRAMES = 240  # each pooled scene is a 240-frame clip; frames are drawn from all of it


class _Stream:
    """Batches of (image, labels) from a refreshed pool of generated scenes."""

    def __init__(self, seed: int, batch_size: int):
        self.rng = np.random.Generator(np.random.PCG64([seed, 7]))
        self.base = 1_000_000 * (seed + 1)
        self.next_seed = 0
        self.batch_size = batch_size
        self.pool = [self._scene() for _ in range(POOL)]

    def _scene(self) -> _Scene:
        s = self.base + self.next_seed
        self.next_seed += 1
        return _Scene(s, SCENE_FRAMES, TRAIN_SIZE[0], TRAIN_SIZE[1], scale=float(self.rng.uniform(0.5, 1.1)))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Rendering is many small tensor ops: one thread avoids waking (and, on a busy machine,
        # waiting for) a second one; their results do not depend on the thread count.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._batch()
        finally:
            torch.set_num_threads(threads)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        imgs, labs = [], []
        for _ in range(self.batch_size):
            scene = self.pool[int(self.rng.integers(len(self.pool)))]
            img, lab, _, _ = scene.render(int(self.rng.integers(SCENE_FRAMES)), False)
            if self.rng.random() < 0.5:
                img, lab = img[:, ::-1], lab[:, ::-1]
            imgs.append(img)
            labs.append(lab)
        for _ in range(POOL_REFRESH):
            self.pool[int(self.rng.integers(len(self.pool)))] = self._scene()
        x = preprocess(np.ascontiguousarray(np.stack(imgs)))
        y = torch.from_numpy(np.ascontiguousarray(np.stack(labs))).long()
        return x, y


@torch.no_grad()
def evaluate(model: torch.nn.Module, frames: int = 24, height: int = 360, width: int = 480,
             seeds=EVAL_SEEDS) -> dict:
    """Scores of ``model`` (eval mode) on held-back clips: ``miou`` (percent, over all frames of all
    clips), ``per_class_iou`` and ``temporal_consistency`` (percent, mean over clips)."""
    was_training = model.training
    model.eval()
    K = len(CLASSES)
    cm = np.zeros((K, K), dtype=np.int64)
    tcs = []
    preds_all, gts_all = [], []
    for s in seeds:
        clip = render_video(int(s), frames, height, width)
        preds = np.stack([model(preprocess(f)).argmax(1)[0].numpy().astype(np.uint8) for f in clip.frames])
        cm += confusion(preds, clip.labels, K)
        tcs.append(temporal_consistency(preds, clip.flow, clip.valid, K))
        preds_all.append(preds)
        gts_all.append(clip.labels)
    model.train(was_training)
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    per_class = {c: (float(100 * tp[i] / union[i]) if union[i] else float("nan")) for i, c in enumerate(CLASSES)}
    return {"miou": miou(np.concatenate(preds_all), np.concatenate(gts_all), K), "per_class_iou": per_class,
            "temporal_consistency": float(np.mean(tcs)), "eval_frames": frames * len(seeds),
            "eval_size": [height, width]}


def train_demo(output, *, seed: int = 0, minutes: float | None = 14.0, steps: int = 500, batch_size: int = 8,
               lr: float = 4e-3, eval_frames: int = 24, threads: int | None = None, log=print) -> dict:
    """Train CompactSegNet on generated scenes, evaluate it on a held-back clip, save it to ``output``
    with ``save_checkpoint`` and return the metrics.

    ``steps`` optimiser steps (AdamW, linear warm-up then cosine decay from ``lr``) of ``batch_size``
    180x240 frames. ``minutes`` is a wall-clock cap (None: no cap): if it is reached first, training
    stops early -- the result then depends on the machine's speed, and ``stopped_early`` says so.
    ``eval_frames``: frames per held-back clip (360x480, two clips; 0 skips the evaluation).
    ``threads``: torch threads for the run (None: leave the current setting; restored afterwards).
    ``log``: called with progress lines (None: silent). Returns ``{"steps", "train_seconds",
    "final_loss", "miou", "per_class_iou", "temporal_consistency", "stopped_early", "output", ...}``.

    The shipped ``deconvseg_fast/weights/demo_segnet.pt`` is
    ``train_demo(DEFAULT_WEIGHTS, seed=0, threads=1, minutes=None)`` (the defaults otherwise): 500
    steps in 695 s on a 2-core CPU shared with other jobs; held-back mIoU 94.85 %.
    """
    from ..models import compact_segnet, save_checkpoint

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if minutes is not None and (not isinstance(minutes, numbers.Real) or minutes <= 0):
        raise ValueError(f"minutes must be a positive number or None, got {minutes!r}")
    if not isinstance(lr, numbers.Real) or lr <= 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if isinstance(eval_frames, bool) or not isinstance(eval_frames, numbers.Integral) or eval_frames < 0:
        raise ValueError(f"eval_frames must be a non-negative int, got {eval_frames!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, numbers.Integral)
                                or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    if not isinstance(output, (str, os.PathLike)):
        raise TypeError(f"output must be a path, got {type(output).__name__}")
    parent = os.path.dirname(os.fspath(output)) or "."
    if not os.path.isdir(parent):
        raise ValueError(f"output: directory {parent!r} does not exist")
    say = log if log is not None else (lambda *_: None)

    deterministic = torch.are_deterministic_algorithms_enabled()
    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        model = compact_segnet(len(CLASSES)).train()
        stream = _Stream(int(seed), int(batch_size))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        warm = max(1, steps // 20)

        def lr_at(i):  # linear warm-up, cosine decay to 2 % of the peak
            if i < warm:
                return lr * (i + 1) / warm
            return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm))))

        start = time.perf_counter()
        losses, done, stopped = [], 0, False
        for i in range(steps):
            if minutes is not None and time.perf_counter() - start > 60.0 * minutes:
                stopped = True
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(i)
            x, y = stream.batch()
            loss = TF.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            done = i + 1
            if done % 25 == 0 or done == steps:
                say(f"step {done}/{steps}  loss {np.mean(losses[-50:]):.4f}  "
                    f"lr {lr_at(i):.2e}  {time.perf_counter() - start:.0f}s")
        train_seconds = time.perf_counter() - start
        run_threads = torch.get_num_threads()
        model.eval()
        save_checkpoint(model, output)
        result = {"steps": done, "train_seconds": train_seconds, "batch_size": int(batch_size), "threads": run_threads,
                  "train_size": list(TRAIN_SIZE), "final_loss": float(np.mean(losses[-50:])),
                  "stopped_early": stopped, "seed": int(seed), "output": os.fspath(output)}
        if eval_frames:
            result.update(evaluate(model, eval_frames))
            say(f"held-back mIoU {result['miou']:.2f} %  "
                f"temporal consistency {result['temporal_consistency']:.2f} %")
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(prev_threads)
    return result
