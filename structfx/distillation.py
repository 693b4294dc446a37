"""``structfx.distill``: fine-tune the structured factors of a compressed model on its teacher.

Layer by layer, in graph order: every ``BlastLinear`` / ``SS1Linear`` of ``compressed`` is fit,
with Adam over its own parameters (factors and bias), so that its outputs match the dense
layer's. Only one layer's statistics are in memory at a time, and they don't grow with the
calibration set: the squared output error over ``N`` rows is a quadratic form in the layer's
affine map, so it is evaluated exactly on ``in_features + 1`` "virtual" rows (the Cholesky
factor of the inputs' Gram matrix) instead of on the ``N`` real ones.

Which inputs and targets (``mode``):
  ``"correct"`` (default): the compressed model's own inputs to the layer (earlier layers
      already distilled) and the teacher's outputs of that layer as targets, so each layer
      also absorbs the error that reaches it from upstream;
  ``"student"``: the compressed model's own inputs, the dense layer applied to them;
  ``"teacher"``: the teacher's inputs and outputs (every layer on its own; errors add up).
Measured on all-MiniLM-L6-v2 (docs/minilm.md): ``"correct"`` gives the closest embeddings.

An optional end-to-end phase (``end_to_end_steps``) then trains every structured layer at
once to match the teacher's floating-point outputs on the calibration batches.

Every 8th input row is held out of the fit; the per-layer errors reported before and after
are measured on those rows (a layer whose held-out error the fit made worse is put back).
"""
from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from tabulate import tabulate
from torch import fx, nn
from tqdm.auto import tqdm

from .inputs import Inputs, prepare
from .layers import BlastLinear, SS1Linear
from .passes.checks import calibration_problem
from .passes.cost_model import describe_layer
from .passes.factorize_blast import HOLDOUT_EVERY  # the same hold-out rows as factorize

STRUCTURED = (BlastLinear, SS1Linear)
MODES = ("correct", "student", "teacher")
MAX_HELD_ROWS = 4096     # memory cap on the held-out rows kept per layer
RIDGE = 1e-6             # relative to the Gram's mean diagonal: keeps the Cholesky defined


# ----------------------------------------------------------------------------- result
@dataclass
class LayerDistill:
    name: str
    structure: str                # "blast b=4 r=94", "ss1 c=2"
    rows: int                     # input rows fitted on (held-out rows excluded)
    error_before: float           # relative output error on the held-out rows, before
    error_after: float            # ... and after
    seconds: float


@dataclass
class DistillResult:
    """What ``distill`` did: per-layer held-out output errors before / after, and the whole
    model's output error relative to the teacher on the calibration batches (and on
    ``eval_inputs`` when given)."""

    mode: str
    layers: list[LayerDistill] = field(default_factory=list)
    model_error_before: Optional[float] = None
    model_error_after_layers: Optional[float] = None   # after the layer-wise phase
    model_error_after: Optional[float] = None          # after everything
    eval_error_before: Optional[float] = None
    eval_error_after: Optional[float] = None
    end_to_end_steps: int = 0
    end_to_end_reverted: bool = False                  # it made the calibration error worse
    seconds: float = 0.0

    @property
    def fidelity_gain(self) -> Optional[float]:
        """How many times smaller the model's output error got (held-out when available)."""
        before, after = ((self.eval_error_before, self.eval_error_after)
                         if self.eval_error_before is not None
                         else (self.model_error_before, self.model_error_after))
        if before is None or after is None:
            return None
        return before / after if after > 0 else math.inf

    def table(self) -> str:
        rows = [[d.name, d.structure, d.rows, f"{d.error_before:.4f}", f"{d.error_after:.4f}",
                 f"{d.error_before / d.error_after:.2f}x" if d.error_after > 0 else "inf",
                 f"{d.seconds:.1f}"] for d in self.layers]
        head = ["layer", "structure", "rows", "output err before", "after", "gain", "s"]
        return tabulate(rows, head, tablefmt="simple", disable_numparse=True)

    def totals(self) -> str:
        f = lambda v: "n/a" if v is None else f"{v:.4f}"
        lines = [f"distill (mode={self.mode!r}): {len(self.layers)} layers in "
                 f"{self.seconds:.1f} s"]
        lines.append(f"model output error vs teacher (calibration batches): "
                     f"{f(self.model_error_before)} -> {f(self.model_error_after_layers)} "
                     f"after the layers"
                     + (f" -> {f(self.model_error_after)} after {self.end_to_end_steps} "
                        f"end-to-end steps" if self.end_to_end_steps else "")
                     + (" (the end-to-end phase made it worse and was undone)"
                        if self.end_to_end_reverted else ""))
        if self.eval_error_before is not None:
            lines.append(f"model output error vs teacher (eval inputs): "
                         f"{f(self.eval_error_before)} -> {f(self.eval_error_after)}")
        if self.fidelity_gain is not None:
            lines.append(f"fidelity gain: {self.fidelity_gain:.2f}x smaller output error")
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"structfx distill\n{self.table()}\n\n{self.totals()}"


