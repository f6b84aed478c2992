"""The small default model that ships inside the package (nothing is downloaded).

``demo_segnet.pt`` is a ``CompactSegNet`` trained on the generated scenes of
``deconvseg_fast.scenes`` (classes ``deconvseg_fast.scenes.CLASSES``) by
``deconvseg_fast.scenes.train.train_demo(DEFAULT_WEIGHTS, seed=0, threads=1, minutes=None)`` (500
steps, about 12 minutes on 2 CPU cores; held-back mIoU 94.85 % at 360x480). It is a
``save_checkpoint`` file (float32 weights, 1.5 MB).

Input convention: RGB float32 in [0, 1], [N, 3, H, W] (``preprocess`` turns uint8 frames into it);
output: logits [N, len(CLASSES), H, W].
"""
from __future__ import annotations

import os

import torch

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_segnet.pt")


def preprocess(frames) -> torch.Tensor:
    """uint8 RGB [H, W, 3] or [N, H, W, 3] (numpy or torch, any device) -> float32 [N, 3, H, W] in
    [0, 1]: the compact model's input convention, used by its training and by the video pipeline."""
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or x.ndim not in (3, 4) or x.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [H, W, 3] or [N, H, W, 3], got {x.dtype} {list(x.shape)}")
    if x.ndim == 3:
        x = x[None]
    return x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()


def load_default_model(device="cpu") -> torch.nn.Module:
    """The shipped CompactSegNet in eval mode on ``device``."""
    if not os.path.isfile(DEFAULT_WEIGHTS):
        raise FileNotFoundError(
            f"default weights not found at {DEFAULT_WEIGHTS}: the package was installed without its data "
            "files; reinstall it, or make new ones with `deconvseg-fast train-demo` "
            "(deconvseg_fast.scenes.train.train_demo) and save them to that path")
    from ..models import load_checkpoint
    return load_checkpoint(DEFAULT_WEIGHTS, map_location=device).to(device).eval()
