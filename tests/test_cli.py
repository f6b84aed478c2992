"""The `deconvseg-fast bench` command end to end (quick shapes), and its usage errors."""
import csv
import re

import pytest
import torch

from deconvseg_fast.cli import main

# The printed table's columns, in order. Written out (not imported from the runner) so that a
# change to the runner's table has to be made here too, on purpose.
EXPECTED_COLUMNS = [
    "op", "shape", "format", "memory format", "ours ms", "ours IQR", "torch ms", "speed-up",
    "ours GB/s", "% copy BW", "H100 roofline ms", "switch MB ours", "switch MB torch", "check",
]
QUICK_CASES = 20  # benchmarks/pooling.py: 12 NCHW + 6 channels_last + 2 DeepLab


def _table_header(out: str) -> list[str]:
    lines = [ln for ln in out.splitlines() if ln.startswith("op ")]
    assert lines, f"no table header line in output:\n{out}"
    return re.split(r"\s{2,}", lines[0].strip())


def test_bench_quick_writes_table_csv_and_png(tmp_path, capsys):
    csv_path, png_path = tmp_path / "res" / "results.csv", tmp_path / "res" / "bench.png"
    assert main(["bench", "--quick", "--csv", str(csv_path), "--plot", str(png_path)]) == 0
    out = capsys.readouterr().out

    assert _table_header(out) == EXPECTED_COLUMNS
    assert f"threads: {torch.get_num_threads()}" in out and f"torch {torch.__version__}" in out
    # The compact-switch memory table: exact byte counts for the 4x64x360x480 2x2 pool.
    assert "88,473,600" in out and "11,059,200" in out and "2,764,800" in out

    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == QUICK_CASES
    for r in rows:
        # Both sides computed the same outputs before they were timed.
        assert r["check"] in ("exact", "close"), r
        assert float(r["ours_ms"]) > 0 and float(r["torch_ms"]) > 0 and float(r["copy_ms"]) > 0
        assert r["threads"] == str(torch.get_num_threads())
    assert {r["index_format"] for r in rows} == {"flat", "window", "packed"}
    assert {r["memory_format"] for r in rows} == {"contiguous", "channels_last"}
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run appends to the same CSV under the one header.
    assert main(["bench", "--quick", "--csv", str(csv_path), "--plot", str(png_path),
                 "--filter", "max_pool2d[packed] 2x16x36x48 k2x2 s2 CL", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| op " in out and "|---" in out
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == QUICK_CASES + 1
    assert rows[-1]["memory_format"] == "channels_last" and rows[-1]["index_format"] == "packed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_cuda_without_cuda_exits_2(tmp_path, capsys):
    csv_path = tmp_path / "results.csv"
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--device", "cuda", "--quick", "--csv", str(csv_path),
              "--plot", str(tmp_path / "b.png")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--device cuda" in err and "torch.cuda.is_available() is False" in err
    assert not csv_path.exists()


def test_bench_filter_matching_nothing_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--quick", "--filter", "no-such-case", "--csv", str(tmp_path / "r.csv"),
              "--plot", str(tmp_path / "b.png")])
    assert exc.value.code == 2
    assert "filter" in capsys.readouterr().err


def test_bench_rejects_unknown_device(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--device", "tpu"])
    assert exc.value.code == 2
    assert "--device" in capsys.readouterr().err
