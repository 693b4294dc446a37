"""The pass pipeline, top to bottom, in one place:

    match (LinearSite) -> cost (Candidate) -> record -> estimate (Estimate) -> select (Decision)
      -> factorize (Factorized) -> rewrite -> report

``compress`` and the compile backend both call ``run`` (everything up to the rewrite) and then
``apply`` (the rewrite); they differ only in how they capture the graph and what they do with
the result (return it, or lower it to inductor). Each pass hands the next a frozen record;
the report is built from the records. A layer whose estimate or factorization fails stays
dense with the reason in the report (``Config.strict`` raises instead): one bad layer never
throws away the others' work.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from .config import Config
from .report import LayerDecision, Report
from .passes import checks, rewrite
from .passes.cost_model import Candidate, CostModel, device_profile
from .passes.estimate import Estimate, estimate_candidates
from .passes.factorize import Factorized, build_layer, layer_seed
from .passes.match import LinearSite
from .passes.select import Option, candidate_grid, select
from .passes.sensitivity import output_sensitivity
from .passes.calib_stats import CalibStats, RowDigest, StatsRecorder, stats_bytes
from .passes.store import FactorStore, decision_settings


@dataclass(frozen=True)
class Decision:
    """What select decided for one site."""

    site: LinearSite
    dense: Candidate
    chosen: Candidate
    estimate: Optional[Estimate] = None      # of the chosen candidate
    reason: Optional[str] = None             # why it stays dense

    @property
    def replaced(self) -> bool:
        return self.chosen.structure != "dense"


@dataclass
class Result:
    decisions: list[Decision]
    layers: dict[str, Factorized]
    report: Report
    store: FactorStore = field(repr=False, default=None)


# ----------------------------------------------------------------------------- record
class _Enough(Exception):
    """Raised inside the interpreter once the last watched node has run."""


class _Recorder(fx.Interpreter):
    """Runs the graph, hands every value of a watched node to ``take``, and stops after
    ``last``. A module-level class: one defined inside ``_record`` would be a reference cycle
    (a class refers to itself) holding ``take``'s closure, so the recorded statistics would
    stay alive until the garbage collector ran."""

    def __init__(self, gm: fx.GraphModule, watch, take, last):
        super().__init__(gm)
        self.watch, self.take, self.last = watch, take, last

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.watch and isinstance(out, torch.Tensor):
            self.take(n, out)
        if n is self.last:
            raise _Enough
        return out


def _record(gm: fx.GraphModule, sites: Sequence[LinearSite], batches: Sequence[Sequence],
            take) -> dict[fx.Node, list[str]]:
    """Run ``gm`` on ``batches``; ``take(node, value)`` for every value of a node some site
    reads. Returns the watched nodes and the sites reading each. Each run stops after the
    last watched node (in graph order): the rest of the graph can't change what was seen."""
    watch: dict[fx.Node, list[str]] = {}
    for s in sites:
        watch.setdefault(s.x, []).append(s.name)
    last = next((n for n in reversed(gm.graph.nodes) if n in watch), None)
    with torch.no_grad():
        for batch in batches:
            rec = _Recorder(gm, watch, take, last)
            try:
                rec.run(*batch)
            except _Enough as stop:
                # The traceback holds the interpreter's frames, one of which holds the
                # exception: a cycle that would keep the batch's activations alive until
                # the garbage collector runs.
                stop.__traceback__ = None
            finally:
                rec.env.clear()
    return watch


def record_inputs(gm: fx.GraphModule, sites: Sequence[LinearSite],
                  batches: Sequence[Sequence], max_rows: int = 8192) -> dict[str, torch.Tensor]:
    """Input rows ``(N, in_features)`` each site sees when ``gm`` runs on ``batches``. Sites
    reading the same node (q, k and v projections) share one tensor."""
    rows: dict[fx.Node, list[torch.Tensor]] = {}

    def take(n, out):
        have = sum(r.shape[0] for r in rows.setdefault(n, []))
        if have < max_rows:
            rows[n].append(out.detach().reshape(-1, out.shape[-1])[: max_rows - have])

    watch = _record(gm, sites, batches, take)
    out = {}
    for node, names in watch.items():
        if rows.get(node):
            x = torch.cat(rows[node])
            for name in names:
                out[name] = x
    return out


