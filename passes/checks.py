"""Input checks shared by the passes: a bad value is a ValueError that names the layer and the
problem, raised before it can turn into a NaN model or an unrelated solver error.

``calibration_problem`` says what is wrong with a layer's recorded inputs (or None);
``check_calibration`` raises it for a named layer (the pipeline calls it per layer before a
data-aware factorization; ``factorize_blast`` / ``project_ss1`` / ``distill`` use the same test).
"""
from __future__ import annotations

from typing import Optional

import torch

# A Gram entry is a sum of squares over the rows; the factorizations form ``X^T X`` (and
# products with it) in the working dtype. Refuse inputs whose Gram diagonal comes within this
# factor of the dtype's largest value (the products after it would overflow).
_GRAM_HEADROOM = 1e6


def gram_limit(gram_dtype: torch.dtype) -> float:
    """The largest Gram diagonal entry ``gram_dtype`` takes with headroom for the products."""
    return torch.finfo(gram_dtype).max / _GRAM_HEADROOM


def too_large(max_abs: float, gram_dtype: torch.dtype) -> str:
    return (f"calibration inputs are too large (max |x| = {max_abs:.3g}): their Gram matrix "
            f"X^T X overflows {gram_dtype}; scale the inputs down or check the model")


def calibration_problem(x: torch.Tensor, gram_dtype: Optional[torch.dtype] = torch.float32
                        ) -> Optional[str]:
    """What makes ``x`` ``(..., in_features)`` unusable as calibration inputs, or None.

    Non-finite values (NaN / inf), and, with ``gram_dtype``, values so large that ``X^T X``
    overflows that dtype (activations of 1e20 are finite but their squares are not in fp32).
    ``x`` may be a ``calib_stats.CalibStats`` (the streamed form of the rows)."""
    from .calib_stats import CalibStats

    if isinstance(x, CalibStats):
        if x.problem is not None:
            return x.problem
        if not x.rows:
            return "calibration inputs are empty"
        if gram_dtype is not None:
            diag = float((x.gram.diagonal() + x.held.double().pow(2).sum(0)).max())
            if diag > gram_limit(gram_dtype):
                return too_large(x.max_abs, gram_dtype)
        return None
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        return f"calibration inputs must be a floating-point tensor, got {what}"
    if x.numel() == 0:
        return "calibration inputs are empty"
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = x.numel() - int(finite.sum())
        rows = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
        bad_rows = int((~torch.isfinite(rows)).any(-1).sum())
        kinds = " and ".join(k for k, m in (("NaN", torch.isnan(x)), ("inf", torch.isinf(x)))
                             if bool(m.any()))
        return (f"calibration inputs contain {kinds} ({bad} values in {bad_rows} of "
                f"{rows.shape[0]} rows): the model produces non-finite activations there; "
                f"check the calibration batches (and the layers before this one)")
    if gram_dtype is not None:
        rows = x.detach().reshape(-1, x.shape[-1] if x.dim() else 1).double()
        diag = float(rows.pow(2).sum(0).max())
        if diag > gram_limit(gram_dtype):
            return too_large(float(x.abs().max()), gram_dtype)
    return None


def check_calibration(name: str, x: torch.Tensor,
                      gram_dtype: Optional[torch.dtype] = torch.float32) -> None:
    """Raise ``ValueError("structfx: layer '<name>': <problem>")`` if ``x`` (the inputs layer
    ``name`` saw) can't drive a data-aware factorization."""
    raise_layer_problem(name, calibration_problem(x, gram_dtype))


def raise_layer_problem(name: str, problem: Optional[str]) -> None:
    """``ValueError("structfx: layer '<name>': <problem>")`` unless ``problem`` is None."""
    if problem is not None:
        raise ValueError(f"structfx: layer {name!r}: {problem}")


def check_weight(who: str, weight) -> None:
    """Raise ``ValueError("<who>: ...")`` unless ``weight`` is a finite 2-D floating-point
    ``(out, in)`` tensor (what every factorization takes)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{who}: weight must be a 2-D (out, in) tensor, got {shape}")
    if not weight.is_floating_point():
        raise ValueError(f"{who}: wrong dtype {weight.dtype}, weight must be floating point")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{who}: weight contains NaN or inf")


def check_calib_arg(who: str, calib, in_features: int,
                    gram_dtype: Optional[torch.dtype] = torch.float32) -> None:
    """Raise ``ValueError("<who>: ...")`` unless ``calib`` (rows ``(..., in_features)`` or
    ``CalibStats``) can drive a data-aware factorization: floating point, at least 2 rows (one
    is held out), and no ``calibration_problem`` (``gram_dtype`` as there)."""
    from .calib_stats import CalibStats

    if isinstance(calib, CalibStats):
        if calib.in_features != in_features:
            raise ValueError(f"{who}: calib must have last dim {in_features} (in_features), "
                             f"got statistics of {calib.in_features}")
        if calib.rows < 2:
            raise ValueError(f"{who}: calib needs at least 2 rows (one is held out)")
    else:
        if not isinstance(calib, torch.Tensor) or calib.dim() < 1 or \
                calib.shape[-1] != in_features:
            shape = tuple(calib.shape) if isinstance(calib, torch.Tensor) else \
                type(calib).__name__
            raise ValueError(f"{who}: calib must have last dim {in_features} (in_features), "
                             f"got {shape}")
        if not calib.is_floating_point():
            raise ValueError(f"{who}: wrong dtype {calib.dtype} for calib")
        if calib.reshape(-1, in_features).shape[0] < 2:
            raise ValueError(f"{who}: calib needs at least 2 rows (one is held out)")
    problem = calibration_problem(calib, gram_dtype)
    if problem is not None:
        raise ValueError(f"{who}: {problem}")