# ----------------------------------------------------------------------------- helpers
class _Stop(Exception):
    """Raised from a hook once the rows a pass needs are recorded: the rest of the forward
    would be wasted work."""


def _batch(b: Any, model: nn.Module, what: str) -> Inputs:
    """One batch as ``Inputs`` (inputs.normalize), with ``use_cache=False`` for HF models: the
    teacher's and student's outputs are compared, their caches are not needed."""
    return prepare(b, model, what)


def _teacher_path(name: str, teacher: nn.Module) -> str:
    # rewrite.install puts a layer at "<path>_structfx" when "<path>" still held other state.
    for path in dict.fromkeys((name, name.removesuffix("_structfx"))):
        try:
            teacher.get_submodule(path)
            return path
        except AttributeError:
            pass
    raise ValueError(f"distill: the teacher has no module {name!r}, where the compressed model "
                     f"has a structured layer; pass the model that structfx.compress() was "
                     f"given (same module paths)")


def _groups(compressed: nn.Module, names: list[str]) -> list[list[str]]:
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


def _flat_rows(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1, t.shape[-1])


@dataclass
class _Stats:
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
    def empty(cls, n: int, m: int, device) -> "_Stats":
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


def _virtual_rows(stats: _Stats) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Xv, Yv)`` with ``||Xv A^T - Yv||^2 = ||X A^T - Y||^2 - const`` for every affine ``A``.

    ``G = R^T R`` (Cholesky, small relative ridge), ``Yv = R^-T H``: then
    ``||R A^T - Yv||^2 = tr(A G A^T) - 2 tr(A H) + ||Yv||^2``, the real loss up to a constant."""
    G = stats.gram
    lam = RIDGE * G.diagonal().mean().clamp_min(1e-30)
    R = torch.linalg.cholesky(G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device),
                              upper=True)
    Yv = torch.linalg.solve_triangular(R.T, stats.cross, upper=False)
    return R.float(), Yv.float()


def _affine(layer: nn.Module, xa: torch.Tensor) -> torch.Tensor:
    """``layer`` applied to augmented rows ``[x, c]``: ``W x + c * bias``."""
    y = layer(xa[:, :-1].contiguous())
    if layer.bias is not None:
        y = y + (xa[:, -1:] - 1) * layer.bias
    return y


def _held_error(layer: nn.Module, stats: _Stats) -> float:
    if not stats.held_x:
        return math.nan
    with torch.no_grad():
        x, y = torch.cat(stats.held_x), torch.cat(stats.held_y)
        return float((layer(x) - y).norm() / y.norm().clamp_min(1e-30))


class _RelativeAdam:
    """Adam with each parameter tensor's step size ``lr`` times its RMS (factors from
    ``compress`` differ in scale by orders of magnitude) and cosine decay to 0 over ``steps``."""

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


def _fit(layer: nn.Module, stats: _Stats, steps: int, lr: float, name: str = "") -> None:
    """Adam on ``layer``'s parameters, full batch on the virtual rows; step sizes relative to
    each parameter's RMS (factors from ``compress`` differ in scale by orders of magnitude),
    cosine decay to 0. The best iterate is kept."""
    dtype = next(layer.parameters()).dtype
    Xv, Yv = (t.to(dtype) for t in _virtual_rows(stats))
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = _RelativeAdam(params, lr, steps)
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
def _record(compressed: nn.Module, teacher: nn.Module, group: list[str],
            layers: dict[str, nn.Module], paths: dict[str, str], batches: list[Inputs],
            mode: str) -> dict[str, _Stats]:
    """Run both models on every batch up to the group's layers and accumulate each layer's
    statistics: inputs from the compressed model (``mode`` "correct" / "student") or the
    teacher, targets from the teacher's layer outputs or the teacher layer on the inputs."""
    t_mods = {n: teacher.get_submodule(paths[n]) for n in group}
    stats: dict[str, _Stats] = {}
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
                        stats[n] = _Stats.empty(layer.in_features, layer.out_features, x.device)
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


