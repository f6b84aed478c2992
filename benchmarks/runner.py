"""Times the pooling cases against torch and a plain copy, prints a table, appends a CSV, draws a PNG.

Every figure is a ratio to something measured in the same run on the same machine: torch's op on
the same inputs (speed-up), and a `uint8` copy moving the same number of bytes (share of the
machine's copy bandwidth). The absolute GB/s and the H100 roofline are printed beside them for
orientation only.

    from benchmarks.runner import run
    rows = run(device="cpu", quick=True, csv_path=None, png_path=None)

or `deconvseg-fast bench` (deconvseg_fast/cli.py).

The same run then times the fully connected CRF against pydensecrf (benchmarks/crf.py, `run_crf`),
printing its own table and scaling fits and writing its own CSV and PNG next to the pooling ones
(`results_crf.csv`, `bench_crf.png`). `--filter` selects from both suites: `--filter crf` runs
only the CRF, `--filter max_pool` only pooling.

The atrous convolution (benchmarks/conv.py, `run_conv`: ours vs torch's conv2d + relu on DeepLab
and SegNet layers) follows, with its own table and `results_conv.csv`; `--filter conv` runs only it.

The seed networks (benchmarks/models.py, `run_models`: each model's forward vs its pure-torch twin,
SegNet training-step memory) take minutes on a 2-core CPU and are not part of the default run: a
filter starting with `model` (`--filter model`, `--filter model_segnet`) runs them, and only them,
writing `results_models.csv` next to the pooling CSV.

The end-to-end video pipeline (benchmarks/video.py, `run_video`: fps and per-stage times of the
default model with and without CRF, against the same pipeline on torch's ops and pydensecrf) takes
about a minute and is not part of the default run either: a filter starting with `video`
(`--filter video`, `--filter "video ours"`) runs it, and only it, writing `results_video.csv`.
"""
from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, TextIO

import torch

from benchmarks import crf, pooling
from benchmarks import conv as conv_bench

DEFAULT_CSV = os.path.join("bench_results", "results.csv")
DEFAULT_PNG = os.path.join("bench_results", "bench.png")

# H100 SXM: HBM3 bandwidth and dense FP32 (non-tensor-core) peak. Pooling is pure data movement,
# so the bandwidth term always wins; the FLOP term is there so the formula stays honest for ops
# that do arithmetic.
H100_BYTES_PER_S = 3.35e12
H100_FLOPS = 67e12

# CPU timing effort. Several interleaved rounds (ours, torch, copy, ours, torch, copy, ...) rather
# than one long block each: on a shared 2-core box the load drifts, and interleaving spreads the
# drift over both sides of every ratio instead of biasing one of them.
FULL_ROUNDS, FULL_MIN_RUN_TIME = 3, 0.2
QUICK_ROUNDS, QUICK_MIN_RUN_TIME = 3, 0.005

CSV_COLUMNS = [
    "timestamp", "git_commit", "torch_version", "device", "device_name", "threads", "load_avg_1m",
    "quick",
    "case", "op", "shape", "dtype", "index_format", "memory_format", "kernel_size", "stride",
    "padding", "ours_ms", "ours_iqr_ms", "torch_ms", "torch_iqr_ms", "copy_ms", "speedup",
    "ours_gbps", "pct_copy_bw", "h100_roofline_ms", "bytes_moved", "flops",
    "switch_bytes_ours", "switch_bytes_torch", "check",
]

# (header, row key, formatter) of the printed table.
_MB = 1e6


def _f(fmt: str) -> Callable[[object], str]:
    return lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


