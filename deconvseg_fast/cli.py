"""The `deconvseg-fast` command.

    deconvseg-fast bench [--device cpu|cuda] [--quick] [--sweeps] [--csv PATH] [--plot PATH]
                         [--filter SUBSTR] [--markdown]
    deconvseg-fast segment IMAGE... -o DIR [--model NAME] [--weights PATH] [--crf/--no-crf] [--labels] [--probs]
    deconvseg-fast video INPUT -o OUTPUT [--model NAME] [--weights PATH] [--crf/--no-crf] [--temporal-window N]
                         [--batch B] [--resize HxW] [--max-frames N] [--labels-out DIR] [--quiet] ...
    deconvseg-fast video --demo [-o OUTPUT] [--camera low-light|standard] [--seed N]
    deconvseg-fast train-demo [-o PATH] [--seed N] [--minutes M]

torch is imported only inside the subcommands, so `deconvseg-fast --help` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

EXIT_USAGE = 2  # argparse's code for bad usage; also used for "cannot run as asked here"


def _fail(message: str):
    # Same channel and code as argparse's own usage errors, so callers handle one mechanism.
    print(f"deconvseg-fast: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _load_bench_runner():
    """Import `benchmarks.runner` from the source checkout this package was installed from.

    The suite is not part of the installed package (it needs matplotlib and writes result files),
    so it is found next to the package directory: that works for `pip install -e .` and for
    running from the repository root, and fails clearly for a regular (non-editable) install.
    """
    repo_root = Path(__file__).resolve().parent.parent
    bench_dir = repo_root / "benchmarks"
    if not (bench_dir / "runner.py").is_file():
        raise LookupError(
            f"the benchmark suite was not found at {bench_dir}; it lives in the source repository, "
            f"so run `bench` from a checkout installed with `pip install -e .`")
    if str(repo_root) not in sys.path:
        sys.path.insert(0, str(repo_root))
    runner = importlib.import_module("benchmarks.runner")
    # Another top-level `benchmarks` package earlier on sys.path would shadow ours.
    found = Path(runner.__file__).resolve().parent
    if found != bench_dir:
        raise LookupError(f"`benchmarks.runner` resolved to {found}, not {bench_dir}: another package "
                          f"named `benchmarks` shadows the suite")
    return runner


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        why = ("this torch build has no CUDA" if torch.version.cuda is None
               else "no CUDA device is visible")
        _fail(f"--device cuda: torch.cuda.is_available() is False ({why}; "
                     f"torch {torch.__version__})")
    try:
        runner = _load_bench_runner()
    except LookupError as e:
        _fail(str(e))
    try:
        runner.run(device=args.device, quick=args.quick, csv_path=args.csv, png_path=args.plot, sweeps=args.sweeps,
                   filter=args.filter, markdown=args.markdown)
    except runner.BenchmarkConfigError as e:  # --filter matching nothing, a CSV of another layout
        _fail(str(e))
    return 0


def _warn(message: str) -> None:
    line = f"deconvseg-fast: warning: {message}"
    try:
        from tqdm import tqdm
        tqdm.write(line, file=sys.stderr)  # keeps a running progress bar intact
    except ImportError:
        print(line, file=sys.stderr)


def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
        return value
    parse.__name__ = name  # argparse names the type in its message
    return parse


def _alpha(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _size(args) -> None:
    """--resize HxW -> (H, W) in place, a one-line error otherwise (parsed here, not by argparse, so
    the message has the same one-line form as every other bad-input error)."""
    from .video.io import VideoError, parse_size
    if args.resize is not None:
        try:
            args.resize = parse_size(args.resize)
        except VideoError as e:
            _fail(str(e))


def _segmenter(args, crf: bool):
    from .video import Segmenter
    _size(args)
    return Segmenter.from_options(args.model, args.weights, crf=crf, crf_iterations=args.crf_iterations,
                                  temporal_window=getattr(args, "temporal_window", 1) or 1,
                                  device=args.device, half=args.half, warn=_warn)


def _cmd_segment(args: argparse.Namespace) -> int:
    from .video.images import segment_images
    from .video.io import VideoError

    try:
        seg = _segmenter(args, crf=args.crf if args.crf is not None else True)
        written = segment_images(args.images, args.output, seg, resize=args.resize, alpha=args.alpha,
                                 labels=args.labels, probs=args.probs, legend=not args.no_legend)
    except VideoError as e:
        _fail(str(e))
    if not args.quiet:
        for paths in written:
            print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _cmd_video(args: argparse.Namespace) -> int:
    from .video.io import VideoError

    if args.camera is not None and not args.demo:
        _fail("video --camera: the camera is the demo's; use it with --demo")
    if args.demo:
        if args.input is not None:
            _fail("video --demo renders its own clip; give no INPUT")
        return _cmd_video_demo(args)
    if args.input is None:
        _fail("video: give an INPUT file or URL (or --demo)")
    if args.output is None and args.labels_out is None:
        _fail("video: give -o OUTPUT (and/or --labels-out DIR)")
    from .video import format_summary, segment_video

    crf = bool(args.crf) or (args.crf is None and (args.temporal_window or 1) > 1)
    try:
        seg = _segmenter(args, crf=crf)
        summary = segment_video(args.input, args.output, seg, batch=args.batch, max_frames=args.max_frames,
                                resize=args.resize, labels_out=args.labels_out, alpha=args.alpha,
                                legend=not args.no_legend, progress=not args.quiet and sys.stderr.isatty(),
                                input_format=args.input_format, warn=_warn)
    except VideoError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        print("deconvseg-fast: interrupted", file=sys.stderr)
        raise SystemExit(130)
    print(format_summary(summary))
    return 0


def _cmd_video_demo(args: argparse.Namespace) -> int:
    from .video.demo import DEMO_CAMERA, format_demo, run_demo
    from .video.io import VideoError

    _size(args)
    size = args.resize or (360, 480)
    try:
        results = run_demo(args.output or "demo_segmented.mp4", seed=args.seed, frames=args.max_frames or 30,
                           height=size[0], width=size[1], model=args.model, weights=args.weights,
                           camera=args.camera or DEMO_CAMERA, crf_iterations=args.crf_iterations,
                           temporal_window=args.temporal_window or 5,
                           batch=args.batch, device=args.device, half=args.half, alpha=args.alpha,
                           progress=not args.quiet and sys.stderr.isatty(), warn=_warn)
    except VideoError as e:
        _fail(str(e))
    print(format_demo(results))
    return 0


def _cmd_train_demo(args: argparse.Namespace) -> int:
    from .scenes.train import train_demo

    try:
        train_demo(args.output, seed=args.seed, minutes=args.minutes)
    except (ValueError, OSError) as e:
        _fail(" ".join(str(e).split()))
    return 0


def _add_model_options(p: argparse.ArgumentParser, crf_default: str) -> None:
    p.add_argument("--model", default=None, metavar="NAME",
                   help="a network from deconvseg_fast.models (compact_segnet, segnet, deeplab_largefov, fcn8s, "
                        "deconvnet); default: the shipped demo model")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="a checkpoint written by deconvseg_fast.models.save_checkpoint, or a torchvision VGG16 "
                        "state dict for --model's encoder")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None,
                   help=f"refine with the fully connected CRF (default: {crf_default})")
    p.add_argument("--crf-iterations", type=_positive_int("iterations"), default=5, metavar="N",
                   help="mean-field iterations (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--half", action="store_true", help="float16 model (CUDA only)")
    p.add_argument("--alpha", type=_alpha, default=0.5, help="overlay opacity in [0, 1] (default: %(default)s)")
    p.add_argument("--resize", default=None, metavar="HxW",
                   help="scale inputs to HxW before segmenting (outputs are written at that size)")
    p.add_argument("--no-legend", action="store_true", help="draw no class key on the overlay")
    p.add_argument("--quiet", action="store_true", help="no progress bar (segment: no 'wrote' lines)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deconvseg-fast",
        description="Fast kernels for switch-based and atrous segmentation networks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = sub.add_parser(
        "bench", help="time the pooling ops against torch and a plain copy",
        description="Time deconvseg_fast's pooling ops against torch's and against a copy of the "
                    "same bytes, print a table, append rows to a CSV and draw a PNG.")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="where to run (default: cpu)")
    bench.add_argument("--quick", action="store_true",
                       help="small shapes and few repetitions: a smoke test of a few seconds")
    bench.add_argument("--csv", default="bench_results/results.csv", metavar="PATH",
                       help="CSV to append rows to (default: %(default)s)")
    bench.add_argument("--plot", default="bench_results/bench.png", metavar="PATH",
                       help="PNG to draw (default: %(default)s)")
    bench.add_argument("--filter", default=None, metavar="SUBSTR",
                       help="only cases whose name contains SUBSTR (case-insensitive), "
                            "e.g. 'max_unpool2d[packed]' or ' CL'")
    bench.add_argument("--sweeps", action="store_true",
                       help="also run the CRF scaling sweeps over pixels, labels and threads (~2 more minutes)")
    bench.add_argument("--markdown", action="store_true",
                       help="print the tables as GitHub markdown")
    bench.set_defaults(func=_cmd_bench)

    seg = sub.add_parser(
        "segment", help="segment images: colour overlay with a legend, label maps, probabilities",
        description="Run the model (and by default the CRF) on images; write DIR/NAME_overlay.png, and on "
                    "request DIR/NAME_labels.png (class ids) and DIR/NAME_probs.npy (float32 [L, H, W]).")
    seg.add_argument("images", nargs="+", metavar="IMAGE")
    seg.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to write to")
    _add_model_options(seg, crf_default="on")
    seg.add_argument("--labels", action="store_true", help="also write the label map (PNG, values = class ids)")
    seg.add_argument("--probs", action="store_true", help="also write the probabilities (.npy, float32 [L, H, W])")
    seg.set_defaults(func=_cmd_segment)

    vid = sub.add_parser(
        "video", help="segment a video file or stream into an overlay video (or --demo)",
        description="Decode, segment and re-encode a video in a threaded pipeline, keeping every frame, the "
                    "exact frame rate and the audio. With --demo: render a clip with known labels, segment it "
                    "three ways (per frame, per-frame CRF, temporal CRF) and print mIoU, temporal consistency "
                    "and fps.")
    vid.add_argument("input", nargs="?", default=None, metavar="INPUT", help="a video file or a URL FFmpeg opens")
    vid.add_argument("-o", "--output", default=None, metavar="OUTPUT",
                     help="the overlay video; its extension picks the codec (.mp4, .mkv, .webm, .avi, .mov, .ts)")
    _add_model_options(vid, crf_default="off; on with --temporal-window > 1")
    vid.add_argument("--temporal-window", type=_positive_int("window"), default=None, metavar="N",
                     help="temporal CRF over N consecutive frames (1: per-frame CRF; --demo default: 5)")
    vid.add_argument("--batch", type=_positive_int("batch"), default=4, help="frames per model call (default: %(default)s)")
    vid.add_argument("--max-frames", type=_positive_int("frames"), default=None, metavar="N",
                     help="stop after N frames (--demo: the clip length, default 30)")
    vid.add_argument("--labels-out", default=None, metavar="DIR", help="write each frame's label map as DIR/NNNNNN.png")
    vid.add_argument("--input-format", default=None, metavar="FMT",
                     help="force an FFmpeg demuxer, e.g. v4l2 for /dev/video0")
    vid.add_argument("--demo", action="store_true", help="segment a generated clip and score it against its labels")
    vid.add_argument("--seed", type=int, default=0, help="--demo: the scene seed (default: %(default)s)")
    vid.add_argument("--camera", choices=("low-light", "standard"), default=None,
                     help="--demo: how the clip is filmed: low-light (default; strong per-frame sensor noise, "
                          "colour blotches and exposure flicker) or standard (the clean camera the model was "
                          "trained on)")
    vid.set_defaults(func=_cmd_video)

    td = sub.add_parser("train-demo", help="train the default model on generated scenes (CPU, minutes)",
                        description="Train CompactSegNet on generated scenes and save it with save_checkpoint.")
    td.add_argument("-o", "--output", default="compact_segnet_demo.pt", metavar="PATH",
                    help="checkpoint to write (default: %(default)s)")
    td.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
    td.add_argument("--minutes", type=float, default=14.0, help="wall-clock cap (default: %(default)s)")
    td.set_defaults(func=_cmd_train_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns 0, or raises SystemExit(2) with a one-line message on stderr."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
