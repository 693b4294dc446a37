"""The compiler: backend="structfx", compress(), matching, budget, cache, staleness, report."""
import json

import pytest
import torch
from torch import nn

import structfx
from structfx import BlastLinear, Config, SS1Linear
from structfx.passes.store import FactorStore

from conftest import assert_untouched, rel, snapshot, tiny_bert, tiny_gpt2
from conftest import mlp as _mlp

transformers = pytest.importorskip("transformers")


def mlp(seed=0):
    return _mlp(128, 256, 128, 64, seed=seed)


CFG = Config(params=0.5, min_params=4096, progress=False, steps=30, estimate_steps=5,
             force=True, blocks=(1, 2, 4), rank_fractions=(0.25, 0.375, 0.5))


def compile_with(model, cfg=CFG):
    torch._dynamo.reset()
    return torch.compile(model, backend=structfx.backend(cfg))


def out(y):
    return y if isinstance(y, torch.Tensor) else (y.logits if hasattr(y, "logits")
                                                    else y.last_hidden_state)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("make,inputs", [
    (mlp, lambda: torch.randn(4, 16, 128)),
    (tiny_bert, lambda: torch.randint(0, 100, (2, 16))),
    (tiny_gpt2, lambda: torch.randint(0, 100, (2, 16))),
])
def test_compile_equals_compress_and_leaves_model_untouched(make, inputs):
    model = make()
    x = inputs()
    before = snapshot(model)
    small = structfx.compress(model, (x,), CFG)
    rep = structfx.last_report()
    assert rep.replaced, "something must be replaced"
    compiled = compile_with(model)
    with torch.no_grad():
        y_dense, y_small, y_comp = out(model(x)), out(small(x)), out(compiled(x))
    assert_untouched(model, before)
    # Same factors (cache) -> the compiled model computes what the compressed module does.
    assert rel(y_comp, y_small) < 1e-4
    # The report states the model's error on the example inputs: compiled output is within it.
    assert rep.model_output_error is not None and 0 < rep.model_output_error < 1.5
    assert rel(y_small, y_dense) == pytest.approx(rep.model_output_error, rel=1e-3)
    assert rel(y_comp, y_dense) <= rep.model_output_error * 1.01
    # Replaced layers are structured modules at their original paths, dense weights gone.
    names = {n for n, m in small.named_modules() if isinstance(m, (BlastLinear, SS1Linear))}
    assert names == {d.name for d in rep.replaced}
    for d in rep.replaced:
        assert not any(k == f"{d.name}.weight" for k in small.state_dict())


def test_budget_met_and_params_exact():
    model = mlp()
    x = torch.randn(8, 128)
    small = structfx.compress(model, (x,), CFG)
    rep = structfx.last_report()
    dense = sum(d.dense_params for d in rep.layers)
    kept = sum(d.params for d in rep.layers)
    assert kept <= 0.5 * dense
    for d in rep.layers:
        if d.structure != "dense":
            layer = small.get_submodule(d.name)
            assert layer.num_structured_params() == d.params
    n_small = sum(p.numel() for p in small.parameters())
    n_model = sum(p.numel() for p in model.parameters())
    assert rep.model_params_before == n_model and rep.model_params_after == n_small
    assert n_model - n_small == dense - kept  # only weights changed; biases kept


def test_output_error_in_report_is_the_layer_error():
    model = mlp()
    x = torch.randn(32, 128)
    cfg = CFG.replace(include=["4"])  # the last layer only: model error = that layer's error
    small = structfx.compress(model, (x,), cfg)
    (d,) = structfx.last_report().replaced
    with torch.no_grad():
        h = model[:4](x)
        ref = h @ model[4].weight.t()
        diff = (small(x) - model(x)).norm()
    assert diff.item() == pytest.approx(d.output_error * ref.norm().item(), rel=1e-3)


def test_no_recompile_or_refactorize_on_second_call_and_dynamic_batch():
    model = mlp()
    calls = []
    store = FactorStore()
    inner = structfx.backend(CFG, store=store)

    def counting(gm, ex, **kw):
        calls.append(1)
        return inner(gm, ex, **kw)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting)
    x = torch.randn(4, 128)
    with torch.no_grad():  # inference: grad-mode graphs of trainable weights stay dense
        compiled(x)
        assert structfx.last_report().replaced
        made = store.factorizations
        assert made > 0
        compiled(torch.randn(4, 128))
        assert len(calls) == 1 and store.factorizations == made
        for b in (7, 11, 13):  # new batch sizes: at most one dynamic recompile, no factorization
            y = compiled(torch.randn(b, 128))
            assert y.shape == (b, 64)
    assert len(calls) <= 2 and store.factorizations == made


