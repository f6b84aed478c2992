"""The video half of `deconvseg-fast bench --filter video` (benchmarks/video.py via benchmarks/runner.py),
on the quick clip."""
import csv
import re

import pytest

from deconvseg_fast.cli import _load_bench_runner, main

runner = _load_bench_runner()
from benchmarks import video  # noqa: E402 - after _load_bench_runner put the checkout on sys.path


def test_bench_filter_video_runs_only_video(tmp_path, capsys):
    pytest.importorskip("pydensecrf.densecrf")
    csv_path, png_path = tmp_path / "results.csv", tmp_path / "bench.png"
    assert main(["bench", "--quick", "--filter", "video", "--csv", str(csv_path), "--plot", str(png_path)]) == 0
    out = capsys.readouterr().out
    assert "video pipeline vs torch + pydensecrf2" in out and "targets:" in out
    assert "pooling benchmark" not in out and "dense CRF benchmark" not in out
    assert not csv_path.exists() and not png_path.exists()
    with (tmp_path / "results_video.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == [c.name for c in video.cases(quick=True)]
    for r in rows:
        assert int(r["frames"]) == video.QUICK["frames"], r
        assert float(r["fps"]) > 0 and float(r["wall_s"]) > 0, r
        assert 0 <= float(r["io_pct"]) <= 100, r
        assert float(r["speedup"]) > 0, r
    ours_crf = next(r for r in rows if r["impl"] == "ours" and r["crf"] == "frame")
    # The same CRF model and the same weights: the labels agree with torch + pydensecrf's (the few
    # pixels allowed to differ are near-ties flipped by float rounding in the model's two builds).
    agree = float(re.match(r"([\d.]+)% = ref crf labels", ours_crf["check"]).group(1))
    assert agree >= 99.0, ours_crf["check"]
    assert float(ours_crf["target"]) == video.TARGET_SPEEDUP
    assert float(ours_crf["crf_ms"]) > 0 and int(ours_crf["crf_iterations"]) == video.CRF_ITERATIONS


def test_select_keeps_both_rows_of_the_ratio():
    all_cases = video.cases(quick=True)
    assert video.select(all_cases, "video") == all_cases
    picked = video.select(all_cases, "video ours crf")
    assert {(c.impl, c.crf) for c in picked} == {("ours", "frame"), ("reference", "frame")}
    assert [c.crf for c in video.select(all_cases, "nocrf")] == ["none"]


def test_unknown_video_filter_names_filter():
    with pytest.raises(runner.BenchmarkConfigError, match="filter: no video case contains 'video nothing'"):
        runner.run(quick=True, filter="video nothing", csv_path=None, png_path=None)
