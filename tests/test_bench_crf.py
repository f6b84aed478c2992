"""The CRF half of `deconvseg-fast bench` (benchmarks/crf.py via benchmarks/runner.py), quick shapes."""
import csv
import math

import pytest

from deconvseg_fast.cli import main, _load_bench_runner

runner = _load_bench_runner()
crf = runner.crf


def _crf_table_header(out: str) -> list[str]:
    lines = [ln for ln in out.splitlines() if ln.startswith("case ")]
    assert lines, f"no CRF table header in output:\n{out}"
    return lines[0].split()


def test_bench_filter_crf_runs_only_the_crf(tmp_path, capsys):
    pytest.importorskip("pydensecrf.densecrf")
    csv_path, png_path = tmp_path / "results.csv", tmp_path / "bench.png"
    assert main(["bench", "--quick", "--filter", "crf voc", "--csv", str(csv_path),
                 "--plot", str(png_path)]) == 0
    out = capsys.readouterr().out
    assert "deconvseg_fast pooling benchmark" not in out  # no pooling case matched the filter
    assert "dense CRF benchmark vs pydensecrf2" in out and "targets:" in out
    assert not csv_path.exists() and not png_path.exists()
    crf_csv, crf_png = tmp_path / "results_crf.csv", tmp_path / "bench_crf.png"
    with crf_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    expected = [c for c in crf.cases(quick=True) if "crf voc" in c.name]
    assert [r["case"] for r in rows] == [c.name for c in expected]
    for r in rows:
        assert r["check"].startswith("MAP 100.00%"), r
        for k in ("ours_build_ms", "ours_total_ms", "ref_build_ms", "ref_iter_ms", "ref_total_ms",
                  "speedup"):
            assert float(r[k]) > 0, (k, r)
        # functional's per-iteration time is a difference of two timings; on a busy machine it
        # may be lost in the noise (empty). The compat path times its iterations directly.
        if r["impl"] == "compat" or r["ours_iter_ms"]:
            per_iter = float(r["ours_iter_ms"])
            assert per_iter > 0
            # End to end = build + iterations of the same runs (medians taken separately).
            assert math.isclose(float(r["ours_total_ms"]),
                                float(r["ours_build_ms"]) + int(r["iterations"]) * per_iter,
                                rel_tol=0.5)
    assert crf_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_crf_rows_without_pydensecrf(monkeypatch, capsys):
    """No pydensecrf: the rows say so, ours is still timed, nothing crashes."""
    monkeypatch.setattr(crf, "pydensecrf_status",
                        lambda: (None, "pydensecrf not importable (ImportError: test); "
                                       "pip install pydensecrf2"))
    rows = runner.run_crf(quick=True, filter="crf scale-labels", csv_path=None, png_path=None)
    out = capsys.readouterr()
    assert rows and all(r["ref_total_ms"] is None and r["speedup"] is None for r in rows)
    assert all("pydensecrf not importable" in r["check"] for r in rows)
    assert all(r["ours_total_ms"] > 0 for r in rows)
    assert "n/a" in out.out and "pydensecrf not importable" in out.err


def test_linear_fit():
    f = crf.linear_fit([1, 2, 3, 4], [3, 5, 7, 9])
    assert f["a"] == pytest.approx(1) and f["b"] == pytest.approx(2) and f["r2"] == pytest.approx(1)
    assert crf.linear_fit([1, 2, 3], [1, 3, 2])["r2"] < 0.5


def test_case_names_are_filterable():
    full = crf.cases(quick=False, sweeps=True)
    names = [c.name for c in full]
    assert len(names) == len(set(names))
    assert all(n.startswith("crf ") for n in names)
    assert crf.select(full, "CRF VOC 500x375") == [c for c in full if c.kind == "voc"]
    assert {c.kind for c in full} == {"voc", "batch4", "scale-px", "scale-labels", "threads"}
    # Without --sweeps the default run keeps to the headline rows.
    assert {c.kind for c in crf.cases(quick=False)} == {"voc", "batch4"}
    mp = [c.pixels / 1e6 for c in full if c.kind == "scale-px"]
    assert min(mp) == pytest.approx(0.1, rel=0.01) and max(mp) == pytest.approx(2.0, rel=0.01)
    labels = [c.labels for c in full if c.kind == "scale-labels"]
    assert min(labels) == 2 and max(labels) == 60
