"""``python -m structfx.bench ops|onnx|gpu``: time structured layers against dense ones.

``ops``: the structured ops against dense ``F.linear``.

For each shape ``n x m`` (in_features x out_features; the dense weight is ``(m, n)``) and token
count ``T``, one process on the current device (CUDA if available, else CPU) times:

- dense ``F.linear``;
- low rank at equal parameters: two ``F.linear``, ``r = floor(rho m n / (m + n))`` (its
  ``r (m + n)`` parameters: structfx's ``"lowrank"`` is BLAST at b = 1, whose ``S`` adds ``r``);
- BLAST via ``torch.ops.structfx.blast_linear`` for each ``b`` in ``--blocks``,
  ``r = floor(rho m n / (m + n + b^2))``; the table shows the fastest ``b``;
- SS1 via ``torch.ops.structfx.ss1_linear`` at ``c = round(1 / rho)``, default block sizes
  (BLAST ranks: ``blast_rank_for_params``, as the cost model turns ``Config.rank_fractions``
  into ranks; the compression: ``ss1_compression_for_params``);
- on CUDA (or with ``--compiled-ref``), ``torch.compile`` of the plain bmm BLAST
  (``blast_forward_torch``) at the ``b`` the op was fastest with: what a user gets without
  structfx's kernels.

ratio = dense time / structured time (> 1: faster than dense). CUDA times are
``triton.testing.do_bench`` medians (L2 flushed); CPU times are medians over repeats after a
warm-up, with a time budget per measurement. See docs/design.md, "Cost model", "Measuring honestly".

``onnx``: a GPT-2-small-sized model (``GPT2Model``, n_embd 768, ``--layers`` blocks, random
weights, built offline) exported to ONNX dense and compressed (BLAST, ``--params`` of every
linear layer's parameters, blocks ``--blocks``), both run by onnxruntime in one process (CPU
EP, or CUDA EP when onnxruntime-gpu and a GPU are present; there the times include copying the
ids in and the hidden states out). The compressed model is exported as ``structfx.export_onnx``
does (``ai.structfx`` nodes and functions, plain onnxruntime). Every linear layer is replaced
(``force=True``): this measures the runtime, not the cost model's choices. Factorization runs a
few steps only, since random weights leave nothing to fit and do not change the timing.
ratio = dense ms / structured ms, medians over repeats within a time budget, the two models
taking turns.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tabulate import tabulate

from structfx.kernels import ss1_hash
from structfx.kernels.blast_torch import blast_forward_torch
from structfx.passes.factorize_blast import blast_rank_for_params
from structfx.passes.project_ss1 import ss1_compression_for_params
from structfx.timing import time_alternating as _time_alternating
from structfx.timing import time_fn

MEMORY_FRACTION = 0.25  # skip a cell whose x + y + weights exceed this share of device memory


@dataclass
class Cell:
    """Timings (ms) of one (shape, T) cell; ``None`` where a method failed or was not run."""
    n: int
    m: int
    tokens: int
    dense_ms: Optional[float] = None
    lowrank_rank: int = 0
    lowrank_ms: Optional[float] = None
    blast_rank: dict[int, int] = field(default_factory=dict)
    blast_ms: dict[int, Optional[float]] = field(default_factory=dict)
    ss1_compression: int = 1
    ss1_ms: Optional[float] = None
    compiled_ms: Optional[float] = None
    compiled_b: Optional[int] = None

    @property
    def best_b(self) -> Optional[int]:
        timed = {b: t for b, t in self.blast_ms.items() if t is not None}
        return min(timed, key=timed.get) if timed else None


# ----------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# ----------------------------------------------------------------------------- timing
def time_cpu(fn: Callable[[], object], budget_s: float, min_reps: int = 5) -> float:
    """Median ms after one warm-up call, over repeats until ``budget_s`` is spent (5..1000):
    cheap calls get many samples, so a few that lose the CPU to another process do not move
    the median."""
    return 1e3 * time_fn(fn, budget_s=budget_s, min_repeats=min_reps, max_repeats=1000)


def time_cuda(fn: Callable[[], object]) -> float:
    """Median ms of ``triton.testing.do_bench`` (L2 flushed between runs)."""
    return 1e3 * time_fn(fn, flush_l2=True)


def measure(fn, device, budget_s, label: str, notes: list[str]) -> Optional[float]:
    """Time ``fn``; a failure becomes a footnote and an empty cell, not a crash."""
    try:
        with torch.inference_mode():
            return time_cuda(fn) if device.type == "cuda" else time_cpu(fn, budget_s)
    except Exception as e:  # noqa: BLE001  (any kernel failure: report it, keep going)
        notes.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return None


# ----------------------------------------------------------------------------- one cell
def randn(*shape, scale: float, device, dtype) -> torch.Tensor:
    # Random, O(1) outputs: values do not change the timing, but zeros, infs or denormals could.
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def lowrank_rank(m: int, n: int, rho: float) -> int:
    """Rank of a two-``F.linear`` low rank (``r (m + n)`` parameters, no ``S``) keeping ``rho`` of
    the dense parameters; ``blast_rank_for_params`` counts BLAST's ``S`` too."""
    return max(1, math.floor(rho * m * n / (m + n)))