def _check_batches(compressed: nn.Module, batches: list, what: str) -> None:
    """Each batch against the input shapes ``compressed`` was captured for (the number of
    dims, and every dim that is not dynamic, as ``compress`` recorded them), so that a 1-D
    batch or one of the wrong width is an error naming the batch rather than an
    ``IndexError`` or a bare matmul shape error deep in the model. Modules without that
    information (not a ``compress`` result) are not checked."""
    info = getattr(compressed, "structfx_inputs", None)
    if info is None:
        return
    import torch.fx._pytree as fx_pytree

    expected = info["inputs"]
    for i, args in enumerate(batches):
        try:
            flat = list(fx_pytree.tree_flatten_spec((args.args, args.kwargs), info["spec"]))
        except Exception:  # a pytree the spec doesn't describe: leave it to the model
            continue
        if len(flat) != len(expected):
            continue
        for k, (got, (dims, dtype)) in enumerate(zip(flat, expected)):
            where = f"distill: {what} batch {i}" + (f", input {k}" if len(flat) > 1 else "")
            if not isinstance(got, torch.Tensor):
                raise ValueError(f"{where}: expected a tensor, got {type(got).__name__}")
            shown = "(" + ", ".join(map(str, dims)) + ")"
            if got.dim() != len(dims) or any(d != "*" and d != g for d, g in
                                             zip(dims, got.shape)):
                raise ValueError(
                    f"{where} has shape {tuple(got.shape)}, but the compressed model was "
                    f"captured for inputs of shape {shown} (* = any size): give batches "
                    f"shaped like compress()'s example inputs")
            if got.dtype != dtype and (got.is_floating_point() != dtype.is_floating_point):
                raise ValueError(f"{where} has dtype {got.dtype}, but the compressed model "
                                 f"was captured for {dtype}")


# ----------------------------------------------------------------------------- whole model
def _float_leaves(out) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(out.to_tuple() if hasattr(out, "to_tuple") else out)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _model_error(student: nn.Module, teacher_outs: list[list[torch.Tensor]],
                 batches: list[Inputs]) -> Optional[float]:
    num = den = 0.0
    with torch.no_grad():
        for args, ref in zip(batches, teacher_outs):
            got = _float_leaves(args.call(student))
            if len(got) != len(ref):
                return None
            num += sum(float((g.double() - r.double()).pow(2).sum()) for g, r in zip(got, ref))
            den += sum(float(r.double().pow(2).sum()) for r in ref)
    return math.sqrt(num / den) if den > 0 else None


def _teacher_outputs(teacher: nn.Module, batches: list[Inputs], what: str = "calib_inputs"
                     ) -> list[list[torch.Tensor]]:
    out = []
    with torch.no_grad():
        for i, args in enumerate(batches):
            try:
                y = args.call(teacher)
            except Exception as e:  # name the batch: the traceback alone points into the model
                raise ValueError(f"distill: the teacher fails on {what} batch {i} "
                                 f"({type(e).__name__}: {e})") from e
            out.append([t.detach() for t in _float_leaves(y)])
    return out


