import os

# Triton kernels run on CPU tensors through the interpreter; it must be set before triton
# is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")