def bench_cell(n: int, m: int, T: int, args, device, dtype, notes: list[str]) -> Cell:
    rho, budget = args.params, args.budget
    mk = lambda *s, fan: randn(*s, scale=fan ** -0.5, device=device, dtype=dtype)  # noqa: E731
    cell = Cell(n=n, m=m, tokens=T)
    label = f"{n}x{m} T={T}"
    x = randn(T, n, scale=1.0, device=device, dtype=dtype)

    W = mk(m, n, fan=n)
    cell.dense_ms = measure(lambda: F.linear(x, W), device, budget, f"{label} dense", notes)
    del W

    r = lowrank_rank(m, n, rho)
    A, B = mk(r, n, fan=n), mk(m, r, fan=r)
    cell.lowrank_rank = r
    cell.lowrank_ms = measure(lambda: F.linear(F.linear(x, A), B), device, budget,
                              f"{label} low-rank", notes)
    del A, B

    factors = {}
    for b in args.blocks:
        if b > min(m, n):
            continue
        r = blast_rank_for_params(m, n, (b, b), rho)
        p, q = -(-m // b), -(-n // b)
        U, S, V = mk(b, p, r, fan=r), mk(b, b, r, fan=b), mk(b, q, r, fan=n)
        cell.blast_rank[b] = r
        cell.blast_ms[b] = measure(
            lambda: torch.ops.structfx.blast_linear(x, U, S, V, None, m), device, budget,
            f"{label} BLAST b={b}", notes)
        factors[b] = (U, S, V)

    c = ss1_compression_for_params(rho)
    P = mk(m, ss1_hash.reduced_k(n, c), fan=n)
    cell.ss1_compression = c
    cell.ss1_ms = measure(
        lambda: torch.ops.structfx.ss1_linear(x, P, None, c, 0, ss1_hash.DEFAULT_BLOCK_K,
                                              ss1_hash.DEFAULT_BLOCK_N),
        device, budget, f"{label} SS1", notes)
    del P

    b = cell.best_b
    if args.compiled_ref and b is not None:
        torch._dynamo.reset()  # a fresh compile per cell: no recompile limit, no stale guards
        compiled = torch.compile(blast_forward_torch, dynamic=False)
        U, S, V = factors[b]
        cell.compiled_b = b
        cell.compiled_ms = measure(lambda: compiled(x, U, S, V, None, m), device, budget,
                                   f"{label} compiled reference b={b}", notes)
    return cell


# ----------------------------------------------------------------------------- table
def fmt(ms: Optional[float], dense: Optional[float], b: Optional[int] = None) -> str:
    if ms is None:
        return "n/a"
    text = f"{ms:.4g} / " + (f"{dense / ms:.3g}" if dense is not None else "n/a")
    return text + (f" (b={b})" if b is not None else "")


def table(cells: list[Cell], args) -> str:
    headers = ["shape", "T", "dense ms", "low-rank ms / ratio", "BLAST ms / ratio (b)",
               "SS1 ms / ratio"]
    if args.compiled_ref:
        headers.append("compiled ref ms / ratio (b)")
    if args.all_blocks:
        headers += [f"BLAST b={b}" for b in args.blocks]
    rows = []
    for c in cells:
        b = c.best_b
        row = [f"{c.n}x{c.m}", c.tokens, "n/a" if c.dense_ms is None else f"{c.dense_ms:.4g}",
               fmt(c.lowrank_ms, c.dense_ms),
               fmt(c.blast_ms.get(b), c.dense_ms, b) if b is not None else "n/a",
               fmt(c.ss1_ms, c.dense_ms)]
        if args.compiled_ref:
            row.append(fmt(c.compiled_ms, c.dense_ms, c.compiled_b))
        if args.all_blocks:
            row += [fmt(c.blast_ms.get(bb), c.dense_ms) for bb in args.blocks]
        rows.append(row)
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


# ----------------------------------------------------------------------------- ops command
QUICK = dict(shapes="256x256,256x512", tokens="1,16", blocks="1,2,4", budget=0.01)
CPU_DEFAULT = dict(shapes="1024x1024,2048x2048", tokens="1,16,64,256,4096")
CUDA_DEFAULT = dict(shapes="2048x2048,4096x4096", tokens="1,16,256,4096")


def ops(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype, device)
    interpreted = [mod for mod in ("blast_triton", "ss1_triton")
                   if f"structfx.kernels.{mod}" in sys.modules]
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        # Inherited from the environment (tests/conftest.py sets it for CPU test runs); timing
        # interpreted kernels on a GPU would be meaningless. It counts when a kernel module is
        # first imported (kernels/triton_common.py), so it is cleared before that.
        os.environ["TRITON_INTERPRET"] = "0"
        if interpreted:
            print(f"warning: {interpreted} already imported with TRITON_INTERPRET=1; "
                  "their times are the interpreter's")
    defaults = {**(CUDA_DEFAULT if device.type == "cuda" else CPU_DEFAULT),
                "blocks": "1,2,4,8,16", "budget": 0.25, **(QUICK if args.quick else {})}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    args.blocks = [int(b) for b in str(args.blocks).split(",")]
    args.budget = float(args.budget)
    if args.compiled_ref is None:
        args.compiled_ref = device.type == "cuda" and not args.quick  # compiling takes minutes

    header = (f"device: {device_name(device)} | torch {torch.__version__} | "
              f"threads {torch.get_num_threads()} | dtype {str(dtype).removeprefix('torch.')} | "
              f"params {args.params:g} of dense")
    print(header, flush=True)
    limit = MEMORY_FRACTION * device_memory(device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    cells, notes, skipped = [], [], []
    t_start = time.perf_counter()
    for n, m in shapes:
        for T in tokens:
            if (T * n + T * m + m * n) * itemsize > limit:
                skipped.append(f"{n}x{m} T={T}")
                continue
            cells.append(bench_cell(n, m, T, args, device, dtype, notes))
    elapsed = time.perf_counter() - t_start

    print(table(cells, args))
    print(f"ratio = dense ms / structured ms (> 1: faster than dense). "
          f"low-rank r = floor(rho*m*n/(m+n)); BLAST r = floor(rho*m*n/(m+n+b*b)), "
          f"fastest b of {args.blocks}; SS1 c = {ss1_compression_for_params(args.params)}.")
    if args.compiled_ref:
        print("compiled ref: torch.compile of the bmm BLAST (blast_forward_torch) at the op's "
              "fastest b.")
    for s in skipped:
        print(f"skipped {s}: x + y + weights exceed {MEMORY_FRACTION:.0%} of "
              f"{device.type} memory")
    for note in notes:
        print(f"failed {note}")
    print(f"benchmark time: {elapsed:.1f} s")

    result = {"device": device_name(device), "device_type": device.type,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "dtype": str(dtype).removeprefix("torch."), "params": args.params,
              "command": " ".join(["python -m structfx.bench"] + sys.argv[1:]),
              "cells": [asdict(c) | {"best_b": c.best_b} for c in cells],
              "skipped": skipped, "failures": notes, "seconds": elapsed}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


# ----------------------------------------------------------------------------- onnx command
ONNX_QUICK = dict(layers=1, hidden=128, batch="2", seq="16", budget=0.05)


def gpt2_model(layers: int, hidden: int, seed: int = 0):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=max(1, hidden // 64),
                     n_positions=1024, use_cache=False, attn_implementation="eager")
    return GPT2Model(cfg).eval()


def file_size(path: str) -> int:
    """Bytes of an ONNX model with its external data file (if any)."""
    data = path + ".data"
    return os.path.getsize(path) + (os.path.getsize(data) if os.path.exists(data) else 0)


def time_alternating(fns: dict[str, Callable[[], object]], budget_s: float,
                     rounds: int = 3) -> dict[str, float]:
    """Median ms of each function, the functions taking turns over ``rounds`` (the lowest
    round's median is kept): load from other processes hits both, not just one."""
    seconds = _time_alternating(fns, rounds, keep="min", budget_s=budget_s / rounds,
                                min_repeats=5, max_repeats=1000)
    return {k: 1e3 * t for k, t in seconds.items()}


def onnx_bench(args) -> dict:
    import tempfile
    import warnings

    import numpy as np
    import onnxruntime as ort

    import structfx
    from structfx.export import export_program

    for key, value in {**dict(layers=4, hidden=768, batch="1,4", seq="128", budget=2.0),
                       **(ONNX_QUICK if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    batches = [int(b) for b in str(args.batch).split(",")]
    seqs = [int(s) for s in str(args.seq).split(",")]
    blocks = tuple(int(b) for b in str(args.blocks).split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)

    model = gpt2_model(args.layers, args.hidden)
    vocab = model.config.vocab_size
    example = torch.randint(0, vocab, (2, 16))
    config = structfx.Config(structure="blast", params=args.params, blocks=blocks,
                             rank_fractions=(args.params,), force=True, steps=args.steps,
                             estimate_steps=1, progress=False)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    # Setup, not measured: factorization's small SVDs and solves gain nothing from threads and
    # slow down many times over when another process holds one of the cores.
    torch.set_num_threads(1)
    try:
        small = structfx.compress(model, (example,), config)
    finally:
        torch.set_num_threads(threads)
    compress_s = time.perf_counter() - t0
    report = small.structfx_report
    replaced = len(report.replaced)

    rows, cells = [], []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": os.path.join(tmp, "dense.onnx"),
                 "structured": os.path.join(tmp, "structured.onnx")}
        t0 = time.perf_counter()
        export_program(model, (example,), paths["dense"])
        export_program(small, (example,), paths["structured"])
        export_s = time.perf_counter() - t0
        sizes = {k: file_size(p) for k, p in paths.items()}
        from structfx.export import ort_session

        sessions = {k: ort_session(p, args.threads) for k, p in paths.items()}
        provider = sessions["structured"].structfx_provider
        print(f"device: {device_name(torch.device('cuda' if 'CUDA' in provider else 'cpu'))} | "
              f"onnxruntime {ort.__version__} {provider} | threads "
              f"{args.threads or 'default'} | GPT-2 {args.layers} layers x {args.hidden} "
              f"(random weights) | BLAST blocks {blocks}, params {args.params:g} of dense",
              flush=True)
        for B in batches:
            for S in seqs:
                ids = torch.randint(0, vocab, (B, S))
                feed = {sessions["dense"].get_inputs()[0].name: ids.numpy()}
                with torch.no_grad():
                    want = small(ids).last_hidden_state.numpy()
                got = sessions["structured"].run(None, feed)[0]
                err = float(np.abs(got - want).max() / np.abs(want).max())
                ms = time_alternating({k: (lambda s=s: s.run(None, feed))
                                       for k, s in sessions.items()}, args.budget)
                cells.append(dict(batch=B, seq=S, dense_ms=ms["dense"],
                                  structured_ms=ms["structured"],
                                  ratio=ms["dense"] / ms["structured"], max_rel_err=err))
                rows.append([B, S, f"{ms['dense']:.4g}", f"{ms['structured']:.4g}",
                             f"{ms['dense'] / ms['structured']:.3g}", f"{err:.1e}"])
        del sessions
    print(tabulate(rows, headers=["batch", "seq", "dense ms", "structured ms", "ratio",
                                  "ORT vs torch err"],
                   tablefmt="github", disable_numparse=True))
    print(f"ratio = dense ms / structured ms (> 1: faster than dense). {replaced} of "
          f"{len(report.layers)} linear layers replaced; model parameters "
          f"{report.model_params_after:,} of {report.model_params_before:,}; files (.onnx + "
          f"data) {sizes['structured'] / 1e6:.1f} MB vs {sizes['dense'] / 1e6:.1f} MB dense "
          f"({sizes['structured'] / sizes['dense']:.0%}). ORT vs torch err: max |ORT - torch| / "
          f"max |torch| of the structured model.")
    print(f"compress: {compress_s:.1f} s, export: {export_s:.1f} s")

    result = {"device": device_name(torch.device("cuda" if "CUDA" in provider else "cpu")),
              "provider": provider, "onnxruntime": ort.__version__, "threads": args.threads,
              "layers": args.layers, "hidden": args.hidden, "blocks": list(blocks),
              "params": args.params, "replaced": replaced, "layers_total": len(report.layers),
              "model_params": [report.model_params_before, report.model_params_after],
              "file_bytes": sizes,
              "command": " ".join(["python -m structfx.bench"] + sys.argv[1:]),
              "cells": cells, "compress_s": compress_s, "export_s": export_s}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m structfx.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ops", help="time dense / low-rank / BLAST / SS1 linear layers")
    p.add_argument("--shapes", help="n x m (in x out) list, e.g. 2048x2048,4096x11008")
    p.add_argument("--tokens", help="token counts T, e.g. 1,16,256,4096")
    p.add_argument("--params", type=float, default=0.5, help="fraction of dense params kept")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--blocks", help="BLAST block counts b to try (default 1,2,4,8,16)")
    p.add_argument("--all-blocks", action="store_true", help="one column per b as well")
    p.add_argument("--compiled-ref", action=argparse.BooleanOptionalAction, default=None,
                   help="time torch.compile of the bmm BLAST (default: on CUDA only)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--budget", type=float, help="CPU seconds per measurement (default 0.25)")
    p.add_argument("--quick", action="store_true", help="tiny grid that runs in seconds")
    p.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON")
    p.set_defaults(func=ops)

    p = sub.add_parser("onnx", help="onnxruntime latency of a GPT-2-sized model, dense vs BLAST")
    p.add_argument("--layers", type=int, help="transformer blocks (default 4)")
    p.add_argument("--hidden", type=int, help="n_embd (default 768, GPT-2 small)")
    p.add_argument("--batch", help="batch sizes, e.g. 1,4 (default 1,4)")
    p.add_argument("--seq", help="sequence lengths, e.g. 128,512 (default 128)")
    p.add_argument("--params", type=float, default=0.5, help="fraction of dense params kept")
    p.add_argument("--blocks", default="2", help="BLAST block counts to choose from (default 2)")
    p.add_argument("--steps", type=int, default=5, help="factorization steps (default 5)")
    p.add_argument("--threads", type=int,
                   help="onnxruntime intra-op threads (default: onnxruntime's choice)")
    p.add_argument("--budget", type=float, help="seconds per measurement (default 2)")
    p.add_argument("--quick", action="store_true",
                   help="1 layer, hidden 128, batch 2, seq 16: runs in seconds")
    p.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON")
    p.set_defaults(func=onnx_bench)

    from . import bench_compress, bench_gpu

    bench_compress.add_parser(sub)
    p = sub.add_parser("gpu", help="check, tune and time everything on CUDA in one run")
    bench_gpu.add_arguments(p)
    p.set_defaults(func=bench_gpu.main)
    return parser


def main(argv: Optional[list[str]] = None):
    args = build_parser().parse_args(argv)
    if not 0 < args.params <= 1:
        raise SystemExit(f"--params must be in (0, 1], got {args.params}")
    return args.func(args)


if __name__ == "__main__":
    main()
