"""The layer-wise fit of ``structfx.distill``: each structured layer against its dense layer.

Layer by layer, in graph order: every ``BlastLinear`` / ``SS1Linear`` of the compressed model
is fit, with Adam over its own parameters (factors and bias), so that its outputs match the
dense layer's. Only one layer's statistics are in memory at a time, and they don't grow with
the calibration set: the squared output error over ``N`` rows is a quadratic form in the
layer's affine map, so it is evaluated exactly on ``in_features + 1`` "virtual" rows (the
Cholesky factor of the inputs' Gram matrix) instead of on the ``N`` real ones.

Where each layer's inputs and targets come from (``mode``):
  ``"correct"``: the compressed model's own inputs to the layer (earlier layers already
      distilled) and the teacher's outputs of that layer as targets, so each layer also absorbs
      the error that reaches it from upstream;
  ``"student"``: the compressed model's own inputs, the dense layer applied to them;
  ``"teacher"``: the teacher's inputs and outputs (every layer on its own; errors add up).

Every 8th input row (``calib_stats.HOLDOUT_EVERY``, the rows factorize holds out) is held
out of the fit; each layer's error before and after is measured on those rows, and a layer
whose held-out error the fit made worse is put back.

The pieces: ``layer_groups`` (which layers one recording pass serves), ``record_group``
(forward hooks on both models, accumulating ``LayerStats``: the Gram statistics and the
held-out rows), ``virtual_rows`` and ``fit_layer`` (the fit), ``layerwise_phase`` (the loop).
``RelativeAdam`` is the optimizer of both phases. The math: docs/design.md, "Distillation".
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from .inputs import Inputs
from .layers import BlastLinear, SS1Linear
from .passes.checks import calibration_problem
from .passes.cost_model import describe_layer
from .passes.calib_stats import HOLDOUT_EVERY  # the same hold-out rows as factorize

STRUCTURED = (BlastLinear, SS1Linear)
MAX_HELD_ROWS = 4096     # memory cap on the held-out rows kept per layer
RIDGE = 1e-6             # relative to the Gram's mean diagonal: keeps the Cholesky defined


@dataclass
class LayerDistill:
    """One layer's line of the layer-wise fit."""

    name: str
    structure: str                # "blast b=4 r=94", "ss1 c=2"
    rows: int                     # input rows fitted on (held-out rows excluded)
    error_before: float           # relative output error on the held-out rows, before
    error_after: float            # ... and after
    seconds: float


# ----------------------------------------------------------------------------- statistics
@dataclass
class LayerStats:
    """Sufficient statistics of one layer's least-squares problem ``min ||[x, 1] A^T - y||^2``
    over the fit rows, plus the held-out rows themselves."""

    gram: torch.Tensor                  # (n+1, n+1) sum of [x, 1]^T [x, 1]   (float64)
    cross: torch.Tensor                 # (n+1, m)   sum of [x, 1]^T y
    yy: float = 0.0                     # sum of ||y||^2
    rows: int = 0
    seen: int = 0                       # rows offered so far (for the hold-out pattern)
    held_x: list = field(default_factory=list)
    held_y: list = field(default_factory=list)
    held: int = 0

    @classmethod
    def empty(cls, n: int, m: int, device) -> "LayerStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)
        return cls(gram=z(n + 1, n + 1), cross=z(n + 1, m))

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = _flat_rows(x).double(), _flat_rows(y).double()
        idx = torch.arange(self.seen, self.seen + x.shape[0], device=x.device)
        self.seen += x.shape[0]
        held = idx % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
        if self.held < MAX_HELD_ROWS and held.any():
            hx, hy = x[held][: MAX_HELD_ROWS - self.held], y[held][: MAX_HELD_ROWS - self.held]
            self.held_x.append(hx.float())
            self.held_y.append(hy.float())
            self.held += hx.shape[0]
        x, y = x[~held], y[~held]
        xa = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        self.gram += xa.T @ xa
        self.cross += xa.T @ y
        self.yy += float(y.pow(2).sum())
        self.rows += x.shape[0]


def _flat_rows(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1, t.shape[-1])


