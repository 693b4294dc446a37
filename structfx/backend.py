"""``torch.compile(model, backend="structfx")``: rewrite the Dynamo graph, then inductor.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so it is listed
by ``torch._dynamo.list_backends()`` without importing structfx first. Options come through
``torch.compile(..., options={...})`` (the keys of ``structfx.Config``) or ``backend(config)``.

Dynamo hands us parameters as graph inputs: the rewritten graph keeps those placeholders (the
caller still passes them) but no longer reads the dense weights; the factors live in modules of
a fresh GraphModule, which aot_autograd lifts as its own parameters. Because weights are inputs,
Dynamo does not recompile when one changes: a guard looks at each replaced weight on every call
(``Config.stale_check``) and refactorizes or raises.

What the backend must not do behind the user's back:
  * train nothing: the factors are the backend's own, invisible to the user's optimizer, so a
    layer whose weights require grad in a graph run with grad enabled stays dense (warning);
  * touch the user's tensors: the activations for the report are recorded on copies of the
    inputs and buffers (an in-place update of an input, batch-norm statistics), with the RNG
    state restored afterwards;
  * lose the compression on dynamic shapes: a graph with symbolic sizes is costed at, and
    recorded with, the sizes of the call that compiled it.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from typing import Callable, Optional

import torch
from torch import fx, nn

from . import pipeline
from .config import Config
from .passes.factorize import refresh_layer
from .passes.match import match_linears
from .passes.store import FactorStore
from .report import LayerDecision, Report, set_last_report

# Dynamo already compiles one frame at a time (its own compile lock), but the backend can also
# be called directly, and the decision memo, the factor cache and the report list are shared
# with compress(): one compile of ours at a time.
_LOCK = threading.RLock()

TRAINING_SKIP = "weight requires grad in grad mode (to fine-tune: structfx.compress)"


class LeftToInductor(RuntimeError):
    """This graph (or some of its layers) cannot be rewritten; the message says why."""


def structfx_backend(gm: fx.GraphModule, example_inputs, *, options: Optional[dict] = None,
                     mode=None, **kwargs):
    """The ``"structfx"`` torch.compile backend."""
    return _backend_with(Config.from_options(options), DEFAULT_STORE)(gm, example_inputs,
                                                                       mode=mode)


# The store of the string backend ``backend="structfx"`` (Dynamo builds that backend afresh for
# every graph, so graphs of one model can only meet here). It holds floats, decisions and weak
# references to live factors: nothing that outlives the compiled models. ``structfx.backend()``
# objects own a store of their own.
DEFAULT_STORE = FactorStore()


def backend(config: Optional[Config] = None, *, store: Optional[FactorStore] = None,
            **options) -> Callable:
    """A backend bound to ``config``: ``torch.compile(m, backend=structfx.backend(cfg))``.
    The graphs it compiles share one ``FactorStore`` (``store``, or a new one)."""
    if config is not None and options:
        raise ValueError("give a Config or keyword options, not both")
    return _backend_with(config or Config.from_options(options), store or FactorStore())


def _backend_with(config: Config, store: FactorStore) -> Callable:
    def compile_with_structfx(gm: fx.GraphModule, example_inputs, mode=None, **kwargs):
        import functools

        import torch._inductor
        from torch._inductor.compile_fx import compile_fx

        # torch.compile(..., mode="reduce-overhead" | "max-autotune") reaches custom backends
        # as ``mode``: hand it on to inductor as the config it stands for (CUDA graphs, ...).
        from torch._dynamo import exc as _dynamo_exc   # here: it imports triton (import cost)

        patches = torch._inductor.list_mode_options(mode) if mode else {}
        lower = functools.partial(compile_fx, config_patches=patches) if patches else compile_fx
        attempt: dict = {}
        with _LOCK:
            try:
                return _compile(gm, list(example_inputs), config, lower, attempt, store)
            except (_dynamo_exc.RestartAnalysis, _dynamo_exc.SkipFrame):
                raise  # Dynamo's own control flow (e.g. "tensorify scalars"): it calls again
            except Exception as e:
                if config.strict:
                    raise
                reason = str(e) if isinstance(e, LeftToInductor) else f"{type(e).__name__}: {e}"
                warnings.warn(f"structfx: left this graph to plain inductor because {reason}",
                              stacklevel=2)
                _publish(_fallback_report(attempt.get("sites", []), reason), config)
                return lower(gm, example_inputs)

    return compile_with_structfx


def _compile(gm: fx.GraphModule, example_inputs: list, config: Config, compile_fx,
             attempt: dict, store: FactorStore):
    sites = match_linears(gm, example_inputs, config)
    training = _trainable(gm, sites, config)
    sites = attempt["sites"] = [dataclasses.replace(s, skip=TRAINING_SKIP)
                                if s.name in training else s for s in sites]
    result = _without_side_effects(gm, example_inputs, lambda inputs: pipeline.run(
        gm, sites, config, batches=[inputs], store=store))
    decisions, layers, report = result.decisions, result.layers, result.report
    for f in layers.values():
        f.layer.requires_grad_(False)  # the user's optimizer never sees them: no backward
    replaced = [d for d in decisions if d.replaced]
    if not replaced:
        compiled = compile_fx(gm, example_inputs)
        if training:  # nothing left to rewrite once the trainable layers stay dense
            report.fallback = _training_message(training)
        _publish(report, config)
        return compiled

    # Rewrite a copy of Dynamo's graph into a fresh GraphModule that owns the factor modules.
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    moved = [dataclasses.replace(d, site=dataclasses.replace(
        d.site, node=env[d.site.node], x=env[d.site.x],
        weight_nodes=[env[n] for n in d.site.weight_nodes])) for d in decisions]
    root = nn.Module()
    pipeline.apply(graph, moved, layers, root)
    new_gm = fx.GraphModule(root, graph)
    compiled = compile_fx(new_gm, example_inputs)
    guard = StaleWeightGuard(replaced, layers, config)
    _publish(report, config)

    def run(*args):
        guard.check(args)
        return compiled(*args)

    run.structfx_report = report
    run.structfx_guard = guard
    return run


def _publish(report: Report, config: Config) -> None:
    set_last_report(report)
    if config.report or os.environ.get("STRUCTFX_REPORT") == "1":
        print(report)


def _fallback_report(sites: list, reason: str) -> Report:
    """Every layer of a graph left to inductor, dense, with the reason (first line)."""
    reason = reason.strip().splitlines()[0] if reason.strip() else reason
    rows = [LayerDecision(
        name=s.name, shape=(s.out_features, s.in_features), tokens=s.tokens,
        dense_mflops=2 * s.out_features * s.in_features * s.tokens / 1e6, structure="dense",
        settings="", params=s.out_features * s.in_features,
        dense_params=s.out_features * s.in_features,
        skip=s.skip or "graph left to plain inductor") for s in sites]
    return Report(layers=rows, device="", fallback=reason)


# ----------------------------------------------------------------------------- training
def _grad_mode(gm: fx.GraphModule) -> bool:
    """Will this graph run with grad enabled? (Dynamo guards on the grad mode it compiled in;
    a ``torch.enable_grad()`` region inside the graph shows as a ``_set_grad_enabled`` call.)"""
    if torch.is_grad_enabled():
        return True
    return any(n.op == "call_function" and n.target is torch._C._set_grad_enabled
               and n.args and n.args[0] for n in gm.graph.nodes)


def _trainable(gm: fx.GraphModule, sites: list, config: Config) -> list[str]:
    """The candidate layers to keep dense because their weight or bias requires grad in a graph
    run with grad enabled: their gradient would go to the backend's factors, never to the
    user's parameters. Warns (names the layers), or raises under ``strict``."""
    if not _grad_mode(gm):
        return []
    names = [s.name for s in sites if s.skip is None and (
        s.weight.requires_grad or (s.bias is not None and s.bias.requires_grad))]
    if not names:
        return []
    message = _training_message(names)
    if config.strict:
        raise LeftToInductor(message)
    warnings.warn(f"structfx: {message}", stacklevel=4)
    return names


