"""The run-owned factor store: decision keys, live factors, the validated disk cache."""
import dataclasses
import json
import os

import pytest
import torch
from torch import nn

import structfx
from structfx import Config
from structfx.passes.store import NOT_DECISIONS, FactorStore, decision_settings

from conftest import mlp as _mlp

CFG = Config(params=0.5, min_params=1024, progress=False, steps=20, estimate_steps=3,
             force=True, device="H100 SXM")

# A second value for every field that decides something.
_OTHER = {"structure": "ss1", "params": 0.4, "flops": 0.6, "max_error": 0.9,
          "include": ("a*",), "exclude": ("b*",), "min_params": 7, "force": False,
          "blocks": (2,), "compressions": (3,), "rank_fractions": (0.3,), "steps": 11,
          "estimate_steps": 4, "seed": 5, "device": "A100 80GB", "time_candidates": True,
          "calib_blend": 0.25, "sensitivity": True}


def test_every_decision_field_changes_the_decision_key():
    base = decision_settings(CFG)
    decided = [f.name for f in dataclasses.fields(Config) if f.name not in NOT_DECISIONS]
    assert set(decided) <= set(_OTHER), set(decided) - set(_OTHER)
    for name in decided:
        assert decision_settings(CFG.replace(**{name: _OTHER[name]})) != base, name
    for name in NOT_DECISIONS & {f.name for f in dataclasses.fields(Config)}:
        value = {"report": True, "progress": True, "strict": True, "on_stale": "raise",
                 "cache_dir": "/tmp/x", "calib_memory": 12345}.get(name)
        if value is not None:
            assert decision_settings(CFG.replace(**{name: value})) == base, name


def mlp(seed=0):
    return _mlp(64, 128, 64, seed=seed, act=nn.ReLU)


def test_compress_store_reuses_decisions_and_live_factors():
    model, x = mlp(), torch.randn(8, 64)
    store = FactorStore()
    a = structfx.compress(model, (x,), CFG, store=store)
    made, estimated = store.factorizations, store.estimations
    assert made == 2 and estimated == 2
    b = structfx.compress(model, (x,), CFG, store=store)
    assert store.factorizations == made and store.estimations == estimated
    assert torch.equal(a(x), b(x))
    del a, b                                  # the live factors are only weakly held
    import gc

    gc.collect()
    structfx.compress(model, (x,), CFG, store=store)
    assert store.factorizations == made + 2 and store.estimations == estimated
    store.clear()
    assert not store.estimates and not store.decisions and store.factorizations == 0


def test_time_candidates_is_part_of_the_decision_key():
    """Config(time_candidates=True) after a roofline run must choose anew (it used to reuse)."""
    model, x = mlp(), torch.randn(8, 64)
    store = FactorStore()
    structfx.compress(model, (x,), CFG.replace(device=None), store=store)
    assert "candidates timed" not in structfx.last_report().device
    structfx.compress(model, (x,), CFG.replace(device=None, time_candidates=True), store=store)
    assert "candidates timed" in structfx.last_report().device


def test_measure_is_the_deprecated_name_of_time_candidates():
    with pytest.warns(DeprecationWarning, match="time_candidates"):
        old = Config(measure=True, progress=False)
    assert old == Config(time_candidates=True, progress=False)
    assert decision_settings(old) == decision_settings(Config(time_candidates=True))
    with pytest.warns(DeprecationWarning):
        assert CFG.replace(measure=True).time_candidates
    with pytest.warns(DeprecationWarning):
        assert Config.from_options({"measure": True}).time_candidates
    with pytest.warns(DeprecationWarning):
        assert old.measure is True
    with pytest.raises(ValueError, match=r"Config\.measure\b"):
        Config(measure="yes")


def _cache_files(path):
    return sorted(path.glob("*.safetensors"))


def _tamper(path, tensors=None, metadata="keep"):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        old = {k: f.get_tensor(k) for k in f.keys()}
    new = tensors(old) if tensors else old
    save_file(new, str(path), metadata=meta if metadata == "keep" else metadata)


@pytest.mark.parametrize("damage", [
    "broadcastable_shape", "int_dtype", "nan", "truncated", "garbage", "no_metadata",
    "other_settings", "bad_meta"])
def test_damaged_cache_entries_are_recomputed_with_a_warning(tmp_path, damage):
    model, x = mlp(), torch.randn(8, 64)
    cfg = CFG.replace(cache_dir=str(tmp_path))
    ref = structfx.compress(model, (x,), cfg, store=FactorStore())(x)
    files = _cache_files(tmp_path)
    assert len(files) == 2
    victim = files[0]
    if damage == "broadcastable_shape":
        _tamper(victim, lambda t: {k: v[..., :1].contiguous() for k, v in t.items()})
    elif damage == "int_dtype":
        _tamper(victim, lambda t: {k: v.to(torch.int32) for k, v in t.items()})
    elif damage == "nan":
        _tamper(victim, lambda t: {k: torch.full_like(v, float("nan")) for k, v in t.items()})
    elif damage == "truncated":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        victim.write_bytes(b"\x00garbage" * 50)
    elif damage == "no_metadata":
        _tamper(victim, metadata=None)
    elif damage == "other_settings":
        from safetensors import safe_open
        with safe_open(str(victim), framework="pt") as f:
            meta = dict(f.metadata())
        s = json.loads(meta["settings"])
        s["rank"] = s.get("rank", 0) + 1
        meta["settings"] = json.dumps(s)
        _tamper(victim, metadata=meta)
    elif damage == "bad_meta":
        from safetensors import safe_open
        with safe_open(str(victim), framework="pt") as f:
            meta = dict(f.metadata())
        meta["meta"] = json.dumps({"error": "NaN", "output_error": None})
        _tamper(victim, metadata=meta)
    store = FactorStore()
    with pytest.warns(UserWarning, match="ignoring the factor cache entry"):
        got = structfx.compress(model, (x,), cfg, store=store)(x)
    assert store.factorizations == 1 and store.hits == 1
    assert torch.allclose(got, ref, atol=1e-5) and torch.isfinite(got).all()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only modes")
def test_unwritable_cache_dir_is_a_warning(tmp_path):
    tmp_path.chmod(0o500)
    model, x = mlp(), torch.randn(8, 64)
    with pytest.warns(UserWarning, match="could not write the factor cache"):
        structfx.compress(model, (x,), CFG.replace(cache_dir=str(tmp_path)))


def test_cache_dir_that_is_a_file_is_a_warning(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model, x = mlp(), torch.randn(8, 64)
    with pytest.warns(UserWarning, match="could not write the factor cache"):
        small = structfx.compress(model, (x,), CFG.replace(cache_dir=str(blocker / "sub")))
    assert torch.isfinite(small(x)).all()


def test_cache_writes_leave_no_temporary_files(tmp_path):
    model, x = mlp(), torch.randn(8, 64)
    structfx.compress(model, (x,), CFG.replace(cache_dir=str(tmp_path)))
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_weight_hash_sees_changes_through_data():
    store = FactorStore()
    w = nn.Parameter(torch.randn(64, 32))
    h = store.weight_hash(w)
    assert store.weight_hash(w) == h
    w.data.mul_(2)                     # moves no version counter
    h2 = store.weight_hash(w)
    assert h2 != h
    w.data = torch.randn(64, 32)       # new storage
    assert store.weight_hash(w) not in (h, h2)
