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

    if "structfx" in sys.modules:
        import importlib

        # The modules, not the package's attributes: ``structfx.backend`` is also the name of
        # the backend function the package exports, which shadows the module.
        importlib.import_module("structfx.backend").DEFAULT_STORE.clear()
        importlib.import_module("structfx.report").clear_reports()
