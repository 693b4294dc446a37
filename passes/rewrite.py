"""Rewrite: replace a matched linear node by a call to its structured module.

The node ``y = linear(x, W, b)`` (or ``addmm(b, x, W)``, ``mm``, ``matmul``) becomes
``y = call_module(<path>)(x)``; the module is installed on ``root`` at the layer's own path so
``state_dict`` keys read like the original model's (``fc1.U``, ``fc1.S``, ...). Nodes that only
fed the dense weight (``get_attr``, ``aten.t``) are removed, and the dense tensors with them.
A bias that is not a plain parameter (``F.linear(x, w, lin.bias * s)``) stays in the graph:
the node becomes the structured op without bias, then an add of that bias value.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import fx, nn

from .match import LinearSite


def _is_free(module: nn.Module) -> bool:
    return not any(True for _ in module.children()) and not any(
        True for _ in module.named_parameters(recurse=False)) and not any(
        True for _ in module.named_buffers(recurse=False))


def install(root: nn.Module, path: str, module: nn.Module) -> str:
    """Put ``module`` at ``path`` under ``root`` (creating parents); return the target used.

    A path still holding other state gets a ``_structfx`` suffix rather than clobbering it; a
    path through something that is not a module (a bare parameter ``w``, a ``dict``) puts the
    layer under ``root`` as ``<path with _>_structfx``."""
    *parents, leaf = path.split(".")
    parent = root
    for p in parents:
        if not hasattr(parent, p):
            parent.add_module(p, nn.Module())
        parent = getattr(parent, p)
        if not isinstance(parent, nn.Module):
            return install(root, path.replace(".", "_") + "_structfx", module)
    existing = getattr(parent, leaf, None)
    if existing is not None and not (isinstance(existing, nn.Module) and _is_free(existing)):
        leaf = leaf + "_structfx"
        path = ".".join(parents + [leaf])
    if hasattr(parent, leaf):
        delattr(parent, leaf)
    parent.add_module(leaf, module)
    return path


def _operand(node: fx.Node, where) -> object:
    return node.args[where] if isinstance(where, int) else node.kwargs[where]


def replace_node(graph: fx.Graph, site: LinearSite, target: str) -> tuple[fx.Node, list[str]]:
    """Swap ``site.node`` for ``call_module(target)(x)`` (plus ``+ bias`` for a bias that stays
    in the graph); return the structured node and the attribute targets whose ``get_attr``
    nodes died with it (the dense weight and bias).

    The operands are read from ``site.node`` as it is now, not from the site's match-time
    ``x``: when a Linear feeds another, rewriting the first replaced the second's input."""
    old = site.node
    x = _operand(old, site.x_arg)
    bias = _operand(old, site.bias_arg) if site.bias_arg is not None else None
    with graph.inserting_before(old):
        # create_node, not call_module: the target is installed after the rewrite, and the
        # path may still hold the dense parameter (a bare ``nn.Parameter`` weight ``w``).
        new = graph.create_node("call_module", target, (x,))
        out = new
        if isinstance(bias, (fx.Node, torch.Tensor, float, int)):
            aten_graph = isinstance(old.target, torch._ops.OpOverload)
            add = torch.ops.aten.add.Tensor if aten_graph else operator.add
            out = graph.create_node("call_function", add, (new, bias))
    new.meta = dict(old.meta)
    if out is not new:
        out.meta = dict(old.meta)
    pending = list(old.all_input_nodes)
    old.replace_all_uses_with(out)
    graph.erase_node(old)
    freed, erased = [], set()
    while pending:  # weight transposes, then the get_attrs they read; never placeholders
        n = pending.pop()
        if n in erased or n.users or n.op not in ("get_attr", "call_function", "call_method"):
            continue
        erased.add(n)
        pending.extend(n.all_input_nodes)
        if n.op == "get_attr":
            freed.append(n.target)
        graph.erase_node(n)
    return new, freed


def inherit_requires_grad(layer: nn.Module, weight: torch.Tensor,
                          bias: Optional[torch.Tensor]) -> nn.Module:
    """Give ``layer``'s factors the dense weight's ``requires_grad`` and its bias the dense
    bias's: a frozen layer stays frozen after compression."""
    bias_param = getattr(layer, "bias", None)
    for name, p in layer.named_parameters():
        if p is bias_param:
            p.requires_grad_(bool(bias.requires_grad) if bias is not None else weight.requires_grad)
        else:
            p.requires_grad_(bool(weight.requires_grad))
    return layer


def drop_unused_attrs(graph: fx.Graph, root: nn.Module, targets: list[str]) -> None:
    """Delete dense weights / biases no node reads any more (they'd keep the memory)."""
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    for target in targets:
        if target in used:
            continue
        *parents, leaf = target.split(".")
        owner = root
        try:
            for p in parents:
                owner = getattr(owner, p)
            delattr(owner, leaf)
        except AttributeError:
            pass
