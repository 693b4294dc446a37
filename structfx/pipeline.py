"""The pass pipeline, top to bottom: capture -> match -> cost -> select -> factorize -> rewrite.

``compress`` and the compile backend both call ``plan`` and ``apply``; they differ only in how
they capture the graph and what they do with the result (return it, or lower it to inductor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from .config import Config
from .passes import checks, factorize, rewrite
from .passes.cost_model import Candidate, CostModel, device_profile
from .passes.match import LinearSite
from .passes.select import Option, select
from .report import LayerDecision, Report


@dataclass
class Plan:
    """What the pipeline decided for one linear site."""

    site: LinearSite
    dense: Candidate
    chosen: Candidate
    error_estimate: float = 0.0

    @property
    def replaced(self) -> bool:
        return self.chosen.structure != "dense"


# ----------------------------------------------------------------------------- cost + select
# Decisions already taken in this process, per (weight content, config): a graph compiled
# again for new shapes (decode after prefill, a new batch size, a graph break that splits the
# model differently) keeps its layers' structures instead of choosing, and factorizing, anew.
_DECISIONS: dict[tuple[str, str], tuple[Candidate, float, Optional[str]]] = {}
_NOT_DECISIONS = ("report", "progress", "strict", "on_stale", "cache_dir", "measure")


def _decision_key(site: LinearSite, config: Config) -> tuple[str, str]:
    import dataclasses

    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_DECISIONS}
    return factorize.weight_key(site.linear_weight), repr(sorted(settings.items()))


def _recall(plans: list[Plan], model: CostModel, config: Config) -> bool:
    """Reuse earlier decisions if every eligible site of this graph has one."""
    active = [p for p in plans if p.site.skip is None]
    if not active:
        return False
    found = [_DECISIONS.get(_decision_key(p.site, config)) for p in active]
    if any(f is None for f in found):
        return False
    for p, (cand, err, skip) in zip(active, found):
        m, n, t = p.site.out_features, p.site.in_features, p.site.tokens
        if cand.structure == "blast":
            p.chosen = model.blast(m, n, t, cand.blocks, cand.rank)
        elif cand.structure == "ss1":
            p.chosen = model.ss1(m, n, t, cand.compression)
        p.error_estimate, p.site.skip = err, skip
    return True


def plan(sites: list[LinearSite], config: Config, dtype: Optional[torch.dtype] = None
         ) -> tuple[list[Plan], str]:
    """Cost every candidate of every eligible site, estimate its error, pick under the budget
    (or reuse the choices made for the same weights and config earlier in this process)."""
    profile = device_profile(config.device)
    active = [s for s in sites if s.skip is None]
    if dtype is None:
        dtype = active[0].weight.dtype if active else torch.float32
    model = CostModel(profile, dtype=dtype, measure=config.measure)
    plans, options = [], []
    candidate_lists = []
    for s in sites:
        dense = model.dense(s.out_features, s.in_features, s.tokens)
        plans.append(Plan(site=s, dense=dense, chosen=dense))
    if _recall(plans, model, config):
        return plans, profile.name
    work = [(p, model.candidates(p.site.out_features, p.site.in_features, p.site.tokens, config))
            for p in plans if p.site.skip is None]
    total = sum(len(c) - 1 for _, c in work)
    bar = tqdm(total=total, desc="structfx: estimating", disable=not config.progress or total == 0,
               leave=False)
    for p, cands in work:
        errs = []
        for c in cands:
            errs.append(factorize.estimate_error(p.site, c, config))
            bar.update(c.structure != "dense")
        candidate_lists.append((p, cands, errs))
        options.append([Option(params=c.params, flops=c.flops, error=e)
                        for c, e in zip(cands, errs)])
    bar.close()
    for p, cands, _ in candidate_lists:
        if len(cands) == 1:
            p.site.skip = "no candidate predicted faster than dense"
    if options:
        sel = select(options, params=config.params, flops=config.flops,
                     max_error=config.max_error, force=config.force)
        for (p, cands, errs), k in zip(candidate_lists, sel.choice):
            p.chosen, p.error_estimate = cands[k], errs[k]
            if k == 0 and p.site.skip is None:
                p.site.skip = "kept dense by the budget"
    for p, _, _ in candidate_lists:
        _DECISIONS[_decision_key(p.site, config)] = (p.chosen, p.error_estimate, p.site.skip)
    return plans, profile.name


# ----------------------------------------------------------------------------- factorize
def record_inputs(gm: fx.GraphModule, sites: Sequence[LinearSite],
                  batches: Sequence[Sequence], max_rows: int = 8192) -> dict[str, torch.Tensor]:
    """Input rows ``(N, in_features)`` each site sees when ``gm`` runs on ``batches``."""
    watch: dict[fx.Node, list[str]] = {}
    for s in sites:  # q, k and v projections read the same node
        watch.setdefault(s.x, []).append(s.name)
    rows: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in watch and isinstance(out, torch.Tensor):
                flat = out.detach().reshape(-1, out.shape[-1])
                for name in watch[n]:
                    have = sum(r.shape[0] for r in rows[name])
                    if have < max_rows:
                        rows[name].append(flat[: max_rows - have])
            return out

    with torch.no_grad():
        for batch in batches:
            Rec(gm).run(*batch)
    return {k: torch.cat(v) for k, v in rows.items() if v}


def split_rows(x: torch.Tensor, held_out: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split into (fit, held-out) rows: every k-th row is held out."""
    k = max(2, round(1 / held_out))
    idx = torch.arange(x.shape[0])
    return x[idx % k != 0], x[idx % k == 0]