def test_tied_weights_skipped_with_reason():
    model = tiny_gpt2()
    x = torch.randint(0, 100, (2, 8))
    structfx.compress(model, (x,), CFG)
    rows = {d.name: d for d in structfx.last_report().layers}
    assert rows["lm_head"].structure == "dense"
    assert "tied" in rows["lm_head"].skip
    with torch.no_grad():
        compile_with(model)(x)
    rows = {d.name: d for d in structfx.last_report().layers}
    assert "tied" in rows["lm_head"].skip


def test_include_exclude_and_size_floor():
    model = mlp()
    x = torch.randn(4, 128)
    structfx.compress(model, (x,), CFG.replace(exclude=["0"], min_params=20000))
    rows = {d.name: d for d in structfx.last_report().layers}
    assert rows["0"].skip == "excluded"
    assert "size floor" in rows["4"].skip  # 64 x 128 = 8192 weights
    assert rows["2"].structure != "dense"


@pytest.mark.parametrize("on_stale", ["refactorize", "raise"])
def test_weight_updated_after_compiling_is_detected(on_stale):
    model = mlp()
    x = torch.randn(4, 128)
    # One candidate per layer and a budget only met by replacing both big layers: the choice
    # cannot depend on the weights, so a fresh compress() is the reference for refactorizing.
    cfg = CFG.replace(on_stale=on_stale, min_params=20000, blocks=(2,), rank_fractions=(0.375,))
    compiled = compile_with(model, cfg)
    with torch.no_grad():
        y0 = compiled(x)
        model[0].weight.mul_(2.0)  # in place: no recompile, new _version
        if on_stale == "raise":
            with pytest.raises(RuntimeError, match="stale"):
                compiled(x)
            return
        y1 = compiled(x)
        expected = structfx.compress(model, (x,), cfg)(x)
        assert len(structfx.last_report().replaced) == 2
        assert not torch.allclose(y0, y1)
        assert rel(y1, expected) < 1e-4
        model.load_state_dict(mlp(seed=1).state_dict())  # copy_ into the same tensors
        assert rel(compiled(x), structfx.compress(model, (x,), cfg)(x)) < 1e-4