def _training_message(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:4]) + (f" and {len(names) - 4} more"
                                                     if len(names) > 4 else "")
    return (f"the graph runs with grad enabled and the weights of {shown} require grad: "
            f"torch.compile(backend='structfx') does not train structured factors (the "
            f"gradients would never reach your parameters), so these layers stay dense. To "
            f"fine-tune structured layers, train the module returned by structfx.compress; to "
            f"compile for inference, call it under torch.no_grad() / torch.inference_mode() "
            f"or freeze the weights (requires_grad_(False)).")


# ----------------------------------------------------------------------------- recording
def _concrete(v):
    """A symbolic size (a dynamic-shape graph's SymInt input) -> the value it has in the call
    that compiled the graph; anything else unchanged."""
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = v.node.hint
        if hint is None:
            raise LeftToInductor(f"the graph input {v} has no example value (data-dependent "
                                 f"size), so its activations cannot be recorded")
        return hint
    return v


def _without_side_effects(gm: fx.GraphModule, example_inputs: list, run):
    """``run(inputs)`` (the pipeline, which records the rows each replaced site sees on the
    example inputs, for the report's output error) without side effects on the user's tensors: Dynamo's example inputs *are* the call's real
    inputs and buffers, and the graph may update them in place (``x.add_(1)``, batch-norm
    running statistics and ``num_batches_tracked``, which ``native_batch_norm`` updates without
    a trace in its schema or ``_version``), so every tensor that is not a parameter is copied.
    Parameters are copied only where the graph visibly updates them in place (an in-place
    method or ``out=`` on the placeholder); the RNG state is restored (dropout)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = []
    for k, v in enumerate(example_inputs):
        v = _concrete(v)
        if isinstance(v, torch.Tensor) and (not isinstance(v, nn.Parameter) or (
                k < len(placeholders) and _updated_in_place(placeholders[k]))):
            v = v.detach().clone()
        inputs.append(v)
    params = [(k, v, v._version) for k, v in enumerate(inputs) if isinstance(v, nn.Parameter)]
    cuda = sorted({v.device.index or 0 for v in inputs
                   if isinstance(v, torch.Tensor) and v.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        result = run(inputs)
    changed = [placeholders[k].name for k, v, version in params
               if v._version != version and k < len(placeholders)]
    if changed:  # not seen in the graph: say so rather than leave it silent
        raise LeftToInductor(f"the graph updates parameter(s) {changed} in place, and "
                             f"structfx's recording run on the compile call updated them once "
                             f"more than eager would have")
    return result


def _updated_in_place(node: fx.Node) -> bool:
    for user in node.users:
        name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
        if user.op in ("call_method", "call_function") and (
                (isinstance(name, str) and name.endswith("_") and not name.endswith("__")
                 and user.args and user.args[0] is node) or "out" in user.kwargs):
            return True
    return False


# ----------------------------------------------------------------------------- staleness
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# stale_check="sample": RUNS runs of RUN contiguous elements per tensor, at fixed random
# places. Runs rather than scattered elements: on CPU a gather from a weight that is not in
# cache costs a memory access per cache line touched.
RUNS, RUN = 16, 16


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, a view (compared exactly: NaN equals itself, -0.0 != 0.0)."""
    return t.detach().view(_INT_OF_SIZE[t.element_size()])