def _record_streams(gm: fx.GraphModule, sites: Sequence[LinearSite],
                    batches: Sequence[Sequence], make) -> tuple[dict, dict]:
    """``_record`` feeding every watched node's values to a recorder of its own,
    ``make(in_features)`` (``StatsRecorder``, ``RowDigest``): ``(watch, {node: recorder})``."""
    recs: dict = {}

    def take(n, out):
        rec = recs.get(n)
        if rec is None:
            rec = recs[n] = make(out.shape[-1])
        rec.add(out)

    return _record(gm, sites, batches, take), recs


def record_stats(gm: fx.GraphModule, sites: Sequence[LinearSite],
                 batches: Sequence[Sequence], max_rows: int = 8192) -> dict[str, CalibStats]:
    """``CalibStats`` of the input rows each site sees when ``gm`` runs on ``batches`` (the
    first ``max_rows`` rows), streamed: per distinct input node an ``n x n`` Gram and the
    held-out rows, never the full activations. Sites reading the same node share them."""
    scratch: dict = {}             # the recorders' shared product buffers, freed on return
    watch, recs = _record_streams(gm, sites, batches,
                                  lambda n: StatsRecorder(n, max_rows, scratch))
    out = {}
    for node, names in watch.items():
        if node in recs and recs[node].seen:
            st = recs[node].finish()
            for name in names:
                out[name] = st
    return out


def record_digests(gm: fx.GraphModule, sites: Sequence[LinearSite],
                   batches: Sequence[Sequence], max_rows: int = 8192
                   ) -> dict[str, tuple[str, Optional[str]]]:
    """``(digest, problem)`` of the rows each site sees (``RowDigest``: what ``record_stats``
    would give as ``CalibStats.digest`` and as the rows' problem), without any Gram."""
    watch, recs = _record_streams(gm, sites, batches, lambda n: RowDigest(n, max_rows))
    return {name: recs[node].finish() for node, names in watch.items() if node in recs
            for name in names}


class Calibration:
    """The calibration statistics of the sites, recorded in groups whose statistics fit in
    ``budget`` bytes (``Config.calib_memory``), so data-aware compression of a model whose
    layers' Grams together exceed the memory still runs: each group is recorded (the forward
    passes stop after the group's last input node), used and dropped. When every site's
    statistics fit at once they are recorded once and kept for the whole run.

    ``digests(sites)``: every site's rows' digest (for the decision memo), checking the rows;
    ``each(sites)``: ``(site, CalibStats)`` in group order."""

    def __init__(self, gm: fx.GraphModule, batches: Sequence[Sequence], budget: int,
                 max_rows: int = 8192):
        self.gm, self.batches, self.budget, self.max_rows = gm, batches, budget, max_rows
        self.kept: dict[str, CalibStats] = {}
        self.covered: set[str] = set()  # sites whose statistics ``kept`` holds (or that saw none)
        self.recordings = 0            # forward passes over the calibration batches

    def groups(self, sites: Sequence[LinearSite]) -> list[list[LinearSite]]:
        """``sites`` cut into groups of input nodes (in graph order) whose statistics fit the
        budget together; a node too large for it alone is a group of its own."""
        by_node: dict[fx.Node, list[LinearSite]] = {}
        for s in sites:
            by_node.setdefault(s.x, []).append(s)
        groups, size = [], 0
        for node in (n for n in self.gm.graph.nodes if n in by_node):
            need = stats_bytes(by_node[node][0].in_features, self.max_rows)
            if not groups or size + need > self.budget:
                groups.append([])
                size = 0
            groups[-1].extend(by_node[node])
            size += need
        return groups

    def digests(self, sites: Sequence[LinearSite]) -> dict[str, str]:
        """Every site's calibration digest; a ``ValueError`` naming the layer when its rows
        can't drive a factorization (non-finite, overflowing). Records all statistics (kept)
        when they fit the budget at once, else only the digests."""
        if len(self.groups(sites)) <= 1:
            self.kept = record_stats(self.gm, sites, self.batches, self.max_rows)
            self.covered = {s.name for s in sites}
            self.recordings += 1
            for name, st in self.kept.items():
                checks.check_calibration(name, st)
            return {name: st.digest for name, st in self.kept.items()}
        found = record_digests(self.gm, sites, self.batches, self.max_rows)
        self.recordings += 1
        for name, (_, problem) in found.items():
            checks.raise_layer_problem(name, problem)
        return {name: digest for name, (digest, _) in found.items()}

    def each(self, sites: Sequence[LinearSite]):
        """``(site, CalibStats or None)`` for every site, a group's statistics recorded just
        before its sites and dropped after them (None: the site saw no rows)."""
        if all(s.name in self.covered for s in sites):
            for s in sites:
                yield s, self.kept.get(s.name)
            return
        for group in self.groups(sites):
            stats = record_stats(self.gm, group, self.batches, self.max_rows)
            self.recordings += 1
            for s in group:
                yield s, stats.get(s.name)
            del stats


