"""The streaming video pipeline: decode -> model -> CRF -> overlay -> encode.

Public API:

* ``Segmenter(model, *, classes, palette, crf, crf_iterations, crf_params, temporal_window, device,
  half)``: ``seg(frames uint8 [B, H, W, 3]) -> labels uint8 [B, H, W]``, ``seg.probabilities(frames)
  -> float32 [B, L, H, W]``, ``seg.logits(frames)``; ``Segmenter.from_options(model_name, weights, ...)``.
* ``segment_video(input, output, segmenter, *, batch, max_frames, resize, labels_out, alpha, legend,
  progress, input_format, codec, max_in_flight, on_labels, warn) -> summary dict``.
* ``segment_images(images, output_dir, segmenter, ...)``, ``run_demo(...)``, ``preprocess(frames)``
  (the model input convention), ``load_model(name, weights)``, ``VideoReader`` / ``VideoWriter`` /
  ``write_clip`` (PyAV), ``Overlay``; errors: ``VideoError`` and its ``PipelineError``.
* ``TemporalCRF`` (``video.temporal``): the streaming temporal CRF.

torch is imported by ``segmenter`` and ``pipeline``; ``io`` and ``overlay`` need only numpy, PyAV
and Pillow.
"""
from .images import segment_images
from .io import VideoError, VideoReader, VideoWriter, choose_video_codec, parse_size, write_clip
from .overlay import Overlay, default_palette
from .pipeline import PipelineError, format_summary, segment_video
from .segmenter import IMAGENET_MEAN, IMAGENET_STD, Segmenter, load_model, preprocess


def __getattr__(name):  # the temporal CRF and the demo load on first use
    if name == "TemporalCRF":
        from .temporal import TemporalCRF
        return TemporalCRF
    if name in ("run_demo", "format_demo"):
        from . import demo
        return getattr(demo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Segmenter", "segment_video", "segment_images", "run_demo", "format_demo", "format_summary",
           "preprocess", "load_model", "IMAGENET_MEAN", "IMAGENET_STD", "VideoError", "PipelineError",
           "VideoReader", "VideoWriter", "choose_video_codec", "parse_size", "write_clip", "Overlay",
           "default_palette", "TemporalCRF"]
