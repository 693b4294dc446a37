import os

# Triton kernels run on CPU tensors through the interpreter; it must be set before triton
# is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_structfx_state():
    """Every test starts with an empty string-backend store and no reports."""
    yield
    import sys

    backend = sys.modules.get("structfx.backend")   # (structfx.backend is also a function)
    if backend is not None:
        backend.DEFAULT_STORE.clear()
        sys.modules["structfx.report"].clear_reports()
