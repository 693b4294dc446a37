"""What ``import structfx`` loads, and what is registered lazily instead.

``import structfx`` is also how torch.compile loads the backend (the ``torch_dynamo_backends``
entry point), so it must not pay for onnx / onnxscript (export), scipy (the select pass) or
triton (the CUDA kernels; ``torch.utils.flop_counter`` imports it too). Each check runs in a
fresh interpreter: this test process has imported all of them long ago.
"""
import json
import subprocess
import sys

HEAVY = ("onnx", "onnxscript", "scipy", "triton")


def run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (this environment: TRITON_INTERPRET=1 from
    conftest.py); it prints one JSON object as its last line."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_structfx_loads_no_heavy_dependency():
    out = run(f"""
import json, sys
import structfx
from structfx.backend import structfx_backend   # the torch_dynamo_backends entry point
import torch
loaded = [m for m in {HEAVY!r} if m in sys.modules]
cuda = [torch._C._dispatch_has_kernel_for_dispatch_key("structfx::" + op, "CUDA")
        for op in ("blast_linear", "blast_linear_backward", "ss1_linear", "ss1_linear_backward")]
kernels = [m for m in ("structfx.kernels.blast_triton", "structfx.kernels.ss1_triton")
           if m in sys.modules]
export_onnx, onnx_session = structfx.export_onnx, structfx.onnx_session
import structfx.export as ex
print(json.dumps(dict(loaded=loaded, cuda=cuda, kernels=kernels,
                      same=[export_onnx is ex.export_onnx, onnx_session is ex.onnx_session],
                      listed="export_onnx" in dir(structfx),
                      onnx_now="onnx" in sys.modules)))
""")
    assert out["loaded"] == []
    assert out["kernels"] == []          # the Triton modules load on the first CUDA call
    assert out["cuda"] == [True] * 4     # ... through the stand-ins registered for "cuda"
    assert out["same"] == [True, True] and out["listed"]
    assert out["onnx_now"]               # the lazy names did import the export module


def test_cuda_stand_ins_load_and_run_the_triton_kernels():
    """Each stand-in imports its Triton module and runs the kernel named in ops.py's table
    (called directly here: no CUDA device; the kernels run in the interpreter). Its results
    match the op's default (CPU) implementation."""
    out = run("""
import json, sys
import torch
import structfx
from structfx.kernels import ops, ss1_hash
g = torch.Generator().manual_seed(0)
rnd = lambda *s: torch.randn(*s, generator=g)
x, U, S, V, b = rnd(2, 3, 45), rnd(2, 19, 5), rnd(2, 3, 5), rnd(3, 15, 5), rnd(37)
xs, P, bs = rnd(4, 70), rnd(40, ss1_hash.reduced_k(70, 2, 16)), rnd(40)
cases = {
    "blast_linear": (x, U, S, V, b, 37),
    "blast_linear_backward": (rnd(2, 3, 37), x, U, S, V, 37, [True] * 5),
    "ss1_linear": (xs, P, bs, 2, 3, 16, 16),
    "ss1_linear_backward": (rnd(4, 40), xs, P, 2, 3, 16, 16, [True] * 3),
}
err, loaded = {}, {}
for op, args in cases.items():
    module, kernel = ops._CUDA_KERNELS[op]
    got = ops._cuda_stand_in(module, kernel)(*args)
    want = getattr(torch.ops.structfx, op)(*args)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    err[op] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))
    loaded[op] = "structfx.kernels." + module in sys.modules
print(json.dumps(dict(err=err, loaded=loaded)))
""")
    assert all(out["loaded"].values()), out
    assert all(e < 1e-5 for e in out["err"].values()), out


FLOPS = """
import json, torch
x, U, S, V = torch.randn(10, 64), torch.randn(2, 16, 4), torch.randn(2, 2, 4), torch.randn(2, 32, 4)
with FlopCounterMode(display=False) as fc:
    torch.ops.structfx.blast_linear(x, U, S, V, None, 32)
print(json.dumps(fc.get_total_flops()))
"""


def test_flop_formulas_register_whichever_is_imported_first():
    """structfx registers its FLOP formulas when ``torch.utils.flop_counter`` is imported, be
    that before or after structfx."""
    after = run("import structfx\nfrom torch.utils.flop_counter import FlopCounterMode\n" + FLOPS)
    before = run("from torch.utils.flop_counter import FlopCounterMode\nimport structfx\n" + FLOPS)
    assert after == before == 2 * 10 * 4 * (2 * 32 + 2 * 16 + 2 * 2)
