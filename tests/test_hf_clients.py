"""The model ``structfx.compress`` returns, used by the real Hugging Face clients: PEFT (LoRA on
the dense layers structfx kept and, through ``structfx.lora``, on its BlastLinear / SS1Linear;
training, ``.generate()``, merging, adapter save / load) and ``transformers.Trainer`` (training
the structured factors, saving, reloading). Tiny random GPT-2 / Llama configs, offline.

The PEFT tests need ``peft``, the Trainer tests ``accelerate`` (``pip install -e
".[test,clients]"``); without them those tests skip. ``BlastLinear.add_low_rank_`` (how an
adapter merges into a BLAST layer) is checked here without either. sentence-transformers is
covered by ``tests/test_cli.py`` (the real MiniLM through the CLI, reloaded into
``SentenceTransformer``).
"""
import copy
import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import structfx

transformers = pytest.importorskip("transformers")

from conftest import generating_gpt2 as gpt2, generating_llama as llama  # noqa: E402

CFG = structfx.Config(params=0.5, min_params=0, force=True, blocks=(2,), rank_fractions=(0.5,),
                      compressions=(2,), steps=5, estimate_steps=1, progress=False)


# The attention projections stay dense, the MLP becomes BLAST: LoRA targets one of each.
ARCH = {
    "gpt2": dict(build=gpt2, dense="c_attn", structured="c_fc", exclude=["*.attn.*"]),
    "llama": dict(build=llama, dense="q_proj", structured="up_proj", exclude=["*.self_attn.*"]),
}
STRUCTURED = (structfx.BlastLinear, structfx.SS1Linear)


