"""``structfx.DistillConfig``: the settings of ``distill`` as one frozen value; keywords still
work, and a keyword overrides the same field of ``config``."""
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import structfx
from structfx import Config, DistillConfig, distill

from conftest import mlp

CFG = Config(params=0.5, min_params=1024, progress=False, steps=10, estimate_steps=2,
             force=True, blocks=(1, 2), rank_fractions=(0.25,))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, 64)
    return [(torch.randn(48, 64, generator=g) * scale,) for _ in range(n)]


@pytest.fixture(scope="module")
def pair():
    teacher = mlp(64, 96, 32)
    return structfx.compress(teacher, batches(1)[0], CFG), teacher


def _params(m):
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def _run(pair, *args, **kwargs):
    small, teacher = copy.deepcopy(pair[0]), pair[1]
    res = distill(small, teacher, batches(3), *args, **kwargs)
    return res, _params(small)


def _same(a, b):
    (ra, pa), (rb, pb) = a, b
    assert [(d.name, d.error_before, d.error_after) for d in ra.layers] == \
        [(d.name, d.error_before, d.error_after) for d in rb.layers]
    assert ra.model_error_after == rb.model_error_after and ra.mode == rb.mode
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_config_and_keywords_give_the_same_fit(pair):
    by_keywords = _run(pair, steps=15, lr=2e-2, mode="student", progress=False)
    by_config = _run(pair, DistillConfig(steps=15, lr=2e-2, mode="student", progress=False))
    by_name = _run(pair, config=DistillConfig(steps=15, lr=2e-2, mode="student",
                                              progress=False))
    _same(by_keywords, by_config)
    _same(by_keywords, by_name)
    assert by_config[0].mode == "student"
    before = _params(pair[0])
    assert any(not torch.equal(before[k], by_config[1][k]) for k in before)  # it did fit


def test_a_keyword_overrides_the_config_field(pair):
    cfg = DistillConfig(steps=15, mode="teacher", progress=False)
    _same(_run(pair, cfg, mode="student"), _run(pair, steps=15, mode="student", progress=False))
    # steps=0 over a config with steps: the layers are measured, not fit (factors unchanged)
    res, params = _run(pair, DistillConfig(steps=50, progress=False), steps=0)
    before = _params(pair[0])
    assert all(torch.equal(before[k], params[k]) for k in before)
    assert all(d.error_after == d.error_before for d in res.layers)
    assert cfg.mode == "teacher"   # the given config is not changed


def test_end_to_end_phase_from_the_config(pair):
    res, _ = _run(pair, DistillConfig(steps=0, end_to_end_steps=4, end_to_end_lr=1e-3,
                                      progress=False))
    assert res.end_to_end_steps == 4
    assert res.model_error_after <= res.model_error_after_layers   # undone if it hurt


def test_wrong_config_type_and_unknown_keywords_are_type_errors(pair):
    small, teacher = pair
    with pytest.raises(TypeError, match="must be a structfx.DistillConfig, got Config "
                                        r"\(structfx.Config holds compress\(\)'s settings\)"):
        distill(small, teacher, batches(1), Config())
    with pytest.raises(TypeError, match="unexpected keyword argument 'step'.*steps, lr, mode"):
        distill(small, teacher, batches(1), step=3)


def test_defaults_and_frozen():
    cfg = DistillConfig()
    assert (cfg.steps, cfg.lr, cfg.mode, cfg.end_to_end_steps, cfg.end_to_end_lr,
            cfg.time_limit, cfg.progress) == (200, 1e-2, "correct", 0, 1e-3, None, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3
    assert cfg.replace(steps=3) == DistillConfig(steps=3) and cfg.steps == 200


@pytest.mark.parametrize("field, value, expected", [
    ("mode", "fast", "one of"), ("mode", None, "one of"),
    ("steps", -1, "an integer >= 0"), ("steps", 2.0, "an integer >= 0"),
    ("steps", True, "an integer >= 0"), ("end_to_end_steps", "10", "an integer >= 0"),
    ("lr", 0.0, "> 0"), ("lr", math.nan, "> 0"), ("end_to_end_lr", -1e-3, "> 0"),
    ("lr", math.inf, "> 0"), ("time_limit", 0, "seconds > 0"), ("time_limit", True, "seconds"),
    ("time_limit", "5", "seconds"), ("progress", 1, "True or False"),
])
def test_bad_values_name_the_field(field, value, expected):
    with pytest.raises(ValueError, match=f"DistillConfig.{field} must be .*{expected}"):
        DistillConfig(**{field: value})


def test_numpy_numbers_are_accepted_as_python_numbers():
    cfg = DistillConfig(steps=np.int64(7), lr=np.float32(0.5), time_limit=np.int32(3))
    assert type(cfg.steps) is int and cfg.steps == 7
    assert type(cfg.lr) is float and cfg.lr == 0.5
    assert type(cfg.time_limit) is float and cfg.time_limit == 3.0


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True), st.booleans(), st.none(),
                 st.text(max_size=3)))
def test_steps_accepts_exactly_the_non_negative_integers(v):
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if ok:
        assert DistillConfig(steps=v).steps == v
    else:
        with pytest.raises(ValueError, match="DistillConfig.steps must be an integer >= 0"):
            DistillConfig(steps=v)


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3),
                 st.booleans(), st.none()))
def test_time_limit_accepts_positive_seconds_or_none(v):
    ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)
    if ok:
        assert DistillConfig(time_limit=v).time_limit == (None if v is None else float(v))
    else:
        with pytest.raises(ValueError, match="DistillConfig.time_limit must be"):
            DistillConfig(time_limit=v)
