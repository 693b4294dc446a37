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
environment), so the cost is about one forward pass per layer. Keeping every node's value is
one batch's activations, all of them; when those would exceed ``KEEP_BYTES`` (long sequences,
a large model) each layer's run is a whole forward pass instead, which frees values as it
goes.
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
# Above this many bytes of node values the reference run's environment is not kept.
KEEP_BYTES = 1 << 30


class _Reference(fx.Interpreter):
    """A plain run that also keeps node values in ``values``: every node's while they add up
    to at most ``keep_bytes`` (then ``all`` stays True), else only the ``watch`` nodes'."""

    def __init__(self, gm, watch: set, keep_bytes: int):
        super().__init__(gm)
        self.watch, self.room, self.values, self.all = watch, keep_bytes, {}, True

    def run_node(self, n):
        out = super().run_node(n)
        if self.all:
            self.room -= sum(t.numel() * t.element_size() for t in pytree.tree_leaves(out)
                             if isinstance(t, torch.Tensor))
            if self.room < 0:
                self.all = False
                self.values = {k: v for k, v in self.values.items() if k in self.watch}
        if self.all or n in self.watch:
            self.values[n] = out
        return out


class _Perturbed(fx.Interpreter):
    """A whole forward pass with ``node``'s value replaced by ``value``."""

    def __init__(self, gm, node, value):
        super().__init__(gm)
        self.node, self.value = node, value

    def run_node(self, n):
        return self.value if n is self.node else super().run_node(n)


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
                       seed: int = 0, keep_bytes: int = KEEP_BYTES) -> dict[str, float]:
    """``name -> w``: the relative squared change of ``gm``'s floating outputs on ``batch``
    per unit relative squared noise in that site's output (module docstring). A site whose
    output has no floating path to the outputs gets 0. ``keep_bytes``: the most node values
    kept between the layers' runs (module docstring)."""
    with torch.no_grad():
        ref_run = _Reference(gm, {s.node for s in sites} | {s.x for s in sites}, keep_bytes)
        ref = _float_leaves(ref_run.run(*batch))
        keep, env = ref_run.all, ref_run.values
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
            noisy = value + noise.to(value.dtype)
            if keep:
                below = _downstream(s.node)
                start = {n: v for n, v in env.items() if n not in below}
                start[s.node] = noisy
                got = _float_leaves(fx.Interpreter(gm).run(*batch, initial_env=start))
            else:
                got = _float_leaves(_Perturbed(gm, s.node, noisy).run(*batch))
            moved = sum(float((g - r).pow(2).sum()) for g, r in zip(got, ref))
            out[s.name] = moved / y2 / EPS ** 2
        return out
