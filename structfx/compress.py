"""``structfx.compress``: a copy of the user's model with structured linear layers.

The decisions are made on a captured ATen graph (``torch.export``, non-strict); what comes back
is, by default, a copy of the user's own model (its class and methods: ``.generate()``,
``.config``, sentence-transformers, the HF ``Trainer``) with each replaced layer swapped for its
``BlastLinear`` / ``SS1Linear`` (``swap.py``). The rewritten graph comes back instead when a
replaced linear is not a module structfx can swap (``output="graph"`` asks for it).
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
import threading
import warnings
from typing import Any, Iterable, Optional

import torch
from torch import fx, nn

from . import pipeline, swap
from .config import Config
from .inputs import Inputs, dynamic_shapes, normalize, normalize_batches, prepare
from .passes.match import match_linears
from .passes.store import FactorStore
from .report import set_last_report
from .timing import median_time

OUTPUTS = ("auto", "model", "graph")

# torch.export is not thread-safe (non-strict tracing patches process-wide state, and a
# failure half-way can leave it patched). compress and export_onnx run under this lock: calls
# from several threads are serialized rather than interleaved.
_LOCK = threading.RLock()


def capture_lock():
    """The process-wide lock ``compress`` and ``export_onnx`` hold while they trace / run
    models."""
    return _LOCK


def _export(model: nn.Module, inp: Inputs, dyn, oblivious: bool):
    ctx = (torch.fx.experimental._config.patch(backed_size_oblivious=True) if oblivious
           else contextlib.nullcontext())
    with ctx, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*0/1 specialized.*")
        return torch.export.export(model, inp.args, kwargs=inp.kwargs or None,
                                   dynamic_shapes=dyn, strict=False)


def capture(model: nn.Module, inputs: Any) -> fx.GraphModule:
    """ATen-level graph of ``model`` (torch.export, non-strict) for ``inputs`` (a tensor, tuple,
    dict or ``Inputs``), every tensor axis dynamic where the model allows it, sizes 1 included
    (an example with batch 1 or sequence 1 does not specialize the graph to 1). Its
    parameters are still the model's own tensors.

    Attempts, each only when the one before failed because of its dynamic dims
    (``dynamic_shape_failure``): 1. dynamic, sizes 1 not specialized (size-oblivious); 2.
    dynamic where the model lets sizes vary; 3. static shapes. Any other failure is the
    model's own and propagates at once, as torch.export raised it (with a note naming the
    model and inputs); if every attempt fails, the error shows the first failure and the
    last, and is chained to the first."""
    inp = inputs if isinstance(inputs, Inputs) else normalize(inputs, model)
    if isinstance(model, fx.GraphModule) and not any(
            n.op == "call_module" and n.target == "_guards_fn" for n in model.graph.nodes):
        # A symbolic_trace graph: match works on its call_module nodes as they are. Rewrite a
        # copy (its submodules are the user's objects).
        return copy.deepcopy(model)
    dyn = dynamic_shapes(model, inp, feature_axis=True)
    attempts = ([(dyn, True), (dyn, False)] if dyn is not None else []) + [(None, False)]
    where = f"structfx: torch.export could not capture {type(model).__name__} on {inp.describe()}"
    errors: list[Exception] = []
    with _LOCK:
        for d, oblivious in attempts:
            try:
                return _export(model, inp, d, oblivious).module()
            except Exception as e:  # noqa: BLE001 - sorted here: only shape failures retry
                retry = d is not None and dynamic_shape_failure(e)
                if not errors and not retry:   # the model's own error, as torch raised it
                    e.add_note(where + (" with dynamic dims; not a dynamic-shape failure, "
                                        "so static shapes were not tried" if d is not None
                                        else " with static shapes"))
                    raise
                errors.append(e)
                if not retry:
                    break
    first, last = errors[0], errors[-1]
    also = (f" (the first attempt, with dynamic batch / sequence dims: "
            f"{type(first).__name__}: {first})" if first is not last else "")
    raise RuntimeError(f"{where}: {type(last).__name__}: {last}{also}") from first


# Messages of errors raised by code that met a symbolic size: "SymInt", or a backed size
# symbol ("s77") as torch prints one ("The size of tensor a (s77) must match ...").
_SYMBOLIC = re.compile(r"\bSym(?:Int|Float|Bool)\b|\bs\d+\b")


def dynamic_shape_failure(e: BaseException) -> bool:
    """Whether a ``torch.export`` failure comes from the dims it was asked to keep dynamic,
    so that fewer dynamic dims may succeed: a constraint violation
    (``torch._dynamo.exc.UserError`` of type ``CONSTRAINT_VIOLATION`` / ``DYNAMIC_DIM``,
    ``ConstraintViolationError``), a guard that can't be decided on a symbolic size
    (``GuardOnDataDependentSymNode`` on a size symbol, not on a value read from the data), or
    an op / Python code that refused a symbolic size (its message names one). An error of the
    model's own (a raise, data-dependent control flow, a shape mismatch static shapes hit too)
    is not one. Follows the exception's cause / context chain."""
    from torch._dynamo.exc import UserError, UserErrorType
    from torch.fx.experimental.symbolic_shapes import (ConstraintViolationError,
                                                       GuardOnDataDependentSymNode)

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ConstraintViolationError):
            return True
        if isinstance(e, UserError) and e.error_type in (UserErrorType.CONSTRAINT_VIOLATION,
                                                         UserErrorType.DYNAMIC_DIM):
            return True
        if isinstance(e, GuardOnDataDependentSymNode):
            cond = getattr(e, "cond", None)
            symbols = getattr(cond, "free_symbols", ())
            return any(str(s).startswith("s") for s in symbols)   # u*: a value, not a size
        if _SYMBOLIC.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _flat(gm: fx.GraphModule, inp: Inputs, what: str = "example_inputs",
          example: Optional[Inputs] = None) -> list:
    """The graph's flat placeholder values for ``inp``; an error naming the batch if it does
    not fit the captured graph (other inputs, or a size the graph is specialized to)."""
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        import torch.fx._pytree as fx_pytree

        try:
            flat = list(fx_pytree.tree_flatten_spec((inp.args, inp.kwargs), spec))
        except Exception:  # noqa: BLE001
            ref = f" (example_inputs: {example.describe()})" if example is not None else ""
            raise ValueError(f"{what}: {inp.describe()} does not have the inputs the model "
                             f"was captured with{ref}; every batch needs the same positional "
                             f"inputs and keyword names") from None
    else:
        codegen = gm.graph._codegen
        flat = (list(codegen.process_inputs(*inp.args, **inp.kwargs))
                if hasattr(codegen, "process_inputs") else list(inp.args))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, flat):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and isinstance(value, torch.Tensor):
            if val.dim() != value.dim():
                raise ValueError(f"{what}: input {node.name!r} is {value.dim()}-D "
                                 f"{tuple(value.shape)}, the captured graph takes "
                                 f"{val.dim()}-D inputs there")
            for axis, (want, got) in enumerate(zip(val.shape, value.shape)):
                if isinstance(want, int) and want != got:
                    raise ValueError(f"{what}: input {node.name!r} has size {got} on axis "
                                     f"{axis}, where the captured graph is specialized to "
                                     f"{want} (the model needs that size to stay fixed)")
    return flat


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