def _structured_params(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": p for n, layer in layers.items() for k, p in layer.named_parameters()}


def _batches_forever(batches: list[Inputs], targets: list, extra: Optional[Iterable],
                     teacher: nn.Module):
    """``(args, teacher outputs or None)`` pairs for the end-to-end phase: the calibration
    batches with their cached targets, cycled; or ``extra`` (labelled by the teacher as they
    come), cycled if it is a list or tuple, else read until it runs out."""
    if extra is None:
        while True:
            yield from zip(batches, targets)
    while True:
        empty = True
        for b in extra:
            empty = False
            yield _batch(b, teacher, "end_to_end_inputs"), None
        if empty or not isinstance(extra, (list, tuple)):
            return


def _end_to_end(student: nn.Module, teacher: nn.Module, layers: dict[str, nn.Module],
                stream, steps: int, lr: float, progress: bool,
                deadline: Optional[float] = None) -> int:
    """Adam on every structured layer at once, one batch per step, loss: squared output
    error relative to the teacher's output norm; step sizes relative to each parameter's RMS,
    cosine decay. Returns the steps taken."""
    params = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
    opt = _RelativeAdam(params, lr, steps)
    bar = tqdm(total=steps, desc="structfx: distill end to end", disable=not progress,
               leave=False)
    taken = 0
    t0 = time.perf_counter()
    for (args, ref), t in zip(stream, range(steps)):
        # with a deadline, the schedule runs on whichever of steps and time is further along
        done = t / steps if deadline is None else max(
            t / steps, (time.perf_counter() - t0) / max(deadline - t0, 1e-9))
        if done >= 1:
            break
        if ref is None:
            with torch.no_grad():
                ref = [r.detach() for r in _float_leaves(args.call(teacher))]
        with torch.enable_grad():
            got = _float_leaves(args.call(student))
            if len(got) != len(ref):
                raise ValueError("distill: the compressed model and the teacher return "
                                 "different numbers of floating-point outputs")
            loss = sum((g - r).pow(2).sum() for g, r in zip(got, ref)) / sum(
                r.pow(2).sum() for r in ref).clamp_min(1e-30)
            opt.step(loss, t, done)
        taken += 1
        bar.update(1)
        if progress:
            bar.set_postfix(rel_err=f"{math.sqrt(float(loss.detach())):.4f}")
    bar.close()
    opt.zero_grad()
    return taken


# ----------------------------------------------------------------------------- entry point
def _teacher_untouched(fn):
    """The teacher is the user's model: its buffers (train-mode batch norm statistics) and the
    RNG state are as they were when ``distill`` returns."""
    @functools.wraps(fn)
    def wrapper(compressed, teacher, *args, **kwargs):
        from .compress import no_side_effects

        with no_side_effects(teacher):
            return fn(compressed, teacher, *args, **kwargs)
    return wrapper


@_teacher_untouched
def distill(compressed: nn.Module, teacher: nn.Module, calib_inputs: Iterable, *,
            steps: int = 200, lr: float = 1e-2, mode: str = "correct",
            end_to_end_steps: int = 0, end_to_end_lr: float = 1e-3,
            end_to_end_inputs: Optional[Iterable] = None, eval_inputs: Optional[Iterable] = None,
            time_limit: Optional[float] = None, progress: bool = True) -> DistillResult:
    """Fine-tune ``compressed``'s structured layers in place to match ``teacher``; return a
    ``DistillResult`` (``print`` it for the per-layer table).

    ``compressed``: what ``structfx.compress(teacher, ...)`` returned (any module holding
    ``BlastLinear`` / ``SS1Linear`` layers at the teacher's ``nn.Linear`` paths works).
    ``calib_inputs``: batches, each a tensor, a tuple or a dict of keyword inputs as for
    ``compress``. ``steps``: Adam steps per layer; ``lr``: Adam step size relative to each
    parameter tensor's RMS. ``mode``: where each layer's inputs and targets come from (see
    the module docstring). ``end_to_end_steps``: then this many Adam steps on all structured
    layers together against the teacher's outputs, one batch a step, at relative step size
    ``end_to_end_lr``; the batches are ``calib_inputs`` (cycled) or ``end_to_end_inputs`` (a
    list is cycled; any other iterable, e.g. a generator of fresh or augmented batches, is
    read until it runs out), and if the phase leaves the error on ``calib_inputs`` higher than
    before it, it is undone. ``time_limit``: seconds for the whole call; the end-to-end phase
    stops early to end by then (its step-size schedule runs on time instead of steps, so it
    still decays to 0; the layer-wise phase, the fast part, is always completed).
    ``eval_inputs``: batches on which to report the model's output
    error before and after. The teacher is only read (``no_grad``, hooks removed after).
    """
    t_start = time.perf_counter()
    if mode not in MODES:
        raise ValueError(f"distill: mode must be one of {MODES}, got {mode!r}")
    for name, v in (("steps", steps), ("end_to_end_steps", end_to_end_steps)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"distill: {name} must be an integer >= 0, got {v!r}")
    for name, v in (("lr", lr), ("end_to_end_lr", end_to_end_lr)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"distill: {name} must be > 0, got {v!r}")
    if time_limit is not None and not (isinstance(time_limit, (int, float))
                                       and not isinstance(time_limit, bool) and time_limit > 0):
        raise ValueError(f"distill: time_limit must be a number of seconds > 0, got "
                         f"{time_limit!r}")
    if not isinstance(compressed, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError("distill: compressed and teacher must be nn.Modules")
    if compressed is teacher:
        raise ValueError("distill: compressed and teacher are the same module; pass the dense "
                         "model as the teacher")
    layers = {n: m for n, m in compressed.named_modules() if isinstance(m, STRUCTURED)}
    if any(isinstance(m, STRUCTURED) for m in teacher.modules()):
        raise ValueError("distill: the teacher holds structured layers; call "
                         "distill(compressed, dense_teacher, ...) (arguments swapped?)")
    if not layers:
        raise ValueError("distill: no structured layers (BlastLinear / SS1Linear) in the "
                         "compressed model; pass what structfx.compress() returned")
    shared = {id(p) for p in teacher.parameters()} & {
        id(p) for layer in layers.values() for p in layer.parameters()}
    if shared:
        raise ValueError("distill: the compressed model's structured layers share parameters "
                         "with the teacher")
    if isinstance(calib_inputs, (torch.Tensor, dict, Inputs)):
        raise TypeError(f"distill: calib_inputs must be an iterable of batches (e.g. a list), "
                        f"got one {type(calib_inputs).__name__}; wrap it in a list")
    batches = [_batch(b, teacher, f"calib_inputs[{i}]") for i, b in enumerate(calib_inputs)]
    if not batches:
        raise ValueError("distill: calib_inputs is empty; give at least one batch")
    evals = ([_batch(b, teacher, f"eval_inputs[{i}]") for i, b in enumerate(eval_inputs)]
             if eval_inputs is not None else None)
    _check_batches(compressed, batches, "calib_inputs")
    if evals:
        _check_batches(compressed, evals, "eval_inputs")
    paths = {n: _teacher_path(n, teacher) for n in layers}
    if teacher.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in teacher.modules()):
        warnings.warn("distill: the teacher is in training mode (dropout active), so its "
                      "targets are noisy; call teacher.eval() first", stacklevel=2)

    result = DistillResult(mode=mode)
    targets = _teacher_outputs(teacher, batches)
    eval_targets = _teacher_outputs(teacher, evals, "eval_inputs") if evals else None
    t_eval = time.perf_counter()
    result.model_error_before = _model_error(compressed, targets, batches)
    if evals:
        result.eval_error_before = _model_error(compressed, eval_targets, evals)
    t_eval = time.perf_counter() - t_eval   # the same evaluations close the call: keep time

    groups = _groups(compressed, list(layers))
    bar = tqdm(total=len(layers), desc="structfx: distill", disable=not progress, leave=False)
    for group in groups:
        t0 = time.perf_counter()
        stats = _record(compressed, teacher, group, layers, paths, batches, mode)
        t_rec = (time.perf_counter() - t0) / len(group)
        for n in group:
            t1 = time.perf_counter()
            layer, s = layers[n], stats[n]
            before = _held_error(layer, s)
            after = before
            if steps:
                saved = [p.detach().clone() for p in layer.parameters()]
                _fit(layer, s, steps, lr, n)
                after = _held_error(layer, s)
                if after > before:  # fit rows improved, held-out rows didn't: keep the start
                    with torch.no_grad():
                        for p, q in zip(layer.parameters(), saved):
                            p.copy_(q)
                    after = before
            result.layers.append(LayerDistill(
                name=n, structure=describe_layer(layer), rows=s.rows, error_before=before,
                error_after=after, seconds=t_rec + time.perf_counter() - t1))
            bar.update(1)
            if progress:
                bar.set_postfix(err=f"{before:.3f}->{after:.3f}")
        del stats
    bar.close()
    result.model_error_after_layers = _model_error(compressed, targets, batches)
    result.model_error_after = result.model_error_after_layers
    if end_to_end_steps:
        saved = {k: p.detach().clone() for k, p in _structured_params(layers).items()}
        stream = _batches_forever(batches, targets, end_to_end_inputs, teacher)
        deadline = None if time_limit is None else t_start + time_limit - 1.5 * t_eval
        result.end_to_end_steps = _end_to_end(compressed, teacher, layers, stream,
                                              end_to_end_steps, end_to_end_lr, progress,
                                              deadline)
        result.model_error_after = _model_error(compressed, targets, batches)
        before = result.model_error_after_layers
        if before is not None and (result.model_error_after is None
                                   or not result.model_error_after <= before):
            with torch.no_grad():
                for k, p in _structured_params(layers).items():
                    p.copy_(saved[k])
            result.model_error_after, result.end_to_end_reverted = before, True
    if evals:
        result.eval_error_after = _model_error(compressed, eval_targets, evals)
    result.seconds = time.perf_counter() - t_start
    return result
