"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU.

Each entry of the KERNELS lists of deconvseg_fast.kernels.pooling, deconvseg_fast.kernels.crf,
deconvseg_fast.kernels.proposals and deconvseg_fast.kernels.conv (whose entries also carry their
autotune config's num_warps/num_stages and a launch's divisibility attrs) is compiled with triton.compile for both targets; the resulting cubin's registers and shared
memory come from cuobjdump -res-usage and the spill bytes from ptxas -v on the same PTX (both
tools ship inside the triton wheel). Any spill or local-memory use fails the test. The crf entries
are built by the same code that launches the kernels (kernels/crf.py `_launches`), on meta
tensors shaped like a 500x375 image, so their signatures and constexprs are a real launch's.

The work runs in a subprocess with TRITON_INTERPRET removed: `@triton.jit` decides between a
compilable JITFunction and the interpreter's InterpretedFunction when the kernel module is
imported, and the interpreter tests in this process may already have imported it interpreted.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ARCHS = (80, 90)

_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import torch  # noqa: F401  (loads libc10 & co. before the package's compiled extension)
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from deconvseg_fast.kernels import crf, pooling
from deconvseg_fast.kernels import proposals
from deconvseg_fast.kernels import conv

archs = [int(a) for a in sys.argv[1:]]
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ptxas = os.path.join(bin_dir, "ptxas")
cuobjdump = os.path.join(bin_dir, "cuobjdump")
fmt_names = {0: "flat", 1: "window", 2: "packed"}

def crf_label(fn, sig, const):
    # e.g. "K2 d2P+d5G L32x16 final out[L,N]": the launch's kernels (d, Potts / General),
    # BLOCK_L x BLOCK_N, softmax fused or energy written, and the layout of the output
    if "NUM_K" in const:
        ks = ["d%d%s" % (const["D1_%d" % i] - 1, "P" if const["DIAG_%d" % i] else "G")
              for i in range(const["NUM_K"])]
        parts = ["K%d %s" % (const["NUM_K"], "+".join(ks) if ks else "softmax")]
        parts.append("L%dx%d" % (const["BLOCK_L"], const["BLOCK_N"]))
        parts.append("final" if const["FINAL"] else "energy")
        if not const["ALL_LABELS"]:
            parts.append("chunked")
    else:
        parts = ["rows L%dx%d" % (const["BLOCK_L"], const["BLOCK_N"])]
        if const.get("s_x_n") == 1:
            parts.append("in[L,N]")
    if const.get("s_out_n") == 1 and const.get("s_out_l") != 1:
        parts.append("out[L,N]")
    if const.get("INDEX_64"):
        parts.append("i64")
    return " ".join(parts)

def proposals_label(fn, sig, const):
    # e.g. "paste fp16 max": score dtype and reduction
    floats = [t[1:] for t in sig.values() if t.startswith(("*fp", "*bf"))]
    return "paste %s %s" % (floats[0], "max" if const["MAX"] else "sum")

def conv_label(fn, sig, const):
    # e.g. "conv fp16 k3x3 M128xN64 w4s4 cl-out s2b": dtype, kernel, tile, warps/stages, output
    # layout, formulation (space_to_batch launches carry PA > 1)
    floats = [t[1:] for t in sig.values() if t.startswith(("*fp", "*bf"))]
    parts = ["conv", floats[0], "k%dx%d" % (const["KH"], const["KW"]),
             "M%dxN%d" % (const["BLOCK_M"], const["BLOCK_N"])]
    parts.append("cl-out" if const.get("syc") == 1 else "nchw-out")
    parts.append("s2b" if "PA" not in const else "direct")
    if not (const["HAS_BIAS"] or const["HAS_SCALE"] or const["RELU"]):
        parts.append("plain")
    return " ".join(parts)

def label(fn, sig, const):
    if fn.__name__ == "_atrous_conv2d_kernel":
        return conv_label(fn, sig, const)
    if fn.__name__ == "_paste_aggregate_kernel":
        return proposals_label(fn, sig, const)
    if "FORMAT" not in const:
        return crf_label(fn, sig, const)
    parts = [fmt_names[const["FORMAT"]]]
    floats = [t[1:] for t in sig.values() if t.startswith(("*fp", "*bf"))]
    parts.append(floats[0] if floats else "switches")
    if "ACCUMULATE" in const:
        parts.append("sum" if const["ACCUMULATE"] else "last")
    parts.append("k%dx%d" % (const["KH"], const["KW"]))
    if const.get("CHANNELS_LAST"):
        parts.append("cl")
    if const.get("INDEX_64"):
        parts.append("i64")
    if "HW" in const:
        parts.append("scalars=1")
    return " ".join(parts)