def virtual_rows(stats: LayerStats) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Xv, Yv)`` with ``||Xv A^T - Yv||^2 = ||X A^T - Y||^2 - const`` for every affine ``A``.

    ``G = R^T R`` (Cholesky, small relative ridge), ``Yv = R^-T H``: then
    ``||R A^T - Yv||^2 = tr(A G A^T) - 2 tr(A H) + ||Yv||^2``, the real loss up to a constant."""
    G = stats.gram
    lam = RIDGE * G.diagonal().mean().clamp_min(1e-30)
    R = torch.linalg.cholesky(G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device),
                              upper=True)
    Yv = torch.linalg.solve_triangular(R.T, stats.cross, upper=False)
    return R.float(), Yv.float()


def held_error(layer: nn.Module, stats: LayerStats) -> float:
    """``layer``'s relative output error on the held-out rows (NaN when there are none)."""
    if not stats.held_x:
        return math.nan
    with torch.no_grad():
        x, y = torch.cat(stats.held_x), torch.cat(stats.held_y)
        return float((layer(x) - y).norm() / y.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- the fit
class RelativeAdam:
    """Adam with each parameter tensor's step size ``lr`` times its RMS (factors from
    ``compress`` differ in scale by orders of magnitude) and cosine decay to 0 over ``steps``.
    The optimizer of both phases."""

    def __init__(self, params: list, lr: float, steps: int):
        self.opt = torch.optim.Adam(
            [{"params": [p], "lr": lr * float(p.detach().pow(2).mean().sqrt().clamp_min(1e-8))}
             for p in params])
        self.base = [g["lr"] for g in self.opt.param_groups]
        self.steps = steps

    def step(self, loss: torch.Tensor, t: int, done: Optional[float] = None) -> None:
        """Backward of ``loss`` and step ``t`` (0-based); ``done``: the fraction of the
        schedule already spent, when something other than the step count decides it."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        scale = 0.5 * (1 + math.cos(math.pi * min(1.0, t / self.steps if done is None else done)))
        for g, b in zip(self.opt.param_groups, self.base):
            g["lr"] = b * scale
        self.opt.step()

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)


def _affine(layer: nn.Module, xa: torch.Tensor) -> torch.Tensor:
    """``layer`` applied to augmented rows ``[x, c]``: ``W x + c * bias``."""
    y = layer(xa[:, :-1].contiguous())
    if layer.bias is not None:
        y = y + (xa[:, -1:] - 1) * layer.bias
    return y


def fit_layer(layer: nn.Module, stats: LayerStats, steps: int, lr: float,
              name: str = "") -> None:
    """``steps`` Adam steps (``RelativeAdam``) on ``layer``'s trainable parameters, full batch
    on the virtual rows; the best iterate is kept. A loss that is never finite is an error
    naming the layer."""
    dtype = next(layer.parameters()).dtype
    Xv, Yv = (t.to(dtype) for t in virtual_rows(stats))
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = RelativeAdam(params, lr, steps)
    norm = max(stats.yy, 1e-30)
    best, best_loss = None, math.inf
    with torch.enable_grad():
        for t in range(steps + 1):
            loss = (_affine(layer, Xv) - Yv).pow(2).sum() / norm
            value = float(loss.detach())
            if value < best_loss:
                best_loss, best = value, [p.detach().clone() for p in params]
            if t == steps or not math.isfinite(value):
                break
            opt.step(loss, t)
    if best is None:
        raise ValueError(f"distill: layer {name!r}: the fit loss is not finite from the "
                         f"first step (its inputs or targets overflow {dtype})")
    with torch.no_grad():
        for p, b in zip(params, best):
            p.copy_(b)
            p.grad = None


# ----------------------------------------------------------------------------- recording
class _Stop(Exception):
    """Raised from a hook once the rows a pass needs are recorded: the rest of the forward
    would be wasted work."""


def layer_groups(compressed: nn.Module, names: list[str]) -> list[list[str]]:
    """Structured layers in execution order, grouped by the graph node they read (q, k and v
    share one input: one recording pass serves them all)."""
    if not isinstance(compressed, fx.GraphModule):
        return [[n] for n in names]
    wanted = set(names)
    groups: dict[Any, list[str]] = {}
    for node in compressed.graph.nodes:
        if node.op == "call_module" and node.target in wanted and node.args:
            groups.setdefault(node.args[0], []).append(node.target)
    ordered = list(groups.values())
    seen = {n for g in ordered for n in g}
    return ordered + [[n] for n in names if n not in seen]


def record_group(compressed: nn.Module, teacher: nn.Module, group: list[str],
                 layers: dict[str, nn.Module], paths: dict[str, str], batches: list[Inputs],
                 mode: str) -> dict[str, LayerStats]:
    """Run both models on every batch up to the group's layers and accumulate each layer's
    statistics: inputs from the compressed model (``mode`` "correct" / "student") or the
    teacher, targets from the teacher's layer outputs or the teacher layer on the inputs."""
    t_mods = {n: teacher.get_submodule(paths[n]) for n in group}
    stats: dict[str, LayerStats] = {}
    captured: dict[str, Any] = {}

    def student_hook(mod, args, out):
        captured["x_student"] = args[0]
        raise _Stop

    def teacher_hook(name):
        def hook(mod, args, out):
            captured.setdefault("x_teacher", {})[name] = args[0]
            captured.setdefault("y_teacher", {})[name] = out
            if len(captured["y_teacher"]) == len(group):
                raise _Stop
        return hook

    handles = []
    try:
        if mode != "teacher":
            handles += [layers[n].register_forward_hook(student_hook) for n in group]
        if mode != "student":
            handles += [t_mods[n].register_forward_hook(teacher_hook(n)) for n in group]
        with torch.no_grad():
            for i, args in enumerate(batches):
                captured.clear()
                if mode != "teacher":
                    _run_until_stop(compressed, args)
                    if "x_student" not in captured:
                        raise ValueError(f"distill: layer {group[0]!r} of the compressed model "
                                         f"did not run on the calibration inputs")
                if mode != "student":
                    _run_until_stop(teacher, args)
                    missing = [n for n in group if n not in captured.get("y_teacher", {})]
                    if missing:
                        raise ValueError(f"distill: the teacher's module {paths[missing[0]]!r} "
                                         f"did not run on the calibration inputs")
                for n in group:
                    layer = layers[n]
                    if mode == "teacher":
                        x = captured["x_teacher"][n]
                    else:
                        x = captured["x_student"]
                    if mode == "student":
                        y = t_mods[n](x)
                    else:
                        y = captured["y_teacher"][n]
                    _check_pair(n, layer, x, y)
                    _check_rows(n, i, "its inputs", x)
                    _check_rows(n, i, "its target outputs", y)
                    if mode == "correct" and x.shape[:-1] != y.shape[:-1]:
                        raise ValueError(f"distill: layer {n!r} sees inputs of shape "
                                         f"{tuple(x.shape)} in the compressed model but the "
                                         f"teacher's gives outputs {tuple(y.shape)}: the "
                                         f"models don't match")
                    if n not in stats:
                        stats[n] = LayerStats.empty(layer.in_features, layer.out_features,
                                                    x.device)
                    stats[n].add(x, y)
    finally:
        for h in handles:
            h.remove()
    return stats


def _run_until_stop(model: nn.Module, args: Inputs) -> None:
    try:
        args.call(model)
    except _Stop:
        pass


def _check_pair(name: str, layer: nn.Module, x, y) -> None:
    ok = (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
          and x.shape[-1] == layer.in_features and y.shape[-1] == layer.out_features)
    if not ok:
        shape = lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"distill: layer {name!r} is {layer.in_features} -> "
                         f"{layer.out_features} in the compressed model, but the teacher's "
                         f"module maps {shape(x)} -> {shape(y)}: the models don't match")


