"""``torch.compile(model, backend="structfx")``: rewrite the Dynamo graph, then inductor.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so it is listed
by ``torch._dynamo.list_backends()`` without importing structfx first. Options come through
``torch.compile(..., options={...})`` (the keys of ``structfx.Config``) or ``backend(config)``.

Dynamo hands us parameters as graph inputs: the rewritten graph keeps those placeholders (the
caller still passes them) but no longer reads the dense weights; the factors live in modules of
a fresh GraphModule, which aot_autograd lifts as its own parameters. Because weights are inputs,
Dynamo does not recompile when one changes: a guard compares each replaced weight (identity and
``_version``) on every call and refactorizes or raises.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Callable, Optional

from torch import fx, nn

from . import pipeline
from .config import Config
from .passes.factorize import refresh_layer
from .passes.match import match_linears
from .passes.store import FactorStore
from .report import set_last_report


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
        patches = torch._inductor.list_mode_options(mode) if mode else {}
        lower = functools.partial(compile_fx, config_patches=patches) if patches else compile_fx
        try:
            return _compile(gm, list(example_inputs), config, lower, store)
        except Exception as e:
            if config.strict:
                raise
            warnings.warn(f"structfx: left this graph to plain inductor because "
                          f"{type(e).__name__}: {e}", stacklevel=2)
            return lower(gm, example_inputs)

    return compile_with_structfx


def _compile(gm: fx.GraphModule, example_inputs: list, config: Config, compile_fx,
             store: FactorStore):
    sites = match_linears(gm, example_inputs, config)
    result = pipeline.run(gm, sites, config, batches=[example_inputs], store=store)
    decisions, layers, report = result.decisions, result.layers, result.report
    replaced = [d for d in decisions if d.replaced]
    set_last_report(report)
    if config.report or os.environ.get("STRUCTFX_REPORT") == "1":
        print(report)
    if not replaced:
        return compile_fx(gm, example_inputs)

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

    def run(*args):
        guard.check(args)
        return compiled(*args)

    run.structfx_report = report
    return run


class StaleWeightGuard:
    """Notices a replaced weight (or bias) that changed after compiling: same tensor updated in
    place (``_version``), or another tensor passed in its place. Refactorizes or raises."""

    def __init__(self, plans: list, layers: dict, config: Config):
        self.config = config
        self.entries = []
        for p in plans:
            s = p.site
            watched = [(s.weight_input, s.weight)]
            if s.bias_input is not None:
                watched.append((s.bias_input, s.bias))
            self.entries.append([p, layers[s.name].layer, [(i, t, t._version) for i, t in watched]])

    def check(self, args) -> None:
        for entry in self.entries:
            p, layer, watched = entry
            if all(args[i] is t and t._version == v for i, t, v in watched):
                continue
            s = p.site
            if self.config.on_stale == "raise":
                raise RuntimeError(
                    f"structfx: the weights of {s.name!r} changed after compiling; its "
                    f"structured factors are stale. Recompile (torch._dynamo.reset()) or use "
                    f"on_stale='refactorize'.")
            weight = args[watched[0][0]]
            bias = args[s.bias_input] if s.bias_input is not None else None
            w = weight.t() if s.transposed else weight
            refresh_layer(layer, s, p.chosen, self.config, w.detach(),
                          None if bias is None else bias.detach())
            entry[2] = [(i, args[i], args[i]._version) for i, _, _ in watched]