def _used_nodes(graph: fx.Graph) -> set:
    """Nodes whose value reaches the graph's output."""
    out = [n for n in graph.nodes if n.op == "output"]
    seen, stack = set(), list(out)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


# ----------------------------------------------------------------------------- run
def run(gm: fx.GraphModule, sites: list[LinearSite], config: Config, *,
        batches: Sequence[Sequence] = (), calibrated: bool = False,
        store: Optional[FactorStore] = None, dtype: Optional[torch.dtype] = None,
        group=None) -> Result:
    """Decide and factorize every site of ``gm``. ``batches``: flat graph inputs to record
    activations on (the example inputs first); ``calibrated``: they are calibration data
    (data-aware estimates and factorizations, held-out output errors).

    Under ``torch.distributed`` (``group``, or the default group when one is initialized:
    ``torchrun --nproc-per-node N``), the ranks split the layers: each estimates and
    factorizes its share, estimates and factors are all-gathered, and every rank ends with
    the same decisions and the same model."""
    store = store if store is not None else FactorStore()
    dist = _Dist(group)
    used = _used_nodes(gm.graph)
    reasons = {s.name: s.skip for s in sites}
    for s in sites:
        if reasons[s.name] is None and s.node not in used:
            reasons[s.name] = "its output is never used"
    active = [s for s in sites if reasons[s.name] is None]
    # A CPU's profile is measured, so each process would measure its own: only rank 0
    # measures and the ranks take its profile, or their cost models (and so the candidates
    # they offer) would differ; ranks measuring at once also slow each other's measurement.
    profile = dist.first(lambda: device_profile(config.device))
    if dtype is None:
        dtype = active[0].weight.dtype if active else torch.float32
    model = CostModel(profile, dtype=dtype, time_candidates=config.time_candidates)
    dense = {s.name: model.dense(s.out_features, s.in_features, s.tokens) for s in sites}

    # calibrated: the statistics estimates and factorizations fit, recorded within the
    # memory budget; broken calibration data is the caller's error (raised here, up front)
    calib = Calibration(gm, batches, config.calib_memory) if (batches and calibrated) else None
    digests = calib.digests(active) if calib is not None and active else {}
    decisions = _recall(active, dense, model, config, store, digests)
    if decisions is None:
        weights = None
        if config.sensitivity and calibrated and batches and active:
            # rank 0's: forward passes with other thread counts round differently
            weights = dist.first(lambda: _sensitivity(gm, active, batches[0], config))
        decisions = _decide(active, dense, model, config, store, calib, digests, dist, weights)
    chosen = [d for d in decisions.values() if d.replaced]
    # data-free: the example rows the reported output errors are measured on
    example = (record_inputs(gm, [d.site for d in chosen], batches[:1])
               if not calibrated and chosen and batches else {})
    layers: dict[str, Factorized] = {}
    failed: dict[str, str] = {}
    mine = dist.share(chosen, lambda d: d.site.out_features * d.site.in_features * d.chosen.rank
                      if d.chosen.structure == "blast" else d.site.out_features)
    by_name = {d.site.name: d for d in mine}
    stream = (calib.each([d.site for d in mine]) if calib is not None
              else ((d.site, None) for d in mine))
    for site, st in tqdm(stream, total=len(mine), desc="structfx: factorizing", leave=False,
                         disable=not config.progress or not mine):
        d = by_name[site.name]
        try:
            layers[site.name] = build_layer(site, d.chosen, config, store, calib=st,
                                            example_rows=example.get(site.name))
        except Exception as e:
            if config.strict:
                raise
            failed[site.name] = f"factorization failed: {_why(e)}"
    if dist.world > 1:
        layers, failed = dist.gather_layers(layers, failed, {d.site.name: d for d in chosen},
                                            config, store)
    for name, why in failed.items():
        d = decisions[name]
        decisions[name] = Decision(d.site, d.dense, d.dense, reason=why)
    ordered = [decisions.get(s.name) or Decision(s, dense[s.name], dense[s.name],
                                                 reason=reasons[s.name]) for s in sites]
    report = make_report(ordered, layers, profile.name)
    return Result(ordered, layers, report, store)


