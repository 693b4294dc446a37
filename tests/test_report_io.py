"""Report.from_json / load / to_markdown / plot."""
import sys

import pytest
import torch
from torch import nn

import structfx
from structfx.report import LayerDecision, Report


def _report():
    return Report(layers=[
        LayerDecision("a.fc1", (64, 32), 8, 0.03, "blast", "b=2 r=8", 1000, 2048, 0.4, 0.3,
                      1.5, None),
        LayerDecision("a.fc2", (32, 64), 8, 0.03, "dense", "", 2048, 2048, skip="excluded"),
    ], device="cpu", model_params_before=5000, model_params_after=3000, dense_flops=100,
        structured_flops=60, predicted_speedup=1.2, model_output_error=0.25,
        notes=["a note"], output="graph")


def test_json_round_trip(tmp_path):
    r = _report()
    again = Report.from_json(r.to_json())
    assert again.to_dict() == r.to_dict() and str(again) == str(r)
    assert again.layers[0].shape == (64, 32) and again.output == "graph"
    r.save(tmp_path)
    assert Report.load(tmp_path).to_dict() == r.to_dict()
    md = (tmp_path / "report.md").read_text()
    assert "| a.fc1" in md and "a note" in md


def test_from_json_rejects_non_reports(tmp_path):
    with pytest.raises(ValueError, match="'layers' list"):
        Report.from_dict({"layers": 3})
    with pytest.raises(ValueError, match="layer 0"):
        Report.from_dict({"layers": [{"name": "x"}]})
    (tmp_path / "report.json").write_text("{oops")
    with pytest.raises(ValueError, match="invalid JSON"):
        Report.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        Report.load(tmp_path / "none")


def test_plot_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib")
    path = _report().plot(tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = _report().plot(tmp_path / "r.svg")
    text = svg.read_text()
    assert "<svg" in text and "a.fc1" in text


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"structfx\[plot\]"):
        _report().plot(tmp_path / "r.png")


def test_compress_report_records_the_output_kind():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    cfg = structfx.Config(min_params=0, force=True, blocks=(2,), rank_fractions=(0.5,),
                          steps=3, estimate_steps=1, progress=False)
    small = structfx.compress(model, torch.randn(4, 32), cfg)
    assert small.structfx_report.output == "model"
    assert Report.from_json(small.structfx_report.to_json()).output == "model"