def _sample_index(t: torch.Tensor) -> torch.Tensor:
    n = t.numel()
    if n <= RUNS * RUN:
        return torch.arange(n, device=t.device)
    g = torch.Generator().manual_seed(n)
    starts = torch.randint(n - RUN + 1, (RUNS,), generator=g)
    return (starts[:, None] + torch.arange(RUN)).reshape(-1).to(t.device)


@dataclasses.dataclass
class _Watched:
    """One replaced weight or bias as it was when its factors were computed."""

    index: int                     # its position among the graph's inputs
    tensor: torch.Tensor
    version: int
    ptr: int
    bits: torch.Tensor             # a view of its storage: sees writes through any alias
    sample_at: Optional[torch.Tensor] = None  # flat indices sampled ("sample")
    content: Optional[torch.Tensor] = None    # sampled bits ("sample") / all bits ("full")

    @classmethod
    def of(cls, index: int, t: torch.Tensor, mode: str,
           sample_at: Optional[torch.Tensor] = None) -> "_Watched":
        w = cls(index, t, t._version, t.data_ptr(), _bits(t))
        if mode == "sample":
            w.sample_at = _sample_index(t) if sample_at is None else sample_at
            w.content = torch.take(w.bits, w.sample_at)
        elif mode == "full":
            w.content = w.bits.clone()
        return w

    def same_tensor(self, args) -> bool:
        t = args[self.index]
        return t is self.tensor and t._version == self.version and t.data_ptr() == self.ptr

    def same_content(self) -> bool:
        if self.sample_at is None:
            return torch.equal(self.bits, self.content)
        return torch.equal(torch.take(self.bits, self.sample_at), self.content)