def test_compressed_module_trains_and_state_dict_round_trips():
    model = mlp()
    x = torch.randn(16, 128)
    small = structfx.compress(model, (x,), CFG)
    small.train()
    opt = torch.optim.SGD(small.parameters(), lr=1e-2)
    target = model(x).detach()
    loss0 = (small(x) - target).pow(2).mean()
    for _ in range(5):
        loss = (small(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < loss0.item()
    again = structfx.compress(model, (x,), CFG)
    again.load_state_dict(small.state_dict())
    assert torch.equal(again(x), small(x))


# ----------------------------------------------------------------------------- plumbing
def test_backend_is_registered_by_entry_point():
    assert "structfx" in torch._dynamo.list_backends()
    torch._dynamo.reset()
    model = mlp()
    x = torch.randn(4, 128)
    with torch.no_grad():
        y = torch.compile(model, backend="structfx",
                          options={"params": 0.5, "min_params": 4096, "progress": False,
                                   "force": True, "steps": 20})(x)
    assert y.shape == (4, 64) and structfx.last_report().replaced


def test_unknown_option_is_an_error():
    with pytest.raises(ValueError, match="unknown structfx option"):
        Config.from_options({"param": 0.5})
    with pytest.raises(ValueError, match="structure"):
        Config(structure="monarch")


def test_fallback_warns_and_strict_raises(monkeypatch):
    from structfx import pipeline

    def boom(*a, **k):
        raise RuntimeError("planner exploded")

    monkeypatch.setattr(pipeline, "run", boom)
    model = mlp()
    x = torch.randn(4, 128)
    with pytest.warns(UserWarning, match="planner exploded"), torch.no_grad():
        y = compile_with(model)(x)
    assert torch.allclose(y, model(x), atol=1e-5)
    with pytest.raises(Exception, match="planner exploded"), torch.no_grad():
        compile_with(model, CFG.replace(strict=True))(x)


def test_disk_cache_round_trip(tmp_path):
    model = mlp()
    x = torch.randn(4, 128)
    cfg = CFG.replace(cache_dir=str(tmp_path))
    first = FactorStore()
    a = structfx.compress(model, (x,), cfg, store=first)
    files = list(tmp_path.glob("*.safetensors"))
    assert files and first.factorizations == len(files)
    second = FactorStore()
    b = structfx.compress(model, (x,), cfg, store=second)
    assert second.factorizations == 0 and second.hits == len(files)  # all from disk
    assert torch.equal(a(x), b(x))


def test_report_table_and_json(capsys, monkeypatch):
    model = mlp()
    x = torch.randn(4, 128)
    monkeypatch.setenv("STRUCTFX_REPORT", "1")
    with torch.no_grad():
        compile_with(model)(x)
    printed = capsys.readouterr().out
    assert "structfx report" in printed and "params kept" in printed
    rep = structfx.last_report()
    data = json.loads(rep.to_json())
    assert {r["name"] for r in data["layers"]} == {"0", "2", "4"}
    assert data["dense_flops"] == sum(2 * 4 * o * i for o, i in [(256, 128), (128, 256), (64, 128)])


def test_calibrated_compress_reports_held_out_error():
    model = mlp()
    torch.manual_seed(1)
    scale = torch.logspace(0, -2, 128)  # anisotropic inputs: data-aware factorization pays off
    x = torch.randn(4, 128) * scale
    batches = [(torch.randn(64, 128) * scale,) for _ in range(4)]
    cfg = CFG.replace(include=["0"])
    aware = structfx.compress(model, (x,), cfg, calibration=batches)
    (row,) = structfx.last_report().replaced
    plain = structfx.compress(model, (x,), cfg)

    fresh = torch.randn(512, 128) * scale
    ref = fresh @ model[0].weight.t()

    def err(small):
        layer = small.get_submodule("0")
        return ((layer(fresh) - layer.bias - ref).norm() / ref.norm()).item()

    assert err(aware) < 0.8 * err(plain)
    assert row.output_error == pytest.approx(err(aware), rel=0.5)


def test_prefill_and_decode_graphs_share_decisions_and_factors():
    model = tiny_gpt2()
    model.config.use_cache = True
    torch._dynamo.reset()
    structfx.clear_reports()
    store = FactorStore()
    compiled = torch.compile(model, backend=structfx.backend(CFG, store=store))
    prompt = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        out = compiled(input_ids=prompt, use_cache=True)
        made, estimated = store.factorizations, store.estimations
        assert made > 0 and estimated > 0
        nxt = out.logits[:, -1:].argmax(-1)
        compiled(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    reps = [r for r in structfx.reports() if r.layers]
    assert len(reps) >= 2
    first, last = reps[0], reps[-1]
    assert {d.tokens for d in first.layers} != {d.tokens for d in last.layers}
    assert ([(d.name, d.structure, d.settings) for d in first.layers]
            == [(d.name, d.structure, d.settings) for d in last.layers])
    assert store.factorizations == made     # the decode graph factorized nothing new
    assert store.estimations == estimated   # ... and did not choose again


def test_symbolic_trace_graph_is_matched_by_call_module():
    model = mlp()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(8, 128)
    small = structfx.compress(traced, (x,), CFG)
    rep = structfx.last_report()
    assert {d.name for d in rep.replaced} == {"0", "2", "4"}
    assert rel(small(x), model(x)) == pytest.approx(rep.model_output_error, rel=1e-3)
    assert isinstance(traced.get_submodule("0"), nn.Linear)  # the traced input is untouched


def test_time_candidates_times_the_candidates_and_measure_the_model():
    model = mlp()
    x = torch.randn(16, 128)
    structfx.compress(model, (x,), CFG.replace(time_candidates=True, blocks=(2,),
                                               rank_fractions=(0.375,)), measure=True)
    rep = structfx.last_report()
    assert rep.replaced
    for d in rep.replaced:
        assert d.measured_speedup is not None and d.measured_speedup > 0
        assert d.predicted_speedup is None
    assert rep.measured_speedup is not None and rep.measured_speedup > 0
    assert "timed" in rep.device and "measured model speedup" in str(rep)