def _speedup(dense, small, inp: Inputs, repeats: int = 5) -> float:
    return (median_time(lambda *a: inp.call(dense), *inp.tensors(), repeats=repeats)
            / median_time(lambda *a: inp.call(small), *inp.tensors(), repeats=repeats))


def _warn_train_mode(model: nn.Module) -> None:
    """One warning per call when the model is in training mode with dropout / batch norm."""
    if not model.training:
        return
    active = [n for n, m in model.named_modules() if m.training and (
        (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)
        or isinstance(m, nn.modules.batchnorm._BatchNorm))]
    if active:
        more = f" and {len(active) - 1} more" if len(active) > 1 else ""
        warnings.warn(f"structfx.compress: {type(model).__name__} is in training mode, so "
                      f"the capture that calibrates and checks the layers runs with dropout / "
                      f"batch-norm training behaviour ({active[0]!r}{more}), and a returned "
                      f"graph (output='graph') keeps that behaviour baked in; call "
                      f"model.eval() before compress (a returned model copy follows "
                      f".train() / .eval() as usual)", UserWarning, stacklevel=3)


def compress(model: nn.Module, example_inputs: Any, config: Optional[Config] = None, *,
             calibration: Optional[Iterable] = None, measure: bool = False,
             output: str = "auto", store: Optional[FactorStore] = None) -> nn.Module:
    """Return a copy of ``model`` computing it with structured layers.

    ``example_inputs`` (and each ``calibration`` batch): a tensor, a tuple of positional
    inputs, a dict / ``BatchEncoding`` of keyword inputs (``tokenizer(texts,
    return_tensors="pt")``), or ``structfx.Inputs(args, kwargs)``. Hugging Face models are
    captured with ``use_cache=False`` (their cache is not needed to decide the layers; the
    returned model uses its cache as before). ``calibration``: batches whose activations drive
    data-aware factorization; the report then shows output error on held-out calibration rows.
    ``measure``: time the dense and the compressed model on ``example_inputs``. ``store``: a
    ``structfx.FactorStore`` to reuse estimates, decisions and live factors across calls
    (default: a fresh one per call).

    ``output``: ``"auto"`` (default) returns a copy of ``model`` (same class and methods), each
    replaced ``nn.Linear`` / HF ``Conv1D`` swapped for its ``BlastLinear`` / ``SS1Linear`` at
    the same path, or, when a replaced linear is not such a module (a functional ``F.linear``
    on a parameter), the rewritten ``GraphModule`` with a warning and a report note;
    ``"model"`` raises instead of falling back; ``"graph"`` always returns the graph (captured
    in the mode ``model`` is in: dropout fixed; it takes the inputs as captured).

    ``model`` and its tensors are left untouched; the result shares no tensor with it, and
    the dense weights of the replaced layers are not copied. ``result.structfx_report`` and
    ``structfx.last_report()`` hold the report. Calls from several threads are serialized.
    """
    if output not in OUTPUTS:
        raise ValueError(f"compress: output must be one of {OUTPUTS}, got {output!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress: model must be an nn.Module, got {type(model).__name__}")
    config = config or Config()
    cap = prepare(example_inputs, model)
    calib = [prepare(b, model, f"calibration[{i}]")
             for i, b in enumerate(normalize_batches(calibration, model))]
    _warn_train_mode(model)
    with _LOCK, no_side_effects(model):   # the captured graph shares the model's buffers
        gm = capture(model, cap)
        flat = [_flat(gm, cap)] + [_flat(gm, b, f"calibration[{i}]", cap)
                                   for i, b in enumerate(calib)]
        captured = captured_inputs(gm)
        sites = match_linears(gm, None, config)
        if not any(s.tokens > 1 for s in sites):  # symbolic_trace graphs carry no shapes
            sites = _propagate_shapes(gm, flat[0], sites)
        # ---- the pipeline: decide, record, factorize, rewrite, report
        run = pipeline.run(gm, sites, config, batches=flat, calibrated=bool(calib),
                           store=store)
        pipeline.apply(gm.graph, run.decisions, run.layers, root=gm)
        report = run.report
        replaced = [d.site for d in run.decisions if d.replaced]
        layers = {name: f.layer for name, f in run.layers.items()}
        # ----
    with _LOCK:
        result = _result(model, gm, replaced, layers, output, report)
        report.model_params_before, report.model_params_after = _count(model), _count(result)
        with no_side_effects(model), no_side_effects(result):
            report.model_output_error = model_output_error(model, result, cap)
            if measure:
                report.measured_speedup = _speedup(model, result, cap)
    set_last_report(report)
    result.structfx_report = report
    result.structfx_inputs = captured   # what distill checks its batches against
    return result


