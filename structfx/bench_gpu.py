"""``python -m structfx.bench gpu --out DIR [--budget-s 540] [--dry-run]``: GPU proof in one run.

One command that checks, tunes and times structfx on a CUDA machine within a time budget, in
this order (each step in its own ``try``: a failure is recorded and the run goes on):

1. ``env``: GPU name, SM count, driver, CUDA, Python / torch / triton / onnxruntime versions,
   and a check of the features structfx needs (a missing one is named with the version that
   has it).
2. ``ceilings``: a device-to-device copy (TB/s, bytes read + written) and a large bf16
   ``torch.mm`` on random data (TFLOP/s), measured once.
3. Correctness, each Triton kernel against an fp64 reference (``kernels/reference.py`` and plain
   einsums) on fresh random inputs, bf16 / fp16 / fp32, T = 1, 7, 16, 256, 4096, sizes that do
   and don't divide by the blocks, with and without bias. Every output buffer the launchers
   allocate is NaN-poisoned (``torch.empty`` and friends are wrapped while a launcher runs), so
   an unwritten element shows as NaN; a launcher that allocated nothing we could poison is a
   failure too. Error = ``||out - ref|| / ||ref||`` (Frobenius, fp64), tolerances in ``TOL``.

   - ``blast-kernels``: stage 1 (block GEMM), the fused mix + U-GEMM, the mix alone, the
     forward launcher and the backward launcher (dx, dU, dS, dV, dbias);
   - ``ss1-kernels``: the SS1 forward, dx and dP kernels (through their launchers);
   - ``ops-autograd``: ``torch.ops.structfx.blast_linear`` / ``ss1_linear`` forward and
     ``torch.autograd`` gradients, 2-D and 3-D inputs;
   - ``compile-fullgraph``: ``torch.compile(fullgraph=True)`` of a model holding BlastLinear
     and SS1Linear, forward and backward;
   - ``backend-bert``: ``torch.compile(backend="structfx")`` end to end on a tiny BERT against
     ``structfx.compress`` of the same model (same factors), strict (no silent fallback).
4. ``ops-table``: 4096x4096, 4096x11008, 11008x4096, bf16, T = 1, 16, 256, 4096: dense
   ``F.linear``, low rank at equal params (two GEMMs), BLAST b = 2, 4, 16 through structfx's
   kernels, ``torch.compile`` of the plain bmm BLAST (b = 4), SS1 c = 2, 4;
   ``triton.testing.do_bench`` medians (it flushes L2) with several input sets rotated; ratios
   to dense; achieved TB/s and TFLOP/s (fewest bytes: inputs, weights and output once) and the
   fraction of the roofline of the measured ceilings.
5. ``llama``: ``examples/llama_gpu.py``'s model, configs and timing functions, run in a child
   process with a timeout: prefill and decode tokens/s, dense vs BLAST / SS1 at 50 % params,
   torch.compile default and ``mode="reduce-overhead"``.
6. ``onnx-cuda``: ``python -m structfx.bench onnx`` (GPT-2-sized, BLAST at 50 %) on the
   onnxruntime CUDA execution provider, if the installed onnxruntime has it (else: says so).

It writes ``DIR/bench-gpu.md`` (tables, the exact command, the date), ``DIR/bench-gpu.json``
(every number) and ``DIR/log.txt`` (everything printed, the children's output too), rewritten
after every step so a run killed from outside still leaves its report, and prints a short
summary table last. Exit status 1 if a step failed (after the report is written).

Budget: each step gets a share of what is left (``SHARES``; time a step does not use goes to
the later ones). A step whose share is below its minimum is skipped and says so; the loops
inside a step stop at its deadline and count what they skipped; a step that runs far past its
deadline is interrupted (SIGALRM) and recorded as failed.

``--dry-run`` is the rehearsal CI runs: CPU, ``TRITON_INTERPRET=1``, tiny sizes, every step.
The Triton launchers run in the interpreter; ``torch.ops.structfx.*`` take their CPU paths;
timings are CPU medians of tiny problems (meaningless as figures); the onnxruntime step uses the
CPU EP; ``reduce-overhead`` runs but CUDA graphs do not apply on CPU.

The kernel entry points are named in one place, ``KERNELS`` below, as ``module:attribute``
strings resolved when a step runs (after ``TRITON_INTERPRET`` is set, which Triton reads when a
kernel module is imported); a rename in the kernel files is a one-line change there, and a
missing name fails only the steps that use it, with a message saying so.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import inspect
import itertools
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch

# ----------------------------------------------------------------------------- kernel names
# Every kernel entry point this script calls, in one place ("module:attribute"). The signatures
# used are the ones documented in kernels/blast_triton.py and kernels/ss1_triton.py.
KERNELS = {
    # BLAST (kernels/blast_triton.py)
    "blast_stage1": "structfx.kernels.blast_triton:_block_gemm",       # (a, B, out_dtype)
    "blast_mix_gemm": "structfx.kernels.blast_triton:_mix_gemm",       # (z, S, U, bias, M, dt)
    "blast_mix": "structfx.kernels.blast_triton:_mix",                 # (z, S)
    "blast_forward": "structfx.kernels.blast_triton:blast_forward_triton",
    "blast_backward": "structfx.kernels.blast_triton:blast_backward_triton",
    # SS1 (kernels/ss1_triton.py); dx and dP are launched by the backward's flags
    "ss1_forward": "structfx.kernels.ss1_triton:ss1_forward_triton",
    "ss1_backward": "structfx.kernels.ss1_triton:ss1_backward_triton",
    # references and helpers
    "blast_reference": "structfx.kernels.reference:blast_linear_reference",
    "ss1_reference": "structfx.kernels.reference:ss1_linear_reference",
    "blast_torch": "structfx.kernels.blast_torch:blast_forward_torch",
    "ss1_coeffs": "structfx.kernels.ss1_hash:hash_coeffs",
    "ss1_reduced_k": "structfx.kernels.ss1_hash:reduced_k",
}
KERNEL_MODULES = ("structfx.kernels.blast_triton", "structfx.kernels.ss1_triton")

# Relative Frobenius error vs the fp64 reference, per compute dtype (METHOD: fp32 far under
# 1e-3, tf32 ~3e-4, bf16 operands 1e-3..1e-2). fp32 runs with TF32 off, so 1e-4 catches a
# kernel that silently uses TF32. bf16 / fp16 leave room for the rounded intermediates
# (BLAST's z and w, SS1's sketch) on top of the rounded output.
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4, torch.float64: 1e-10}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

STEPS = ["env", "ceilings", "blast-kernels", "ss1-kernels", "ops-autograd",
         "compile-fullgraph", "backend-bert", "ops-table", "llama", "onnx-cuda"]
# Share of the remaining budget each step may use, and the least time worth starting it with.
SHARES = {"env": 0.3, "ceilings": 0.7, "blast-kernels": 5, "ss1-kernels": 3, "ops-autograd": 2,
          "compile-fullgraph": 2, "backend-bert": 2, "ops-table": 7, "llama": 7,
          "onnx-cuda": 2.5}
MIN_S = {"env": 1, "ceilings": 3, "blast-kernels": 10, "ss1-kernels": 8, "ops-autograd": 5,
         "compile-fullgraph": 10, "backend-bert": 15, "ops-table": 20, "llama": 45,
         "onnx-cuda": 20}
TITLES = {"env": "environment and versions", "ceilings": "copy and matmul ceilings",
          "blast-kernels": "BLAST Triton kernels vs fp64",
          "ss1-kernels": "SS1 Triton kernels vs fp64",
          "ops-autograd": "torch.ops.structfx + autograd vs fp64",
          "compile-fullgraph": "torch.compile(fullgraph=True) of BlastLinear/SS1Linear",
          "backend-bert": 'backend="structfx" on a tiny BERT',
          "ops-table": "ops table (do_bench)", "llama": "examples/llama_gpu.py tokens/s",
          "onnx-cuda": "onnxruntime CUDA EP, GPT-2-sized"}
HARD_GRACE = 0.5  # a step is interrupted this fraction of its share (>= 30 s) past its deadline


# ----------------------------------------------------------------------------- sizes
@dataclasses.dataclass(frozen=True)
class Sizes:
    tokens: tuple                 # correctness token counts
    blast: tuple                  # (n, m, (b1, b2), r)
    ss1: tuple                    # (K, N, c, block_k, block_n)
    ops_tokens: tuple             # ops-autograd / compile-fullgraph token counts
    model: tuple                  # compile-fullgraph (n, hidden, m, blocks, rank)
    bert: dict                    # small_bert kwargs
    table_shapes: tuple           # (n, m)
    table_tokens: tuple
    table_blocks: tuple
    table_ss1: tuple
    compiled_ref_blocks: tuple
    llama: dict
    onnx: dict
    copy_bytes: int
    mm_size: int


GPU_SIZES = Sizes(
    tokens=(1, 7, 16, 256, 4096),
    # divides / doesn't divide the blocks and the tiles; b2 = 16 takes the rolled mix loop
    blast=((1024, 1024, (4, 4), 128), (1001, 1503, (3, 5), 100), (4096, 4096, (16, 16), 200)),
    # block_k 40 (a multiple of 8, not a power of two), block_n 192 (> 128: N split in tiles)
    ss1=((4096, 4096, 2, 32, 64), (1000, 1500, 3, 40, 192), (4096, 11008, 4, 32, 64)),
    ops_tokens=(1, 16, 256),
    model=(512, 768, 384, (4, 4), 96),
    bert=dict(hidden=256, layers=2),
    table_shapes=((4096, 4096), (4096, 11008), (11008, 4096)),
    table_tokens=(1, 16, 256, 4096),
    table_blocks=(2, 4, 16),
    table_ss1=(2, 4),
    compiled_ref_blocks=(4,),
    llama=dict(layers=1, batch=8, prompt=512, new_tokens=32, gpu=True),
    onnx=dict(layers=4, hidden=768, batch="1,4", seq="128", budget=1.0),
    copy_bytes=1 << 30,
    mm_size=8192,
)
DRY_SIZES = Sizes(
    tokens=(1, 7, 16, 33),
    blast=((32, 48, (2, 2), 16), (37, 44, (3, 2), 20), (90, 40, (2, 9), 8)),
    ss1=((64, 64, 2, 16, 16), (50, 70, 3, 8, 24), (32, 150, 2, 8, 136)),
    ops_tokens=(1, 7),
    model=(48, 40, 36, (2, 2), 8),
    bert=dict(hidden=64, layers=1),
    table_shapes=((64, 64), (64, 172)),
    table_tokens=(1, 16),
    table_blocks=(2, 4),
    table_ss1=(2,),
    compiled_ref_blocks=(4,),
    llama=dict(layers=1, batch=1, prompt=8, new_tokens=3, gpu=False),
    onnx=dict(layers=1, hidden=64, batch="1", seq="8", budget=0.02),
    copy_bytes=1 << 20,
    mm_size=128,
)


# ----------------------------------------------------------------------------- versions
def _version(text: str) -> tuple:
    out = []
    for part in text.split("+")[0].split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        out.append(int(digits or 0))
    return tuple(out)


def check_features() -> list[tuple[str, bool, str]]:
    """``(feature, present, what has it)`` for what structfx and this script use from torch /
    triton, by feature detection (the GPU image may be older than the ``torch>=2.13`` pin)."""
    checks: list[tuple[str, bool, str]] = []

    def has(name: str, test: Callable[[], bool], needs: str) -> None:
        try:
            ok = bool(test())
        except Exception:  # noqa: BLE001  (an import or attribute error means: missing)
            ok = False
        checks.append((name, ok, needs))

    has("python >= 3.10", lambda: sys.version_info >= (3, 10), "Python 3.10")
    has("torch.library.custom_op / register_fake / register_autograd",
        lambda: all(hasattr(torch.library, a) for a in ("custom_op", "register_fake",
                                                         "register_autograd")), "torch 2.4")
    has("torch.utils.flop_counter.register_flop_formula",
        lambda: hasattr(importlib.import_module("torch.utils.flop_counter"),
                        "register_flop_formula"), "torch 2.3")
    has("torch.export.Dim.AUTO", lambda: hasattr(importlib.import_module("torch.export").Dim,
                                                  "AUTO"), "torch 2.6")
    has("torch.onnx.export(dynamo=True, custom_translation_table=...)",
        lambda: {"dynamo", "custom_translation_table"} <= set(
            inspect.signature(torch.onnx.export).parameters), "torch 2.6")
    has("torch._inductor.list_mode_options",
        lambda: hasattr(importlib.import_module("torch._inductor"), "list_mode_options"),
        "torch 2.0")
    has("triton importable", lambda: importlib.import_module("triton"), "triton 3.0")
    has("tl.dot(input_precision=...)",
        lambda: "input_precision" in inspect.signature(
            importlib.import_module("triton.language").dot).parameters, "triton 3.0")
    has("triton.testing.do_bench(return_mode=...)",
        lambda: "return_mode" in inspect.signature(
            importlib.import_module("triton.testing").do_bench).parameters, "triton 3.0")
    return checks


def check_versions_cli() -> int:
    """Pre-flight for benchmarks/gpu.sh (runs before ``import structfx``): 0 if all present."""
    missing = [(n, needs) for n, ok, needs in check_features() if not ok]
    print(f"python {platform.python_version()} | torch {torch.__version__} | "
          f"triton {_try_version('triton')} | onnxruntime {_try_version('onnxruntime')}")
    if _version(torch.__version__) < (2, 13):
        print(f"note: torch {torch.__version__} is older than the torch>=2.13 pin of "
              f"pyproject.toml; structfx was developed on 2.13; the features below are what "
              f"it needs")
    for name, needs in missing:
        print(f"missing: {name} (needs {needs} or newer)")
    return 1 if missing else 0


def _try_version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as e:  # noqa: BLE001
        return f"n/a ({type(e).__name__})"


# ----------------------------------------------------------------------------- run state
class StepFailed(Exception):
    """Raised by a step to fail with a message of its own (no traceback in the report)."""


class HardTimeout(Exception):
    pass


@dataclasses.dataclass
class StepResult:
    name: str
    status: str = "pending"            # ok | failed | skipped
    seconds: float = 0.0
    note: str = ""
    failures: list = dataclasses.field(default_factory=list)
    cases: list = dataclasses.field(default_factory=list)
    data: dict = dataclasses.field(default_factory=dict)
    skipped_cases: int = 0


class Run:
    def __init__(self, args):
        self.args = args
        self.dry = bool(args.dry_run)
        self.sizes = DRY_SIZES if self.dry else GPU_SIZES
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.out / "log.txt", "w", buffering=1)
        self.t0 = time.perf_counter()
        self.budget = float(args.budget_s)
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.command = "python -m structfx.bench " + " ".join(
            shlex.quote(a) for a in (args.argv if args.argv is not None else sys.argv[1:]))
        self.results: dict[str, StepResult] = {}
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.ceilings: dict[str, float] = {}
        self.k: Optional[SimpleNamespace] = None
        self.seed = 1234

    # time
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    # output
    def log(self, msg: str = "", echo: bool = True) -> None:
        self.log_file.write(msg + "\n")
        if echo:
            print(msg, flush=True)

    # randomness: fresh inputs for every case
    def gen(self) -> torch.Generator:
        self.seed += 1
        return torch.Generator(device=self.device).manual_seed(self.seed)

    def randn(self, *shape, g, scale=1.0, dtype=torch.float64) -> torch.Tensor:
        t = torch.randn(*shape, generator=g, device=self.device, dtype=torch.float32)
        return (t * scale).to(dtype)


class Step:
    """What a step body gets: its deadline, its result, and the case / check helpers."""

    def __init__(self, run: Run, result: StepResult, deadline: float, inject: bool):
        self.run, self.r, self.deadline, self.inject = run, result, deadline, inject

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def expired(self) -> bool:
        return time.perf_counter() >= self.deadline

    def log(self, msg: str, echo: bool = False) -> None:
        self.run.log(f"  [{self.r.name}] {msg}", echo=echo)

    def fail(self, label: str, msg: str) -> None:
        self.r.failures.append(f"{label}: {msg}")
        self.log(f"FAIL {label}: {msg}", echo=True)

    @contextlib.contextmanager
    def case(self, label: str):
        """One checked case: an exception is recorded with the label (shape, dtype, T) and
        the step goes on. With --inject-failure on this step, the first case raises (after
        its body, as a failing check would)."""
        try:
            yield
            if self.inject:
                self.inject = False
                raise RuntimeError("injected failure (--inject-failure)")
        except HardTimeout:
            raise
        except Exception as e:  # noqa: BLE001  (any failure: record it with its case)
            self.fail(label, f"{type(e).__name__}: {_first_line(e)}")
            self.log(traceback.format_exc())

    def budget_skip(self, n: int = 1) -> bool:
        """True (and counted) when the step's deadline has passed."""
        if self.expired():
            self.r.skipped_cases += n
            return True
        return False

    def compare(self, label: str, what: str, got, ref, dtype, extra: str = "") -> bool:
        """Record ``||got - ref|| / ||ref||`` against ``TOL[dtype]``; NaN (an unwritten,
        poisoned element) or a wrong shape fails."""
        tol = TOL[dtype]
        entry = dict(case=label, what=what, dtype=_dt(dtype), tol=tol)
        if got is None or tuple(got.shape) != tuple(ref.shape):
            entry.update(ok=False, error=None)
            self.r.cases.append(entry)
            self.fail(f"{label} {what}", f"shape {None if got is None else tuple(got.shape)}, "
                                         f"expected {tuple(ref.shape)}")
            return False
        g = got.detach().double()
        nan = int(torch.isnan(g).sum())
        err = rel_err(g, ref.detach().double())
        ok = nan == 0 and err <= tol
        entry.update(ok=ok, error=err, unwritten=nan)
        self.r.cases.append(entry)
        if not ok:
            why = f"rel err {err:.2e} > tol {tol:.0e}" if err > tol or not math.isfinite(err) \
                else f"rel err {err:.2e}"
            if nan:
                why += f", {nan} of {g.numel()} elements NaN (unwritten or poisoned)"
            self.fail(f"{label} {what}", why + (f" {extra}" if extra else ""))
        return ok


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _dt(dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.float64: "fp64"}.get(dtype, str(dtype))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(got).all():
        return math.inf
    denom = ref.norm().item()
    num = (got - ref).norm().item()
    return num / denom if denom > 0 else (0.0 if num == 0 else math.inf)


