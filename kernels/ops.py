"""``torch.ops.structfx.blast_linear`` / ``ss1_linear``: the structured ops as torch.library ops.

Each op is a ``custom_op`` (opaque to Dynamo, AOT and export, so graphs hold one node per
layer) with a fake impl, an autograd formula and a FLOP formula. The default implementation,
defined here, is the bmm / gather PyTorch path (CPU, and any device without a kernel of its
own); the Triton kernels register themselves for ``"cuda"`` in ``blast_triton.py`` /
``ss1_triton.py``, beside the kernels (see ``_register_cuda_stand_ins`` for how they are loaded).
A plain ``custom_op`` rather than ``triton_op``: on a CPU-only machine a ``triton_op`` breaks
``torch.compile`` even when a CPU kernel is registered (see docs/design.md).

Every implementation starts with ``check_blast_args`` / ``check_ss1_args``: the one place the
arguments are validated; the Triton launchers assume it passed.

The backward of each op is itself an op (``*_backward``), so compiled training graphs and
exported graphs keep it as one node and CUDA backward runs the Triton kernels. It is told which
grads autograd needs (``needs``: frozen factors, or only ``dx`` at inference) and computes only
those; an op cannot return ``None``, so a grad not asked for comes back as an empty tensor and
the autograd formula turns it into ``None``.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import blast_torch, ss1_hash, ss1_torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- validation
def _check_common(name: str, x: Tensor, params: dict[str, Tensor], bias: Optional[Tensor]):
    if x.dim() < 1:
        raise ValueError(f"{name}: input must have at least 1 dimension, got a scalar")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name}: input dtype must be a floating type, got {x.dtype}")
    for pname, p in params.items():
        if p.dtype != x.dtype:
            raise TypeError(f"{name}: {pname} has dtype {p.dtype} but the input is {x.dtype}; "
                            f"cast the factors (BlastLinear/SS1Linear do this for you)")
        if p.device != x.device:
            raise ValueError(f"{name}: {pname} is on {p.device} but the input is on {x.device}")
    if bias is not None and (bias.dtype != x.dtype or bias.device != x.device):
        raise TypeError(f"{name}: bias must match the input's dtype and device")


def check_blast_args(x: Tensor, U: Tensor, S: Tensor, V: Tensor, bias: Optional[Tensor],
                     out_features: int) -> None:
    _check_common("blast_linear", x, {"U": U, "S": S, "V": V}, bias)
    if U.dim() != 3 or S.dim() != 3 or V.dim() != 3:
        raise ValueError("blast_linear: U (b1, p, r), S (b1, b2, r), V (b2, q, r) must be 3-D; got "
                         f"U {tuple(U.shape)}, S {tuple(S.shape)}, V {tuple(V.shape)}")
    b1, p, r = U.shape
    b2, q, rv = V.shape
    if tuple(S.shape) != (b1, b2, r) or rv != r:
        raise ValueError(f"blast_linear: factor shapes disagree: U {tuple(U.shape)}, "
                         f"S {tuple(S.shape)} (expected {(b1, b2, r)}), V {tuple(V.shape)}")
    n = x.shape[-1]
    if not (b2 * (q - 1) < n <= b2 * q):
        raise ValueError(f"blast_linear: input has {n} features but V covers b2*q = {b2}*{q} "
                         f"(expected {b2 * (q - 1) + 1}..{b2 * q})")
    if not (b1 * (p - 1) < out_features <= b1 * p):
        raise ValueError(f"blast_linear: out_features={out_features} does not fit U's "
                         f"b1*p = {b1}*{p}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"blast_linear: bias has shape {tuple(bias.shape)}, "
                         f"expected ({out_features},)")


def check_ss1_args(x: Tensor, P: Tensor, bias: Optional[Tensor], compression: int, seed: int,
                   block_k: int, block_n: int) -> None:
    _check_common("ss1_linear", x, {"P": P}, bias)
    if P.dim() != 2:
        raise ValueError(f"ss1_linear: P must be 2-D (N, K_red), got {tuple(P.shape)}")
    K, (N, K_red) = x.shape[-1], P.shape
    ss1_hash.check_config(K, N, compression, block_k, block_n)
    want = ss1_hash.reduced_k(K, compression, block_k)
    if K_red != want:
        raise ValueError(f"ss1_linear: P has {K_red} columns but in_features={K} at compression "
                         f"{compression}, block_k={block_k} needs K_red={want}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"ss1_linear: bias has shape {tuple(bias.shape)}, expected ({N},)")


def check_backward_args(name: str, dy: Tensor, x: Tensor, out_features: int,
                        needs: Sequence[bool], n_grads: int) -> None:
    """The backward ops' own arguments (the factors were checked by the forward)."""
    want = (*x.shape[:-1], out_features)
    if tuple(dy.shape) != want:
        raise ValueError(f"{name}: dy has shape {tuple(dy.shape)}, expected {want}")
    if dy.device != x.device:
        raise ValueError(f"{name}: dy is on {dy.device} but x is on {x.device}")
    if len(needs) != n_grads:
        raise ValueError(f"{name}: needs must have {n_grads} flags, got {list(needs)!r}")


