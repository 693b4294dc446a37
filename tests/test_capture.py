"""``compress.capture``: torch.export is retried with fewer dynamic dims only when the failure
comes from the dynamic dims; the model's own errors propagate at once, as torch raised them;
when every attempt fails, the error shows the first one."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.exc import UserError, UserErrorType
from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

import structfx
from structfx.compress import dynamic_shape_failure

compress_mod = importlib.import_module("structfx.compress")   # structfx.compress is the function

CFG = structfx.Config(params=0.5, min_params=1024, progress=False, steps=5, estimate_steps=2,
                      force=True, blocks=(1, 2))


@pytest.fixture
def exports(monkeypatch):
    """The ``dynamic_shapes`` of every torch.export.export call, in order."""
    calls = []
    real = torch.export.export

    def spy(*args, **kwargs):
        calls.append(kwargs.get("dynamic_shapes"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", spy)
    return calls


class Refuses(nn.Module):
    """Fails for a reason of its own, whatever the shapes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        if x.shape[-1] == 64:
            raise ValueError("Refuses: this model does not take 64 features")
        return self.fc(x)


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: no shape setting can export it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


class Scaled(nn.Module):
    """``x * m`` with ``m`` of batch 1: the size-oblivious attempt (sizes 1 kept dynamic)
    can't broadcast it; the next attempt (1 specialized where the model needs it) can."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x, m):
        return self.fc(x * m)


class Hashes(nn.Module):
    """Hashes a size: a symbolic size can't be hashed, at any attempt."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        hash(x.shape[0])
        return self.fc(x)


def test_the_models_own_error_propagates_at_once(exports):
    with pytest.raises(ValueError, match="does not take 64 features") as info:
        structfx.compress(Refuses().eval(), torch.randn(12, 64), CFG)
    assert len(exports) == 1 and exports[0] is not None      # one dynamic attempt, no retry
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "could not capture Refuses" in notes and "static shapes were not tried" in notes


def test_data_dependent_control_flow_is_not_retried(exports):
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    with pytest.raises(GuardOnDataDependentSymNode, match="data-dependent"):
        structfx.compress(DataDependent().eval(), torch.randn(12, 64), CFG)
    assert len(exports) == 1


def test_a_dynamic_shape_failure_is_retried_and_the_result_is_right(exports):
    torch.manual_seed(0)
    model = Scaled().eval()
    small = structfx.compress(model, (torch.randn(12, 64), torch.randn(1, 64)), CFG)
    assert len(exports) == 2 and exports[1] is not None       # the second attempt: still dynamic
    assert isinstance(small.fc, structfx.BlastLinear)
    for batch in (12, 5):                                       # the batch dim stayed dynamic
        x, m = torch.randn(batch, 64), torch.randn(1, 64)
        ref = F.linear(x * m, small.fc.to_dense(), small.fc.bias)
        torch.testing.assert_close(small(x, m), ref, rtol=1e-4, atol=1e-5)


def test_a_model_that_specializes_a_dim_compresses_without_a_retry(exports):
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            return self.fc(x.view(4, 3, 64)).sum(1)   # needs exactly 12 rows

    torch.manual_seed(0)
    model = Fixed().eval()
    x = torch.randn(12, 64)
    small = structfx.compress(model, x, CFG)
    assert len(exports) == 1
    ref = F.linear(x.view(4, 3, 64), small.fc.to_dense(), small.fc.bias).sum(1)
    torch.testing.assert_close(small(x), ref, rtol=1e-4, atol=1e-5)


def test_every_attempt_failing_shows_the_first_error(exports):
    with pytest.raises(RuntimeError, match="could not capture Hashes") as info:
        structfx.compress(Hashes().eval(), torch.randn(12, 64), CFG)
    assert len(exports) == 3 and exports[-1] is None            # dynamic, dynamic, static
    assert "unhashable" in str(info.value) and "the first attempt" in str(info.value)
    assert isinstance(info.value.__cause__, TypeError)


def _constraint_error():
    return UserError(UserErrorType.CONSTRAINT_VIOLATION, "Constraints violated (batch)!")


@pytest.mark.parametrize("second, attempts, shown", [
    (None, 2, None),                                            # the retry succeeds
    (ValueError("the model's own error"), 2, "the model's own error"),   # no third attempt
    (_constraint_error(), 3, "static"),                         # ... then static fails
])
def test_retry_policy(monkeypatch, second, attempts, shown):
    """Fake exports: the first attempt fails on a constraint violation; what the retries do
    with the next failure, and that the raised error names the first."""
    model = nn.Sequential(nn.Linear(64, 64)).eval()
    seen = []
    real = compress_mod._export

    def fake(m, inp, dyn, oblivious):
        seen.append(dyn)
        if len(seen) == 1:
            raise _constraint_error()
        if len(seen) == 2 and second is not None:
            raise second
        if len(seen) == 3:
            raise ValueError("static: still failing")
        return real(m, inp, dyn, oblivious)

    monkeypatch.setattr(compress_mod, "_export", fake)
    if shown is None:
        gm = compress_mod.capture(model, torch.randn(4, 64))
        x = torch.randn(6, 64)
        torch.testing.assert_close(gm(x), model(x))
        assert len(seen) == attempts
        return
    with pytest.raises(RuntimeError) as info:
        compress_mod.capture(model, torch.randn(4, 64))
    assert len(seen) == attempts
    text = str(info.value)
    assert shown in text and "Constraints violated (batch)" in text   # the last and the first
    assert isinstance(info.value.__cause__, UserError)


def test_dynamic_shape_failure_sorts_real_exceptions():
    assert dynamic_shape_failure(_constraint_error())
    assert dynamic_shape_failure(UserError(UserErrorType.DYNAMIC_DIM, "dim 0 is static"))
    assert dynamic_shape_failure(ConstraintViolationError("s0 must be 12"))
    assert not dynamic_shape_failure(UserError(UserErrorType.ANTI_PATTERN, "no"))
    assert not dynamic_shape_failure(ValueError("the model's own error"))
    assert not dynamic_shape_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied "
                                                  "(12x63 and 64x64)"))
    # as torch words an op that met symbolic sizes; and a chained one
    assert dynamic_shape_failure(RuntimeError("The size of tensor a (s77) must match the size "
                                              "of tensor b (s54) at non-singleton dimension 0"))
    outer = RuntimeError("wrapped")
    outer.__cause__ = TypeError("unhashable type: non-nested SymInt")
    assert dynamic_shape_failure(outer)