def captured_inputs(gm: fx.GraphModule) -> Optional[dict]:
    """The input structure (pytree spec) and per-input ``(dims, dtype)`` the graph was
    captured for; ``"*"`` for a dim that may vary. None when the graph doesn't say."""
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    spec = getattr(gm, "_in_spec", None)
    if spec is None or not all(isinstance(v, torch.Tensor) for v in vals):
        return None

    def dim(d):
        if isinstance(d, torch.SymInt):
            value = d.node.maybe_as_int()
            return "*" if value is None else int(value)
        return int(d)
    return {"spec": spec, "inputs": [([dim(d) for d in v.shape], v.dtype) for v in vals]}


@contextlib.contextmanager
def no_side_effects(gm: nn.Module):
    """Running the user's module (the captured graph while recording, the teacher while
    distilling) must leave its buffers as they were: train-mode batch norm would update its
    running statistics and ``num_batches_tracked``. Put them back after, and the CPU RNG state
    too (dropout)."""
    saved = [(b, b.detach().clone()) for b in gm.buffers()]
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, value in saved:
                    b.copy_(value)


def _result(model: nn.Module, gm: fx.GraphModule, replaced, layers: dict, output: str,
            report) -> nn.Module:
    """The model copy with the structured modules swapped in, or the rewritten graph."""
    why = {} if output == "graph" else {
        s.name: r for s in replaced
        if (r := swap.unswappable(model, s.name, s.node, s.weight)) is not None}
    if why and output == "model":
        lines = "; ".join(why.values())
        raise ValueError(f"compress(output='model'): {len(why)} replaced layer(s) can't be "
                         f"swapped into a copy of {type(model).__name__}: {lines}. Use "
                         f"output='graph' (or 'auto') for the rewritten GraphModule")
    if output == "model" or (output == "auto" and not why):
        try:
            out = swap.copy_with_swaps(model, {s.name: layers[s.name] for s in replaced})
            report.output = "model"
            return out
        except (TypeError, RuntimeError, copy.Error) as e:  # an object deepcopy can't copy
            if output == "model":
                raise
            why = {"": f"copying {type(model).__name__} failed ({type(e).__name__}: {e})"}
    _detach_from(gm, model)
    gm.recompile()
    # torch.export's unlifted module refuses .train()/.eval(); a plain GraphModule over the same
    # graph (same submodules, same pytree in/out handling) is an ordinary trainable module.
    gm = fx.GraphModule(gm, gm.graph, class_name="StructfxModule")
    report.output = "graph"
    if why:
        note = (f"returned the rewritten GraphModule, not a copy of {type(model).__name__}: "
                + "; ".join(why.values()))
        report.notes.append(note)
        warnings.warn(f"structfx.compress: {note}", UserWarning, stacklevel=3)
    return gm


