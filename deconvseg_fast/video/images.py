"""``deconvseg-fast segment``: still images through a Segmenter, written as overlay / labels / probabilities."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import VideoError
from .overlay import Overlay, with_side_legend
from .segmenter import Segmenter, labels_of


def read_image(path, resize: tuple[int, int] | None = None) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3] (optionally resized to (H, W)); VideoError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    p = Path(str(path))
    if not p.is_file():
        raise VideoError(f"IMAGE: {path}: no such file")
    try:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if resize is not None:
                im = im.resize((resize[1], resize[0]), Image.BILINEAR)
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise VideoError(f"IMAGE: cannot read {path}: {' '.join(str(e).split())[:200]}") from None


def segment_images(images, output_dir, segmenter: Segmenter, *, resize=None, alpha: float = 0.5,
                   labels: bool = False, probs: bool = False, legend: bool = True) -> list[list[Path]]:
    """Segment each image; write ``DIR/NAME_overlay.png`` (with the class key on the right unless
    ``legend=False``), with ``labels`` ``DIR/NAME_labels.png`` (uint8 class ids) and with ``probs``
    ``DIR/NAME_probs.npy`` (float32 [L, H, W]: CRF marginals or softmax). Returns the paths per image.
    Every input is checked before anything is written."""
    from PIL import Image

    paths = [Path(str(p)) for p in images]
    for p in paths:
        if not p.is_file():
            raise VideoError(f"IMAGE: {p}: no such file")
    out = Path(str(output_dir))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VideoError(f"--output: cannot create {output_dir}: {e.strerror or e}") from None
    names, seen = [], {}
    for p in paths:  # a.png and other/a.png must not overwrite each other
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        names.append(p.stem if n == 0 else f"{p.stem}_{n + 1}")
    written = []
    for p, name in zip(paths, names):
        image = read_image(p, resize)
        y = segmenter.logits(image[None])
        q = segmenter.refine(y, image[None]) if segmenter.crf else None
        lab = labels_of(q if q is not None else y)[0]
        ov = Overlay(segmenter.palette, alpha, segmenter.classes, legend=False)(image, lab)
        if legend:
            ov = with_side_legend(ov, segmenter.palette, segmenter.classes)
        files = [out / f"{name}_overlay.png"]
        try:
            Image.fromarray(ov).save(files[0])
            if labels:
                files.append(out / f"{name}_labels.png")
                Image.fromarray(lab, mode="L").save(files[-1])
            if probs:
                import torch

                pr = q if q is not None else torch.softmax(y, dim=1)
                files.append(out / f"{name}_probs.npy")
                np.save(files[-1], pr[0].float().cpu().numpy())
        except OSError as e:
            raise VideoError(f"--output: cannot write in {out}: {e.strerror or e}") from None
        written.append(files)
    return written
