"""Generated scenes: images and videos with exact labels and motion, and the metrics to score them.

Everything here is procedural -- drawn from an integer seed -- so the default model can be trained and
checked without downloading anything. See ``render`` for the scene model and ``metrics`` for the scores.
"""
from .metrics import confusion, estimate_flow, miou, temporal_consistency
from .render import CAMERAS, CLASSES, PALETTE, Camera, Clip, render_image, render_video

__all__ = ["CAMERAS", "CLASSES", "PALETTE", "Camera", "Clip", "render_image", "render_video", "confusion", "miou",
           "temporal_consistency", "estimate_flow", "train_demo"]


def __getattr__(name):  # train_demo imports the models; keep `import deconvseg_fast.scenes` light
    if name == "train_demo":
        from .train import train_demo
        return train_demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