def _sensitivity(gm, active, batch, config: Config) -> Optional[dict]:
    """``output_sensitivity``, or None (parameter-count weights) with a warning if it fails."""
    try:
        return output_sensitivity(gm, active, batch, seed=config.seed)
    except Exception as e:
        if config.strict:
            raise
        warnings.warn(f"structfx: output sensitivity not measured ({_why(e)}); the layers are "
                      f"weighed by their parameter count")
        return None


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def _key(site: LinearSite, config: Config, store: FactorStore, digests: dict) -> tuple:
    return (store.weight_hash(site.linear_weight), decision_settings(config),
            digests.get(site.name))


def _recall(active, dense, model: CostModel, config: Config, store: FactorStore,
            digests: dict):
    """Earlier decisions for every active site (same weights, same decision settings, same
    calibration rows), re-costed at this graph's token counts; None unless all are there."""
    found = [store.decisions.get(_key(s, config, store, digests)) for s in active]
    if not active or any(f is None for f in found):
        return None
    out = {}
    for s, d in zip(active, found):
        m, n, t = s.out_features, s.in_features, s.tokens
        c = d.chosen
        if c.structure == "blast":
            c = model.blast(m, n, t, c.blocks, c.rank)
        elif c.structure == "ss1":
            c = model.ss1(m, n, t, c.compression)
        else:
            c = dense[s.name]
        out[s.name] = Decision(s, dense[s.name], c, d.estimate, d.reason)
    return out


def _decide(active, dense, model: CostModel, config: Config, store: FactorStore,
            calib: Optional[Calibration], digests: dict, dist: "_Dist",
            weights: Optional[dict] = None) -> dict[str, Decision]:
    # rank 0's grids: timed candidates (time_candidates=True) differ between the ranks
    work = list(zip(active, dist.first(lambda: [
        candidate_grid(model, s.out_features, s.in_features, s.tokens, config)
        for s in active])))
    todo = dist.share([w for w in work if len(w[1]) > 1],
                      lambda w: w[0].out_features * w[0].in_features * len(w[1]))
    bar = tqdm(total=len(todo), desc="structfx: estimating", leave=False,
               disable=not config.progress)
    priced = {}
    for s, cands in work:
        if len(cands) == 1:
            priced[s.name] = (s, cands, [Estimate(0.0, None)],
                              "no candidate predicted faster than dense")
    grid = {s.name: cands for s, cands in todo}
    stream = (calib.each([s for s, _ in todo]) if calib is not None
              else ((s, None) for s, _ in todo))
    for s, st in stream:
        cands = grid[s.name]
        try:
            key = (store.weight_hash(s.linear_weight), repr([c.describe() for c in cands]),
                   config.estimate_steps, config.seed, config.calib_blend,
                   digests.get(s.name))
            ests = store.estimate(repr(key), lambda: estimate_candidates(
                s.linear_weight, cands, seed=config.seed, steps=config.estimate_steps,
                ss1_seed=layer_seed(config.seed, s.name), calib=st,
                blend=config.calib_blend))
            priced[s.name] = (s, cands, ests, None)
        except Exception as e:
            if config.strict:
                raise
            priced[s.name] = (s, cands[:1], [Estimate(0.0, None)], f"estimate failed: {_why(e)}")
        bar.update(1)
    bar.close()
    if dist.world > 1:   # every rank needs every layer's estimates to select the same way
        by_name = {s.name: (s, c) for s, c in work}
        for name, (ncands, ests, why) in dist.gather_estimates(
                {n: (len(p[1]), p[2], p[3]) for n, p in priced.items()}).items():
            s, cands = by_name[name]
            priced[name] = (s, cands[:ncands], ests, why)
    priced = [priced[s.name] for s, _ in work]
    out: dict[str, Decision] = {}
    if priced:
        options = [[Option(params=c.params, flops=c.flops, error=e.price if k else 0.0)
                    for k, (c, e) in enumerate(zip(cands, ests))]
                   for _, cands, ests, _ in priced]
        sel = select(options, params=config.params, flops=config.flops,
                     max_error=config.max_error, force=config.force,
                     weights=None if weights is None else [weights[p[0].name] for p in priced])
        for (s, cands, ests, why), k in zip(priced, sel.choice):
            reason = why or (None if k else "kept dense by the budget")
            out[s.name] = Decision(s, cands[0], cands[k], ests[k] if k else None, reason)
    for d in out.values():
        store.decisions[_key(d.site, config, store, digests)] = d
    return out


