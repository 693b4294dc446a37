"""What the two Triton kernel modules share: whether their kernels run in the interpreter.

Read once, here, when the first kernel module is imported: that is the moment ``triton.jit``
decides whether the kernels it decorates are compiled or interpreted, so the flags derived from
it (the autotune config sets, ``DOT_FP32`` at launch) always match the kernels. Setting
``TRITON_INTERPRET`` later changes neither (tests/conftest.py sets it before any import;
``structfx.bench`` warns when it comes too late).
"""
from __future__ import annotations

import os

import triton


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4: the value triton.jit itself reads
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # what older triton.jit compares


INTERPRET: bool = _interpreting()
