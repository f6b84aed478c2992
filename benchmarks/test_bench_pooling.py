"""pytest-benchmark versions of the pooling cases in benchmarks/pooling.py.

Not part of the test suite (tests/ is); run explicitly, e.g.

    pytest benchmarks/test_bench_pooling.py --benchmark-only --benchmark-group-by=group
    DECONVSEG_BENCH_QUICK=1 pytest benchmarks/test_bench_pooling.py -k "max_unpool2d"

Ours and torch's op are separate benchmarks in one group per case, so pytest-benchmark's table
puts them side by side. The runner (`deconvseg-fast bench`) adds the copy-bandwidth reference,
the roofline and the plot; use it for the numbers that go into BENCHMARKS.md.
"""
import functools
import os

import pytest
import torch

from benchmarks.pooling import cases

pytest.importorskip("pytest_benchmark")

QUICK = os.environ.get("DECONVSEG_BENCH_QUICK") == "1"
DEVICE = os.environ.get("DECONVSEG_BENCH_DEVICE", "cpu")
CASES = cases(quick=QUICK)

# (case, impl) pairs with impl varying fastest, so both sides of a case run back to back and a
# one-entry cache holds only the current case's inputs (the full-size cases are ~0.5 GB each).
PARAMS = [pytest.param(c, impl, id=f"{c.name}-{impl}") for c in CASES for impl in ("ours", "torch")]


@functools.lru_cache(maxsize=1)
def _built(case):
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("DECONVSEG_BENCH_DEVICE=cuda but torch.cuda.is_available() is False")
    return case.build(DEVICE)


def _synced(fn):
    if DEVICE != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()  # time the kernel, not the launch
        return out
    return run


@pytest.mark.parametrize("case,impl", PARAMS)
def test_pooling(benchmark, case, impl):
    built = _built(case)
    benchmark.group = case.name
    benchmark.extra_info.update(
        op=case.op, index_format=case.index_format, memory_format=case.memory_format,
        shape="x".join(map(str, case.shape)), bytes_moved=built.bytes_moved, flops=built.flops,
        switch_bytes=case.switch_bytes() if impl == "ours" else case.torch_switch_bytes(),
        threads=torch.get_num_threads())
    fn = _synced(built.ours_fn if impl == "ours" else built.torch_fn)
    fn()  # warm-up outside the timing (allocator, first-touch pages)
    benchmark(fn)