# ----------------------------------------------------------------------------- ranks
class _Dist:
    """The layer split over ``torch.distributed`` ranks (a no-op in one process)."""

    def __init__(self, group=None):
        import torch.distributed as td

        self.td = td
        self.group = group
        on = td.is_available() and td.is_initialized()
        self.world = td.get_world_size(group) if on else 1
        self.rank = td.get_rank(group) if on else 0

    def share(self, items: list, cost) -> list:
        """This rank's items: greedy longest-processing-time split by ``cost``, identical on
        every rank (items come in graph order, ties broken by position)."""
        if self.world == 1:
            return list(items)
        load = [0.0] * self.world
        owner = {}
        for i in sorted(range(len(items)), key=lambda i: (-cost(items[i]), i)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += cost(items[i])
        return [it for i, it in enumerate(items) if owner[i] == self.rank]

    def first(self, compute):
        """``compute()`` run on rank 0 only, its result on every rank (in one process: just
        ``compute()``). An exception it raises is raised on every rank, so none is left
        waiting for rank 0."""
        if self.world == 1:
            return compute()
        box = [None]
        if self.rank == 0:
            try:
                box = [(True, compute())]
            except Exception as e:
                box = [(False, e)]
        self.td.broadcast_object_list(box, src=self.td.get_global_rank(self.group, 0)
                                      if self.group is not None else 0, group=self.group)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def _all_gather(self, obj) -> list:
        out = [None] * self.world
        self.td.all_gather_object(out, obj, group=self.group)
        return out

    def gather_estimates(self, mine: dict) -> dict:
        merged = {}
        for part in self._all_gather(mine):
            merged.update(part)
        return merged

    def gather_layers(self, layers: dict, failed: dict, chosen: dict, config, store):
        from .passes.factorize import _module

        mine = {n: ({k: v.detach().cpu() for k, v in f.layer.named_parameters() if k != "bias"},
                    f.weight_error, f.output_error) for n, f in layers.items()}
        out, bad = {}, {}
        for part, why in self._all_gather((mine, failed)):
            bad.update(why)
            for name, (state, we, oe) in part.items():
                if name in layers:
                    out[name] = layers[name]
                    continue
                d = chosen[name]
                layer = _module(d.site, d.chosen, config, state)
                out[name] = Factorized(layer, we, oe)
        return out, bad


# ----------------------------------------------------------------------------- rewrite
def apply(graph: fx.Graph, decisions: list[Decision], layers: dict[str, Factorized],
          root: nn.Module) -> None:
    """Rewrite ``graph`` in place so replaced sites call their modules, drop the dense weights
    no node reads any more from ``root``, and install the modules on ``root`` at the layers'
    own paths (freed first, so ``fc1`` becomes the BlastLinear rather than ``fc1_structfx``)."""
    new_nodes, freed = [], []
    for d in decisions:
        if d.replaced:
            node, dead = rewrite.replace_node(graph, d.site, d.site.name)
            rewrite.inherit_requires_grad(layers[d.site.name].layer, d.site.weight, d.site.bias)
            new_nodes.append((d.site.name, node))
            freed += dead
    rewrite.drop_unused_attrs(graph, root, freed)
    for name, node in new_nodes:
        node.target = rewrite.install(root, name, layers[name].layer)
    graph.lint()


# ----------------------------------------------------------------------------- report
def make_report(decisions: list[Decision], layers: dict[str, Factorized], device: str) -> Report:
    rows = []
    dense_flops = structured_flops = 0
    dense_time = structured_time = 0.0
    for d in decisions:
        s, dn, c = d.site, d.dense, d.chosen
        f = layers.get(s.name) if d.replaced else None
        dense_flops += dn.flops
        structured_flops += c.flops
        dense_time += dn.time_s
        structured_time += c.time_s
        timed = d.replaced and c.time_s > 0
        rows.append(LayerDecision(
            name=s.name, shape=(s.out_features, s.in_features), tokens=s.tokens,
            dense_mflops=dn.flops / 1e6, structure=c.kind, settings=c.settings,
            params=c.params, dense_params=dn.params,
            weight_error=f.weight_error if f else None,
            output_error=f.output_error if f else None,
            estimated_error=d.estimate.price if f and d.estimate else None,
            predicted_speedup=(dn.time_s / c.time_s) if timed and not c.measured else None,
            measured_speedup=(dn.time_s / c.time_s) if timed and c.measured and dn.measured
            else None,
            skip=d.reason if not d.replaced else None))
    if any(d.chosen.measured for d in decisions):
        device = f"{device}, candidates timed"
    return Report(layers=rows, device=device, dense_flops=dense_flops,
                  structured_flops=structured_flops,
                  predicted_speedup=(dense_time / structured_time) if structured_time else None)