def float_leaves(out) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output (a tensor, tuple, dict, HF
    ``ModelOutput``), in pytree order."""
    leaves = torch.utils._pytree.tree_leaves(
        out.to_tuple() if hasattr(out, "to_tuple") else out)  # HF ModelOutput
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def relative_output_error(pairs: Iterable[tuple[list, list]]) -> Optional[float]:
    """``sqrt(sum ||got - ref||^2 / sum ||ref||^2)`` over ``(got, ref)`` pairs, each the
    ``float_leaves`` of one call of two models on the same inputs (fp64 sums): the relative
    output error over one call or several batches. None when a pair doesn't line up (a
    different number of outputs, or shapes) or the reference outputs are all zero."""
    num = den = 0.0
    for got, ref in pairs:
        if len(got) != len(ref) or any(g.shape != r.shape for g, r in zip(got, ref)):
            return None
        num += sum(float((g.double() - r.double()).pow(2).sum()) for g, r in zip(got, ref))
        den += sum(float(r.double().pow(2).sum()) for r in ref)
    return math.sqrt(num / den) if den > 0 else None


def model_output_error(dense: nn.Module, small: nn.Module, inputs: Any) -> Optional[float]:
    """``||small(x) - dense(x)|| / ||dense(x)||`` over the floating-point outputs."""
    inp = inputs if isinstance(inputs, Inputs) else normalize(inputs)
    with torch.no_grad():
        ref, got = float_leaves(inp.call(dense)), float_leaves(inp.call(small))
    return relative_output_error([(got, ref)])


def _propagate_shapes(gm: fx.GraphModule, flat: list, sites) -> list:
    """``sites`` with their token counts from running ``gm`` on ``flat``."""
    from dataclasses import replace

    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(*flat)
    return [replace(s, tokens=int(torch.Size(s.x.meta["tensor_meta"].shape[:-1]).numel()))
            for s in sites]
