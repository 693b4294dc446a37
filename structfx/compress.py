"""``structfx.compress``: an eager, trainable copy of a model with structured linear layers."""
from __future__ import annotations

import copy
from typing import Any, Iterable, Optional

import torch
from torch import fx, nn
from torch.export import Dim

from . import pipeline
from .config import Config
from .passes.match import match_linears
from .passes.store import FactorStore
from .report import set_last_report
from .timing import median_time


def _as_args(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def capture(model: nn.Module, args: tuple) -> fx.GraphModule:
    """ATen-level graph of ``model`` (torch.export, non-strict), batch/sequence dims dynamic
    where the model allows it. Its parameters are still the model's own tensors."""
    if isinstance(model, fx.GraphModule) and not any(
            n.op == "call_module" and n.target == "_guards_fn" for n in model.graph.nodes):
        # A symbolic_trace graph: match works on its call_module nodes as they are. Rewrite a
        # copy (its submodules are the user's objects).
        return copy.deepcopy(model)
    dyn = tuple({i: Dim.AUTO for i in range(a.dim())} if isinstance(a, torch.Tensor) else None
                for a in args)
    try:
        ep = torch.export.export(model, args, dynamic_shapes=dyn, strict=False)
    except Exception:
        ep = torch.export.export(model, args, strict=False)  # static shapes, if dims can't vary
    return ep.module()


def _flat(gm: fx.GraphModule, args: tuple) -> list:
    codegen = gm.graph._codegen
    return list(codegen.process_inputs(*args)) if hasattr(codegen, "process_inputs") else list(args)


def _detach_from(gm: nn.Module, model: nn.Module) -> None:
    """Give ``gm`` its own copies of the tensors it shares with ``model`` (ties kept)."""
    theirs = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    copies: dict[int, torch.Tensor] = {}
    for mod in gm.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and id(p) in theirs:
                if id(p) not in copies:
                    copies[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                mod._parameters[name] = copies[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None and id(b) in theirs:
                copies.setdefault(id(b), b.detach().clone())
                mod._buffers[name] = copies[id(b)]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _speedup(dense, small, args, repeats: int = 5) -> float:
    return median_time(dense, *args, repeats=repeats) / median_time(small, *args, repeats=repeats)


def compress(model: nn.Module, example_inputs: Any, config: Optional[Config] = None, *,
             calibration: Optional[Iterable] = None, measure: bool = False,
             store: Optional[FactorStore] = None) -> fx.GraphModule:
    """Return a new module (an FX GraphModule) computing ``model`` with structured layers.

    ``example_inputs``: a tensor or a tuple of positional inputs. ``calibration``: batches
    (each like ``example_inputs``) whose activations drive data-aware factorization; the report
    then shows output error on held-out calibration rows. ``measure``: time the dense and the
    compressed model on ``example_inputs`` for the report. ``store``: a ``FactorStore`` to
    reuse estimates, decisions and live factors across calls (default: a fresh one per call). ``model`` and its weights are left
    untouched; the result owns copies of everything it keeps, and its ``BlastLinear`` /
    ``SS1Linear`` submodules are trainable and sit at the original layers' paths.
    The graph is captured in the mode ``model`` is in (dropout / batch-norm behaviour is fixed
    at capture time, as with ``torch.export``); ``.train()`` only makes the factors trainable.
    """
    config = config or Config()
    args = _as_args(example_inputs)
    gm = capture(model, args)
    sites = match_linears(gm, None, config)
    if not any(s.tokens > 1 for s in sites):  # symbolic_trace graphs carry no shapes
        _propagate_shapes(gm, args, sites)
    batches = [args] + [_as_args(b) for b in (calibration or [])]
    result = pipeline.run(gm, sites, config, batches=[_flat(gm, b) for b in batches],
                          calibrated=calibration is not None, store=store)
    pipeline.apply(gm.graph, result.decisions, result.layers, root=gm)
    _detach_from(gm, model)
    gm.recompile()
    # torch.export's unlifted module refuses .train()/.eval(); a plain GraphModule over the same
    # graph (same submodules, same pytree in/out handling) is an ordinary trainable module.
    gm = fx.GraphModule(gm, gm.graph, class_name="StructfxModule")

    report = result.report
    report.model_params_before, report.model_params_after = _count(model), _count(gm)
    report.model_output_error = model_output_error(model, gm, args)
    if measure:
        report.measured_speedup = _speedup(model, gm, args)
    set_last_report(report)
    gm.structfx_report = report
    return gm


def _float_leaves(out) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(
        out.to_tuple() if hasattr(out, "to_tuple") else out)  # HF ModelOutput
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def model_output_error(dense: nn.Module, small: nn.Module, args: tuple) -> Optional[float]:
    """``||small(x) - dense(x)|| / ||dense(x)||`` over the floating-point outputs."""
    with torch.no_grad():
        a, b = _float_leaves(dense(*args)), _float_leaves(small(*args))
    if not a or len(a) != len(b):
        return None
    num = sum(float((y.double() - x.double()).pow(2).sum()) for x, y in zip(a, b))
    den = sum(float(x.double().pow(2).sum()) for x in a)
    return (num / den) ** 0.5 if den > 0 else None


def _propagate_shapes(gm: fx.GraphModule, args: tuple, sites) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(*_flat(gm, args))
    for s in sites:
        shape = s.x.meta["tensor_meta"].shape
        s.tokens = int(torch.Size(shape[:-1]).numel())