# ----------------------------------------------------------------------------- poisoning
@contextlib.contextmanager
def poisoned_outputs():
    """Fill every float tensor made by ``torch.empty`` / ``empty_like`` / ``empty_strided`` /
    ``Tensor.new_empty`` with NaN while active (the launchers allocate their outputs with
    these), so elements a kernel does not write stay NaN. Yields a counter of poisoned
    allocations."""
    count = [0]
    originals = (torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty)

    def poison(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            t.fill_(float("nan"))
            count[0] += 1
        return t

    def wrap(fn):
        return lambda *a, **k: poison(fn(*a, **k))

    torch.empty, torch.empty_like, torch.empty_strided = (wrap(f) for f in originals[:3])
    torch.Tensor.new_empty = lambda self, *a, **k: poison(originals[3](self, *a, **k))
    try:
        yield count
    finally:
        torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty = originals


def _require_poisoned(st: Step, label: str, count: list) -> None:
    if count[0] == 0:
        st.fail(label, "the launcher allocated no output through torch.empty / new_empty, so "
                       "the NaN poisoning did not reach it: update poisoned_outputs()")


# ----------------------------------------------------------------------------- kernels
def resolve_kernels() -> tuple[SimpleNamespace, list[str]]:
    """``KERNELS`` resolved; names that do not resolve are left None and listed."""
    found, missing = {}, []
    for key, spec in KERNELS.items():
        mod_name, attr = spec.split(":")
        try:
            found[key] = getattr(importlib.import_module(mod_name), attr)
        except Exception as e:  # noqa: BLE001
            found[key] = None
            missing.append(f"{key} = {spec}: {type(e).__name__}: {_first_line(e)} "
                           f"(update KERNELS in structfx/bench_gpu.py)")
    return SimpleNamespace(**found), missing


def need(run: Run, *names: str) -> SimpleNamespace:
    missing = [n for n in names if getattr(run.k, n, None) is None]
    if missing:
        raise StepFailed("kernel entry points not found: " + ", ".join(
            f"{n} ({KERNELS[n]})" for n in missing) + " (update KERNELS in structfx/bench_gpu.py)")
    return run.k


def autotuners(modules=KERNEL_MODULES) -> list:
    """The ``triton.autotune`` objects of the kernel modules (found by type, not by name)."""
    try:
        from triton.runtime.autotuner import Autotuner
    except Exception:  # noqa: BLE001
        return []
    out = []
    for name in modules:
        mod = sys.modules.get(name)
        if mod is not None:
            out += [v for v in vars(mod).values() if isinstance(v, Autotuner)]
    return out


@contextlib.contextmanager
def pinned_configs(pick: Callable[[list], list] = lambda configs: configs[:1],
                   modules=KERNEL_MODULES):
    """Pin every autotuner to ``pick(its configs)`` (default: the first) and clear its tuned
    choices; restored (and cleared again) on exit.

    The correctness steps check values, not speed: with the full autotune every new key
    (token bucket x shape x dtype) would compile and benchmark every config, minutes of
    compiling on a fresh machine. Pinned, each kernel compiles about once per dtype and
    specialization; ``sweep_configs`` then runs each config once, and ``ops-table`` tunes for
    real and re-checks the outputs of the configs it picked."""
    saved = [(t, t.configs) for t in autotuners(modules)]
    try:
        for tuner, configs in saved:
            tuner.configs = pick(list(configs))
            tuner.cache.clear()
        yield len(saved)
    finally:
        for tuner, configs in saved:
            tuner.configs = configs
            tuner.cache.clear()


def sweep_configs(st: Step, what: str, module: str, check: Callable[[int], None]) -> None:
    """Run ``check`` once per autotune config index (config i of every kernel of ``module``,
    cycled), so every config of every kernel computes at least once against the reference."""
    n = max((len(t.configs) for t in autotuners((module,))), default=1)
    for i in range(n):
        if st.budget_skip():
            continue
        with pinned_configs(lambda configs, i=i: [configs[i % len(configs)]], (module,)):
            with st.case(f"{what} config #{i}"):
                check(i)


def cases_for(run: Run, *axes):
    """All combinations on the GPU. The dry run covers every value of every axis at least once
    (a diagonal through the grid plus its shifted copy), not the full product."""
    if not run.dry:
        return list(itertools.product(*axes))
    n = max(len(a) for a in axes)
    picks = []
    for shift in (0, 1):
        for i in range(n):
            picks.append(tuple(a[(i + shift * (k + 1)) % len(a)] for k, a in enumerate(axes)))
    return list(dict.fromkeys(picks))


# ----------------------------------------------------------------------------- step: env
def step_env(run: Run, st: Step) -> None:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torch CUDA": str(torch.version.cuda), "triton": _try_version("triton"),
            "onnxruntime": _try_version("onnxruntime"), "transformers":
            _try_version("transformers"), "numpy": _try_version("numpy"),
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "")}
    try:
        import onnxruntime as ort
        info["onnxruntime providers"] = ", ".join(ort.get_available_providers())
    except Exception as e:  # noqa: BLE001
        info["onnxruntime providers"] = f"n/a ({type(e).__name__})"
    import structfx
    info["structfx from"] = str(Path(structfx.__file__).parent)
    repo = Path(__file__).resolve().parents[1]
    try:
        info["structfx commit"] = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
            text=True, timeout=10).stdout.strip() or "n/a"
    except Exception:  # noqa: BLE001
        info["structfx commit"] = "n/a"
    if run.dry:
        info["device"] = "CPU (dry run: no GPU figure)"
    elif not torch.cuda.is_available():
        run.results[st.r.name].data["info"] = info
        raise StepFailed("torch.cuda.is_available() is False: no GPU seen by torch "
                         f"{torch.__version__} (CUDA {torch.version.cuda}); use --dry-run on CPU")
    else:
        props = torch.cuda.get_device_properties(0)
        info.update({"GPU": props.name, "SMs": str(props.multi_processor_count),
                     "compute capability": f"{props.major}.{props.minor}",
                     "memory GiB": f"{props.total_memory / 2**30:.1f}",
                     "L2 MiB": f"{getattr(props, 'L2_cache_size', 0) / 2**20:.0f}"})
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,"
                                  "clocks.max.sm,power.limit", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=15).stdout.strip()
            info["driver, SM clock, max SM clock, power limit"] = smi or "n/a"
        except Exception as e:  # noqa: BLE001
            info["driver"] = f"n/a (nvidia-smi: {type(e).__name__})"
    st.r.data["info"] = info
    for k, v in info.items():
        st.log(f"{k}: {v}", echo=True)

    missing = []
    for name, ok, needs in check_features():
        st.r.data.setdefault("features", []).append(dict(feature=name, ok=ok, needs=needs))
        if not ok:
            missing.append(f"{name} (needs {needs} or newer)")
    if _version(torch.__version__) < (2, 13):
        st.r.note = (f"torch {torch.__version__} is older than the torch>=2.13 pin "
                     f"(developed on 2.13); feature checks passed")
    # Kernel modules read TRITON_INTERPRET when imported: a module imported before main()
    # set it would run in the wrong mode.
    want = run.dry
    for name in KERNEL_MODULES:
        mod = sys.modules.get(name)
        mode = getattr(mod, "_INTERPRET", getattr(mod, "INTERPRET", want))  # either name
        if mod is not None and mode != want:
            missing.append(f"{name} was imported with TRITON_INTERPRET="
                           f"{'1' if not want else '0'} before this run set it; run the "
                           f"benchmark in a fresh process")
    run.k, unresolved = resolve_kernels()
    if unresolved:
        st.r.data["unresolved kernels"] = unresolved
        for u in unresolved:
            st.fail("kernel entry point", u)
    if missing:
        raise StepFailed("; ".join(missing))


