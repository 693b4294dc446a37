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
    # quick runs force: every layer is offered candidates (one estimate each, whatever this
    # CPU's measured profile says), a factorization per replaced layer
    assert r["layers"] == 3 and r["estimations"] == 3
    assert 1 <= r["replaced"] <= r["estimations"]
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


def test_ranks_run_the_case_under_torch_distributed(tmp_path, capsys):
    """``--ranks 2``: the case runs on 2 gloo processes (torch.distributed.run) that split the
    layers; the work is summed over them."""
    import argparse

    parser = argparse.ArgumentParser()
    bc.add_parser(parser.add_subparsers())
    out = tmp_path / "r.json"
    args = parser.parse_args(["compress", "--cases", "mlp", "--quick", "--ranks", "2",
                              "--json", str(out)])
    (r,) = args.func(args)
    assert "error" not in r, r
    assert r["ranks"] == 2 and r["case"] == "mlp, 2 ranks" and r["layers"] == 3
    # the ranks split the work: together they estimate what one process does (quick forces:
    # every layer once) and factorize each replaced layer once
    assert r["estimations"] == 3 and 1 <= r["factorizations"] == r["replaced"] <= 3
    assert json.loads(out.read_text())[0]["ranks"] == 2
    assert "mlp, 2 ranks" in capsys.readouterr().out


def test_quick_data_aware_llama_case_with_a_statistics_budget():
    r = bc.run_case("llama-aware", quick=True, calib_memory=1)
    assert r["case"] == "llama-aware (calib_memory 9.53674e-07 MiB)"
    assert r["layers"] == 8 and r["factorizations"] == r["replaced"] >= 1
    for e in r["estimates"]:     # data-aware low rank: the estimate is the final (exact)
        assert e["relative"] == pytest.approx(0.0, abs=1e-6)