def tokens_2d(x: Tensor) -> Tensor:
    """``(..., k)`` -> contiguous ``(T, k)``: what the CPU paths and the launchers take."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def grads_out(grads: Sequence[Optional[Tensor]], dy: Tensor) -> tuple[Tensor, ...]:
    """A backward op's outputs: each grad contiguous, an empty tensor where none was asked for."""
    return tuple(dy.new_empty(0) if g is None else g.contiguous() for g in grads)


def _fake_grads(needs: Sequence[bool], dy: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(t.new_empty(t.shape) if n else dy.new_empty(0) for n, t in zip(needs, like))


def _autograd_grads(grads: Sequence[Tensor], needs: Sequence[bool]) -> list[Optional[Tensor]]:
    return [g if n else None for g, n in zip(grads, needs)]


# ----------------------------------------------------------------------------- BLAST
@torch.library.custom_op("structfx::blast_linear", mutates_args=())
def blast_linear(x: Tensor, U: Tensor, S: Tensor, V: Tensor, bias: Optional[Tensor],
                 out_features: int) -> Tensor:
    """``y = x @ W.T + bias`` with ``W`` the BLAST matrix of ``(U, S, V)`` (docs/design.md, "BLAST")."""
    check_blast_args(x, U, S, V, bias, out_features)
    y = blast_torch.blast_forward_torch(tokens_2d(x), U, S, V, bias, out_features)
    return y.contiguous().reshape(*x.shape[:-1], out_features)


@blast_linear.register_fake
def _(x, U, S, V, bias, out_features):
    check_blast_args(x, U, S, V, bias, out_features)
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("structfx::blast_linear_backward", mutates_args=())
def blast_linear_backward(dy: Tensor, x: Tensor, U: Tensor, S: Tensor, V: Tensor,
                          out_features: int, needs: Sequence[bool]
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dU, dS, dV, dbias)`` of ``blast_linear``, each only where ``needs`` (5 flags) says
    (an empty tensor otherwise). ``dbias`` is ``dy`` summed over tokens, in ``dy``'s dtype."""
    check_backward_args("blast_linear_backward", dy, x, out_features, needs, 5)
    grads = blast_torch.blast_backward_torch(tokens_2d(dy), tokens_2d(x), U, S, V,
                                             out_features, needs)
    dx = grads[0]
    return grads_out((None if dx is None else dx.reshape(x.shape), *grads[1:]), dy)


@blast_linear_backward.register_fake
def _(dy, x, U, S, V, out_features, needs):
    check_backward_args("blast_linear_backward", dy, x, out_features, needs, 5)
    return _fake_grads(needs, dy, (x, U, S, V, dy.new_empty(out_features)))


def _blast_setup(ctx, inputs, output):
    x, U, S, V, bias, out_features = inputs
    ctx.save_for_backward(x, U, S, V)
    ctx.out_features = out_features


def _blast_backward(ctx, dy):
    x, U, S, V = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])  # (x, U, S, V, bias); False for an absent bias
    grads = torch.ops.structfx.blast_linear_backward(dy, x, U, S, V, ctx.out_features, needs)
    return (*_autograd_grads(grads, needs), None)


