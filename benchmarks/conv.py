"""Benchmark cases for the atrous convolution with a fused epilogue, and the suite's runner.

Each case (`ConvCase`) times ours -- `deconvseg_fast.functional.atrous_conv2d(..., activation=
"relu"[, scale, shift])`, one op -- against torch doing the same work the way a model does it:
`F.relu(F.conv2d(x, w, b, ...))`, plus `F.batch_norm` (eval) in between for the conv-BN-ReLU cases.
Both run on the same inputs in the same run, interleaved (benchmarks/runner.py `_time_cpu`), so
the speed-up column is a ratio of two figures measured under the same load.

The H100 roofline is max(bytes / 3.35 TB/s, flops / peak) with the tensor-core peak of the
dtype (dense, no sparsity): TF32 495 TFLOP/s for float32 (the Triton kernel and cuDNN both use
TF32 by default), 989 TFLOP/s for fp16/bf16. Bytes: input, weight, bias/scale/shift and output
each touched once.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, TextIO

import torch
import torch.nn.functional as F

H100_BYTES_PER_S = 3.35e12
H100_TENSOR_FLOPS = {torch.float32: 494.7e12, torch.float16: 989.4e12, torch.bfloat16: 989.4e12,
                     torch.float64: 66.9e12}


class BuiltCase(NamedTuple):
    ours_fn: Callable[[], object]
    torch_fn: Callable[[], object]
    bytes_moved: int
    flops: int


@dataclass(frozen=True)
class ConvCase:
    tag: str  # the layer it comes from, for the label
    shape: tuple[int, int, int, int]  # input [N, C_in, H, W]
    out_channels: int
    kernel_size: int = 3
    dilation: int = 1
    padding: int | None = None  # default: "same" for stride 1, dilation * (k // 2)
    batch_norm: bool = False  # conv -> BN -> ReLU (folded scale/shift) instead of conv + bias -> ReLU
    memory_format: str = "contiguous"
    dtype: torch.dtype = torch.float32
    packed: bool = False  # ours runs a weight packed once (F.pack_conv_weight, what freeze() does); CPU only

    @property
    def pad(self) -> int:
        return self.dilation * (self.kernel_size // 2) if self.padding is None else self.padding

    @property
    def out_hw(self) -> tuple[int, int]:
        span = self.dilation * (self.kernel_size - 1)
        return self.shape[2] + 2 * self.pad - span, self.shape[3] + 2 * self.pad - span

    @property
    def name(self) -> str:
        k, d = self.kernel_size, self.dilation
        epi = "bn+relu" if self.batch_norm else "bias+relu"
        mf = " CL" if self.memory_format == "channels_last" else ""
        packed = " packed" if self.packed else ""
        return (f"conv {self.tag} {'x'.join(map(str, self.shape))} -> {self.out_channels} "
                f"k{k} d{d} {epi}{mf}{packed}")

    def flops(self) -> int:
        n, c, _, _ = self.shape
        return 2 * n * self.out_channels * math.prod(self.out_hw) * c * self.kernel_size ** 2

    def bytes_moved(self) -> int:
        es = torch.empty((), dtype=self.dtype).element_size()
        n, c, h, w = self.shape
        vecs = (3 if self.batch_norm else 1) * self.out_channels
        return es * (n * c * h * w + self.out_channels * c * self.kernel_size ** 2 + vecs
                     + n * self.out_channels * math.prod(self.out_hw))

    def roofline_ms(self) -> float:
        return 1e3 * max(self.bytes_moved() / H100_BYTES_PER_S, self.flops() / H100_TENSOR_FLOPS[self.dtype])

    def build(self, device="cpu", seed: int = 0) -> BuiltCase:
        import deconvseg_fast.functional as DF  # noqa: N812

        g = torch.Generator().manual_seed(seed)
        n, c, h, w = self.shape
        k, o = self.kernel_size, self.out_channels
        x = torch.randn(self.shape, generator=g).to(device=device, dtype=self.dtype)
        if self.memory_format == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        wt = (torch.randn((o, c, k, k), generator=g) / (c * k * k) ** 0.5).to(device=device, dtype=self.dtype)
        b = (torch.randn(o, generator=g) * 0.1).to(device=device, dtype=self.dtype)
        p, d = self.pad, self.dilation
        w_ours = DF.pack_conv_weight(wt, 1, p, d, input_size=tuple(x.shape)) if self.packed else wt
        if self.batch_norm:
            mean = torch.randn(o, generator=g).mul(0.1).to(device)
            var = torch.rand(o, generator=g).add(0.5).to(device)
            gamma = torch.rand(o, generator=g).add(0.5).to(device)
            beta = torch.randn(o, generator=g).mul(0.1).to(device)
            scale = gamma * torch.rsqrt(var + 1e-5)
            shift = beta - mean * scale

            def ours():
                return DF.atrous_conv2d(x, w_ours, b, 1, p, d, activation="relu", scale=scale, shift=shift)

            def ref():
                z = F.conv2d(x, wt, b, 1, p, d)
                return F.relu(F.batch_norm(z, mean.to(z.dtype), var.to(z.dtype), gamma.to(z.dtype),
                                           beta.to(z.dtype), False, 0.0, 1e-5))
        else:
            def ours():
                return DF.atrous_conv2d(x, w_ours, b, 1, p, d, activation="relu")

            def ref():
                return F.relu(F.conv2d(x, wt, b, 1, p, d))
        return BuiltCase(ours, ref, self.bytes_moved(), self.flops())

    def check(self, ours_out, torch_out) -> str:
        if ours_out.shape != torch_out.shape or ours_out.stride() != torch_out.stride():
            return "MISMATCH"
        if torch.equal(ours_out, torch_out):
            return "exact"
        tol = 1e-4 if self.dtype in (torch.float32, torch.float64) else 3e-2
        return "close" if torch.allclose(ours_out, torch_out, rtol=tol, atol=tol) else "MISMATCH"


# ---- the suite ------------------------------------------------------------------------------------
def cases(quick: bool = False) -> list[ConvCase]:
    """DeepLab-LargeFOV's atrous layers at output stride 8 on a 321x321 crop (41x41 maps) and
    SegNet's conv1_2 on CamVid (360x480); `quick` shrinks them for a smoke test."""
    if quick:
        return [ConvCase("DeepLab-conv5", (1, 32, 21, 21), 32, dilation=2),
                ConvCase("DeepLab-fc6", (1, 32, 21, 21), 64, dilation=12),
                ConvCase("SegNet-conv1_2", (1, 16, 36, 48), 16, batch_norm=True),
                ConvCase("DeepLab-fc6", (1, 32, 21, 21), 64, dilation=12, memory_format="channels_last", packed=True)]
    plain = [
        ConvCase("DeepLab-conv5", (1, 512, 41, 41), 512, dilation=2),
        ConvCase("DeepLab-conv5", (1, 512, 41, 41), 512, dilation=2, memory_format="channels_last"),
        ConvCase("DeepLab-fc6", (1, 512, 41, 41), 1024, dilation=12),
        ConvCase("DeepLab-fc6", (1, 512, 41, 41), 1024, dilation=12, memory_format="channels_last"),
        ConvCase("SegNet-conv1_2", (1, 64, 360, 480), 64),
        ConvCase("SegNet-conv1_2", (1, 64, 360, 480), 64, batch_norm=True),
        ConvCase("SegNet-conv1_2", (1, 64, 360, 480), 64, batch_norm=True, memory_format="channels_last"),
    ]
    # The channels_last shapes with the weight packed once, as a frozen model runs them (freeze()
    # packs only for channels_last activations: on NCHW ones oneDNN's packed path answers NHWC).
    return plain + [dataclasses.replace(c, packed=True) for c in plain if c.memory_format == "channels_last"]


