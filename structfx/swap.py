"""Swap: a copy of the user's model with structured modules at the replaced layers' paths.

``compress`` decides on the captured graph; this module builds what it returns by default: a
copy of the user's own model (its class, methods, ``.config``, ``.generate()``), in which each
replaced ``nn.Linear`` / Hugging Face ``Conv1D`` module is the ``BlastLinear`` / ``SS1Linear``
built for it. The copy shares no tensor with the user's model, and the dense weights being
replaced are never copied (the deep copy's memo maps them to empty placeholders).

A replaced layer can only be swapped when the graph node came from calling that very module,
whose forward is exactly the linear map: a plain ``nn.Linear`` (or MultiheadAttention's
``NonDynamicallyQuantizableLinear``) or HF ``Conv1D`` (``y = x @ W + b`` with ``W`` stored
``(in, out)``: the same function as ``nn.Linear`` with ``W.T``). A functional ``F.linear`` on
a bare parameter, a weight read by its parent (``nn.MultiheadAttention`` reads
``out_proj.weight`` itself), a subclass with its own forward: :func:`unswappable` says why, and
``compress`` returns the rewritten graph instead.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import fx, nn

from .passes.match import _dotted

_LINEAR_TYPES = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def is_hf_conv1d(module: nn.Module) -> bool:
    t = type(module)
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers.")


def is_linear_module(module: nn.Module) -> bool:
    """A module whose forward is exactly ``x @ W.T + b`` (its own forward, not overridden)."""
    return (type(module) in _LINEAR_TYPES or is_hf_conv1d(module)) and \
        "forward" not in module.__dict__


def _called_from(node: fx.Node) -> Optional[str]:
    """Path of the innermost module whose forward made ``node`` (torch.export / Dynamo meta)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _ = list(stack.values())[-1]
    return _dotted(path)


def unswappable(model: nn.Module, name: str, node: fx.Node, weight: torch.Tensor
                ) -> Optional[str]:
    """Why the layer ``name`` (graph node ``node``, dense weight ``weight``) can't be replaced
    by swapping a module of ``model``; None if it can."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return (f"{name!r} is not a module of {type(model).__name__} (a functional linear on "
                f"a parameter)")
    if not is_linear_module(module):
        return (f"{name!r} is a {type(module).__name__}, not an nn.Linear / HF Conv1D whose "
                f"forward is the linear map")
    if module.weight is not weight:
        return f"the graph's weight for {name!r} is not {name}.weight"
    called = _called_from(node)
    if called != name:
        return (f"{name}.weight is read by {called or 'a functional call'!r}, not by calling "
                f"{name!r} (its forward would not run)")
    return None


def _parents(root: nn.Module, target: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every ``(parent, attribute)`` slot holding ``target`` (a module may have several paths)."""
    out = []
    for mod in root.modules():
        for key, child in mod._modules.items():
            if child is target:
                out.append((mod, key))
    return out


def copy_with_swaps(model: nn.Module, layers: dict[str, nn.Module]) -> nn.Module:
    """A deep copy of ``model`` in which the module at each path of ``layers`` is replaced by
    ``layers[path]`` (used as is, not copied: the caller hands over fresh modules).

    The replaced modules' dense weights and biases are not copied: the memo maps them to
    empty ``meta`` tensors, which leave with the modules they sat in. A replaced tensor that is
    also held elsewhere in the model (an alias no graph node read) is copied for real then."""
    originals = {path: model.get_submodule(path) for path in layers}
    memo: dict[int, object] = {}
    placeholders: dict[int, torch.Tensor] = {}
    for mod in originals.values():
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is not None and id(t) not in memo:
                ph = torch.empty(t.shape, dtype=t.dtype, device="meta")
                ph = nn.Parameter(ph, requires_grad=t.requires_grad) if isinstance(
                    t, nn.Parameter) else ph
                memo[id(t)] = ph
                placeholders[id(ph)] = t
    out = copy.deepcopy(model, memo)
    for path, new in layers.items():
        old = out.get_submodule(path)
        new._structfx_replaced = type(old).__name__  # recorded by structfx.save
        new._forward_hooks.update(old._forward_hooks)
        new._forward_pre_hooks.update(old._forward_pre_hooks)
        for parent, key in _parents(out, old):
            parent._modules[key] = new
    _fill_placeholders(out, placeholders)
    return out


def _fill_placeholders(root: nn.Module, placeholders: dict[int, torch.Tensor]) -> None:
    real: dict[int, torch.Tensor] = {}
    for mod in root.modules():
        for slots in (mod._parameters, mod._buffers):
            for key, t in list(slots.items()):
                if t is not None and id(t) in placeholders:
                    src = placeholders[id(t)]
                    if id(t) not in real:
                        c = src.detach().clone()
                        real[id(t)] = nn.Parameter(c, requires_grad=src.requires_grad) \
                            if isinstance(src, nn.Parameter) else c
                    slots[key] = real[id(t)]
