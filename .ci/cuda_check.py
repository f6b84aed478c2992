"""The checks of .ci/cuda_check on an installed CUDA build of deconvseg_fast (no GPU needed).

1. Every op defined in csrc/ops.cpp (and every op registered in the deconvseg namespace) has a
   kernel for the CUDA dispatch key: a C++ one from csrc/cuda/ or a Triton launcher registered
   from deconvseg_fast/ops/.
2. ptxas -v output of the build (in the build log): registers, stack frame and spills of every
   kernel for every target architecture; any spill fails, as does an architecture with no kernels.
3. cuobjdump --list-elf of the built .so holds code for every target architecture, and
   cuobjdump -res-usage of it gives the registers of the code that actually shipped.
Prints one table and exits non-zero listing every failure.
"""
import argparse
import os
import re
import subprocess
import sys


def parse_ops(ops_cpp):
    text = open(ops_cpp).read()
    # m.def("name(...) -> ...") with the schema possibly split over several string literals
    return sorted(set(re.findall(r'm\.def\(\s*"([A-Za-z_][A-Za-z0-9_]*)\(', text)))


def demangle(names):
    if not names:
        return {}
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}
    short = {}
    for mangled, full in zip(names, out):
        full = re.sub(r"\(anonymous namespace\)::", "", full)
        full = re.sub(r"^void ", "", full)
        short[mangled] = full
    return short


def parse_ptxas(log):
    """[(mangled name, arch, regs, stack, spill stores, spill loads)] from ptxas -v output."""
    rows, current, props = [], None, {}
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            current = [m.group(1), m.group(2), None, None, None, None]
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current[3], current[4], current[5] = (int(g) for g in m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current[2] = int(m.group(1))
    return rows


def parse_res_usage(text):
    """{(arch, mangled name): regs} from cuobjdump -res-usage."""
    regs, arch = {}, None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function ([^:\s]+):", line)
        if m and arch and i + 1 < len(lines):
            r = re.search(r"REG:(\d+)", lines[i + 1])
            if r:
                regs[(arch, m.group(1))] = int(r.group(1))
    return regs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops-cpp", required=True)
    ap.add_argument("--build-log", required=True)
    ap.add_argument("--cuobjdump", required=True)
    ap.add_argument("--archs", nargs="+", type=int, required=True)
    ap.add_argument("--forbid-dir", help="fail if deconvseg_fast._C is imported from this folder (the working tree's)")
    args = ap.parse_args()
    archs = ["sm_%d" % a for a in args.archs]
    failures = []

    import torch
    import deconvseg_fast  # noqa: F401  (registers the Triton CUDA kernels of deconvseg_fast/ops/)
    from deconvseg_fast import _C

    so = os.path.realpath(_C.__file__)
    print("torch %s (CUDA %s), GPU available: %s" % (torch.__version__, torch.version.cuda,
                                                     torch.cuda.is_available()))
    print("deconvseg_fast._C: %s" % so)
    if args.forbid_dir and os.path.dirname(so) == os.path.realpath(args.forbid_dir):
        failures.append("imported the working tree's extension %s, not the out-of-tree CUDA build" % so)

    # 1. registrations
    defined = parse_ops(args.ops_cpp)
    registered = sorted({n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                         if n.startswith("deconvseg::")})
    if not defined:
        failures.append("found no m.def(...) in %s" % args.ops_cpp)
    if set(defined) != set(registered):
        failures.append("ops.cpp defines %s but the deconvseg namespace holds %s" % (defined, registered))
    print("\n%-32s %s" % ("op", "CUDA kernel"))
    for op in sorted(set(defined) | set(registered)):
        has = torch._C._dispatch_has_kernel_for_dispatch_key("deconvseg::" + op, "CUDA")
        print("%-32s %s" % (op, "yes" if has else "MISSING"))
        if not has:
            failures.append("deconvseg::%s has no CUDA kernel" % op)

    # 2. ptxas -v figures
    rows = parse_ptxas(open(args.build_log, errors="replace").read())
    names = demangle(sorted({r[0] for r in rows}))
    res = {}
    proc = subprocess.run([args.cuobjdump, "-res-usage", so], capture_output=True, text=True)
    if proc.returncode == 0:
        res = parse_res_usage(proc.stdout)
    else:
        failures.append("cuobjdump -res-usage failed: %s" % proc.stderr.strip())
    print("\n%-78s %6s %5s %5s %6s %6s" % ("CUDA kernel (ptxas -v)", "arch", "regs", "stack", "spillS", "spillL"))
    for r in sorted(rows, key=lambda r: (names[r[0]], r[1])):
        name, arch, regs, stack, ss, sl = r
        print("%-78s %6s %5s %5s %6s %6s" % (names[name][:78], arch, regs, stack, ss, sl))
        if None in (regs, stack, ss, sl):
            failures.append("incomplete ptxas -v output for %s %s" % (names[name], arch))
            continue
        if ss or sl:
            failures.append("%s %s spills: %d bytes stored, %d bytes loaded" % (names[name], arch, ss, sl))
        shipped = res.get((arch, name))
        if res and shipped is None:
            failures.append("%s %s is not in the built .so" % (names[name], arch))
        elif shipped is not None and shipped != regs:
            failures.append("%s %s: ptxas -v says %d registers, the .so %d" % (names[name], arch, regs, shipped))
    per_arch = {a: {r[0] for r in rows if r[1] == a} for a in archs}
    for a in archs:
        if not per_arch[a]:
            failures.append("ptxas -v reported no kernels for %s (is NVCC_APPEND_FLAGS honoured?)" % a)
    if len({frozenset(s) for s in per_arch.values()}) > 1:
        failures.append("the architectures were built with different kernel sets")

    # 3. the architectures in the .so
    proc = subprocess.run([args.cuobjdump, "--list-elf", so], capture_output=True, text=True)
    elf_archs = sorted(set(re.findall(r"\.(sm_\d+)\.cubin", proc.stdout)))
    print("\ncuobjdump --list-elf: %s" % (", ".join(elf_archs) or proc.stdout + proc.stderr))
    for a in archs:
        if a not in elf_archs:
            failures.append("the .so holds no %s code" % a)

    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nOK: every op has a CUDA kernel; %d kernels x %s, no spills" % (len(per_arch[archs[0]]), "/".join(archs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
