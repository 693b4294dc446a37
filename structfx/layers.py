"""``BlastLinear`` and ``SS1Linear``: drop-in ``nn.Linear`` replacements holding structured factors.

Both accept any leading batch dims, any float dtype (factors are cast to the input's dtype,
like autocast would), sizes that don't divide by the block sizes (padded inside), and run
through the ``torch.ops.structfx`` ops, so they work in eager, ``torch.compile`` and
``torch.export``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .kernels import ops, ss1_hash
from .kernels.reference import blast_dense_weight
from .kernels.shapes import Blocks, block_pair


def _check_features(cls: str, in_features: int, out_features: int) -> None:
    if in_features < 1 or out_features < 1:
        raise ValueError(f"{cls}: in_features and out_features must be >= 1, "
                         f"got {in_features}, {out_features}")


def _check_input(cls: str, x: torch.Tensor, in_features: int) -> None:
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{cls}: expected input with last dimension {in_features}, "
                         f"got shape {tuple(x.shape)}")


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    # Skip no-op casts: they would show up as nodes in exported graphs.
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _linear_weight(linear: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
    return linear.weight.detach(), (None if linear.bias is None else linear.bias.detach())


def _adopt(layer: nn.Module, f, bias: Optional[torch.Tensor], **factors: torch.Tensor):
    """``from_linear``'s last step: the factors and the dense bias copied into ``layer``, the
    factorizer's errors (``f.error``, ``f.output_error``) kept on it."""
    with torch.no_grad():
        for name, value in factors.items():
            getattr(layer, name).copy_(value)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.factorization_error = f.error
    layer.output_error = f.output_error
    return layer


class BlastLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` a BLAST matrix (docs/design.md, "BLAST").

    ``W`` ``(out_features, in_features)`` is cut into ``b1 x b2`` blocks (``blocks`` is ``b`` or
    ``(b1, b2)``); block ``(i, j)`` is ``U[i] @ diag(S[i, j]) @ V[j].T`` with
    ``U (b1, p, r)``, ``S (b1, b2, r)``, ``V (b2, q, r)``, ``p = ceil(m / b1)``,
    ``q = ceil(n / b2)``. Parameters: ``r * (b1 p + b2 q + b1 b2)`` plus bias.
    """

    def __init__(self, in_features: int, out_features: int, blocks: Blocks, rank: int,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        _check_features("BlastLinear", in_features, out_features)
        b1, b2 = block_pair(blocks)
        if b1 < 1 or b2 < 1:
            raise ValueError(f"BlastLinear: blocks must be >= 1, got {(b1, b2)}")
        if b1 > out_features or b2 > in_features:
            raise ValueError(f"BlastLinear: blocks {(b1, b2)} can't fit a "
                             f"{out_features}x{in_features} weight (b1 <= out_features and "
                             f"b2 <= in_features needed)")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"BlastLinear: rank must be an integer >= 1, got {rank!r}")
        self.in_features, self.out_features = in_features, out_features
        self.blocks, self.rank = (b1, b2), rank
        p, q = -(-out_features // b1), -(-in_features // b2)
        kw = dict(device=device, dtype=dtype)
        self.U = nn.Parameter(torch.empty(b1, p, rank, **kw))
        self.S = nn.Parameter(torch.empty(b1, b2, rank, **kw))
        self.V = nn.Parameter(torch.empty(b2, q, rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same entry variance as nn.Linear's default, 1/(3 n): S = 1, U, V ~ N(0, a^2), r a^4 = 1/(3n).
        a = (3.0 * self.in_features * self.rank) ** -0.25
        with torch.no_grad():
            nn.init.normal_(self.U, std=a)
            nn.init.normal_(self.V, std=a)
            nn.init.ones_(self.S)
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocks: Blocks = 4, rank: Optional[int] = None,
                    params: Optional[float] = None, *, calib: Optional[torch.Tensor] = None,
                    **factorize_kwargs) -> "BlastLinear":
        """Factorize a trained ``nn.Linear``. Give ``rank``, or ``params`` (fraction of the
        dense weight's parameters to keep; default 0.5). Extra keyword arguments go to
        ``structfx.factorize_blast``. The factorization error is in ``.factorization_error``."""
        weight, bias = _linear_weight(linear)
        from .passes.factorize_blast import blast_rank_for_params, factorize_blast

        m, n = weight.shape
        b1, b2 = block_pair(blocks)
        if rank is not None and params is not None:
            raise ValueError("BlastLinear.from_linear: give rank or params, not both")
        if rank is None:
            rank = blast_rank_for_params(m, n, (b1, b2), 0.5 if params is None else params)
        layer = cls(n, m, (b1, b2), rank, bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)
        f = factorize_blast(weight, (b1, b2), rank, calib=calib, **factorize_kwargs)
        return _adopt(layer, f, bias, U=f.U, S=f.S, V=f.V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("BlastLinear", x, self.in_features)
        dt = x.dtype
        return ops.blast_linear(x, _cast(self.U, dt), _cast(self.S, dt), _cast(self.V, dt),
                                _cast(self.bias, dt), self.out_features)

    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight this layer represents."""
        return blast_dense_weight(self.U, self.S, self.V, self.out_features, self.in_features)

    def num_structured_params(self) -> int:
        return self.U.numel() + self.S.numel() + self.V.numel()

    def add_low_rank_(self, B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> None:
        """``W += scale * B @ A`` exactly (``B`` ``(out_features, k)``, ``A``
        ``(k, in_features)``), by growing the rank by ``k``: block ``(i, j)`` of ``B @ A`` is
        ``B_i @ A_j``, so ``U[i]`` gains the columns ``B_i``, ``V[j]`` the columns ``A_j.T`` and
        ``S[i, j]`` ``k`` entries equal to ``scale``. This is how a LoRA adapter merges into a
        BLAST layer (``structfx.lora``). ``U, S, V`` become new parameters (``requires_grad``
        kept): an optimizer holding the old ones must be rebuilt."""
        m, n = self.out_features, self.in_features
        if B.dim() != 2 or A.dim() != 2 or B.shape[0] != m or A.shape[1] != n or \
                B.shape[1] != A.shape[0]:
            raise ValueError(f"BlastLinear.add_low_rank_: expected B (out_features={m}, k) and "
                             f"A (k, in_features={n}), got B {tuple(B.shape)}, A "
                             f"{tuple(A.shape)}")
        k = B.shape[1]
        (b1, b2), p, q = self.blocks, self.U.shape[1], self.V.shape[1]
        kw = dict(dtype=self.U.dtype, device=self.U.device)
        with torch.no_grad():
            Bp = torch.zeros(b1 * p, k, **kw)
            Bp[:m] = B.detach()
            Ap = torch.zeros(b2 * q, k, **kw)
            Ap[:n] = A.detach().t()
            S_new = torch.full((b1, b2, k), float(scale), **kw)
            self._set_factors(torch.cat([self.U, Bp.reshape(b1, p, k)], -1),
                              torch.cat([self.S, S_new], -1),
                              torch.cat([self.V, Ap.reshape(b2, q, k)], -1))

    def truncate_rank_(self, rank: int) -> None:
        """Keep the first ``rank`` components of ``U, S, V`` (undoes ``add_low_rank_``)."""
        if not isinstance(rank, int) or not 1 <= rank <= self.rank:
            raise ValueError(f"BlastLinear.truncate_rank_: rank must be in 1..{self.rank}, "
                             f"got {rank!r}")
        with torch.no_grad():
            self._set_factors(self.U[..., :rank], self.S[..., :rank], self.V[..., :rank])

    def _set_factors(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
        for name, t in (("U", U), ("S", S), ("V", V)):
            old = getattr(self, name)
            t = torch.clone(t.detach(), memory_format=torch.contiguous_format).to(old.dtype)
            setattr(self, name, nn.Parameter(t, requires_grad=old.requires_grad))
        self.rank = U.shape[-1]

    def extra_repr(self) -> str:
        kept = self.num_structured_params() / (self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"blocks={self.blocks}, rank={self.rank}, bias={self.bias is not None}, "
                f"params={kept:.1%}")


class SS1Linear(nn.Module):
    """``y = x @ W + bias`` with ``W`` ``(K, N)`` read from ``P`` ``(N, K_red)`` by the SS1 hash
    (docs/design.md, "SS1"): ``compression`` input rows share each parameter row. ``seed``,
    ``block_k`` and ``block_n`` are part of the layer's definition and saved in its state dict
    (the ``hash_seed`` buffer), so a reloaded layer reads its parameters the same way."""

    def __init__(self, in_features: int, out_features: int, compression: int, seed: int = 0,
                 bias: bool = True, block_k: int = ss1_hash.DEFAULT_BLOCK_K,
                 block_n: int = ss1_hash.DEFAULT_BLOCK_N, device=None, dtype=None):
        super().__init__()
        _check_features("SS1Linear", in_features, out_features)
        ss1_hash.check_config(in_features, out_features, compression, block_k, block_n)
        self.in_features, self.out_features = in_features, out_features
        self.compression, self.seed = compression, int(seed)
        self.block_k, self.block_n = block_k, block_n
        K_red = ss1_hash.reduced_k(in_features, compression, block_k)
        kw = dict(device=device, dtype=dtype)
        self.P = nn.Parameter(torch.empty(out_features, K_red, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.register_buffer("hash_seed", torch.tensor(self.seed, dtype=torch.int64,
                                                       device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each W entry is one P entry: nn.Linear's default bound gives the same entry variance.
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():
            nn.init.uniform_(self.P, -bound, bound)
            if self.bias is not None:
                nn.init.uniform_(self.bias, -bound, bound)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.seed = int(self.hash_seed)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compression: Optional[int] = None,
                    params: Optional[float] = None, seed: int = 0, *,
                    calib: Optional[torch.Tensor] = None, block_k: int = ss1_hash.DEFAULT_BLOCK_K,
                    block_n: int = ss1_hash.DEFAULT_BLOCK_N, **project_kwargs) -> "SS1Linear":
        """Project a trained ``nn.Linear``. Give ``compression``, or ``params`` (fraction of
        parameters to keep; default 0.5). The projection error is in ``.factorization_error``."""
        weight, bias = _linear_weight(linear)
        from .passes.project_ss1 import project_ss1, ss1_compression_for_params

        if compression is not None and params is not None:
            raise ValueError("SS1Linear.from_linear: give compression or params, not both")
        if compression is None:
            compression = ss1_compression_for_params(0.5 if params is None else params)
        N, K = weight.shape
        layer = cls(K, N, compression, seed, bias=bias is not None, block_k=block_k,
                    block_n=block_n, device=weight.device, dtype=weight.dtype)
        f = project_ss1(weight, compression, seed, calib=calib, block_k=block_k,
                        block_n=block_n, **project_kwargs)
        return _adopt(layer, f, bias, P=f.P)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("SS1Linear", x, self.in_features)
        return ops.ss1_linear(x, _cast(self.P, x.dtype), _cast(self.bias, x.dtype),
                              self.compression, self.seed, self.block_k, self.block_n)

    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight this layer represents."""
        W = ss1_hash.dense_weight(self.P, self.in_features, self.compression, self.seed,
                                  self.block_k, self.block_n)
        return W.t()

    def num_structured_params(self) -> int:
        return self.P.numel()

    def extra_repr(self) -> str:
        kept = self.P.numel() / (self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"compression={self.compression}, seed={self.seed}, block_k={self.block_k}, "
                f"block_n={self.block_n}, bias={self.bias is not None}, params={kept:.1%}")