rows = []
with tempfile.TemporaryDirectory() as tmp:
    # conv entries also carry compile options (warps, stages) and divisibility attrs
    for fn, sig, const, opts, attrs in [(*e, {}, {})[:5] for e in
                                        pooling.KERNELS + crf.KERNELS + proposals.KERNELS + conv.KERNELS]:
        for cc in archs:
            row = {"kernel": fn.__name__, "spec": label(fn, sig, const), "sm": cc}
            try:
                compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                                          target=GPUTarget("cuda", cc, 32), options=dict(opts))
            except Exception as exc:  # reported per row; the test fails on it
                row["error"] = "%s: %s" % (type(exc).__name__, str(exc)[:2000])
                rows.append(row)
                continue
            ptx = compiled.asm["ptx"]
            gpu_name = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
            ptx_path = os.path.join(tmp, "k.ptx")
            cubin_path = os.path.join(tmp, "k.cubin")
            with open(ptx_path, "w") as f:
                f.write(ptx)
            with open(cubin_path, "wb") as f:
                f.write(compiled.asm["cubin"])
            pv = subprocess.run([ptxas, "-v", "--gpu-name", gpu_name, ptx_path, "-o",
                                 os.path.join(tmp, "ptxas.cubin")],
                                capture_output=True, text=True)
            ru = subprocess.run([cuobjdump, "-res-usage", cubin_path], capture_output=True,
                                text=True)
            info = pv.stdout + pv.stderr
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
            usage = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", ru.stdout)
            if pv.returncode or ru.returncode or not spill or not usage:
                row["error"] = "ptxas/cuobjdump failed:\n" + info + ru.stdout + ru.stderr
                rows.append(row)
                continue
            row.update(
                target=gpu_name,
                regs=int(usage.group(1)),
                # Triton's dynamic shared memory plus any static shared memory in the cubin
                smem=int(compiled.metadata.shared) + int(usage.group(2)),
                local=int(usage.group(3)),
                spill_stores=int(spill.group(1)),
                spill_loads=int(spill.group(2)),
            )
            rows.append(row)
print("ROWS" + json.dumps({"entries": len(pooling.KERNELS) + len(crf.KERNELS) + len(proposals.KERNELS)
                                     + len(conv.KERNELS),
                          "rows": rows,
                          "crf_entries": len(crf.KERNELS)}))
"""


def _compile_all():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # the child must import the same deconvseg_fast as this process
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, *map(str, ARCHS)],
                          capture_output=True, text=True, env=env, timeout=1800)
    marker = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS")]
    assert proc.returncode == 0 and marker, (
        f"AOT compile subprocess failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n"
        f"{proc.stderr[-4000:]}")
    result = json.loads(marker[-1][4:])
    assert result["crf_entries"] > 0, "deconvseg_fast.kernels.crf.KERNELS is empty"
    return result["entries"], result["rows"]


def _table(rows):
    head = f"{'kernel':<32} {'spec':<48} {'sm':>3} {'regs':>5} {'smem':>6} {'spill':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['kernel']:<32} {r['spec']:<48} {r['sm']:>3} ERROR")
            continue
        spill = r["spill_stores"] + r["spill_loads"]
        lines.append(f"{r['kernel']:<32} {r['spec']:<48} {r['sm']:>3} {r['regs']:>5} "
                     f"{r['smem']:>6} {spill:>6}")
    return "\n".join(lines)


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    entries, rows = _compile_all()
    table = _table(rows)
    print("\n" + table)  # shown with pytest -rA / -s
    assert entries > 0 and len(rows) == entries * len(ARCHS), table
    errors = [f"{r['kernel']} [{r['spec']}] sm_{r['sm']}:\n{r['error']}" for r in rows
              if "error" in r]
    assert not errors, "\n\n".join(errors) + "\n\n" + table
    assert {r["sm"] for r in rows} == set(ARCHS)
    assert any(r["kernel"] == "_paste_aggregate_kernel" for r in rows), table
    spilled = [r for r in rows
               if r["spill_stores"] or r["spill_loads"] or r["local"]]
    assert not spilled, "register spills / local memory:\n" + table
    # 4 warps of 32 threads: more than 255 registers per thread cannot be allocated at all
    assert all(0 < r["regs"] <= 255 for r in rows), table