TABLE_COLUMNS = [
    ("op", "op", str),
    ("shape", "shape", str),
    ("format", "index_format", str),
    ("memory format", "memory_format", str),
    ("ours ms", "ours_ms", _f(".3f")),
    ("ours IQR", "ours_iqr_ms", _f(".3f")),
    ("torch ms", "torch_ms", _f(".3f")),
    ("speed-up", "speedup", lambda v: f"{v:.2f}x"),
    ("ours GB/s", "ours_gbps", _f(".1f")),
    ("% copy BW", "pct_copy_bw", _f(".0f")),
    ("H100 roofline ms", "h100_roofline_ms", _f(".4f")),
    ("switch MB ours", "switch_bytes_ours", lambda v: f"{v / _MB:.2f}"),
    ("switch MB torch", "switch_bytes_torch", lambda v: f"{v / _MB:.2f}"),
    ("check", "check", str),
]
_RIGHT_ALIGNED = {"ours ms", "ours IQR", "torch ms", "speed-up", "ours GB/s", "% copy BW",
                  "H100 roofline ms", "switch MB ours", "switch MB torch"}


class BenchmarkConfigError(ValueError):
    """A request the runner cannot honour (unknown device, filter matching nothing, CSV layout)."""


# ---- environment ----------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def git_commit() -> str:
    """Short commit of the repo the benchmarks live in, '+dirty' when the tree has changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        if sha.returncode != 0:
            return "none"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "none"


def environment(device: str) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = cpu_model()
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "device": device,
        "device_name": name,
        "threads": torch.get_num_threads(),
        # Other processes on the cores stall every OpenMP barrier (a small op then takes a
        # scheduler time slice instead of microseconds); recorded so such runs can be recognised.
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def header_line(env: dict) -> str:
    return (f"deconvseg_fast pooling benchmark | {env['device']}: {env['device_name']} | "
            f"threads: {env['threads']} | load {env['load_avg_1m']} | torch {env['torch_version']} | "
            f"commit {env['git_commit']} | {env['timestamp']}")


# ---- timing ---------------------------------------------------------------------------------------
def _time_cpu(fns: dict[str, Callable[[], object]], rounds: int, min_run_time: float
              ) -> dict[str, tuple[float, float]]:
    """Median and IQR in ms per callable, from `rounds` interleaved blocked_autorange calls."""
    from torch.utils.benchmark import Measurement, Timer

    # Timer defaults to one thread; the point is to time what users get, i.e. torch's thread count.
    threads = torch.get_num_threads()
    timers = {k: Timer("fn()", globals={"fn": fn}, num_threads=threads, label=k)
              for k, fn in fns.items()}
    collected: dict[str, list] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, t in timers.items():
            collected[k].append(t.blocked_autorange(min_run_time=min_run_time))
    out = {}
    for k, ms in collected.items():
        m = Measurement.merge(ms)[0]  # pools every run's per-call time
        out[k] = (m.median * 1e3, m.iqr * 1e3)
    return out


def _time_cuda(fns: dict[str, Callable[[], object]], quick: bool) -> dict[str, tuple[float, float]]:
    from triton.testing import do_bench

    warmup, rep = (5, 20) if quick else (25, 200)
    out = {}
    for k, fn in fns.items():
        q25, q50, q75 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.25, 0.5, 0.75])
        out[k] = (q50, q75 - q25)
    return out


class _CopyReference:
    """A uint8 `dst.copy_(src)` moving the same total bytes as a case (half read, half written).

    Timed once per distinct byte count per run; cases with equal traffic share the figure. The
    buffers are preallocated, so the copy pays no allocation or first-touch page faults while the
    ops (ours and torch's alike) allocate their outputs: '% copy BW' is what the op achieves as
    called, against the best a plain stream of those bytes gets.
    """

    def __init__(self, device: str):
        self.device = device

    def fn(self, bytes_moved: int) -> Callable[[], object]:
        half = max(1, bytes_moved // 2)
        src = torch.ones(half, dtype=torch.uint8, device=self.device)  # ones: pages really mapped
        dst = torch.zeros(half, dtype=torch.uint8, device=self.device)
        return lambda: dst.copy_(src)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# ---- the run --------------------------------------------------------------------------------------
def run(device: str = "cpu", quick: bool = False, csv_path: str | None = DEFAULT_CSV,
        png_path: str | None = DEFAULT_PNG, filter: str | None = None, *,  # noqa: A002
        markdown: bool = False, stream: TextIO | None = None, progress: TextIO | None = None,
        rounds: int | None = None, min_run_time: float | None = None, sweeps: bool = False) -> list[dict]:
    """Time every (selected) pooling case, ours vs torch vs a copy of the same bytes.

    Prints the table to `stream` (stdout) and one progress line per case to `progress` (stderr),
    appends the rows to `csv_path` and draws `png_path` (either may be None to skip), and returns
    the rows as dicts with the CSV_COLUMNS keys.
    """
    stream = sys.stdout if stream is None else stream
    progress = sys.stderr if progress is None else progress
    if device not in ("cpu", "cuda"):
        raise BenchmarkConfigError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchmarkConfigError("device: 'cuda' requested but torch.cuda.is_available() is False")
    if filter and filter.lower().startswith("video"):
        from benchmarks import video as video_suite
        p = Path(csv_path) if csv_path else None
        return video_suite.run_video(device, quick, str(p.with_name(f"{p.stem}_video.csv")) if p else None,
                                     filter, markdown=markdown, stream=stream, progress=progress)
    if filter and filter.startswith("model"):
        from benchmarks import models as model_suite
        p = Path(csv_path) if csv_path else None
        return model_suite.run_models(device, quick, str(p.with_name(f"{p.stem}_models.csv")) if p else None,
                                      filter, markdown=markdown, stream=stream, progress=progress)
    selected = pooling.select(pooling.cases(quick=quick), filter)
    sweeps = sweeps or bool(filter)
    crf_selected = crf.select(crf.cases(quick=quick, sweeps=sweeps), filter)
    conv_selected = conv_bench.select(conv_bench.cases(quick=quick), filter)
    if not selected and not crf_selected and not conv_selected:
        names = ", ".join([c.name for c in pooling.cases(quick=quick)]
                          + [c.name for c in crf.cases(quick=quick, sweeps=True)]
                          + [c.name for c in conv_bench.cases(quick=quick)])
        raise BenchmarkConfigError(f"filter: no case name contains {filter!r}; cases are: {names}")
    rounds = rounds or (QUICK_ROUNDS if quick else FULL_ROUNDS)
    min_run_time = min_run_time or (QUICK_MIN_RUN_TIME if quick else FULL_MIN_RUN_TIME)

    env = environment(device)
    busy = env["load_avg_1m"] is not None and env["load_avg_1m"] > 0.5 * (os.cpu_count() or 1)
    if busy and device == "cpu":
        print(f"warning: 1-minute load average is {env['load_avg_1m']} on {os.cpu_count()} CPUs; "
              f"other processes will distort these timings", file=progress, flush=True)
    copy_ref = _CopyReference(device)
    copy_ms_by_bytes: dict[int, float] = {}
    rows = []
    t_start = time.perf_counter()
    for i, case in enumerate(selected, 1):
        print(f"[{i}/{len(selected)}] {case.name}", file=progress, flush=True)
        built = case.build(device)
        # One call of each outside the timer: warms caches/allocator, and checks both sides
        # compute the same thing before we compare their speed.
        check = case.check(built.ours_fn(), built.torch_fn())
        fns = {"ours": built.ours_fn, "torch": built.torch_fn}
        if built.bytes_moved not in copy_ms_by_bytes:
            fns["copy"] = copy_ref.fn(built.bytes_moved)
        if device == "cuda":
            times = _time_cuda(fns, quick)
        else:
            times = _time_cpu(fns, rounds, min_run_time)
        if "copy" in times:
            copy_ms_by_bytes[built.bytes_moved] = times["copy"][0]
        copy_ms = copy_ms_by_bytes[built.bytes_moved]
        ours_ms, ours_iqr = times["ours"]
        torch_ms, torch_iqr = times["torch"]
        roofline_s = max(built.bytes_moved / H100_BYTES_PER_S, built.flops / H100_FLOPS)
        rows.append({
            **env,
            "quick": quick,
            "case": case.name,
            "op": case.op,
            "shape": "x".join(map(str, case.shape)),
            "dtype": str(case.dtype).removeprefix("torch."),
            "index_format": case.index_format,
            "memory_format": case.memory_format,
            "kernel_size": "x".join(map(str, case.kernel_size)),
            "stride": "x".join(map(str, case.stride)),
            "padding": "x".join(map(str, case.padding)),
            "ours_ms": ours_ms,
            "ours_iqr_ms": ours_iqr,
            "torch_ms": torch_ms,
            "torch_iqr_ms": torch_iqr,
            "copy_ms": copy_ms,
            "speedup": torch_ms / ours_ms,
            "ours_gbps": built.bytes_moved / (ours_ms * 1e-3) / 1e9,
            "pct_copy_bw": 100.0 * copy_ms / ours_ms,
            "h100_roofline_ms": roofline_s * 1e3,
            "bytes_moved": built.bytes_moved,
            "flops": built.flops,
            "switch_bytes_ours": case.switch_bytes(),
            "switch_bytes_torch": case.torch_switch_bytes(),
            "check": check,
        })
        del built, fns  # free this case's tensors before the next one allocates
    wall_s = time.perf_counter() - t_start

    if rows:
        print(markdown_table(rows) if markdown else text_table(rows), file=stream)
        print(file=stream)
        print(switch_memory_markdown() if markdown else switch_memory_text(), file=stream)
        print(f"\n{len(rows)} cases in {wall_s:.1f} s", file=stream)
        if csv_path:
            append_csv(rows, csv_path)
            print(f"appended {len(rows)} rows to {csv_path}", file=stream)
        if png_path:
            plot(rows, png_path)
            print(f"wrote {png_path}", file=stream)
    if crf_selected:
        if rows:
            print(file=stream)
        run_crf(device=device, quick=quick, csv_path=crf_sibling(csv_path, "csv"),
                png_path=crf_sibling(png_path, "png"), filter=filter, markdown=markdown,
                stream=stream, progress=progress, sweeps=sweeps)
    if conv_selected:
        # the atrous conv suite (benchmarks/conv.py): its own table and results_conv.csv
        print(file=stream)
        conv_csv = str(Path(csv_path).with_name(f"{Path(csv_path).stem}_conv.csv")) if csv_path else None
        conv_bench.run_conv(sys.modules[__name__], device=device, quick=quick, csv_path=conv_csv, filter=filter,
                            markdown=markdown, stream=stream, progress=progress)
    return rows


# ---- output ---------------------------------------------------------------------------------------
def _aligned(headers: list[str], cells: list[list[str]], markdown: bool,
             right: Iterable[str] = ()) -> str:
    right = set(right)
    widths = [max([len(h)] + [len(r[j]) for r in cells]) for j, h in enumerate(headers)]

    def line(vals):
        padded = [v.rjust(w) if h in right else v.ljust(w) for v, w, h in zip(vals, widths, headers)]
        return ("| " + " | ".join(padded) + " |") if markdown else "  ".join(padded).rstrip()

    if markdown:
        rule = "|" + "|".join((("-" * (w + 1)) + ":" if h in right else "-" * (w + 2))
                              for w, h in zip(widths, headers)) + "|"
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in cells])


def _table(rows: list[dict], markdown: bool) -> str:
    headers = [h for h, _, _ in TABLE_COLUMNS]
    cells = [[fmt(r[key]) for _, key, fmt in TABLE_COLUMNS] for r in rows]
    body = _aligned(headers, cells, markdown, _RIGHT_ALIGNED)
    if not rows:
        return body
    head = header_line(rows[0])
    legend = ("speed-up = torch ms / ours ms; % copy BW = copy of the same bytes ms / ours ms; "
              "H100 roofline = max(bytes / 3.35 TB/s, flops / 67 TFLOP/s); "
              "IQR = interquartile range of the per-call times")
    if markdown:
        return f"**{head}**\n\n{body}\n\n_{legend}_"
    return f"{head}\n\n{body}\n\n{legend}"


def text_table(rows: list[dict]) -> str:
    """Aligned plain-text table with the environment header line."""
    return _table(rows, markdown=False)


def markdown_table(rows: list[dict]) -> str:
    """The same table as GitHub markdown (still column-aligned, so it reads as plain text too)."""
    return _table(rows, markdown=True)


def append_csv(rows: list[dict], path: str, columns: list[str] | None = None) -> None:
    """Append rows; write the header when the file is new. Refuses to mix column layouts."""
    columns = CSV_COLUMNS if columns is None else columns
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    new = not p.exists() or p.stat().st_size == 0
    if not new:
        with p.open(newline="") as f:
            existing = next(csv.reader(f), [])
        if existing != columns:
            raise BenchmarkConfigError(f"csv_path: {path} has different columns than this suite writes; "
                                       f"pass a new path or move the old file away")
    with p.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(rows: list[dict], path: str) -> None:
    """Two horizontal bar charts per case: speed-up over torch, and % of copy bandwidth."""
    import matplotlib
    matplotlib.use("Agg")  # no display on CI / servers
    import matplotlib.pyplot as plt

    labels = [r["case"] for r in rows]
    y = list(range(len(rows)))
    colors = {"max_pool2d": "tab:blue", "max_unpool2d": "tab:orange",
              "max_pool2d_backward": "tab:green", "max_unpool2d_backward": "tab:red"}
    c = [colors.get(r["op"], "tab:gray") for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, sharey=True, figsize=(14, 0.32 * len(rows) + 1.6))
    speedups = [r["speedup"] for r in rows]
    # Bars start at 1x on a log axis: a 2x win and a 2x loss are equally long, in opposite directions.
    ax1.barh(y, [v - 1.0 for v in speedups], left=1.0, color=c)
    ax1.set_xscale("log")
    ax1.axvline(1.0, color="black", lw=0.8)
    ax1.set_xlabel("speed-up over torch (torch ms / ours ms, log scale)")
    for yi, v in zip(y, speedups):
        ax1.annotate(f"{v:.3g}x", (v, yi), xytext=(3 if v >= 1 else -3, 0),
                     textcoords="offset points", va="center", ha="left" if v >= 1 else "right",
                     fontsize=6)
    ax1.set_yticks(y, labels, fontsize=7)
    ax1.invert_yaxis()
    ax2.barh(y, [r["pct_copy_bw"] for r in rows], color=c)
    ax2.axvline(100.0, color="black", lw=0.8)
    for yi, r in zip(y, rows):
        ax2.annotate(f"{r['pct_copy_bw']:.0f}%", (r["pct_copy_bw"], yi), xytext=(3, 0),
                     textcoords="offset points", va="center", fontsize=6)
    ax2.set_xlabel("% of copy bandwidth (same bytes, same run)")
    for ax in (ax1, ax2):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(header_line(rows[0]) if rows else "no rows", fontsize=8)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)


# ---- compact-switch memory (exact arithmetic, no timing) ------------------------------------------
def switch_memory(shape=pooling.SEGNET_SHAPE, kernel_size=(2, 2), stride=(2, 2)) -> list[dict]:
    """Bytes of the switches of one pool per index_format, and the ratio to torch's int64."""
    out = []
    for fmt in pooling.INDEX_FORMATS:
        if fmt == "packed" and tuple(kernel_size) != (2, 2):
            continue
        case = pooling.PoolingCase("max_pool2d", tuple(shape), fmt, kernel_size=tuple(kernel_size),
                                   stride=tuple(stride))
        n, c, ho, wo = case.pooled_shape
        sw_shape = (n, c, ho, math.ceil(wo / 4)) if fmt == "packed" else (n, c, ho, wo)
        out.append({
            "format": fmt,
            "dtype": "int64" if fmt == "flat" else "uint8",
            "switch_shape": "x".join(map(str, sw_shape)),
            "bytes": case.switch_bytes(),
            "torch_bytes": case.torch_switch_bytes(),
            "fraction_of_torch": case.switch_bytes() / case.torch_switch_bytes(),
        })
    return out


def _switch_memory_cells(shape, kernel_size, stride):
    rows = switch_memory(shape, kernel_size, stride)
    headers = ["format", "dtype", "switch shape", "bytes", "MiB", "vs torch int64"]
    cells = [[r["format"], r["dtype"], r["switch_shape"], f"{r['bytes']:,}",
              f"{r['bytes'] / 2**20:.2f}", f"1/{1 / r['fraction_of_torch']:g}"] for r in rows]
    title = (f"switch memory, max_pool2d {'x'.join(map(str, shape))} "
             f"k{kernel_size[0]}x{kernel_size[1]} s{stride[0]} (torch int64: "
             f"{rows[0]['torch_bytes']:,} bytes)")
    return title, headers, cells


def switch_memory_markdown(shape=pooling.SEGNET_SHAPE, kernel_size=(2, 2), stride=(2, 2)) -> str:
    """Markdown table of `switch_memory` for the README."""
    title, headers, cells = _switch_memory_cells(shape, kernel_size, stride)
    return f"**{title}**\n\n" + _aligned(headers, cells, True, {"bytes", "MiB", "vs torch int64"})


def switch_memory_text(shape=pooling.SEGNET_SHAPE, kernel_size=(2, 2), stride=(2, 2)) -> str:
    title, headers, cells = _switch_memory_cells(shape, kernel_size, stride)
    return f"{title}\n\n" + _aligned(headers, cells, False, {"bytes", "MiB", "vs torch int64"})


# ---- the CRF suite (benchmarks/crf.py) ------------------------------------------------------------
CRF_CSV_COLUMNS = [
    "timestamp", "git_commit", "torch_version", "pydensecrf_version", "device", "device_name",
    "threads", "load_avg_1m", "quick",
    "case", "kind", "impl", "batch", "labels", "height", "width", "iterations",
    "ours_build_ms", "ours_iter_ms", "ours_total_ms", "ours_total_iqr_ms",
    "ref_build_ms", "ref_iter_ms", "ref_total_ms", "ref_total_iqr_ms",
    "speedup", "build_speedup", "iter_speedup", "ours_peak_mb", "ref_peak_mb",
    "h100_roofline_ms", "rounds", "check",
]

CRF_TABLE_COLUMNS = [
    ("case", "case", str),
    ("B x L x H x W", "shape", str),
    ("thr", "threads", str),
    ("ours build ms", "ours_build_ms", _f(".1f")),
    ("ours ms/iter", "ours_iter_ms", _f(".2f")),
    ("ours total ms", "ours_total_ms", _f(".1f")),
    ("IQR", "ours_total_iqr_ms", _f(".1f")),
    ("pydcrf build ms", "ref_build_ms", _f(".1f")),
    ("pydcrf ms/iter", "ref_iter_ms", _f(".2f")),
    ("pydcrf total ms", "ref_total_ms", _f(".1f")),
    ("speed-up", "speedup", lambda v: "n/a" if v is None else f"{v:.2f}x"),
    ("build x", "build_speedup", lambda v: "n/a" if v is None else f"{v:.1f}x"),
    ("iter x", "iter_speedup", lambda v: "n/a" if v is None else f"{v:.1f}x"),
    ("peak MB ours", "ours_peak_mb", _f(".1f")),
    ("peak MB pydcrf", "ref_peak_mb", _f(".1f")),
    ("H100 roofline ms", "h100_roofline_ms", _f(".3f")),
    ("check", "check", str),
]
_CRF_RIGHT = {h for h, _, _ in CRF_TABLE_COLUMNS} - {"case", "B x L x H x W", "check"}

# Targets of the CRF issue, checked on the printed summary line.
CRF_TARGET_SPEEDUP = 8.0


def crf_sibling(path: str | None, ext: str) -> str | None:
    """results.csv -> results_crf.csv, bench.png -> bench_crf.png (the CRF's own files)."""
    if not path:
        return None
    p = Path(path)
    return str(p.with_name(f"{p.stem}_crf.{ext}"))


def _ratio(a, b):
    return None if a is None or b is None or b <= 0 else a / b


def pydensecrf_version() -> str:
    try:
        from importlib.metadata import version
        return version("pydensecrf2")
    except Exception:  # noqa: BLE001 - not installed, or installed without metadata
        return "n/a"


def crf_row(env: dict, quick: bool, r: "crf.CrfResult") -> dict:
    c = r.case
    mb = (lambda v: None if v is None else v / 1e6)
    return {
        **env,
        "threads": c.threads or env["threads"],
        "pydensecrf_version": pydensecrf_version(),
        "quick": quick, "case": c.name, "kind": c.kind, "impl": c.impl, "batch": c.batch,
        "labels": c.labels, "height": c.height, "width": c.width, "iterations": c.iterations,
        "shape": c.shape,
        "ours_build_ms": r.ours_build_ms, "ours_iter_ms": r.ours_iter_ms,
        "ours_total_ms": r.ours_total_ms, "ours_total_iqr_ms": r.ours_total_iqr_ms,
        "ref_build_ms": r.ref_build_ms, "ref_iter_ms": r.ref_iter_ms,
        "ref_total_ms": r.ref_total_ms, "ref_total_iqr_ms": r.ref_total_iqr_ms,
        "speedup": _ratio(r.ref_total_ms, r.ours_total_ms),
        "build_speedup": _ratio(r.ref_build_ms, r.ours_build_ms),
        "iter_speedup": _ratio(r.ref_iter_ms, r.ours_iter_ms),
        "ours_peak_mb": mb(r.ours_peak_bytes), "ref_peak_mb": mb(r.ref_peak_bytes),
        "h100_roofline_ms": r.h100_roofline_ms, "rounds": r.extra.get("rounds"), "check": r.check,
    }


def crf_header_line(env: dict) -> str:
    return (f"deconvseg_fast dense CRF benchmark vs pydensecrf2 {pydensecrf_version()} | "
            f"{env['device']}: {env['device_name']} | threads: {env['threads']} | "
            f"load {env['load_avg_1m']} | torch {env['torch_version']} | commit {env['git_commit']} | "
            f"{env['timestamp']}")


def crf_table(rows: list[dict], fit_rows: list[dict], markdown: bool = False) -> str:
    headers = [h for h, _, _ in CRF_TABLE_COLUMNS]
    cells = [[fmt(r[key]) for _, key, fmt in CRF_TABLE_COLUMNS] for r in rows]
    body = _aligned(headers, cells, markdown, _CRF_RIGHT)
    legend = ("DeepLab's CRF (gaussian sxy 3 w 3, bilateral sxy 80 srgb 13 w 10, Potts, symmetric), "
              "10 mean-field iterations unless the case says otherwise, on resized photographs "
              "with a noisy unary. build = set-up incl. both lattices; total = build + iterations "
              "of the same run (median); speed-up = pydensecrf total / ours total; pydensecrf is "
              "single-threaded and loops over a batch; peak MB = growth of the peak RSS during one "
              "call in a fresh process (voc and batch rows); check = MAP agreement and "
              "max and mean |Q_ours - Q_pydensecrf| on these inputs; "
              "H100 roofline = max(bytes / 3.35 TB/s, flops / 67 TFLOP/s), see benchmarks/crf.py")
    parts = [f"**{crf_header_line(rows[0])}**" if markdown else crf_header_line(rows[0]), "", body,
             "", f"_{legend}_" if markdown else legend]
    if fit_rows:
        fh = ["sweep", "time", "intercept a ms", "slope b (ms per x)", "R^2", "range"]
        fc = [[f["sweep"], f["y"], f"{f['a']:.1f}", f"{f['b']:.2f} per {f['x']}",
               f"{f['r2']:.4f}", f["range"]] for f in fit_rows]
        parts += ["", "linear fits t = a + b x (least squares):", "",
                  _aligned(fh, fc, markdown, {"intercept a ms", "slope b (ms per x)", "R^2"})]
    targets = []
    for kind in ("voc", "batch4"):
        best = [r for r in rows if r["kind"] == kind and r["speedup"] is not None]
        if best:
            top = max(best, key=lambda r: r["speedup"])
            ok = "met" if top["speedup"] >= CRF_TARGET_SPEEDUP else "NOT met"
            targets.append(f"{top['case']}: {top['speedup']:.2f}x vs target "
                           f"{CRF_TARGET_SPEEDUP:g}x: {ok}")
    if targets:
        parts += ["", "targets: " + "; ".join(targets)]
    return "\n".join(parts)


def append_crf_csv(rows: list[dict], path: str) -> None:
    append_csv(rows, path, CRF_CSV_COLUMNS)


def plot_crf(rows: list[dict], fit_rows: list[dict], path: str) -> None:
    """Left: speed-up over pydensecrf per case. Right: ours' time against megapixels (with the fit)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.32 * len(rows) + 2.2))
    y = list(range(len(rows)))
    sp = [r["speedup"] or 0.0 for r in rows]
    ax1.barh(y, sp, color=["tab:blue" if r["impl"] == "compat" else "tab:green" for r in rows])
    ax1.set_yticks(y, [r["case"] for r in rows], fontsize=7)
    ax1.invert_yaxis()
    ax1.axvline(1.0, color="k", lw=0.8)
    ax1.axvline(CRF_TARGET_SPEEDUP, color="tab:red", lw=0.8, ls="--")
    ax1.set_xlabel("speed-up over pydensecrf (end to end, same inputs, same run)")
    px = [r for r in rows if r["kind"] == "scale-px"]
    if px:
        xs = [r["height"] * r["width"] / 1e6 for r in px]
        ax2.plot(xs, [r["ours_total_ms"] for r in px], "o-", label="ours")
        if all(r["ref_total_ms"] is not None for r in px):
            ax2.plot(xs, [r["ref_total_ms"] for r in px], "s-", label="pydensecrf")
        for f in fit_rows:
            if f["sweep"] == "scale-px" and f["y"] == "ours end-to-end ms":
                ax2.plot(xs, [f["a"] + f["b"] * x for x in xs], "k:", lw=0.8,
                         label=f"fit {f['a']:.0f} + {f['b']:.0f}/MP, R^2 {f['r2']:.3f}")
        ax2.set_xlabel("megapixels")
        ax2.set_ylabel("end-to-end ms")
        ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.suptitle(crf_header_line(rows[0]) if rows else "no rows", fontsize=8)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)


def run_crf(device: str = "cpu", quick: bool = False, csv_path: str | None = None,
            png_path: str | None = None, filter: str | None = None, *,  # noqa: A002
            markdown: bool = False, stream: TextIO | None = None, progress: TextIO | None = None,
            rounds: int | None = None, sweeps: bool = False) -> list[dict]:
    """Time the selected CRF cases, ours vs pydensecrf; print the table and the linear fits,
    append CRF_CSV_COLUMNS rows to `csv_path`, draw `png_path`, return the rows."""
    stream = sys.stdout if stream is None else stream
    progress = sys.stderr if progress is None else progress
    selected = crf.select(crf.cases(quick=quick, sweeps=sweeps or bool(filter)), filter)
    if device != "cpu":
        # On a GPU ours is the functional path (the pydensecrf-compatible API works on numpy
        # arrays, on the CPU); pydensecrf stays the CPU reference. Thread cases are CPU-only.
        selected = [c for c in selected if c.impl == "functional" and c.kind != "threads"]
    pd, why = crf.pydensecrf_status()
    if pd is None:
        print(f"warning: {why}; the CRF rows have no reference", file=progress, flush=True)
    env = environment(device)
    rounds = rounds or (2 if quick else 5)
    results = []
    t_start = time.perf_counter()
    for i, case in enumerate(selected, 1):
        print(f"[crf {i}/{len(selected)}] {case.name}", file=progress, flush=True)
        results.append(crf.run_case(case, rounds, budget_s=1.0 if quick else None,
                                    measure_peak=False if quick else None, device=device))
    crf.clear_caches()
    wall_s = time.perf_counter() - t_start
    rows = [crf_row(env, quick, r) for r in results]
    fit_rows = crf.fits(results)
    if rows:
        print(crf_table(rows, fit_rows, markdown), file=stream)
    print(f"\n{len(rows)} CRF cases in {wall_s:.1f} s", file=stream)
    if csv_path and rows:
        append_crf_csv(rows, csv_path)
        print(f"appended {len(rows)} rows to {csv_path}", file=stream)
    if png_path and rows:
        plot_crf(rows, fit_rows, png_path)
        print(f"wrote {png_path}", file=stream)
    return rows