def _check_rows(name: str, batch: int, what: str, t: torch.Tensor) -> None:
    """The statistics are fp64 but the fit runs in the layer's dtype (fp32): refuse rows that
    are not finite or whose Gram overflows it, naming the layer and the batch."""
    problem = calibration_problem(t, torch.float32)
    if problem is not None:
        problem = problem.replace("calibration inputs", what, 1)
        raise ValueError(f"distill: layer {name!r}, calibration batch {batch}: {problem}")


# ----------------------------------------------------------------------------- the phase
def layerwise_phase(compressed: nn.Module, teacher: nn.Module, layers: dict[str, nn.Module],
                    paths: dict[str, str], batches: list[Inputs], *, steps: int, lr: float,
                    mode: str, progress: bool) -> list[LayerDistill]:
    """Fit every layer of ``layers`` (``name -> structured module`` in ``compressed``;
    ``paths``: its dense module's path in ``teacher``) in graph order, ``steps`` Adam steps at
    relative step size ``lr`` each (0: only measure), keeping the start where the held-out
    error got worse. Returns one ``LayerDistill`` per layer, in the order fitted."""
    out: list[LayerDistill] = []
    bar = tqdm(total=len(layers), desc="structfx: distill", disable=not progress, leave=False)
    for group in layer_groups(compressed, list(layers)):
        t0 = time.perf_counter()
        stats = record_group(compressed, teacher, group, layers, paths, batches, mode)
        t_rec = (time.perf_counter() - t0) / len(group)
        for n in group:
            t1 = time.perf_counter()
            layer, s = layers[n], stats[n]
            before = held_error(layer, s)
            after = before
            if steps:
                saved = [p.detach().clone() for p in layer.parameters()]
                fit_layer(layer, s, steps, lr, n)
                after = held_error(layer, s)
                if after > before:  # fit rows improved, held-out rows didn't: keep the start
                    with torch.no_grad():
                        for p, q in zip(layer.parameters(), saved):
                            p.copy_(q)
                    after = before
            out.append(LayerDistill(
                name=n, structure=describe_layer(layer), rows=s.rows, error_before=before,
                error_after=after, seconds=t_rec + time.perf_counter() - t1))
            bar.update(1)
            if progress:
                bar.set_postfix(err=f"{before:.3f}->{after:.3f}")
        del stats
    bar.close()
    return out