# ----------------------------------------------------------------------------- step: ceilings
def timer(run: Run, budget_s: float = 0.05) -> Callable[[Callable], float]:
    """Median ms: ``triton.testing.do_bench`` (L2 flushed) on CUDA, a CPU median otherwise."""
    from structfx.timing import time_fn
    if run.dry:
        return lambda fn: 1e3 * time_fn(fn, budget_s=budget_s, min_repeats=3)
    return lambda fn: 1e3 * time_fn(fn, flush_l2=True)


def step_ceilings(run: Run, st: Step) -> None:
    t = timer(run, 0.1)
    n = run.sizes.copy_bytes // 2
    g = run.gen()
    src = run.randn(n, g=g, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = t(lambda: dst.copy_(src))
    run.ceilings["TB/s"] = 2 * src.numel() * 2 / (ms * 1e-3) / 1e12
    del src, dst
    s = run.sizes.mm_size
    dt = torch.float32 if run.dry else torch.bfloat16
    A, B = run.randn(s, s, g=g, dtype=dt), run.randn(s, s, g=g, dtype=dt)
    C = torch.empty(s, s, dtype=dt, device=run.device)
    ms_mm = t(lambda: torch.mm(A, B, out=C))
    run.ceilings["TFLOP/s"] = 2 * s ** 3 / (ms_mm * 1e-3) / 1e12
    st.r.data.update(copy_bytes=2 * n * 2, copy_ms=ms, mm=f"{s}x{s}x{s} {_dt(dt)}",
                     mm_ms=ms_mm, **run.ceilings)
    st.log(f"D2D copy {2 * n * 2 / 1e9:.2f} GB moved: {ms:.3f} ms = "
           f"{run.ceilings['TB/s']:.3f} TB/s; mm {s}^3 {_dt(dt)}: {ms_mm:.3f} ms = "
           f"{run.ceilings['TFLOP/s']:.1f} TFLOP/s" + (" (CPU, dry run)" if run.dry else ""),
           echo=True)


# ----------------------------------------------------------------------------- step: BLAST
def blast_inputs(run: Run, T, n, m, b1, b2, r, dtype, bias: bool):
    """Random inputs in ``dtype`` (factors padded: p = ceil(m/b1), q = ceil(n/b2); the padding
    holds random values too, which the kernels must mask)."""
    g = run.gen()
    p, q = -(-m // b1), -(-n // b2)
    x = run.randn(T, n, g=g, dtype=dtype)
    U = run.randn(b1, p, r, g=g, scale=r ** -0.5, dtype=dtype)
    S = run.randn(b1, b2, r, g=g, dtype=dtype)
    V = run.randn(b2, q, r, g=g, scale=n ** -0.5, dtype=dtype)
    bb = run.randn(m, g=g, dtype=dtype) if bias else None
    return x, U, S, V, bb


def _blast_z_ref(x, V):
    """fp64 ``z[j] = x[:, j*q:(j+1)*q] @ V[j]`` (x zero-padded to b2*q columns)."""
    b2, q, _ = V.shape
    xp = torch.nn.functional.pad(x.double(), (0, b2 * q - x.shape[1]))
    return torch.einsum("tjq,jqr->jtr", xp.view(x.shape[0], b2, q), V.double())


def blast_case(run: Run, st: Step, dtype, shape, T: int, bias: bool, tag: str = "") -> None:
    """Every BLAST kernel on one problem: stage 1, fused mix + U-GEMM, mix, the forward and the
    backward launchers, each against fp64, outputs poisoned."""
    k = run.k
    n, m, (b1, b2), r = shape
    label = (f"n={n} m={m} b={b1}x{b2} r={r} {_dt(dtype)} T={T}" + (" bias" if bias else "")
             + tag)
    x, U, S, V, bb = blast_inputs(run, T, n, m, b1, b2, r, dtype, bias)
    x64, U64, S64, V64 = (t.double() for t in (x, U, S, V))
    b64 = bb.double() if bias else None
    z_ref = _blast_z_ref(x, V)
    with st.case(f"{label} stage1"), poisoned_outputs() as cnt:
        z = k.blast_stage1(x, V, dtype)
        _require_poisoned(st, f"{label} stage1", cnt)
        st.compare(label, "stage1 z", z, z_ref, dtype)
    # mix + U-GEMM from a given z (in the compute dtype), against fp64 from that z
    zq = z_ref.to(dtype)
    w_ref = torch.einsum("ijr,jtr->itr", S64, zq.double())
    y_ref = torch.einsum("itr,ipr->tip", w_ref, U64).reshape(T, -1)[:, :m]
    if bias:
        y_ref = y_ref + b64
    with st.case(f"{label} mix_gemm"), poisoned_outputs() as cnt:
        y = k.blast_mix_gemm(zq, S, U, bb, m, dtype)
        _require_poisoned(st, f"{label} mix_gemm", cnt)
        st.compare(label, "fused mix+U-GEMM", y, y_ref, dtype)
    with st.case(f"{label} mix"), poisoned_outputs() as cnt:
        w = k.blast_mix(zq, S)
        _require_poisoned(st, f"{label} mix", cnt)
        st.compare(label, "mix", w, w_ref, dtype)
    # the launchers, end to end
    leaves = [x64.requires_grad_(), U64.requires_grad_(), S64.requires_grad_(),
              V64.requires_grad_()] + ([b64.requires_grad_()] if bias else [])
    y64 = k.blast_reference(x64, U64, S64, V64, b64, m)
    with st.case(f"{label} forward"), poisoned_outputs() as cnt:
        y = k.blast_forward(x, U, S, V, bb, m)
        _require_poisoned(st, f"{label} forward", cnt)
        st.compare(label, "forward", y, y64, dtype)
    dy = run.randn(T, m, g=run.gen(), dtype=dtype)
    grads = torch.autograd.grad(y64, leaves, dy.double())
    with st.case(f"{label} backward"), poisoned_outputs() as cnt:
        out = k.blast_backward(dy, x, U, S, V, bb, m, (True,) * 5)
        _require_poisoned(st, f"{label} backward", cnt)
        for name, got, ref in zip(("dx", "dU", "dS", "dV", "dbias"), out, grads):
            st.compare(label, f"backward {name}", got, ref, dtype)
    _sync(run)


def _sync(run: Run) -> None:
    if not run.dry and torch.cuda.is_available():
        torch.cuda.synchronize()  # an asynchronous fault shows at its own case


def step_blast_kernels(run: Run, st: Step) -> None:
    need(run, "blast_stage1", "blast_mix_gemm", "blast_mix", "blast_forward", "blast_backward",
         "blast_reference")
    grid = cases_for(run, list(DTYPES.values()), run.sizes.blast, run.sizes.tokens,
                     [False, True])
    with pinned_configs():
        for dtype, shape, T, bias in grid:
            if not st.budget_skip():
                blast_case(run, st, dtype, shape, T, bias)
    # every autotune config once: bf16, the shape that divides nothing, two token tiles+
    sweep_configs(st, "BLAST", KERNEL_MODULES[0], lambda i: blast_case(
        run, st, torch.bfloat16, run.sizes.blast[1], run.sizes.tokens[-2], True,
        f" config #{i}"))


# ----------------------------------------------------------------------------- step: SS1
def ss1_inputs(run: Run, T, K, N, c, bk, dtype, bias: bool):
    g = run.gen()
    K_red = run.k.ss1_reduced_k(K, c, bk)
    x = run.randn(T, K, g=g, dtype=dtype)
    P = run.randn(N, K_red, g=g, scale=K ** -0.5, dtype=dtype)
    bb = run.randn(N, g=g, dtype=dtype) if bias else None
    seed = int(torch.randint(0, 1 << 20, (1,), generator=torch.Generator().manual_seed(
        run.seed)).item())
    return x, P, bb, seed


def ss1_case(run: Run, st: Step, dtype, shape, T: int, bias: bool, tag: str = "") -> None:
    """The SS1 forward, dx and dP kernels on one problem against fp64, outputs poisoned."""
    k = run.k
    K, N, c, bk, bn = shape
    label = (f"K={K} N={N} c={c} block_k={bk} block_n={bn} {_dt(dtype)} T={T}"
             + (" bias" if bias else "") + tag)
    x, P, bb, seed = ss1_inputs(run, T, K, N, c, bk, dtype, bias)
    coeffs = k.ss1_coeffs(seed)
    x64 = x.double().requires_grad_()
    P64 = P.double().requires_grad_()
    b64 = bb.double() if bias else None
    y64 = k.ss1_reference(x64, P64, b64, c, seed, bk, bn)
    with st.case(f"{label} forward"), poisoned_outputs() as cnt:
        y = k.ss1_forward(x, P, bb, c, coeffs, bk, bn)
        _require_poisoned(st, f"{label} forward", cnt)
        st.compare(label, "forward", y, y64, dtype)
    dy = run.randn(T, N, g=run.gen(), dtype=dtype)
    dx64, dP64 = torch.autograd.grad(y64, [x64, P64], dy.double())
    with st.case(f"{label} dx"), poisoned_outputs() as cnt:
        dx, _, _ = k.ss1_backward(dy, x, P, bb, c, coeffs, bk, bn, (True, False, False))
        _require_poisoned(st, f"{label} dx", cnt)
        st.compare(label, "dx", dx, dx64, dtype)
    with st.case(f"{label} dP"), poisoned_outputs() as cnt:
        _, dP, _ = k.ss1_backward(dy, x, P, bb, c, coeffs, bk, bn, (False, True, False))
        _require_poisoned(st, f"{label} dP", cnt)
        st.compare(label, "dP", dP, dP64, dtype)
    _sync(run)


def step_ss1_kernels(run: Run, st: Step) -> None:
    need(run, "ss1_forward", "ss1_backward", "ss1_reference", "ss1_coeffs", "ss1_reduced_k")
    grid = cases_for(run, list(DTYPES.values()), run.sizes.ss1, run.sizes.tokens,
                     [False, True])
    with pinned_configs():
        for dtype, shape, T, bias in grid:
            if not st.budget_skip():
                ss1_case(run, st, dtype, shape, T, bias)
    sweep_configs(st, "SS1", KERNEL_MODULES[1], lambda i: ss1_case(
        run, st, torch.bfloat16, run.sizes.ss1[1], run.sizes.tokens[-2], True,
        f" config #{i}"))


# ----------------------------------------------------------------------------- step: ops
def step_ops_autograd(run: Run, st: Step) -> None:
    k = need(run, "blast_reference", "ss1_reference", "ss1_reduced_k")
    import structfx  # noqa: F401  (registers torch.ops.structfx.*)

    blast_shape, ss1_shape = run.sizes.blast[1], run.sizes.ss1[1]
    lead = [(), (2,)]  # 2-D and 3-D inputs (the ops flatten leading dims)
    grid = cases_for(run, list(DTYPES.values()), run.sizes.ops_tokens, lead, [False, True])
    with pinned_configs():
        for dtype, T, lead_dims, bias in grid:
            if st.budget_skip(2):
                continue
            tag = f"{_dt(dtype)} x={(*lead_dims, T)}+features" + (" bias" if bias else "")
            n, m, (b1, b2), r = blast_shape
            label = f"blast_linear n={n} m={m} b={b1}x{b2} r={r} {tag}"
            with st.case(label):
                rows = T * math.prod(lead_dims)
                x, U, S, V, bb = blast_inputs(run, rows, n, m, b1, b2, r, dtype, bias)
                x = x.reshape(*lead_dims, T, n)
                leaves = [t.requires_grad_() for t in (x, U, S, V) + ((bb,) if bias else ())]
                with poisoned_outputs():
                    y = torch.ops.structfx.blast_linear(x, U, S, V, bb, m)
                dy = run.randn(*y.shape, g=run.gen(), dtype=dtype)
                with poisoned_outputs():
                    grads = torch.autograd.grad(y, leaves, dy)
                ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
                b64 = ref_leaves[4] if bias else None
                y64 = k.blast_reference(*ref_leaves[:4], b64, m)
                refs = torch.autograd.grad(y64, ref_leaves, dy.double())
                st.compare(label, "forward", y, y64, dtype)
                for name, got, ref in zip(("dx", "dU", "dS", "dV", "dbias"), grads, refs):
                    st.compare(label, f"grad {name}", got, ref, dtype)
            K, N, c, bk, bn = ss1_shape
            label = f"ss1_linear K={K} N={N} c={c} block_k={bk} block_n={bn} {tag}"
            with st.case(label):
                x, P, bb, seed = ss1_inputs(run, T * math.prod(lead_dims), K, N, c, bk, dtype,
                                            bias)
                x = x.reshape(*lead_dims, T, K)
                leaves = [t.requires_grad_() for t in (x, P) + ((bb,) if bias else ())]
                with poisoned_outputs():
                    y = torch.ops.structfx.ss1_linear(x, P, bb, c, seed, bk, bn)
                dy = run.randn(*y.shape, g=run.gen(), dtype=dtype)
                with poisoned_outputs():
                    grads = torch.autograd.grad(y, leaves, dy)
                ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
                b64 = ref_leaves[2] if bias else None
                y64 = k.ss1_reference(ref_leaves[0], ref_leaves[1], b64, c, seed, bk, bn)
                refs = torch.autograd.grad(y64, ref_leaves, dy.double())
                st.compare(label, "forward", y, y64, dtype)
                for name, got, ref in zip(("dx", "dP", "dbias"), grads, refs):
                    st.compare(label, f"grad {name}", got, ref, dtype)


def _compile_fullgraph(run: Run, st: Step) -> None:
    k = need(run, "blast_reference", "ss1_reference")
    from structfx import BlastLinear, SS1Linear

    n, h, m, blocks, rank = run.sizes.model
    dtypes = [torch.float32] if run.dry else [torch.bfloat16, torch.float32]
    tokens = run.sizes.ops_tokens
    for dtype in dtypes:
        torch._dynamo.reset()
        torch.manual_seed(run.seed)
        model = torch.nn.Sequential(BlastLinear(n, h, blocks, rank), torch.nn.GELU(),
                                    SS1Linear(h, m, compression=2, seed=3))
        with torch.no_grad():  # S = 1 after init: give the mixing something to do
            model[0].S.normal_()
        model = model.to(run.device, dtype)
        compiled = torch.compile(model, fullgraph=True)
        for T in tokens:
            if st.budget_skip():
                continue
            label = f"Blast({n}->{h}, b={blocks}, r={rank})+GELU+SS1({h}->{m}, c=2) " \
                    f"{_dt(dtype)} x=(2, {T}, {n})"
            with st.case(label):
                x = run.randn(2, T, n, g=run.gen(), dtype=dtype).requires_grad_()
                model.zero_grad(set_to_none=True)
                y = compiled(x)
                dy = run.randn(*y.shape, g=run.gen(), dtype=dtype)
                y.backward(dy)
                params = dict(model.named_parameters())
                ref = {name: p.detach().double().requires_grad_() for name, p in params.items()}
                x64 = x.detach().double().requires_grad_()
                s = model[2]
                hid = k.blast_reference(x64, ref["0.U"], ref["0.S"], ref["0.V"], ref["0.bias"], h)
                y64 = k.ss1_reference(torch.nn.functional.gelu(hid), ref["2.P"], ref["2.bias"],
                                      s.compression, s.seed, s.block_k, s.block_n)
                names = list(ref)
                grads = torch.autograd.grad(y64, [x64] + [ref[nm] for nm in names], dy.double())
                st.compare(label, "forward", y, y64, dtype)
                st.compare(label, "grad x", x.grad, grads[0], dtype)
                for nm, g64 in zip(names, grads[1:]):
                    st.compare(label, f"grad {nm}", params[nm].grad, g64, dtype)
    torch._dynamo.reset()


def _backend_bert(run: Run, st: Step) -> None:
    import structfx
    from structfx.__main__ import small_bert

    torch._dynamo.reset()
    model = small_bert(seed=0, **run.sizes.bert).to(run.device)
    opts = dict(params=0.5, min_params=0, force=True, steps=3 if run.dry else 10,
                estimate_steps=1 if run.dry else 2, blocks=(2,) if run.dry else (2, 4),
                rank_fractions=(0.5,), progress=False, strict=True)
    label = f"BERT hidden={run.sizes.bert['hidden']} layers={run.sizes.bert['layers']} fp32"
    for shape in [(2, 16)] if run.dry else [(2, 16), (4, 64)]:
        if st.budget_skip():
            continue
        with st.case(f"{label} ids={shape}"):
            ids = torch.randint(0, 1000, shape, device=run.device)
            small = structfx.compress(model, (ids,), structfx.Config(**opts))
            rep = structfx.last_report()
            if not rep.replaced:
                raise StepFailed("compress replaced no layer")
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="structfx", options=opts)
            with torch.no_grad():
                y_dense = model(ids).last_hidden_state
                y_small = small(ids).last_hidden_state
                y_comp = compiled(ids).last_hidden_state
            crep = structfx.last_report()
            st.log(f"{label} ids={shape}: {len(rep.replaced)} layers replaced by compress, "
                   f"{len(crep.replaced)} in the compiled graph; output error vs dense "
                   f"{rel_err(y_small.double(), y_dense.double()):.3f} (random weights)",
                   echo=True)
            if len(crep.replaced) != len(rep.replaced):
                st.fail(f"{label} ids={shape}", f"compiled graph replaced "
                        f"{len(crep.replaced)} layers, compress {len(rep.replaced)}")
            # same factors (the cache): the compiled model computes what compress's module does
            st.compare(f"{label} ids={shape}", "compiled vs compress", y_comp, y_small,
                       torch.float32)
            err = rel_err(y_small.double(), y_dense.double())
            if not math.isfinite(err) or err > 1.5:
                st.fail(f"{label} ids={shape}", f"compressed output error vs dense {err:.3g}")
    torch._dynamo.reset()


def step_compile_fullgraph(run: Run, st: Step) -> None:
    with pinned_configs():  # values, not speed (see pinned_configs)
        _compile_fullgraph(run, st)


def step_backend_bert(run: Run, st: Step) -> None:
    with pinned_configs():
        _backend_bert(run, st)


# ----------------------------------------------------------------------------- step: table
def _rotating(fn: Callable, sets: list) -> Callable[[], object]:
    it = itertools.cycle(sets)
    return lambda: fn(*next(it))


def _n_sets(run: Run, bytes_per_set: int) -> int:
    """Enough input sets that together they exceed 3x the L2 (2..8)."""
    l2 = 50 << 20
    if not run.dry:
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", l2) or l2
    return max(2, min(8, math.ceil(3 * l2 / max(1, bytes_per_set))))


def step_ops_table(run: Run, st: Step) -> None:
    k = need(run, "blast_torch", "ss1_reduced_k", "blast_reference", "ss1_reference")
    import torch.nn.functional as F

    import structfx  # noqa: F401

    for tuner in autotuners():  # tune for real: drop the correctness steps' quick choices
        tuner.cache.clear()
    t = timer(run, 0.01)
    dt = torch.float32 if run.dry else torch.bfloat16
    item = torch.empty((), dtype=dt).element_size()
    rho = run.args.params
    cells = []
    st.r.data["cells"] = cells
    compiled_done = 0
    for (n, m), T in itertools.product(run.sizes.table_shapes, run.sizes.table_tokens):
        if st.budget_skip():
            continue
        cell = dict(n=n, m=m, T=T, methods={})
        cells.append(cell)
        io = (T * n + T * m) * item

        def timed(name, make, fn, params, flops, extra=None, ref=None):
            """Time ``fn`` over rotating sets made by ``make`` (one set: a tuple of args);
            with ``ref``, also check ``fn``'s output on the first set (the autotuned config
            the timing used) against ``ref(*set)`` in fp32."""
            if st.expired():
                st.r.skipped_cases += 1
                return
            label = f"{n}x{m} T={T} {name}"
            with st.case(label):
                g = run.gen()
                first = make(g)
                sets = [first] + [make(g) for _ in range(_n_sets(run, params * item + io) - 1)]
                ms = t(_rotating(fn, sets))
                if ref is not None:
                    st.compare(label, "output (tuned config)", fn(*first),
                               ref(*(a.float() for a in first)), dt)
                entry = dict(ms=ms, params=params, flops=flops, bytes=params * item + io,
                             sets=len(sets), **(extra or {}))
                cell["methods"][name] = entry
                st.log(f"{label}: {ms:.4g} ms ({len(sets)} input sets)")
                del sets, first

        def x_of(g):
            return run.randn(T, n, g=g, dtype=dt)

        with torch.inference_mode():
            timed("dense", lambda g: (x_of(g), run.randn(m, n, g=g, scale=n ** -0.5, dtype=dt)),
                  F.linear, m * n, 2 * T * m * n)
            r = max(1, math.floor(rho * m * n / (m + n)))
            timed("low rank", lambda g: (x_of(g), run.randn(r, n, g=g, scale=n ** -0.5, dtype=dt),
                                         run.randn(m, r, g=g, scale=r ** -0.5, dtype=dt)),
                  lambda x, A, B: F.linear(F.linear(x, A), B), r * (m + n),
                  2 * T * r * (m + n), dict(rank=r))
            for b in run.sizes.table_blocks:
                r = max(1, math.floor(rho * m * n / (m + n + b * b)))
                p, q = -(-m // b), -(-n // b)

                def make(g, b=b, r=r, p=p, q=q):
                    return (x_of(g), run.randn(b, p, r, g=g, scale=r ** -0.5, dtype=dt),
                            run.randn(b, b, r, g=g, dtype=dt),
                            run.randn(b, q, r, g=g, scale=n ** -0.5, dtype=dt))
                flops = 2 * T * r * (b * q + b * p + b * b)
                ref = lambda x, U, S, V: k.blast_reference(x, U, S, V, None, m)  # noqa: E731
                timed(f"BLAST b={b}", make,
                      lambda x, U, S, V: torch.ops.structfx.blast_linear(x, U, S, V, None, m),
                      r * (b * p + b * q + b * b), flops, dict(rank=r), ref)
                if b in run.sizes.compiled_ref_blocks and (not run.dry or compiled_done == 0):
                    torch._dynamo.reset()  # a fresh static-shape compile per cell
                    compiled = torch.compile(k.blast_torch, dynamic=False)
                    timed(f"compiled torch BLAST b={b}", make,
                          lambda x, U, S, V, fn=compiled: fn(x, U, S, V, None, m),
                          r * (b * p + b * q + b * b), flops, dict(rank=r), ref)
                    compiled_done += 1
            for c in run.sizes.table_ss1:
                K_red = k.ss1_reduced_k(n, c)
                timed(f"SS1 c={c}", lambda g, K_red=K_red: (
                    x_of(g), run.randn(m, K_red, g=g, scale=n ** -0.5, dtype=dt)),
                    lambda x, P, c=c: torch.ops.structfx.ss1_linear(x, P, None, c, 0, 32, 64),
                    m * K_red, 2 * T * m * K_red + T * n * -(-m // 64), dict(compression=c),
                    lambda x, P, c=c: k.ss1_reference(x, P, None, c, 0, 32, 64))
    torch._dynamo.reset()
    if run.dry:
        st.r.note = "CPU timings of tiny problems (dry run): not figures"


# ----------------------------------------------------------------------------- step: llama
def _examples_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "examples"


def llama_child(spec: dict) -> None:
    """Child process: examples/llama_gpu.py's model / configs / timing, one JSON line per
    (mode, model) as each finishes, so a timeout keeps what was measured."""
    import warnings

    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(_examples_dir()))
    import llama_gpu  # noqa: E402  (examples/llama_gpu.py)

    import structfx

    gpu = spec["gpu"]
    device = "cuda" if gpu else "cpu"
    # CPU: tiny, with sizes that SS1 c=2 halves exactly (multiples of c * block_k = 64)
    sizes = llama_gpu.LLAMA_7B if gpu else dict(hidden_size=128, intermediate_size=384,
                                                 num_attention_heads=2)
    dtype = torch.bfloat16 if gpu else torch.float32
    model = llama_gpu.llama(spec["layers"], sizes).to(device, dtype)
    prompt = torch.randint(0, 32000, (spec["batch"], spec["prompt"]), device=device)
    print(json.dumps(dict(event="start", sizes=sizes, dtype=str(dtype), batch=spec["batch"],
                          prompt=spec["prompt"], new_tokens=spec["new_tokens"])), flush=True)
    cfgs = llama_gpu.configs(False)
    unknown = sorted(set(spec["labels"]) - set(cfgs) - {"dense"})
    if unknown:
        raise SystemExit(f"examples/llama_gpu.py configs() has no {unknown}; it has "
                         f"{sorted(cfgs)} (update the plan in structfx/bench_gpu.py)")
    for mode, labels in spec["plan"]:
        for label in labels:
            try:
                row = _llama_row(llama_gpu, structfx, model, prompt, cfgs, label, mode,
                                 spec["new_tokens"])
            except Exception as e:  # noqa: BLE001  (report it, go on with the next row)
                row = dict(event="error", mode=mode or "default", model=label,
                           error=f"{type(e).__name__}: {_first_line(e)}")
            print(json.dumps(row), flush=True)


def _llama_row(llama_gpu, structfx, model, prompt, cfgs, label, mode, new_tokens) -> dict:
    t0 = time.perf_counter()
    torch._dynamo.reset()
    structfx.clear_reports()
    if label == "dense":
        m = torch.compile(model, mode=mode)
    else:  # strict: a graph structfx can't handle is an error here, not a silent dense run
        cfg = cfgs[label].replace(progress=False, strict=True)
        m = torch.compile(model, backend=structfx.backend(cfg), mode=mode)
    llama_gpu.generate(m, prompt, 4)  # compiles prefill and decode
    setup = time.perf_counter() - t0
    prefill, decode = llama_gpu.measure(m, prompt, new_tokens)
    replaced = sorted({d.name for r in structfx.reports() for d in r.replaced})
    if label != "dense" and not replaced:
        raise RuntimeError("structfx replaced no layer")
    return dict(event="result", mode=mode or "default", model=label, prefill_tok_s=prefill,
                decode_tok_s=decode, setup_s=setup, replaced=len(replaced))


def step_llama(run: Run, st: Step) -> None:
    path = _examples_dir() / "llama_gpu.py"
    if not path.exists():
        raise StepFailed(f"{path} not found")
    # What matters first: default mode, then CUDA graphs; within each, dense (the base) first.
    # (The factor cache makes a structure's second mode cheap: nothing is factorized twice.)
    gpu_plan = [[None, ["dense", "BLAST b=2"]], ["reduce-overhead", ["dense", "BLAST b=2"]],
                [None, ["SS1 c=2"]], ["reduce-overhead", ["SS1 c=2"]],
                [None, ["BLAST b=4"]], ["reduce-overhead", ["BLAST b=4"]]]
    # dry run: SS1 only (BLAST's factorization is minutes on 2 CPU cores); the child checks
    # that every label of the GPU plan exists before it starts
    plan = [[None, ["dense", "SS1 c=2"]], ["reduce-overhead", ["dense", "SS1 c=2"]]] \
        if run.dry else gpu_plan
    spec = dict(run.sizes.llama, plan=plan,
                labels=sorted({lb for _, lbs in gpu_plan + plan for lb in lbs}))
    timeout = max(5.0, st.left())
    cmd = [sys.executable, "-m", "structfx.bench_gpu", "llama-child", json.dumps(spec)]
    st.log(f"child: {' '.join(shlex.quote(c) for c in cmd)} (timeout {timeout:.0f} s)")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out_lines: list[str] = []
    timed_out = False
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    out_lines = (stdout or "").splitlines()
    for line in out_lines:
        run.log(f"    llama| {line}", echo=False)
    rows = [json.loads(s) for s in out_lines if s.startswith("{") and '"event": "result"' in s]
    for e in (json.loads(s) for s in out_lines if s.startswith("{") and '"event": "error"' in s):
        st.fail(f"llama {e['model']} mode={e['mode']}", e["error"])
    start = [json.loads(s) for s in out_lines if s.startswith("{") and '"event": "start"' in s]
    st.r.data.update(rows=rows, setup=start[0] if start else None, plan=plan)
    base = {r["mode"]: r for r in rows if r["model"] == "dense"}
    for r in rows:
        b = base.get(r["mode"])
        if b and r["model"] != "dense":
            r["prefill_ratio"] = r["prefill_tok_s"] / b["prefill_tok_s"]
            r["decode_ratio"] = r["decode_tok_s"] / b["decode_tok_s"]
    planned = sum(len(labels) for _, labels in plan) - len(
        [s for s in out_lines if '"event": "error"' in s])
    if timed_out:
        st.r.skipped_cases += planned - len(rows)
        st.r.note = (f"child stopped at the step's deadline ({timeout:.0f} s): {len(rows)} of "
                     f"{planned} runs done")
    elif proc.returncode != 0:
        tail = " | ".join(out_lines[-3:])
        raise StepFailed(f"child exited {proc.returncode} after {len(rows)} of {planned} runs: "
                         f"{tail[-400:]}")
    if run.dry:
        st.r.note = (st.r.note + "; " if st.r.note else "") + \
            "CPU, tiny Llama: reduce-overhead runs but CUDA graphs do not apply on CPU"


# ----------------------------------------------------------------------------- step: onnx
def step_onnx_cuda(run: Run, st: Step) -> None:
    import onnxruntime as ort

    from structfx import bench

    providers = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in providers
    if not run.dry and not has_cuda:
        st.r.status = "skipped"
        st.r.note = (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: "
                     f"{', '.join(providers)}); install onnxruntime-gpu to run this step")
        return
    o = run.sizes.onnx
    args = argparse.Namespace(layers=o["layers"], hidden=o["hidden"], batch=o["batch"],
                              seq=o["seq"], params=run.args.params, blocks="2", steps=3,
                              threads=None, budget=o["budget"], quick=False, json=None)
    buf = _Tee(run)
    with contextlib.redirect_stdout(buf):
        result = bench.onnx_bench(args)
    st.r.data.update(provider=result.get("provider"), cells=result.get("cells"),
                     onnxruntime=result.get("onnxruntime"), layers=o["layers"],
                     hidden=o["hidden"], file_bytes=result.get("file_bytes"))
    for cell in result.get("cells", []):
        if not cell["max_rel_err"] <= 1e-3:
            st.fail(f"batch={cell['batch']} seq={cell['seq']}",
                    f"onnxruntime vs torch max rel err {cell['max_rel_err']:.2e} > 1e-3")
    if not run.dry and "CUDA" not in str(result.get("provider")):
        raise StepFailed(f"CUDAExecutionProvider is listed but the session ran on "
                         f"{result.get('provider')}")
    if run.dry:
        st.r.note = "dry run: CPU EP in place of the CUDA EP"


class _Tee:
    """stdout of a called benchmark into the log file."""

    def __init__(self, run: Run):
        self.run = run

    def write(self, s: str) -> int:
        for line in s.splitlines():
            if line.strip():
                self.run.log(f"    {line}", echo=False)
        return len(s)

    def flush(self) -> None:
        pass


BODIES = {"env": step_env, "ceilings": step_ceilings, "blast-kernels": step_blast_kernels,
          "ss1-kernels": step_ss1_kernels, "ops-autograd": step_ops_autograd,
          "compile-fullgraph": step_compile_fullgraph, "backend-bert": step_backend_bert,
          "ops-table": step_ops_table, "llama": step_llama, "onnx-cuda": step_onnx_cuda}
CORRECTNESS = ("blast-kernels", "ss1-kernels", "ops-autograd", "compile-fullgraph",
               "backend-bert")


# ----------------------------------------------------------------------------- the run
def _alarm(signum, frame):
    raise HardTimeout("step ran far past its share of the budget")


def run_step(run: Run, name: str, selected: list[str]) -> StepResult:
    res = StepResult(name)
    run.results[name] = res
    later = selected[selected.index(name):]
    share = SHARES[name] / sum(SHARES[s] for s in later)
    allot = max(0.0, run.left()) * share
    run.log(f"== {name}: {TITLES[name]} (up to {allot:.0f} s)")
    if allot < MIN_S[name] and name != "env":  # env always runs: the report needs it
        res.status = "skipped"
        res.note = (f"budget: {allot:.0f} s of {run.left():.0f} s left for it, needs ~"
                    f"{MIN_S[name]} s")
        run.log(f"   skipped: {res.note}")
        return res
    if name != "env" and run.k is None and name not in ("ceilings",):
        run.k, _ = resolve_kernels()
    st = Step(run, res, time.perf_counter() + allot, inject=run.args.inject_failure == name)
    hard = allot + max(30.0, HARD_GRACE * allot)
    use_alarm = hasattr(signal, "SIGALRM") and not run.dry
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, hard)
    t0 = time.perf_counter()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks in true fp32
        BODIES[name](run, st)
        if st.inject:  # a step without cases: the injected failure at its end
            raise RuntimeError("injected failure (--inject-failure)")
        if res.status == "pending":
            res.status = "failed" if res.failures else "ok"
    except StepFailed as e:
        res.status = "failed"
        res.failures.append(str(e))
        run.log(f"   FAILED: {e}")
    except BaseException as e:  # noqa: BLE001  (anything, also a hard timeout: go on)
        if isinstance(e, KeyboardInterrupt):
            raise
        res.status = "failed"
        res.failures.append(f"{type(e).__name__}: {_first_line(e)}")
        run.log(f"   FAILED: {type(e).__name__}: {_first_line(e)}")
        run.log(traceback.format_exc(), echo=False)
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        res.seconds = time.perf_counter() - t0
        if not run.dry and torch.cuda.is_available():
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
    if res.skipped_cases:
        res.note = (res.note + "; " if res.note else "") + \
            f"{res.skipped_cases} cases skipped (budget)"
    n_cases = len(res.cases)
    bad = sum(not c["ok"] for c in res.cases)
    run.log(f"   {res.status} in {res.seconds:.1f} s" + (f"; {n_cases - bad}/{n_cases} checks ok"
                                                        if n_cases else "")
            + (f"; {res.note}" if res.note else ""))
    return res


def main(args) -> dict:
    """Entry point of ``python -m structfx.bench gpu``."""
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ["TRITON_INTERPRET"] = "0"  # tests and CPU tools may have set it
    if args.budget_s is None:
        args.budget_s = 900.0 if args.dry_run else 540.0
    if not hasattr(args, "argv"):
        args.argv = None
    selected = STEPS if not args.only else [s for s in STEPS if s in args.only.split(",")]
    unknown = set((args.only or "").split(",")) - set(STEPS) - {""}
    if unknown or (args.inject_failure and args.inject_failure not in STEPS):
        raise SystemExit(f"unknown step(s) {sorted(unknown | {args.inject_failure} - set(STEPS))}"
                         f"; steps are {', '.join(STEPS)}")
    if "env" not in selected:
        selected = ["env"] + selected
    run = Run(args)
    dry = " (DRY RUN: CPU, TRITON_INTERPRET=1, tiny sizes)" if run.dry else ""
    run.log(f"structfx GPU benchmark{dry}")
    run.log(f"command: {run.command}")
    run.log(f"date: {run.started:%Y-%m-%d %H:%M} UTC; budget {run.budget:.0f} s; steps: "
            f"{', '.join(selected)}")
    try:
        for name in selected:
            if not run.dry and not torch.cuda.is_available() and name != "env":
                run.results[name] = StepResult(name, status="skipped", note="no GPU (env)")
                continue
            run_step(run, name, selected)
            write_report(run, selected)
    finally:
        write_report(run, selected)
        run.log("")
        run.log(summary_table(run, selected))
        run.log_file.close()
    if any(r.status == "failed" for r in run.results.values()):
        raise SystemExit(1)  # after the report: the exit status says a step failed
    return {name: dataclasses.asdict(r) for name, r in run.results.items()}


# ----------------------------------------------------------------------------- report
def _tab(rows, headers) -> str:
    from tabulate import tabulate
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def summary_table(run: Run, selected: list[str]) -> str:
    rows = []
    for name in selected:
        r = run.results.get(name)
        if r is None:
            rows.append([name, "not run", "", ""])
            continue
        checks = f"{sum(c['ok'] for c in r.cases)}/{len(r.cases)}" if r.cases else ""
        note = "; ".join(([r.note] if r.note else []) + r.failures[:2])
        rows.append([name, r.status, f"{r.seconds:.1f}", checks, note[:150]])
    head = (f"structfx GPU benchmark{' DRY RUN (no GPU figure)' if run.dry else ''}: "
            f"{run.elapsed():.0f} s of {run.budget:.0f} s; report {run.out / 'bench-gpu.md'}")
    return head + "\n" + _tab(rows, ["step", "status", "s", "checks", "note"])


def _fmt(v, spec=".3g") -> str:
    return "n/a" if v is None else format(v, spec)


def _correctness_md(r: StepResult) -> list[str]:
    lines = []
    groups: dict = {}
    for c in r.cases:
        what = c["what"].split(" d")[0] if c["what"].startswith("backward") else c["what"]
        key = (what, c["dtype"])
        g = groups.setdefault(key, dict(n=0, ok=0, worst=0.0, tol=c["tol"]))
        g["n"] += 1
        g["ok"] += bool(c["ok"])
        if c.get("error") is not None:
            g["worst"] = max(g["worst"], c["error"])
    rows = [[what, dt, f"{g['ok']}/{g['n']}", f"{g['worst']:.2e}", f"{g['tol']:.0e}"]
            for (what, dt), g in groups.items()]
    if rows:
        lines += [_tab(rows, ["check", "dtype", "ok", "worst rel err", "tol"]), ""]
    if r.failures:
        lines.append(f"Failures ({len(r.failures)}):")
        lines += [f"- {f}" for f in r.failures[:60]]
        if len(r.failures) > 60:
            lines.append(f"- ... {len(r.failures) - 60} more in log.txt")
        lines.append("")
    return lines


def _table_md(run: Run, r: StepResult) -> list[str]:
    cells = r.data.get("cells") or []
    if not cells:
        return []
    names = []
    for c in cells:
        names += [n for n in c["methods"] if n not in names]
    rows, rows2 = [], []
    bw, fl = run.ceilings.get("TB/s"), run.ceilings.get("TFLOP/s")
    for c in cells:
        dense = c["methods"].get("dense", {}).get("ms")
        row = [f"{c['n']}x{c['m']}", str(c["T"])]
        row2 = list(row)
        for nm in names:
            e = c["methods"].get(nm)
            if e is None:
                row.append("n/a")
                row2.append("n/a")
                continue
            ratio = f" / {dense / e['ms']:.2f}x" if dense and nm != "dense" else ""
            row.append(f"{e['ms']:.4g}{ratio}")
            s = e["ms"] * 1e-3
            tbs, tfs = e["bytes"] / s / 1e12, e["flops"] / s / 1e12
            roof = ""
            if bw and fl:
                roof = f" ({max(e['bytes'] / (bw * 1e12), e['flops'] / (fl * 1e12)) / s:.0%})"
            row2.append(f"{tbs:.2f} TB/s, {tfs:.1f} TF{roof}")
        rows.append(row)
        rows2.append(row2)
    return ["ms / ratio to dense (> 1: faster than dense):", "",
            _tab(rows, ["shape n x m", "T"] + names), "",
            f"Achieved (fewest bytes: x, weights, y once; FLOPs of each method), and in "
            f"brackets the fraction of the roofline of the measured ceilings "
            f"({_fmt(bw)} TB/s, {_fmt(fl)} TFLOP/s):", "",
            _tab(rows2, ["shape n x m", "T"] + names), "",
            f"Params at {run.args.params:g} of dense: low rank r = floor(rho m n / (m + n)), "
            f"BLAST r = floor(rho m n / (m + n + b^2)); SS1 c = 2 keeps 1/2, c = 4 keeps 1/4. "
            f"Random factors: this table is about speed, not error. do_bench medians, L2 "
            f"flushed, input sets rotated.", ""]


def write_report(run: Run, selected: list[str]) -> None:
    lines = ["# structfx GPU benchmark" + (" -- DRY RUN (CPU, TRITON_INTERPRET=1, tiny sizes; "
                                           "no number here is a GPU figure)" if run.dry else ""),
             "", f"Command: `{run.command}`", "",
             f"Date: {run.started:%Y-%m-%d %H:%M} UTC; budget {run.budget:.0f} s, "
             f"{run.elapsed():.0f} s used.", ""]
    env = run.results.get("env")
    if env and env.data.get("info"):
        lines += ["## Environment", "", _tab(list(env.data["info"].items()), ["", ""]), ""]
    lines += ["## Steps", ""]
    rows = []
    for name in selected:
        r = run.results.get(name)
        if r is None:
            rows.append([name, TITLES[name], "not run", "", "", ""])
            continue
        bad = sum(not c["ok"] for c in r.cases)
        rows.append([name, TITLES[name], r.status, f"{r.seconds:.1f}",
                     f"{len(r.cases) - bad}/{len(r.cases)}" if r.cases else "",
                     "; ".join(([r.note] if r.note else []) + r.failures[:3])[:300]])
    lines += [_tab(rows, ["step", "what", "status", "s", "checks ok", "note"]), ""]
    if run.ceilings:
        c = run.results["ceilings"].data
        lines += ["## Ceilings", "",
                  f"- device-to-device copy: {run.ceilings['TB/s']:.3f} TB/s "
                  f"({c['copy_bytes'] / 1e9:.2f} GB read + written in {c['copy_ms']:.3f} ms)",
                  f"- {c['mm']} torch.mm on random data: {run.ceilings['TFLOP/s']:.1f} TFLOP/s "
                  f"({c['mm_ms']:.3f} ms)", ""]
    for name in CORRECTNESS:
        r = run.results.get(name)
        if r is not None and (r.cases or r.failures):
            lines += [f"## {TITLES[name]}", ""] + _correctness_md(r)
    r = run.results.get("ops-table")
    if r is not None:
        lines += ["## Ops table", ""] + _table_md(run, r)
    r = run.results.get("llama")
    if r is not None and r.data.get("rows"):
        setup = r.data.get("setup") or {}
        lines += ["## examples/llama_gpu.py", "",
                  f"Llama-style decoder, {run.sizes.llama['layers']} layer(s), sizes "
                  f"{setup.get('sizes')}, {setup.get('dtype')}, batch {setup.get('batch')}, "
                  f"prompt {setup.get('prompt')}, {setup.get('new_tokens')} new tokens; 50 % "
                  f"of the linear parameters (lm_head dense).", ""]
        rows = [[x["mode"], x["model"], f"{x['prefill_tok_s']:.0f}", f"{x['decode_tok_s']:.1f}",
                 f"{x['prefill_ratio']:.2f}x / {x['decode_ratio']:.2f}x" if "prefill_ratio" in x
                 else "", f"{x['setup_s']:.0f}"] for x in r.data["rows"]]
        lines += [_tab(rows, ["torch.compile mode", "model", "prefill tok/s", "decode tok/s",
                              "vs dense prefill / decode", "compile + factorize s"]), ""]
    r = run.results.get("onnx-cuda")
    if r is not None:
        lines += ["## onnxruntime", ""]
        if r.data.get("cells"):
            lines.append(f"GPT-2-sized ({r.data['layers']} layers x {r.data['hidden']}, random "
                         f"weights), BLAST b=2 at {run.args.params:g} params, provider "
                         f"{r.data.get('provider')}, onnxruntime {r.data.get('onnxruntime')}:")
            lines.append("")
            rows = [[c["batch"], c["seq"], f"{c['dense_ms']:.4g}", f"{c['structured_ms']:.4g}",
                     f"{c['ratio']:.2f}x", f"{c['max_rel_err']:.1e}"] for c in r.data["cells"]]
            lines += [_tab(rows, ["batch", "seq", "dense ms", "structured ms", "ratio",
                                  "ORT vs torch err"]), ""]
        else:
            lines += [r.note or "; ".join(r.failures) or r.status, ""]
    (run.out / "bench-gpu.md").write_text("\n".join(lines) + "\n")
    data = dict(command=run.command, date=run.started.isoformat(), dry_run=run.dry,
                budget_s=run.budget, elapsed_s=run.elapsed(), ceilings=run.ceilings,
                steps={n: dataclasses.asdict(r) for n, r in run.results.items()},
                selected=selected)
    (run.out / "bench-gpu.json").write_text(json.dumps(data, indent=1, default=str))


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for bench-gpu.md, bench-gpu.json, log.txt")
    p.add_argument("--budget-s", type=float, default=None,
                   help="total seconds (default 540; 900 with --dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="rehearsal on CPU: TRITON_INTERPRET=1, tiny sizes, every step")
    p.add_argument("--params", type=float, default=0.5,
                   help="fraction of dense params kept in the ops table (default 0.5)")
    p.add_argument("--only", help=f"comma-separated subset of the steps ({','.join(STEPS)}); "
                                  f"env always runs")
    p.add_argument("--inject-failure", metavar="STEP",
                   help="testing: make the first case of STEP raise, to check the run goes on")


if __name__ == "__main__":
    if sys.argv[1:2] == ["llama-child"]:
        llama_child(json.loads(sys.argv[2]))
    elif sys.argv[1:2] == ["--check-env"]:
        sys.exit(check_versions_cli())
    else:
        raise SystemExit("use: python -m structfx.bench gpu --out DIR [--budget-s S] [--dry-run]")
