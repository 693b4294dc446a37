"""``python -m structfx.bench compress``: the numbers it reports are the run's own (no timing
is asserted, only what the run did)."""
import json

import pytest

from structfx import bench_compress as bc


def test_quick_mlp_case_reports_its_own_work():
    r = bc.run_case("mlp", quick=True)
    assert r["seconds"] > 0 and r["model_bytes"] == 4 * (2 * 128 * 512 + 128 * 128 + 512 + 2 * 128)
    assert r["peak_rss"] >= r["rss_before"] > 0
    assert r["compress_peak_extra"] is None or r["compress_peak_extra"] >= 0
    # one estimate per layer offered a candidate (which ones the cost model predicts faster
    # than dense depends on this machine), a factorization per replaced layer
    assert r["layers"] == 3
    assert r["replaced"] <= r["estimations"] <= r["layers"]
    assert r["factorizations"] == r["replaced"]
    for e in r["estimates"]:     # data-free: the estimate is the weight error select priced
        assert e["relative"] == pytest.approx(e["estimate"] / e["final"] - 1)


def test_table_shows_failures_and_ratios():
    ok = {"case": "mlp", "seconds": 2.0, "peak_rss": 400, "model_bytes": 100, "rss_before": 300,
          "compress_peak_extra": 100, "estimations": 3, "factorizations": 2, "replaced": 2,
          "layers": 3, "estimates": [{"relative": 0.05}, {"relative": 0.2}]}
    text = bc.table([ok, {"case": "llama", "error": "MemoryError"}])
    row = [c.strip() for c in text.splitlines()[2].strip("|").split("|")]
    assert row == ["mlp", "2.0", "4.00", "1.00", "3 / 2", "2 of 3", "1 of 2"]
    assert "failed" in text and "MemoryError" in text


def test_unknown_case_is_named():
    with pytest.raises(ValueError, match="unknown case 'gpt5'"):
        bc._case("gpt5", quick=True)
