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


def calibration_problem(x: torch.Tensor, gram_dtype: Optional[torch.dtype] = torch.float32
                        ) -> Optional[str]:
    """What makes ``x`` ``(..., in_features)`` unusable as calibration inputs, or None.

    Non-finite values (NaN / inf), and, with ``gram_dtype``, values so large that ``X^T X``
    overflows that dtype (activations of 1e20 are finite but their squares are not in fp32)."""
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
        limit = torch.finfo(gram_dtype).max / _GRAM_HEADROOM
        if diag > limit:
            return (f"calibration inputs are too large (max |x| = "
                    f"{float(x.abs().max()):.3g}): their Gram matrix X^T X overflows "
                    f"{gram_dtype}; scale the inputs down or check the model")
    return None


def check_calibration(name: str, x: torch.Tensor,
                      gram_dtype: Optional[torch.dtype] = torch.float32) -> None:
    """Raise ``ValueError("structfx: layer '<name>': <problem>")`` if ``x`` (the inputs layer
    ``name`` saw) can't drive a data-aware factorization."""
    problem = calibration_problem(x, gram_dtype)
    if problem is not None:
        raise ValueError(f"structfx: layer {name!r}: {problem}")