def _ids(seed=1, shape=(2, 12)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, shape, generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _is_lora(module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def _dense_weight(module) -> torch.Tensor:
    """The ``(out, in)`` weight a linear-like module applies (HF Conv1D stores it ``(in, out)``)."""
    if isinstance(module, STRUCTURED):
        return module.to_dense()
    if type(module).__name__ == "Conv1D":
        return module.weight.t()
    return module.weight


def _delta(lora_layer, adapter="default") -> torch.Tensor:
    """``scale * B @ A`` from the adapter's own matrices (not PEFT's get_delta_weight)."""
    A = lora_layer.lora_A[adapter].weight
    B = lora_layer.lora_B[adapter].weight
    return lora_layer.scaling[adapter] * (B @ A)


def _dense_reference(original, peft_model):
    """Independent reference: the dense ``original`` model with every linear layer's weight set
    to what the PEFT-wrapped compressed model applies there (structured layer as a dense
    matrix, plus the LoRA update where there is one), bias copied."""
    ref = copy.deepcopy(original)
    inner = peft_model.get_base_model()
    with torch.no_grad():
        for path, mod in inner.named_modules():
            if _is_lora(mod):
                base, W = mod.base_layer, None
                W = _dense_weight(base) + _delta(mod)
            elif isinstance(mod, STRUCTURED) and not any(
                    path.startswith(p + ".") for p, m in inner.named_modules() if _is_lora(m)):
                base, W = mod, mod.to_dense()
            else:
                continue
            dense = ref.get_submodule(path)
            dense.weight.copy_(W.t() if type(dense).__name__ == "Conv1D" else W)
            if base.bias is not None:
                dense.bias.copy_(base.bias)
    return ref


def _randomize_lora_B(peft_model, seed=3):
    """PEFT starts B at zero (the adapter adds nothing); give it values so it shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in peft_model.modules():
            if _is_lora(mod):
                B = mod.lora_B["default"].weight
                B.copy_(0.05 * torch.randn(B.shape, generator=g))


# ----------------------------------------------------------------------------- add_low_rank_
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 24), n=st.integers(1, 24), b1=st.integers(1, 4), b2=st.integers(1, 4),
       rank=st.integers(1, 4), k=st.integers(1, 3), scale=st.floats(-2, 2), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_add_low_rank_is_exact_and_truncate_undoes_it(m, n, b1, b2, rank, k, scale, bias, seed):
    """W + scale * B @ A held exactly as BLAST of rank + k, sizes that don't divide by the
    blocks included; checked against the dense matrices and a plain F.linear."""
    b1, b2 = min(b1, m), min(b2, n)
    torch.manual_seed(seed)
    layer = structfx.BlastLinear(n, m, (b1, b2), rank, bias=bias, dtype=torch.float64)
    layer.S.requires_grad_(False)  # requires_grad is kept per factor
    W0 = layer.to_dense().detach().clone()
    U0, S0, V0 = (t.detach().clone() for t in (layer.U, layer.S, layer.V))
    B, A = torch.randn(m, k, dtype=torch.float64), torch.randn(k, n, dtype=torch.float64)
    layer.add_low_rank_(B, A, scale)
    assert layer.rank == rank + k and layer.U.shape[-1] == layer.S.shape[-1] == rank + k
    assert layer.U.requires_grad and not layer.S.requires_grad and layer.V.requires_grad
    want = W0 + scale * (B @ A)
    torch.testing.assert_close(layer.to_dense().detach(), want, rtol=1e-10, atol=1e-10)
    x = torch.randn(3, n, dtype=torch.float64)
    ref = torch.nn.functional.linear(x, want, None if layer.bias is None else layer.bias)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, rtol=1e-9, atol=1e-9)
    layer.truncate_rank_(rank)
    assert layer.rank == rank
    for a, b in ((layer.U, U0), (layer.S, S0), (layer.V, V0)):
        assert torch.equal(a.detach(), b)


def test_add_low_rank_rejects_wrong_shapes():
    layer = structfx.BlastLinear(8, 6, 2, 2)
    with pytest.raises(ValueError, match=r"B \(out_features=6, k\).*got B \(8, 1\)"):
        layer.add_low_rank_(torch.randn(8, 1), torch.randn(1, 8))
    with pytest.raises(ValueError, match="rank must be in 1..2"):
        layer.truncate_rank_(3)


# ----------------------------------------------------------------------------- PEFT
@pytest.fixture(scope="module", params=sorted(ARCH))
def compressed(request):
    pytest.importorskip("peft")
    arch = ARCH[request.param]
    model = arch["build"]()
    ids = _ids(0)
    small = structfx.compress(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                              CFG.replace(exclude=arch["exclude"]))
    return request.param, model, small


def _lora(small, targets, register=True, **kw):
    """A PEFT LoRA model on a copy of ``small`` (get_peft_model changes the model it wraps)."""
    import peft

    import structfx.lora

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw)
    if register:
        config = structfx.lora.register(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: fan_in_fan_out set for GPT-2's Conv1D, etc.
        return peft.get_peft_model(copy.deepcopy(small), config)


def _paths(model, pred):
    return {p for p, m in model.named_modules() if pred(m)}


def test_lora_on_kept_and_structured_layers(compressed):
    name, model, small = compressed
    arch = ARCH[name]
    dense_paths = _paths(small, lambda m: not isinstance(m, STRUCTURED)
                         and m.__class__.__name__ in ("Linear", "Conv1D"))
    blast_paths = _paths(small, lambda m: isinstance(m, structfx.BlastLinear))
    assert blast_paths and dense_paths
    pm = _lora(small, [arch["dense"], arch["structured"]])
    wrapped = {p.removeprefix("base_model.model."): m for p, m in pm.named_modules()
               if _is_lora(m)}
    want = {p for p in dense_paths | blast_paths
            if p.endswith("." + arch["dense"]) or p.endswith("." + arch["structured"])}
    assert set(wrapped) == want and len(want) == 4
    for path, mod in wrapped.items():
        base = mod.base_layer
        assert type(base) is type(small.get_submodule(path))
        assert isinstance(base, structfx.BlastLinear) == path.endswith(arch["structured"])
    ids = _ids()
    # B starts at zero: the adapter adds nothing, greedy decoding is the compressed model's
    assert torch.equal(_logits(pm, ids), _logits(small, ids))
    g0 = small.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    assert torch.equal(pm.generate(input_ids=ids[:1, :4], max_new_tokens=6, do_sample=False), g0)
    # with a nonzero update it is the dense reference with W + scale * B @ A at every target
    _randomize_lora_B(pm)
    ref = _dense_reference(model, pm)
    got = _logits(pm, ids)
    assert not torch.allclose(got, _logits(small, ids), atol=1e-3)
    torch.testing.assert_close(got, _logits(ref, ids), rtol=1e-4, atol=1e-4)
    assert pm.generate(input_ids=ids[:1, :4], max_new_tokens=6, do_sample=False).shape == (1, 10)


def test_one_optimizer_step_changes_only_the_lora_weights(compressed):
    name, model, small = compressed
    arch = ARCH[name]
    pm = _lora(small, [arch["dense"], arch["structured"]])
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # the structured factors are frozen like the dense weights
    assert any(n.endswith(".base_layer.U") for n, _ in pm.named_parameters())
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(5, (4, 12))
    loss = pm(input_ids=ids, labels=ids).loss
    assert math.isfinite(loss.item())
    loss.backward()
    opt.step()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= trainable
    # every adapter's B moved, on the structured layers as on the dense ones
    for path, mod in pm.named_modules():
        if _is_lora(mod):
            assert f"{path}.lora_B.default.weight" in changed, path


def test_merge_and_unload_gives_the_compressed_structure(compressed, tmp_path):
    name, model, small = compressed
    arch = ARCH[name]
    pm = _lora(small, [arch["dense"], arch["structured"]])
    _randomize_lora_B(pm)
    ids = _ids()
    want = _logits(pm, ids)
    deltas = {p.removeprefix("base_model.model."): (_dense_weight(m.base_layer).detach().clone(),
                                                    _delta(m).detach().clone())
              for p, m in pm.named_modules() if _is_lora(m)}
    merged = pm.merge_and_unload()
    assert type(merged) is type(small)
    assert [type(m) for m in merged.modules()] == [type(m) for m in small.modules()]
    for path, (W, delta) in deltas.items():
        mod = merged.get_submodule(path)
        if isinstance(mod, structfx.BlastLinear):  # the adapter joined the factors: rank + r
            assert mod.rank == small.get_submodule(path).rank + 4
        torch.testing.assert_close(_dense_weight(mod).detach(), W + delta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_logits(merged, ids), want, rtol=1e-4, atol=1e-4)
    # the merged model is a compressed model like any other: structfx.save / load round trip
    structfx.save(merged, tmp_path)
    again = structfx.from_pretrained(type(small), tmp_path)
    assert torch.equal(_logits(again, ids), _logits(merged, ids))
    for path in deltas:
        if isinstance(merged.get_submodule(path), structfx.BlastLinear):
            assert again.get_submodule(path).rank == merged.get_submodule(path).rank


def test_adapter_save_and_load(compressed, tmp_path):
    import peft

    import structfx.lora

    name, model, small = compressed
    arch = ARCH[name]
    pm = _lora(small, [arch["dense"], arch["structured"]])
    _randomize_lora_B(pm)
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    config = structfx.lora.register(peft.LoraConfig.from_pretrained(str(tmp_path)))
    again = peft.PeftModel.from_pretrained(copy.deepcopy(small), str(tmp_path), config=config)
    ids = _ids()
    assert torch.equal(_logits(again, ids), _logits(pm, ids))


def test_structured_target_without_register_is_a_clear_error(compressed):
    name, model, small = compressed
    with pytest.raises(ValueError, match=r"BlastLinear\(.*\) is not supported"):
        _lora(small, [ARCH[name]["structured"]], register=False)


def test_all_linear_adapts_the_kept_dense_layers(compressed):
    """PEFT's 'all-linear' picks nn.Linear / Conv1D (not the output head): the structured
    layers are left out and nothing fails."""
    name, model, small = compressed
    pm = _lora(small, "all-linear")
    wrapped = {p.removeprefix("base_model.model.") for p, m in pm.named_modules() if _is_lora(m)}
    dense = _paths(small, lambda m: not isinstance(m, STRUCTURED)
                   and m.__class__.__name__ in ("Linear", "Conv1D"))
    assert wrapped == dense - {"lm_head"} and wrapped
    assert not any(isinstance(m.base_layer, STRUCTURED) for m in pm.modules() if _is_lora(m))


@pytest.mark.parametrize("kw, msg", [
    (dict(use_dora=True), r"layer '.*{}' \(BlastLinear\): only plain LoRA"),
    (dict(init_lora_weights="pissa"), r"layer '.*{}' \(BlastLinear\): "
                                      r"init_lora_weights='pissa' reads the dense base weight"),
])
def test_lora_variants_on_structured_layers_are_clear_errors(compressed, kw, msg):
    name, model, small = compressed
    target = ARCH[name]["structured"]
    with pytest.raises(ValueError, match=msg.format(target)):
        _lora(small, [target], **kw)
    # the same check for a second adapter added to an already wrapped layer
    import peft

    import structfx.lora

    pm = _lora(small, [target])
    config = structfx.lora.register(peft.LoraConfig(r=2, target_modules=[target], **kw))
    with pytest.raises(ValueError, match=msg.format(target)):
        pm.add_adapter("second", config)


def test_ss1_layers_take_lora_but_refuse_to_merge():
    pytest.importorskip("peft")
    model = llama()
    ids = _ids(0)
    small = structfx.compress(model, {"input_ids": ids},
                              CFG.replace(structure="ss1", include=["*.mlp.up_proj"]))
    ss1 = _paths(small, lambda m: isinstance(m, structfx.SS1Linear))
    assert ss1 == {"model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"}
    pm = _lora(small, ["q_proj", "up_proj"])
    _randomize_lora_B(pm)
    x = _ids()
    want = _logits(pm, x)
    torch.testing.assert_close(want, _logits(_dense_reference(model, pm), x), rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(ValueError, match=r"can't merge adapter 'default' into layer "
                                         r"'model.layers.0.mlp.up_proj' \(SS1Linear\)"):
        pm.merge_and_unload()
    # a failed merge leaves the function as it was (layers merged so far are exact)
    torch.testing.assert_close(_logits(pm, x), want, rtol=1e-5, atol=1e-5)
    plain = pm.unload()  # dropping the adapters gives the compressed model back
    assert _paths(plain, lambda m: isinstance(m, structfx.SS1Linear)) == ss1


# ----------------------------------------------------------------------------- HF Trainer
def _lm_dataset(n=8, length=12, seed=7):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, 128, (length,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return rows


def test_trainer_trains_the_factors_and_the_result_reloads(tmp_path):
    pytest.importorskip("accelerate")
    model = gpt2()
    ids = _ids(0)
    small = structfx.compress(model, {"input_ids": ids}, CFG)
    blast = {p: m for p, m in small.named_modules() if isinstance(m, structfx.BlastLinear)}
    assert len(blast) == 8
    before = {k: v.clone() for k, v in small.state_dict().items()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
        learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    trainer = transformers.Trainer(model=small, args=args, train_dataset=_lm_dataset())
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert math.isfinite(result.training_loss)
    trained = trainer.model
    assert trained is small
    after = trained.state_dict()
    for path, mod in blast.items():
        assert trained.get_submodule(path) is mod  # still the structured layer
        for f in ("U", "S", "V"):
            assert getattr(mod, f).requires_grad
            assert not torch.equal(after[f"{path}.{f}"], before[f"{path}.{f}"]), (path, f)
    # Trainer.save_model writes HF's folder (no structure record): structfx.load says so
    trainer.save_model(str(tmp_path / "hf"))
    with pytest.raises(structfx.CheckpointError, match="no structfx.json"):
        structfx.from_pretrained(type(small), tmp_path / "hf")
    # structfx.save keeps it: reloads bit-identical, the tie to the embedding kept
    trained.eval()
    structfx.save(trained, tmp_path / "sfx")
    again = structfx.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "sfx")
    assert type(again) is type(small)
    x = _ids(9)
    assert torch.equal(_logits(again, x), _logits(trained, x))
    assert torch.equal(again.generate(x[:1, :4], max_new_tokens=6, do_sample=False),
                       trained.generate(x[:1, :4], max_new_tokens=6, do_sample=False))
    assert again.lm_head.weight is again.transformer.wte.weight


def test_trainer_on_a_lora_wrapped_compressed_model(tmp_path):
    """The usual recovery recipe: LoRA on the compressed model, trained by Trainer; only the
    adapters move, structured and dense base layers stay as compressed."""
    pytest.importorskip("accelerate")
    pytest.importorskip("peft")
    model = llama()
    ids = _ids(0)
    small = structfx.compress(model, {"input_ids": ids}, CFG.replace(include=["*.mlp.*"]))
    pm = _lora(small, ["q_proj", "up_proj", "down_proj"])
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
        learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    trainer = transformers.Trainer(model=pm, args=args, train_dataset=_lm_dataset())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(".lora_A." in n or ".lora_B." in n for n in changed)
    assert any(".up_proj.lora_B." in n for n in changed)
