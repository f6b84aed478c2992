"""Seed-network benchmarks: each model's forward, ours vs its pure-torch twin, and SegNet's
training-step memory with compact switches vs torch's int64 indices.

Not part of the default ``deconvseg-fast bench`` run: full-size VGG forwards take seconds each on a
2-core CPU (the whole suite takes several minutes). Select it with

    deconvseg-fast bench --filter model            # every model case + the SegNet memory case
    deconvseg-fast bench --filter model_segnet     # cases whose name contains the filter
    python -m benchmarks.models [--quick] [--filter SUBSTR]

Canonical input sizes (H x W): SegNet 360x480 (CamVid), DeconvNet 224x224 (one proposal batch),
DeepLab-LargeFOV 321x321 (its VOC training crop), FCN-8s 375x500 (a VOC image), DecoupledNet
224x224 with two present classes per image. Batch 1 and 4 (``--quick``: batch 1 only, fewer
rounds). Both sides get the same weights (BN statistics randomised, so folding is not a no-op) and
the same input; the check column is the largest |ours - twin| of that forward.

SegNet training-step memory (batch 1, 360x480, forward + cross-entropy + backward):
* switch bytes: the pooling indices saved for backward -- uint8 packed (ours) vs int64 (torch);
  counted exactly from the tensors autograd saves (saved_tensors_hooks, storages deduplicated);
* saved bytes: everything autograd holds for backward, the same way;
* peak: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the growth of the peak RSS of a
  fresh process during the step (``VmHWM`` at the end minus the RSS before it), which
  includes allocator slack.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

MODEL_CSV_COLUMNS = [
    "timestamp", "git_commit", "torch_version", "device", "device_name", "threads", "load_avg_1m", "quick",
    "case", "model", "batch", "input", "ours_ms", "ours_iqr_ms", "frozen_ms", "frozen_iqr_ms", "twin_ms",
    "twin_iqr_ms", "speedup", "frozen_speedup", "target", "check",
]
# Targets of the models issue (forward speed-up over the twin).
TARGETS = {"segnet": 1.3, "deconvnet": 1.3, "deeplab_largefov": 1.0}


@dataclass(frozen=True)
class ModelCase:
    model: str
    hw: tuple[int, int]
    batch: int
    classes: int

    @property
    def name(self) -> str:
        return f"model_{self.model}_b{self.batch}_{self.hw[0]}x{self.hw[1]}"


CANONICAL = [("segnet", (360, 480), 11), ("deconvnet", (224, 224), 21), ("deeplab_largefov", (321, 321), 21),
             ("fcn8s", (375, 500), 21), ("decouplednet", (224, 224), 20)]


def cases(quick: bool = False) -> list[ModelCase]:
    batches = (1,) if quick else (1, 4)
    return [ModelCase(m, hw, b, c) for m, hw, c in CANONICAL for b in batches]


def select(all_cases, filter):  # noqa: A002
    if not filter or filter == "model":
        return list(all_cases)
    return [c for c in all_cases if filter in c.name]


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_((torch.rand(m.num_features, generator=g) - 0.5) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def build_pair(name: str, classes: int, device: str = "cpu"):
    from deconvseg_fast import models as M
    from deconvseg_fast.reference import models as R

    torch.manual_seed(0)
    ours = _randomize_bn(getattr(M, name)(classes)).eval().to(device)
    twin = getattr(R, name)(classes).eval().to(device)
    twin.load_state_dict(ours.state_dict())
    for p in list(ours.parameters()) + list(twin.parameters()):
        p.requires_grad_(False)
    return ours, twin


def _inputs(case: ModelCase, device: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(case.batch, 3, *case.hw, generator=g).to(device)
    if case.model != "decouplednet":
        return (x,)
    classes = torch.zeros(case.batch, case.classes, dtype=torch.bool)
    classes[:, [0, 14]] = True  # two present classes per image: two decoder passes each
    return (x, classes.to(device))


def _first(y):
    return y[0] if isinstance(y, tuple) else y


def run_case(case: ModelCase, device: str, rounds: int, min_run_time: float) -> dict:
    from benchmarks.runner import _time_cpu, _time_cuda

    ours, twin = build_pair(case.model, case.classes, device)
    args = _inputs(case, device)
    with torch.no_grad():
        check = (_first(ours(*args)) - _first(twin(*args))).abs().max().item()

    def fn(m):
        def call():
            with torch.no_grad():
                return m(*args)
        return call

    fns = {"ours": fn(ours), "twin": fn(twin)}
    frozen = None
    if device == "cpu":  # deconvseg_fast.freeze: weights packed once for oneDNN (CPU inference)
        from deconvseg_fast import freeze

        frozen = freeze(copy.deepcopy(ours))
        with torch.no_grad():
            check = max(check, (_first(frozen(*args)) - _first(twin(*args))).abs().max().item())
        fns["frozen"] = fn(frozen)
    times = _time_cuda(fns, rounds < 3) if device == "cuda" else _time_cpu(fns, rounds, min_run_time)
    (o, oi), (t, ti) = times["ours"], times["twin"]
    f, fi = times.get("frozen", (float("nan"), float("nan")))
    return {"case": case.name, "model": case.model, "batch": case.batch, "input": f"{case.hw[0]}x{case.hw[1]}",
            "ours_ms": o, "ours_iqr_ms": oi, "frozen_ms": f, "frozen_iqr_ms": fi, "twin_ms": t, "twin_iqr_ms": ti,
            "speedup": t / o, "frozen_speedup": t / f, "target": TARGETS.get(case.model),
            "check": f"max|d|={check:.2e}"}


# ---- SegNet training-step memory ------------------------------------------------------------------
def _training_step(impl: str, hw=(360, 480), batch: int = 1, device: str = "cpu") -> dict:
    from deconvseg_fast import models as M
    from deconvseg_fast.reference import models as R

    torch.manual_seed(0)
    model = (M.segnet(11) if impl == "ours" else R.segnet(11)).train().to(device)
    x = torch.randn(batch, 3, *hw, device=device)
    target = torch.randint(0, 11, (batch, *hw), device=device)
    saved: dict[int, tuple[int, torch.dtype]] = {}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            # 4-D integer tensors are the switches (the 3-D int64 target of the loss is not one).
            kind = t.dtype if t.dim() == 4 else None
            saved[key] = (t.untyped_storage().nbytes(), kind)
        except (RuntimeError, NotImplementedError):
            pass
        return t

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # Current RSS, not the high-water mark: building the model may have peaked higher than
        # what it keeps, which would hide part of the step's growth.
        with open("/proc/self/statm") as f:
            base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _vm_hwm() - base
    switch = sum(n for n, dt in saved.values() if dt in (torch.uint8, torch.int64, torch.int32))
    return {"impl": impl, "switch_bytes": switch, "saved_bytes": sum(n for n, _ in saved.values()),
            "peak_bytes": peak}


def _vm_hwm() -> int:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: a child started by fork + exec
    inherits the parent's high-water mark there, so a parent that holds large models would make
    both children report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def segnet_memory(device: str = "cpu") -> dict:
    """Run each side's training step in a fresh process (peak RSS is per process) and compare."""
    out = {}
    for impl in ("ours", "twin"):
        if device == "cuda":
            out[impl] = _training_step(impl, device=device)
            torch.cuda.empty_cache()
            continue
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = subprocess.run([sys.executable, "-m", "benchmarks.models", "--memory-child", impl], cwd=root,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {impl} failed:\n{proc.stderr[-2000:]}")
        out[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
    o, t = out["ours"], out["twin"]
    return {"ours": o, "twin": t, "switch_ratio": t["switch_bytes"] / max(1, o["switch_bytes"]),
            "peak_ratio": t["peak_bytes"] / max(1, o["peak_bytes"])}


# ---- output ---------------------------------------------------------------------------------------
def table(rows: list[dict], mem: dict | None, env: dict, markdown: bool = False) -> str:
    from benchmarks.runner import _aligned

    head = (f"deconvseg_fast seed networks, forward ours vs pure-torch twin | {env['device']}: "
            f"{env['device_name']} | threads: {env['threads']} | load {env['load_avg_1m']} | "
            f"torch {env['torch_version']} | commit {env['git_commit']} | {env['timestamp']}")
    headers = ["case", "batch", "input", "ours ms", "IQR", "frozen ms", "IQR  ", "twin ms", "IQR ", "speed-up",
               "frozen speed-up", "target", "check"]
    cells = [[r["case"], str(r["batch"]), r["input"], f"{r['ours_ms']:.1f}", f"{r['ours_iqr_ms']:.1f}",
              f"{r['frozen_ms']:.1f}", f"{r['frozen_iqr_ms']:.1f}",
              f"{r['twin_ms']:.1f}", f"{r['twin_iqr_ms']:.1f}", f"{r['speedup']:.2f}x", f"{r['frozen_speedup']:.2f}x",
              "-" if r["target"] is None else f">= {r['target']:g}x", r["check"]] for r in rows]
    parts = [f"**{head}**" if markdown else head, "",
             _aligned(headers, cells, markdown, set(headers) - {"case", "input", "target", "check"}),
             "", "ours = the model as built (eager); frozen = deconvseg_fast.freeze(model), its convolution weights "
                 "packed once for oneDNN (CPU only); speed-up = twin ms / ours ms, frozen speed-up = twin ms / frozen ms"]
    if mem is not None:
        mb = 2 ** 20
        mh = ["SegNet train step 1x3x360x480", "switch MiB", "saved-for-backward MiB", "peak MiB"]
        mc = [[k, f"{mem[k]['switch_bytes'] / mb:.1f}", f"{mem[k]['saved_bytes'] / mb:.1f}",
               f"{mem[k]['peak_bytes'] / mb:.1f}"] for k in ("ours", "twin")]
        mc.append(["twin / ours", f"{mem['switch_ratio']:.1f}x",
                   f"{mem['twin']['saved_bytes'] / max(1, mem['ours']['saved_bytes']):.2f}x",
                   f"{mem['peak_ratio']:.2f}x"])
        peak_gap = mem["twin"]["peak_bytes"] - mem["ours"]["peak_bytes"]
        parts += ["", _aligned(mh, mc, markdown, set(mh[1:])),
                  "", f"targets: switch memory >= 8x smaller: {'met' if mem['switch_ratio'] >= 8 else 'NOT met'}; "
                      # "lower" means by more than RSS noise (1 MiB), not by a few pages
                      f"peak lower: {'met' if mem['peak_ratio'] > 1 and peak_gap > 2**20 else 'NOT met'}"]
    return "\n".join(parts)


def run_models(device: str = "cpu", quick: bool = False, csv_path: str | None = None, filter: str | None = None,  # noqa: A002
               *, markdown: bool = False, stream=None, progress=None) -> list[dict]:
    from benchmarks.runner import BenchmarkConfigError, append_csv, environment

    stream = sys.stdout if stream is None else stream
    progress = sys.stderr if progress is None else progress
    selected = select(cases(quick), filter)
    want_memory = not filter or filter == "model" or "memory" in filter or "model_segnet" in filter
    if not selected and not want_memory:
        raise BenchmarkConfigError(f"filter: no model case contains {filter!r}; cases are: "
                                   f"{', '.join(c.name for c in cases(quick))}, model_memory")
    env = environment(device)
    rounds, min_run_time = (1, 0.0) if quick else (2, 0.5)
    rows = []
    t0 = time.perf_counter()
    for i, case in enumerate(selected, 1):
        print(f"[model {i}/{len(selected)}] {case.name}", file=progress, flush=True)
        rows.append({**env, "quick": quick, **run_case(case, device, rounds, min_run_time)})
    mem = None
    if want_memory:
        print("[model] segnet training-step memory", file=progress, flush=True)
        mem = segnet_memory(device)
    print(table(rows, mem, env, markdown), file=stream)
    print(f"\n{len(rows)} model cases in {time.perf_counter() - t0:.1f} s", file=stream)
    if csv_path and rows:
        append_csv(rows, csv_path, MODEL_CSV_COLUMNS)
        print(f"appended {len(rows)} rows to {csv_path}", file=stream)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--filter", default=None)
    p.add_argument("--csv", default=None)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--memory-child", default=None, choices=("ours", "twin"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.memory_child:
        print(json.dumps(_training_step(a.memory_child)))
        return 0
    run_models(a.device, a.quick, a.csv, a.filter, markdown=a.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