blast_linear.register_autograd(_blast_backward, setup_context=_blast_setup)


def blast_flops(x_shape, U_shape, S_shape, V_shape) -> int:
    """Forward FLOPs, ``2 T r (b2 q + b1 p + b1 b2)``: the multiply-adds of ``z = x V``
    (``T b2 q r``), of the diagonal mixing (``T b1 b2 r``) and of ``y = w U.T`` (``T b1 p r``),
    padding included, two FLOPs each."""
    tokens = 1
    for d in x_shape[:-1]:
        tokens *= d
    b1, p, r = U_shape
    b2, q, _ = V_shape
    return 2 * tokens * r * (b2 * q + b1 * p + b1 * b2)


# ----------------------------------------------------------------------------- SS1
@torch.library.custom_op("structfx::ss1_linear", mutates_args=())
def ss1_linear(x: Tensor, P: Tensor, bias: Optional[Tensor], compression: int, seed: int,
               block_k: int, block_n: int) -> Tensor:
    """``y = x @ W + bias`` with ``W (K, N)`` read from ``P (N, K_red)`` by the SS1 hash."""
    check_ss1_args(x, P, bias, compression, seed, block_k, block_n)
    y = ss1_torch.ss1_forward_torch(tokens_2d(x), P, bias, compression, seed, block_k, block_n)
    return y.contiguous().reshape(*x.shape[:-1], P.shape[0])


@ss1_linear.register_fake
def _(x, P, bias, compression, seed, block_k, block_n):
    check_ss1_args(x, P, bias, compression, seed, block_k, block_n)
    return x.new_empty(*x.shape[:-1], P.shape[0])


@torch.library.custom_op("structfx::ss1_linear_backward", mutates_args=())
def ss1_linear_backward(dy: Tensor, x: Tensor, P: Tensor, compression: int, seed: int,
                        block_k: int, block_n: int, needs: Sequence[bool]
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dP, dbias)`` of ``ss1_linear``, each only where ``needs`` (3 flags) says (an
    empty tensor otherwise). ``dbias`` is ``dy`` summed over tokens, in ``dy``'s dtype."""
    check_backward_args("ss1_linear_backward", dy, x, P.shape[0], needs, 3)
    dx, dP, db = ss1_torch.ss1_backward_torch(tokens_2d(dy), tokens_2d(x), P, compression, seed,
                                              block_k, block_n, needs)
    return grads_out((None if dx is None else dx.reshape(x.shape), dP, db), dy)


@ss1_linear_backward.register_fake
def _(dy, x, P, compression, seed, block_k, block_n, needs):
    check_backward_args("ss1_linear_backward", dy, x, P.shape[0], needs, 3)
    return _fake_grads(needs, dy, (x, P, dy.new_empty(P.shape[0])))


def _ss1_setup(ctx, inputs, output):
    x, P, bias, compression, seed, block_k, block_n = inputs
    ctx.save_for_backward(x, P)
    ctx.args = (compression, seed, block_k, block_n)


def _ss1_backward(ctx, dy):
    x, P = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])  # (x, P, bias); False for an absent bias
    grads = torch.ops.structfx.ss1_linear_backward(dy, x, P, *ctx.args, needs)
    return (*_autograd_grads(grads, needs), None, None, None, None)


ss1_linear.register_autograd(_ss1_backward, setup_context=_ss1_setup)


