"""The `deconvseg-fast` command.

    deconvseg-fast bench [--device cpu|cuda] [--quick] [--sweeps] [--csv PATH] [--plot PATH]
                         [--filter SUBSTR] [--markdown]

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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns 0, or raises SystemExit(2) with a one-line message on stderr."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