def output_error(layer: nn.Module, site: LinearSite, x: torch.Tensor) -> float:
    with torch.no_grad():
        W = site.linear_weight
        ref = x.to(W.dtype) @ W.t()
        b = layer.bias
        got = layer(x.to(W.dtype)) - (b if b is not None else 0)
        return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def build_layers(plans: list[Plan], config: Config,
                 inputs: Optional[dict[str, torch.Tensor]] = None,
                 calibrated: bool = False) -> dict[str, tuple[nn.Module, dict]]:
    """Factorize every replaced site (progress bar; cached). With ``calibrated``, the layer's
    recorded inputs drive the data-aware objective and the held-out rows give its output error."""
    chosen = [p for p in plans if p.replaced]
    out = {}
    for p in tqdm(chosen, desc="structfx: factorizing", disable=not config.progress or not chosen,
                  leave=False):
        x = (inputs or {}).get(p.site.name)
        fit, held = split_rows(x) if (calibrated and x is not None and x.shape[0] >= 10) else (None, x)
        if fit is not None:
            checks.check_calibration(p.site.name, x)
        layer, meta = factorize.build_layer(p.site, p.chosen, config, calib=fit)
        if held is not None and held.shape[0]:
            meta["output_error"] = output_error(layer, p.site, held)
        out[p.site.name] = (layer, meta)
    return out


# ----------------------------------------------------------------------------- rewrite
def apply(graph: fx.Graph, plans: list[Plan], layers: dict[str, tuple[nn.Module, dict]],
          root: nn.Module) -> None:
    """Rewrite ``graph`` in place so replaced sites call their modules, drop the dense weights
    no node reads any more from ``root``, and install the modules on ``root`` at the layers'
    own paths (freed first, so ``fc1`` becomes the BlastLinear rather than ``fc1_structfx``)."""
    new_nodes, freed = [], []
    for p in plans:
        if p.replaced:
            node, dead = rewrite.replace_node(graph, p.site, p.site.name)
            rewrite.inherit_requires_grad(layers[p.site.name][0], p.site.weight, p.site.bias)
            new_nodes.append((p.site.name, node))
            freed += dead
    rewrite.drop_unused_attrs(graph, root, freed)
    for name, node in new_nodes:
        node.target = rewrite.install(root, name, layers[name][0])
    graph.lint()


# ----------------------------------------------------------------------------- report
def make_report(plans: list[Plan], layers: dict[str, tuple[nn.Module, dict]],
                device: str) -> Report:
    rows = []
    dense_flops = structured_flops = 0
    dense_time = structured_time = 0.0
    for p in plans:
        s, d, c = p.site, p.dense, p.chosen
        meta = layers.get(s.name, (None, {}))[1]
        dense_flops += d.flops
        structured_flops += c.flops
        dense_time += d.time_s
        structured_time += c.time_s
        rows.append(LayerDecision(
            name=s.name, shape=(s.out_features, s.in_features), tokens=s.tokens,
            dense_mflops=d.flops / 1e6, structure=_structure(c), settings=_settings(c),
            params=c.params, dense_params=d.params,
            weight_error=meta.get("error") if p.replaced else None,
            output_error=meta.get("output_error") if p.replaced else None,
            predicted_speedup=(d.time_s / c.time_s) if p.replaced and c.time_s > 0
            and not c.measured else None,
            measured_speedup=(d.time_s / c.time_s) if p.replaced and c.time_s > 0
            and c.measured and d.measured else None,
            skip=s.skip if not p.replaced else None))
    if any(p.chosen.measured for p in plans):
        device = f"{device}, candidates timed"
    return Report(layers=rows, device=device, dense_flops=dense_flops,
                  structured_flops=structured_flops,
                  predicted_speedup=(dense_time / structured_time) if structured_time else None)


def _structure(c: Candidate) -> str:
    return "lowrank" if c.structure == "blast" and tuple(c.blocks) == (1, 1) else c.structure


def _settings(c: Candidate) -> str:
    if c.structure == "blast":
        b1, b2 = c.blocks
        b = f"b={b1}" if b1 == b2 else f"b={b1}x{b2}"
        return f"r={c.rank}" if (b1, b2) == (1, 1) else f"{b} r={c.rank}"
    if c.structure == "ss1":
        return f"c={c.compression}"
    return ""
