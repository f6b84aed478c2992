"""The Triton paste_aggregate kernel (deconvseg_fast.kernels.proposals) against the oracle.

Without a GPU it runs under the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is first imported; see tests/test_triton_pooling.py). The
launcher is called through deconvseg_fast.ops.proposals.triton_forward, the function registered
for "cuda", so the host-side tables and value checks are exercised too.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import deconvseg_fast.kernels.proposals as tk  # noqa: E402
from deconvseg_fast.ops import proposals as prop_ops  # noqa: E402
from deconvseg_fast.reference import proposals as ref  # noqa: E402

from test_proposals import BOXES, DTYPES, OUT, TOL, make_case  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not (
        isinstance(tl.sum, InterpretedFunction) and isinstance(tk._paste_aggregate_kernel, InterpretedFunction)):
    raise ImportError("triton was imported before TRITON_INTERPRET=1 was set; see tests/conftest.py")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ops = torch.ops.deconvseg


def _run(s, b, ii, size, mode, fill):
    return prop_ops.triton_forward(s.to(DEVICE), b.to(DEVICE), ii.to(DEVICE), list(size), mode, fill)


@pytest.mark.parametrize("mode", ["max", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_oracle(mode, dtype):
    s, b, ii = make_case(dtype, "strided" if dtype == torch.float32 else "contiguous")
    fill = -5.0 if mode == "max" else 0.0
    out, winner = _run(s, b, ii, OUT, mode, fill)
    want, want_winner = ref.paste_aggregate(s, b, ii, OUT, mode, fill, return_winner=True)
    assert out.dtype == dtype and out.shape == (4, 3, 9, 12)
    torch.testing.assert_close(out.cpu(), want, **TOL[dtype])
    if mode == "max":
        assert winner.dtype == torch.int32
        if dtype == torch.float64:
            assert torch.equal(winner.cpu().long(), want_winner)
    else:
        assert winner.shape == (0,)


@pytest.mark.parametrize("mode", ["max", "sum"])
def test_several_tiles_match_the_cpu_kernel(mode):
    # 2 x 2 tiles of 8 x 64 per plane, boxes crossing tile borders, ties from a duplicated map.
    boxes = BOXES + [(50.0, -3.0, 90.0, 12.5, 1), (60.5, 7.5, 61.5, 8.5, 1)]
    s, b, ii = make_case(torch.float64, C=2, boxes=boxes)
    b[2] = torch.tensor([6.2, 4.9, 70.0, 13.1])
    s[9] = s[0]
    size = (3, 11, 70)
    out, winner = _run(s, b, ii, size, mode, 0.0)
    want, want_winner = ops.paste_aggregate(s, b, ii, list(size), mode, 0.0)
    torch.testing.assert_close(out.cpu(), want, atol=1e-12, rtol=1e-12)
    assert torch.equal(winner.cpu(), want_winner)


def test_empty_and_unused_images():
    s, b, ii = torch.zeros(0, 2, 3, 3), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    out, _ = _run(s, b, ii, (2, 4, 5), "max", float("-inf"))
    assert out.shape == (2, 2, 4, 5) and torch.isneginf(out).all()
    out, _ = _run(s, b, ii, (0, 4, 5), "sum", 0.0)
    assert out.shape == (0, 2, 4, 5)


@pytest.mark.parametrize("boxes,index,match", [
    ([[0.0, 0.0, float("nan"), 3.0]], [0], "boxes must be finite"),
    ([[0.0, 0.0, 3e7, 3.0]], [0], "boxes must have coordinates within"),
    ([[0.0, 0.0, 2.0, 3.0]], [2], r"image_index must be in \[0, 2\)"),
])
def test_bad_values_raise(boxes, index, match):
    with pytest.raises(ValueError, match=match):
        _run(torch.zeros(1, 2, 3, 3), torch.tensor(boxes), torch.tensor(index), (2, 5, 6), "max", 0.0)
