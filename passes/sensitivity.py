"""Sensitivity pass: how much the model's output moves when one layer's output does.

The budget is spread by ``select`` over the layers' relative output errors ``e_l``. Summing
``e_l^2`` weighs a query projection like an FFN output, though an error in one may move the
model's output far more than the same relative error in the other. To first order, with the
layers' errors independent, the model's relative squared output error is
``sum_l w_l e_l^2``, where ``w_l`` is the relative squared change of the graph's outputs per
unit of relative squared noise added to layer ``l``'s output ``x W^T``. This pass measures
``w_l`` on one calibration batch: a reference run keeps every node's value, then for each
layer Gaussian noise of relative size ``EPS`` is added to its output and only the nodes
downstream of it are run again (``fx.Interpreter`` with the upstream values as its initial
environment), so the cost is about one forward pass per layer.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .match import LinearSite

# Relative size of the injected noise: small enough for the first-order (linear) regime of
# softmax and LayerNorm, large enough to stand clear of fp32 rounding in the outputs.
EPS = 0.05


def _float_leaves(out) -> list[torch.Tensor]:
    return [t.detach().double().reshape(-1) for t in pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _downstream(node: fx.Node) -> set:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def output_sensitivity(gm: fx.GraphModule, sites: Sequence[LinearSite], batch: Sequence,
                       seed: int = 0) -> dict[str, float]:
    """``name -> w``: the relative squared change of ``gm``'s floating outputs on ``batch``
    per unit relative squared noise in that site's output (module docstring). A site whose
    output has no floating path to the outputs gets 0."""
    with torch.no_grad():
        ref_run = fx.Interpreter(gm, garbage_collect_values=False)
        ref = _float_leaves(ref_run.run(*batch))
        env = dict(ref_run.env)
        y = torch.cat(ref) if ref else torch.zeros(0, dtype=torch.float64)
        y2 = float(y.pow(2).sum())
        gen = torch.Generator().manual_seed(seed)
        out: dict[str, float] = {}
        for s in sites:
            value = env.get(s.node)
            if not isinstance(value, torch.Tensor) or y2 == 0:
                out[s.name] = 0.0
                continue
            x = env[s.x]
            clean = float((x.reshape(-1, x.shape[-1]).double()
                           @ s.linear_weight.detach().double().mT).norm())
            noise = torch.randn(value.shape, generator=gen, dtype=torch.float64)
            noise = noise * (EPS * clean / max(float(noise.norm()), 1e-300))
            below = _downstream(s.node)
            start = {n: v for n, v in env.items() if n not in below}
            start[s.node] = value + noise.to(value.dtype)
            got = _float_leaves(fx.Interpreter(gm).run(*batch, initial_env=start))
            moved = sum(float((g - r).pow(2).sum()) for g, r in zip(got, ref))
            out[s.name] = moved / y2 / EPS ** 2
        return out