def select(all_cases: list[ConvCase], filter: str | None) -> list[ConvCase]:  # noqa: A002
    if not filter:
        return list(all_cases)
    needle = filter.lower()
    return [c for c in all_cases if needle in c.name.lower()]


CSV_COLUMNS = [
    "timestamp", "git_commit", "torch_version", "device", "device_name", "threads", "load_avg_1m", "quick",
    "case", "shape", "out_channels", "kernel_size", "dilation", "padding", "epilogue", "memory_format", "packed",
    "dtype",
    "ours_ms", "ours_iqr_ms", "torch_ms", "torch_iqr_ms", "speedup", "ours_gflops", "h100_roofline_ms",
    "bytes_moved", "flops", "check",
]


def run_conv(runner, device: str = "cpu", quick: bool = False, csv_path: str | None = None,
             filter: str | None = None, *, markdown: bool = False,  # noqa: A002
             stream: TextIO | None = None, progress: TextIO | None = None) -> list[dict]:
    """Time the selected conv cases, ours vs torch; print a table, append CSV_COLUMNS rows."""
    stream = sys.stdout if stream is None else stream
    progress = sys.stderr if progress is None else progress
    selected = [c for c in select(cases(quick), filter) if device == "cpu" or not c.packed]  # packing is oneDNN's
    env = runner.environment(device)
    rounds = runner.QUICK_ROUNDS if quick else runner.FULL_ROUNDS
    min_run_time = runner.QUICK_MIN_RUN_TIME if quick else runner.FULL_MIN_RUN_TIME
    rows = []
    t0 = time.perf_counter()
    for i, case in enumerate(selected, 1):
        print(f"[conv {i}/{len(selected)}] {case.name}", file=progress, flush=True)
        built = case.build(device)
        check = case.check(built.ours_fn(), built.torch_fn())
        fns = {"ours": built.ours_fn, "torch": built.torch_fn}
        times = runner._time_cuda(fns, quick) if device == "cuda" else runner._time_cpu(fns, rounds, min_run_time)
        (ours_ms, ours_iqr), (torch_ms, torch_iqr) = times["ours"], times["torch"]
        rows.append({
            **env, "quick": quick, "case": case.name, "shape": "x".join(map(str, case.shape)),
            "out_channels": case.out_channels, "kernel_size": case.kernel_size, "dilation": case.dilation,
            "padding": case.pad, "epilogue": "bn+relu" if case.batch_norm else "bias+relu",
            "memory_format": case.memory_format, "packed": case.packed, "dtype": str(case.dtype).removeprefix("torch."),
            "ours_ms": ours_ms, "ours_iqr_ms": ours_iqr, "torch_ms": torch_ms, "torch_iqr_ms": torch_iqr,
            "speedup": torch_ms / ours_ms, "ours_gflops": case.flops() / (ours_ms * 1e-3) / 1e9,
            "h100_roofline_ms": case.roofline_ms(), "bytes_moved": case.bytes_moved(), "flops": case.flops(),
            "check": check,
        })
        del built, fns
    wall = time.perf_counter() - t0
    if rows:
        headers = ["case", "thr", "ours ms", "IQR", "torch ms", "IQR ", "speed-up", "ours GFLOP/s",
                   "H100 roofline ms", "check"]
        cells = [[r["case"], str(r["threads"]), f"{r['ours_ms']:.2f}", f"{r['ours_iqr_ms']:.2f}",
                  f"{r['torch_ms']:.2f}", f"{r['torch_iqr_ms']:.2f}", f"{r['speedup']:.2f}x",
                  f"{r['ours_gflops']:.0f}", f"{r['h100_roofline_ms']:.4f}", r["check"]] for r in rows]
        head = (f"deconvseg_fast atrous conv benchmark | {env['device']}: {env['device_name']} | threads: "
                f"{env['threads']} | load {env['load_avg_1m']} | torch {env['torch_version']} | "
                f"commit {env['git_commit']} | {env['timestamp']}")
        legend = ("ours = F.atrous_conv2d (one op: conv + fused epilogue; 'packed': its weight packed once by "
                  "F.pack_conv_weight, as deconvseg_fast.freeze does); torch = F.relu(F.conv2d(...)) "
                  "(+ F.batch_norm in eval for bn+relu); speed-up = torch ms / ours ms (median of "
                  "interleaved rounds); H100 roofline = max(bytes / 3.35 TB/s, flops / tensor-core peak)")
        table = runner._aligned(headers, cells, markdown, set(headers) - {"case", "check"})
        print(f"**{head}**\n\n{table}\n\n_{legend}_" if markdown else f"{head}\n\n{table}\n\n{legend}",
              file=stream)
        for kind, group in (("plain weights", [r for r in rows if not r["packed"]]),
                            ("packed weights", [r for r in rows if r["packed"]])):
            if group:
                worst = min(group, key=lambda r: r["speedup"])
                print(f"target >= 1.0x torch on every shape, {kind}: "
                      f"{'met' if worst['speedup'] >= 1.0 else 'NOT met'} "
                      f"(lowest {worst['speedup']:.2f}x, {worst['case']})", file=stream)
        print(f"\n{len(rows)} conv cases in {wall:.1f} s", file=stream)
        if csv_path:
            runner.append_csv(rows, csv_path, CSV_COLUMNS)
            print(f"appended {len(rows)} rows to {csv_path}", file=stream)
    return rows
