"""Rewrite: replace a matched linear node by a call to its structured module.

The node ``y = linear(x, W, b)`` (or ``addmm(b, x, W)``, ``mm``, ``matmul``) becomes
``y = call_module(<path>)(x)``; the module is installed on ``root`` at the layer's own path so
``state_dict`` keys read like the original model's (``fc1.U``, ``fc1.S``, ...). Nodes that only
fed the dense weight (``get_attr``, ``aten.t``) are removed, and the dense tensors with them.
"""
from __future__ import annotations

from torch import fx, nn

from .match import LinearSite


def _is_free(module: nn.Module) -> bool:
    return not any(True for _ in module.children()) and not any(
        True for _ in module.named_parameters(recurse=False)) and not any(
        True for _ in module.named_buffers(recurse=False))


def install(root: nn.Module, path: str, module: nn.Module) -> str:
    """Put ``module`` at ``path`` under ``root`` (creating parents); return the target used.

    A path still holding other state gets a ``_structfx`` suffix rather than clobbering it."""
    *parents, leaf = path.split(".")
    parent = root
    for p in parents:
        if not hasattr(parent, p):
            parent.add_module(p, nn.Module())
        parent = getattr(parent, p)
    existing = getattr(parent, leaf, None)
    if existing is not None and not (isinstance(existing, nn.Module) and _is_free(existing)):
        leaf = leaf + "_structfx"
        path = ".".join(parents + [leaf])
    if hasattr(parent, leaf):
        delattr(parent, leaf)
    parent.add_module(leaf, module)
    return path


def replace_node(graph: fx.Graph, site: LinearSite, target: str) -> tuple[fx.Node, list[str]]:
    """Swap ``site.node`` for ``call_module(target)(x)``; return the new node and the attribute
    targets whose ``get_attr`` nodes died with it (the dense weight and bias)."""
    with graph.inserting_before(site.node):
        new = graph.call_module(target, (site.x,))
    new.meta = dict(site.node.meta)
    pending = list(site.node.all_input_nodes)
    site.node.replace_all_uses_with(new)
    graph.erase_node(site.node)
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