def ss1_flops(x_shape, P_shape, block_n: int) -> int:
    """GEMM FLOPs (``2 T N K_red``) plus the sketch's additions (``T K`` per column block)."""
    tokens = 1
    for d in x_shape[:-1]:
        tokens *= d
    N, K_red = P_shape
    return 2 * tokens * N * K_red + tokens * x_shape[-1] * -(-N // block_n)


# ----------------------------------------------------------------------------- CUDA kernels
# blast_triton.py and ss1_triton.py register their CUDA kernels for these ops when imported
# (``torch.library.register_kernel`` beside each kernel). Importing them here would import
# triton with every ``import structfx`` (0.3 s, on CPU-only machines too), so a stand-in is
# registered instead: the first CUDA call imports the module, whose registration replaces the
# stand-in for every later call, and runs that module's kernel. Without triton nothing is
# registered and CUDA tensors take the default (torch) implementation. Tests run the kernels on
# CPU tensors by calling the modules' kernels or launchers directly (TRITON_INTERPRET=1).
_CUDA_KERNELS = {
    "blast_linear": ("blast_triton", "blast_linear_cuda"),
    "blast_linear_backward": ("blast_triton", "blast_linear_backward_cuda"),
    "ss1_linear": ("ss1_triton", "ss1_linear_cuda"),
    "ss1_linear_backward": ("ss1_triton", "ss1_linear_backward_cuda"),
}


def _cuda_stand_in(module: str, kernel: str) -> Callable:
    def first_cuda_call(*args):
        return getattr(importlib.import_module(f"{__package__}.{module}"), kernel)(*args)

    first_cuda_call.__name__ = f"load_{module}_{kernel}"
    return first_cuda_call


def _register_cuda_stand_ins() -> None:
    if importlib.util.find_spec("triton") is None:
        return
    for op, (module, kernel) in _CUDA_KERNELS.items():
        torch.library.register_kernel(f"structfx::{op}", "cuda", _cuda_stand_in(module, kernel))


_register_cuda_stand_ins()


# ----------------------------------------------------------------------------- FLOP counting
# ``torch.utils.flop_counter`` imports triton (a 0.3 s import ``import structfx`` must not pay),
# so the formulas are registered when it is imported: now if it already is, else right after
# its import (``FlopCounterMode`` copies the registry when it is created, which is later).
def _register_flop_formulas(flop_counter) -> None:
    register = flop_counter.register_flop_formula

    @register(torch.ops.structfx.blast_linear)
    def _(x_shape, U_shape, S_shape, V_shape, *args, **kwargs) -> int:
        return blast_flops(x_shape, U_shape, S_shape, V_shape)

    @register(torch.ops.structfx.blast_linear_backward)
    def _(dy_shape, x_shape, U_shape, S_shape, V_shape, *args, **kwargs) -> int:
        return 2 * blast_flops(x_shape, U_shape, S_shape, V_shape)

    @register(torch.ops.structfx.ss1_linear)
    def _(x_shape, P_shape, bias_shape, compression, seed, block_k, block_n, *a, **kw) -> int:
        return ss1_flops(x_shape, P_shape, block_n)

    @register(torch.ops.structfx.ss1_linear_backward)
    def _(dy_shape, x_shape, P_shape, compression, seed, block_k, block_n, *a, **kw) -> int:
        return 2 * ss1_flops(x_shape, P_shape, block_n)


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs ``callback(module)`` right after module ``name`` is executed, once.

    It sits first on ``sys.meta_path``; for ``name`` it asks the finders after it for the spec
    and wraps the loader (``exec_module``, then the callback). It leaves ``sys.meta_path``
    after that import, not during the finder loop the import machinery is running."""

    def __init__(self, name: str, callback: Callable) -> None:
        self.name, self.callback, self.loader = name, callback, None

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or self.loader is not None:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(fullname, path, target)
            if spec is not None:
                if spec.loader is None or not hasattr(spec.loader, "exec_module"):
                    return spec
                self.loader, spec.loader = spec.loader, self
                return spec
        return None

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self.loader.exec_module(module)
        self.callback(module)


def _when_imported(name: str, callback: Callable) -> None:
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))


_when_imported("torch.utils.flop_counter", _register_flop_formulas)
