"""``deconvseg-fast video --demo``: a generated clip with exact labels, segmented three ways and scored.

The clip is rendered (``scenes.render_video``), written to a temporary H.264 file with an audio
track, and sent through the real pipeline (decode, model, CRF, encode) three times: per-frame
(model only), per-frame CRF, and temporal CRF. For each: mIoU against the rendered labels,
temporal consistency along the rendered flow (``scenes.metrics``), and throughput. The temporal-CRF
run's overlay video is written to ``output``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .io import VideoError, write_clip
from .pipeline import segment_video
from .segmenter import Segmenter, load_model


def run_demo(output="demo_segmented.mp4", *, seed: int = 0, frames: int = 30, height: int = 360,
             width: int = 480, model: str | torch.nn.Module | None = None, weights=None,
             crf_iterations: int = 5, temporal_window: int = 5, batch: int = 4, device="cpu",
             half: bool = False, alpha: float = 0.5, progress: bool | None = None,
             warn: Callable[[str], None] | None = None) -> dict:
    """Render, segment three ways, score. ``model``: a module, a ``--model`` name or None (the
    shipped demo model). Returns ``{"rows": [{"mode", "miou", "temporal_consistency", "fps",
    "summary"}, ...], "output", "frames", "size", "seed"}``."""
    from .. import scenes
    from ..scenes.metrics import miou, temporal_consistency

    warn = warn or (lambda m: None)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise VideoError(f"--max-frames: the demo clip needs at least 2 frames, got {frames!r}")
    if isinstance(model, torch.nn.Module):
        net, classes, palette = model.eval(), list(scenes.CLASSES), np.asarray(scenes.PALETTE)
    else:
        net, classes, palette = load_model(model, weights, warn=warn)
    num_classes = len(classes)
    if num_classes != len(scenes.CLASSES):
        raise VideoError(f"--model: the demo scenes have {len(scenes.CLASSES)} classes, the model "
                         f"predicts {num_classes}")
    clip = scenes.render_video(seed, frames, height, width)
    modes = [("per-frame", dict(crf=False)),
             ("per-frame CRF", dict(crf=True, temporal_window=1)),
             (f"temporal CRF (window {temporal_window})", dict(crf=True, temporal_window=temporal_window))]
    rows = []
    with tempfile.TemporaryDirectory(prefix="deconvseg-demo-") as tmp:
        source = Path(tmp) / "demo_input.mp4"
        write_clip(source, clip.frames, clip.fps, audio=True)
        for i, (name, opts) in enumerate(modes):
            seg = Segmenter(net, classes=classes, palette=palette, crf_iterations=crf_iterations,
                            device=device, half=half, **opts)
            pred = np.zeros(clip.labels.shape, dtype=np.uint8)

            def keep(index, labels, pred=pred):
                pred[index] = labels

            last = i == len(modes) - 1
            summary = segment_video(source, output if last else None, seg, batch=batch, alpha=alpha,
                                    progress=progress, on_labels=keep, warn=warn)
            if summary["frames"] != frames:
                raise VideoError(f"demo: the pipeline returned {summary['frames']} of {frames} frames")
            rows.append({
                "mode": name,
                "miou": miou(pred, clip.labels, num_classes),
                "temporal_consistency": temporal_consistency(pred, clip.flow, clip.valid, num_classes),
                "fps": summary["fps"],
                "summary": summary,
            })
    gt_tc = temporal_consistency(clip.labels, clip.flow, clip.valid, num_classes)
    return {"rows": rows, "output": str(output), "frames": frames, "size": (height, width), "seed": seed,
            "ground_truth_consistency": gt_tc}


def format_demo(r: dict) -> str:
    """The demo's table, as the CLI prints it."""
    lines = [f"demo clip: seed {r['seed']}, {r['frames']} frames of {r['size'][0]}x{r['size'][1]}; "
             f"ground-truth temporal consistency {r['ground_truth_consistency']:.1f}%",
             f"{'mode':<28}{'mIoU %':>8}{'temporal %':>12}{'fps':>8}"]
    for row in r["rows"]:
        lines.append(f"{row['mode']:<28}{row['miou']:>8.1f}{row['temporal_consistency']:>12.1f}{row['fps']:>8.2f}")
    lines.append(f"wrote {r['output']} (the temporal-CRF overlay)")
    return "\n".join(lines)
