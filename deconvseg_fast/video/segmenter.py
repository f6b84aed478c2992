"""Segmenter: a model, its input normalisation, the optional CRF and a device, behind one call.

    seg = Segmenter(model, crf=True, crf_iterations=5, device="cpu")
    labels = seg(frames)                  # frames uint8 [B, H, W, 3] -> labels uint8 [B, H, W]
    probs = seg.probabilities(frames)     # float32 [B, L, H, W] (CRF marginals with crf=True, else softmax)

``load_model(name, weights)`` resolves the CLI's ``--model`` / ``--weights`` into (model, class names,
palette). The model input convention lives in ``preprocess`` and nowhere else.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .io import VideoError
from .overlay import default_palette

# The model input conventions. A model says which it was trained with in its class attribute
# ``input_normalization``: "imagenet" (torchvision's statistics, x = (rgb / 255 - MEAN) / STD: the
# VGG16-based seed networks, the default for any other model) or "unit" (x = rgb / 255: the shipped
# CompactSegNet, trained on the generated scenes).
NORMALIZATIONS = ("imagenet", "unit")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Networks whose forward(x [B, 3, H, W]) returns logits [B, L, h, w]: the ones a frame can go through.
VIDEO_MODELS = ("compact_segnet", "segnet", "deeplab_largefov", "fcn8s", "deconvnet")
# The CRF settings used unless crf_params says otherwise (dense_crf's own defaults).
DEFAULT_CRF_ITERATIONS = 5


def input_normalization(model: torch.nn.Module) -> str:
    """The input convention ``model`` was trained with (its ``input_normalization``, else "imagenet")."""
    norm = getattr(model, "input_normalization", "imagenet")
    if norm not in NORMALIZATIONS:
        raise ValueError(f"model.input_normalization must be one of {NORMALIZATIONS}, got {norm!r}")
    return norm


def preprocess(frames: torch.Tensor, dtype: torch.dtype = torch.float32, normalization: str = "imagenet"
               ) -> torch.Tensor:
    """frames uint8 [B, H, W, 3] RGB (any device) -> model input [B, 3, H, W] of ``dtype``:
    ``(rgb / 255 - IMAGENET_MEAN) / IMAGENET_STD`` for "imagenet", ``rgb / 255`` for "unit". The one
    place the input conventions are defined."""
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [B, H, W, 3], got {list(frames.shape)}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if normalization == "unit":
        from ..weights import preprocess as unit_input  # the compact model's own convention
        return unit_input(frames).to(dtype)
    mean = torch.tensor(IMAGENET_MEAN, device=frames.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=frames.device, dtype=torch.float32).view(1, 3, 1, 1)
    x = frames.permute(0, 3, 1, 2).to(torch.float32)
    x = (x * (1.0 / 255.0) - mean) / std
    return x.to(dtype).contiguous()


def resolve_device(device) -> torch.device:
    """torch.device(device), with a one-line VideoError when it cannot be used here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise VideoError(f"--device: not a device: {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise VideoError(f"--device {device}: torch.cuda.is_available() is False ({why})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise VideoError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise VideoError(f"--device: unsupported device type {dev.type!r}")
    return dev


def _scene_classes(num_classes: int):
    """The generated scenes' names and colours when the class count matches theirs, else None."""
    try:
        from .. import scenes
    except ImportError:
        return None
    if len(scenes.CLASSES) == num_classes:
        return list(scenes.CLASSES), np.asarray(scenes.PALETTE, dtype=np.uint8)
    return None


def _num_classes(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("num_classes"), int):
        return cfg["num_classes"]
    return None


def load_model(name: str | None = None, weights=None, *, device="cpu",
               warn: Callable[[str], None] = lambda m: None):
    """Resolve ``--model`` / ``--weights`` into ``(model, classes, palette)`` (model in eval mode, on CPU).

    * neither: the shipped demo model (``deconvseg_fast.weights.load_default_model``);
    * ``weights`` a ``models.save_checkpoint`` file: that network (``name``, if given, must match its arch);
    * ``weights`` a torchvision VGG16 / VGG16-BN state dict: ``name``'s network with its encoder loaded
      (``models.load_vgg16``; the classifier stays random);
    * ``name`` alone: that network with random weights (a warning says so).
    Class names and colours: the generated scenes' when the class count is theirs, else ``class i`` and
    the VOC palette. Errors are VideoError with a one-line message.
    """
    from .. import models

    if name is not None and name not in VIDEO_MODELS:
        known = ", ".join(n for n in VIDEO_MODELS if hasattr(models, n))
        if hasattr(models, name) and name in _all_builders():
            raise VideoError(f"--model: {name} does not take whole frames (it needs proposals or an image "
                             f"argument); use one of: {known}")
        raise VideoError(f"--model: unknown model {name!r}; known: {known}")
    if name is None and weights is None:
        try:
            from ..weights import load_default_model
        except ImportError as e:
            raise VideoError(f"the shipped demo model is not available ({e}); pass --model and --weights") from None
        try:
            model = load_default_model(device="cpu")
        except (OSError, ValueError, RuntimeError) as e:
            raise VideoError(f"the shipped demo model cannot be loaded: {' '.join(str(e).split())[:300]}") from None
    elif weights is not None:
        model = _from_weights(name, weights)
    else:
        warn(f"--model {name} without --weights: random weights, the labels will be noise")
        model = getattr(models, name)()
    model = model.eval()
    n = _num_classes(model)
    if n is None:
        with torch.no_grad():
            n = int(model(torch.zeros(1, 3, 64, 64)).shape[1])
    named = _scene_classes(n)
    if named is None:
        named = [f"class {i}" for i in range(n)], default_palette(n)
    return model, named[0], named[1]


def _all_builders() -> set:
    from ..models import weights as w
    return set(w._builders())


def _from_weights(name, weights):
    from .. import models

    path = Path(str(weights))
    if not path.is_file():
        raise VideoError(f"--weights: {weights}: no such file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise VideoError(f"--weights: cannot read {weights}: {' '.join(str(e).split())[:200]}") from None
    if isinstance(sd, dict) and "arch" in sd and "state_dict" in sd:
        if name is not None and sd["arch"] != name:
            raise VideoError(f"--weights: {weights} holds a {sd['arch']}, not a {name}")
        if sd["arch"] not in VIDEO_MODELS:
            raise VideoError(f"--weights: {weights} holds a {sd['arch']}, which does not take whole frames")
        try:
            return models.load_checkpoint(path)
        except (ValueError, RuntimeError, TypeError, KeyError) as e:
            raise VideoError(f"--weights: {weights}: {' '.join(str(e).split())[:300]}") from None
    if isinstance(sd, dict) and "features.0.weight" in sd:
        if name is None:
            raise VideoError(f"--weights: {weights} is a VGG16 state dict; say which network with --model")
        model = getattr(models, name)()
        try:
            return models.load_vgg16(model, sd)
        except (ValueError, KeyError, TypeError) as e:
            raise VideoError(f"--weights: {' '.join(str(e).split())[:300]}") from None
    raise VideoError(f"--weights: {weights} is neither a deconvseg_fast checkpoint nor a VGG16 state dict")


class Segmenter:
    """A segmentation model ready for frames: normalisation, device, precision and CRF settings.

    Args:
        model: a ``torch.nn.Module`` mapping [B, 3, H, W] normalised input (``preprocess``) to logits
            [B, L, h, w]; logits of another size are resized bilinearly to the frame's.
        classes / palette: class names and uint8 [L, 3] display colours (defaults: ``class i`` / VOC).
        crf: refine with the fully connected CRF (``functional.dense_crf``, per frame).
        crf_iterations: mean-field iterations. crf_params: further ``dense_crf`` keywords.
        temporal_window: frames per temporal CRF window in ``segment_video`` (1: per-frame CRF;
            >1 needs ``crf``; see ``video.temporal.TemporalCRF``). Calls on a batch are always per frame.
        device: where the model runs ("cpu", "cuda", "cuda:1"); the CRF runs there too.
        half: run the model in float16 (CUDA only; the CRF and the argmax stay float32).

    Calling it: ``seg(frames uint8 [B, H, W, 3]) -> labels uint8 [B, H, W]`` (numpy); also
    ``probabilities(frames) -> float32 [B, L, H, W]`` and ``logits(frames) -> torch [B, L, H, W]``.
    Thread-safe in the sense the pipeline needs: one thread calls ``logits``, another ``refine``.
    """

    def __init__(self, model: torch.nn.Module, *, classes: Sequence[str] | None = None,
                 palette: np.ndarray | None = None, crf: bool = False,
                 crf_iterations: int = DEFAULT_CRF_ITERATIONS, crf_params: dict | None = None,
                 temporal_window: int = 1, device="cpu", half: bool = False):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(crf_iterations, bool) or not isinstance(crf_iterations, int) or crf_iterations < 0:
            raise VideoError(f"--crf-iterations: expected an int >= 0, got {crf_iterations!r}")
        if isinstance(temporal_window, bool) or not isinstance(temporal_window, int) or temporal_window < 1:
            raise VideoError(f"--temporal-window: expected an int >= 1, got {temporal_window!r}")
        if temporal_window > 1 and not crf:
            raise VideoError(f"--temporal-window {temporal_window}: the temporal window is the CRF's; "
                             f"it needs --crf")
        self.device = resolve_device(device)
        if half and self.device.type != "cuda":
            raise VideoError(f"--half: float16 inference needs a CUDA device, not {self.device}")
        self.dtype = torch.float16 if half else torch.float32
        self.normalization = input_normalization(model)
        self.model = model.eval().to(self.device, self.dtype)
        for p in self.model.parameters():
            p.requires_grad_(False)
        n = _num_classes(model)
        self.num_classes = n if n is not None else (len(classes) if classes is not None else None)
        if classes is None and n is not None:
            classes = [f"class {i}" for i in range(n)]
        self.classes = list(classes) if classes is not None else None
        self.palette = np.asarray(palette, dtype=np.uint8) if palette is not None else (
            default_palette(len(self.classes)) if self.classes else None)
        self.crf = bool(crf)
        self.crf_iterations = crf_iterations
        self.crf_params = dict(crf_params or {})
        self.temporal_window = temporal_window

    @classmethod
    def from_options(cls, model: str | None = None, weights=None, *, warn: Callable[[str], None] = lambda m: None,
                     **kwargs) -> "Segmenter":
        """``load_model(model, weights)`` then ``Segmenter(...)``: the CLI's ``--model``/``--weights``."""
        if kwargs.get("half") and resolve_device(kwargs.get("device", "cpu")).type != "cuda":
            raise VideoError(f"--half: float16 inference needs a CUDA device, not {kwargs.get('device', 'cpu')}")
        resolve_device(kwargs.get("device", "cpu"))  # fail before loading weights
        net, classes, palette = load_model(model, weights, warn=warn)
        return cls(net, classes=classes, palette=palette, **kwargs)

    def _frames(self, frames) -> torch.Tensor:
        if isinstance(frames, np.ndarray):
            if frames.ndim == 3:
                frames = frames[None]
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
                raise ValueError(f"frames must be uint8 [B, H, W, 3], got {frames.dtype} {list(frames.shape)}")
            if not frames.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable memory
                frames = frames.copy()
            t = torch.from_numpy(np.ascontiguousarray(frames))
        elif isinstance(frames, torch.Tensor):
            t = frames if frames.dim() == 4 else frames[None]
        else:
            raise TypeError(f"frames must be a numpy array or a tensor, got {type(frames).__name__}")
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        return t

    @torch.no_grad()
    def logits(self, frames) -> torch.Tensor:
        """frames uint8 [B, H, W, 3] -> float32 logits [B, L, H, W] on ``self.device``."""
        x = self._frames(frames)
        H, W = x.shape[1:3]
        y = self.model(preprocess(x, self.dtype, self.normalization))
        if not isinstance(y, torch.Tensor) or y.dim() != 4:
            raise RuntimeError(f"model returned {type(y).__name__} "
                               f"{list(y.shape) if isinstance(y, torch.Tensor) else ''}, expected logits [B, L, H, W]")
        if y.shape[-2:] != (H, W):
            y = torch.nn.functional.interpolate(y.float(), size=(H, W), mode="bilinear", align_corners=False)
        if self.num_classes is None:
            self.num_classes = int(y.shape[1])
            if self.classes is None:
                self.classes = [f"class {i}" for i in range(self.num_classes)]
                self.palette = default_palette(self.num_classes)
        return y.float()

    @torch.no_grad()
    def refine(self, logits: torch.Tensor, frames) -> torch.Tensor:
        """Per-frame CRF: logits [B, L, H, W] and their frames uint8 [B, H, W, 3] -> marginals Q [B, L, H, W]."""
        from ..functional import dense_crf

        image = self._frames(frames).to(logits.device).permute(0, 3, 1, 2)
        return dense_crf(logits.float(), image, iterations=self.crf_iterations, **self.crf_params)

    def temporal(self):
        """A fresh streaming temporal CRF for one video (``TemporalCRF``), or None with window 1."""
        if not self.crf or self.temporal_window <= 1:
            return None
        from .temporal import TemporalCRF

        return TemporalCRF(self.temporal_window, iterations=self.crf_iterations, **self.crf_params)

    @torch.no_grad()
    def probabilities(self, frames) -> np.ndarray:
        """frames uint8 [B, H, W, 3] -> class probabilities float32 [B, L, H, W] (numpy): the CRF's
        marginals with ``crf``, else the softmax of the logits."""
        y = self.logits(frames)
        p = self.refine(y, frames) if self.crf else torch.softmax(y, dim=1)
        return p.float().cpu().numpy()

    @torch.no_grad()
    def __call__(self, frames) -> np.ndarray:
        """frames uint8 [B, H, W, 3] -> labels uint8 [B, H, W] (numpy), the most likely class per pixel."""
        y = self.logits(frames)
        if self.crf:
            y = self.refine(y, frames)
        return labels_of(y)


def labels_of(scores: torch.Tensor) -> np.ndarray:
    """argmax over classes: [B, L, H, W] (any device) -> uint8 [B, H, W] numpy."""
    if scores.shape[1] > 255:
        raise ValueError(f"at most 255 classes fit a uint8 label map, got {scores.shape[1]}")
    return scores.argmax(1).to(torch.uint8).cpu().numpy()