class StaleWeightGuard:
    """Notices a replaced weight (or bias) that changed after compiling, and refactorizes or
    raises (``Config.on_stale``). What is seen depends on ``Config.stale_check``:

    * always: another tensor passed in its place, an in-place update through autograd's view
      of it (``w.mul_()``, ``w.copy_()``, ``load_state_dict``, an optimizer step: ``_version``),
      new storage (``w.data = new``: the data pointer);
    * ``"sample"`` (default): also a change through ``w.data`` (``w.data.mul_(2)``) or any
      other alias that touches one of its sampled elements (``RUNS`` runs of ``RUN``
      contiguous elements at fixed random places; bit-exact): any change of the whole tensor
      (scaling, EMA, re-init, ``copy_``), most changes of a large part of it (pruning); not a
      change confined to a few elements (clipping a few outliers, one row); one small gather
      per tensor and one device sync per call;
    * ``"full"``: every element, bit-exact, against a copy of each watched tensor (memory:
      one extra copy of the replaced weights; time: one read of them per call);
    * ``"version"``: only the first group (no per-call reads at all).
    """

    def __init__(self, plans: list, layers: dict, config: Config):
        self.config = config
        self.mode = config.stale_check
        self.entries = []
        self._lock = threading.Lock()  # one compiled model called from several threads
        for p in plans:
            s = p.site
            watched = [(s.weight_input, s.weight)]
            if s.bias_input is not None:
                watched.append((s.bias_input, s.bias))
            self.entries.append([p, layers[s.name].layer,
                                 [_Watched.of(i, t, self.mode) for i, t in watched]])

    def check(self, args) -> None:
        with self._lock:
            stale = [e for e in self.entries if not all(w.same_tensor(args) for w in e[2])]
            if self.mode != "version":
                seen = {id(e) for e in stale}
                stale += self._content_changed([e for e in self.entries if id(e) not in seen])
            for entry in stale:
                self._handle(entry, args)

    def _content_changed(self, entries: list) -> list:
        if not entries:
            return []
        if self.mode == "full":
            return [e for e in entries if not all(w.same_content() for w in e[2])]
        by_device: dict = {}
        for e in entries:
            for w in e[2]:
                by_device.setdefault(w.bits.device, []).append((e, w))
        changed = []
        for pairs in by_device.values():  # one sync per device, none per tensor
            now = torch.cat([torch.take(w.bits, w.sample_at) for _, w in pairs])
            then = torch.cat([w.content for _, w in pairs])
            if bool((now != then).any()):
                changed += [e for e, w in pairs if not w.same_content()]
        return list({id(e): e for e in changed}.values())

    def _handle(self, entry: list, args) -> None:
        p, layer, watched = entry
        s = p.site
        if self.config.on_stale == "raise":
            raise RuntimeError(
                f"structfx: the weights of {s.name!r} changed after compiling; its "
                f"structured factors are stale. Recompile (torch._dynamo.reset()) or use "
                f"on_stale='refactorize'.")
        weight = args[watched[0].index]
        bias = args[s.bias_input] if s.bias_input is not None else None
        w = weight.t() if s.transposed else weight
        with _LOCK:  # the factor cache is shared with compiles in other threads
            refresh_layer(layer, s, p.chosen, self.config, w.detach(),
                          None if bias is None else bias.detach())
        entry[2] = [_Watched.of(old.index, args[old.index], self.mode, old.sample_at)
                    for old in watched]
