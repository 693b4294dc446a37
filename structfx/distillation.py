"""``structfx.distill``: fine-tune the structured factors of a compressed model on its teacher.

Two phases, each in its own module:
  the layer-wise fit (``distill_layerwise.py``): every ``BlastLinear`` / ``SS1Linear``, in
      graph order, fit by Adam so that its outputs match the dense layer's, on exact Gram
      statistics of its inputs (one layer's in memory at a time), every 8th row held out;
  the end-to-end phase (``distill_end_to_end.py``, optional): every structured layer at once,
      on the whole model's outputs against the teacher's.

This module is the entry: ``DistillConfig`` (the settings), ``distill`` (checks the models and
batches, runs the phases, measures the model's output error before and after, undoes an
end-to-end phase that made it worse) and ``DistillResult``. Which inputs and targets each
layer is fit on (``DistillConfig.mode``) is described in ``distill_layerwise.py``; measured on
all-MiniLM-L6-v2 (docs/minilm.md), ``"correct"`` (the default) gives the closest embeddings.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from tabulate import tabulate
from torch import nn

from .compress import float_leaves, no_side_effects, relative_output_error
from .config import Config, _integer, _real
from .distill_end_to_end import batch_stream, end_to_end_phase
from .distill_layerwise import STRUCTURED, LayerDistill, layerwise_phase
from .inputs import Inputs, prepare

MODES = ("correct", "student", "teacher")


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class DistillConfig:
    """Settings of one ``structfx.distill`` call (the data, ``eval_inputs`` and
    ``end_to_end_inputs``, are ``distill``'s own keywords).

    The layer-wise fit: ``steps`` Adam steps per layer (0: measure only), at step size ``lr``
    relative to each parameter tensor's RMS; ``mode``: where each layer's inputs and targets
    come from, ``"correct"`` (the compressed model's inputs, the teacher layer's outputs),
    ``"student"`` (the compressed model's inputs, the dense layer on them) or ``"teacher"``
    (the teacher's inputs and outputs). The end-to-end phase: ``end_to_end_steps`` Adam steps
    on all structured layers together (0: none), one batch a step, at relative step size
    ``end_to_end_lr``. ``time_limit``: seconds for the whole call (None: no limit); the
    end-to-end phase stops early to end by then (its schedule runs on time instead of steps,
    so it still decays to 0); the layer-wise phase, the fast part, always completes.
    ``progress``: tqdm bars. A bad value is a ValueError naming the field.
    """

    steps: int = 200
    lr: float = 1e-2
    mode: str = "correct"
    end_to_end_steps: int = 0
    end_to_end_lr: float = 1e-3
    time_limit: Optional[float] = None
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.mode, str) or self.mode not in MODES:
            _bad("mode", f"one of {MODES}", self.mode)
        for name in ("steps", "end_to_end_steps"):
            v = getattr(self, name)
            if not (_integer(v) and v >= 0):
                _bad(name, "an integer >= 0", v)
            object.__setattr__(self, name, int(v))
        for name in ("lr", "end_to_end_lr"):
            v = getattr(self, name)
            if not (_real(v) and v > 0):
                _bad(name, "> 0 (a finite number)", v)
            object.__setattr__(self, name, float(v))
        v = self.time_limit
        if v is not None:
            if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0):
                _bad("time_limit", "a number of seconds > 0 or None", v)
            object.__setattr__(self, "time_limit", float(v))
        if not isinstance(self.progress, bool):
            _bad("progress", "True or False", self.progress)

    def replace(self, **changes) -> "DistillConfig":
        return dataclasses.replace(self, **changes)


FIELDS = tuple(f.name for f in dataclasses.fields(DistillConfig))


def _bad(field: str, expected: str, value) -> None:
    raise ValueError(f"DistillConfig.{field} must be {expected}, got {value!r}")


def _settings(config: Optional[DistillConfig], keywords: dict) -> DistillConfig:
    """``config`` (default ``DistillConfig()``) with the keyword settings on top: a keyword
    given to ``distill`` overrides the same field of ``config``."""
    if config is not None and not isinstance(config, DistillConfig):
        hint = (" (structfx.Config holds compress()'s settings)"
                if isinstance(config, Config) else "")
        raise TypeError(f"distill: config must be a structfx.DistillConfig, got "
                        f"{type(config).__name__}{hint}")
    unknown = [k for k in keywords if k not in FIELDS]
    if unknown:
        raise TypeError(f"distill() got an unexpected keyword argument {unknown[0]!r}; its "
                        f"settings are DistillConfig's fields ({', '.join(FIELDS)}), its data "
                        f"eval_inputs and end_to_end_inputs")
    config = config if config is not None else DistillConfig()
    return config.replace(**keywords) if keywords else config


# ----------------------------------------------------------------------------- result
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


# ----------------------------------------------------------------------------- checks
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



def _check_models(compressed: nn.Module, teacher: nn.Module) -> dict[str, nn.Module]:
    """The compressed model's structured layers (``name -> module``), after checking that the
    two models are what ``distill`` needs (a clear error for swapped or shared models)."""
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
    return layers


# ----------------------------------------------------------------------------- whole model
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
            out.append([t.detach() for t in float_leaves(y)])
    return out



def _model_error(student: nn.Module, teacher_outs: list[list[torch.Tensor]],
                 batches: list[Inputs]) -> Optional[float]:
    """The student's output error relative to the teacher's (cached) outputs, over all
    batches."""
    with torch.no_grad():
        return relative_output_error((float_leaves(args.call(student)), ref)
                                     for args, ref in zip(batches, teacher_outs))


def _structured_params(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": p for n, layer in layers.items() for k, p in layer.named_parameters()}


# ----------------------------------------------------------------------------- entry point
def distill(compressed: nn.Module, teacher: nn.Module, calib_inputs: Iterable,
            config: Optional[DistillConfig] = None, *,
            eval_inputs: Optional[Iterable] = None,
            end_to_end_inputs: Optional[Iterable] = None, **settings: Any) -> DistillResult:
    """Fine-tune ``compressed``'s structured layers in place to match ``teacher``; return a
    ``DistillResult`` (``print`` it for the per-layer table).

    ``compressed``: what ``structfx.compress(teacher, ...)`` returned (any module holding
    ``BlastLinear`` / ``SS1Linear`` layers at the teacher's ``nn.Linear`` paths works).
    ``calib_inputs``: batches, each a tensor, a tuple or a dict of keyword inputs as for
    ``compress``. ``config``: a ``DistillConfig`` (default ``DistillConfig()``); its fields
    can also be given as keywords (``steps=``, ``lr=``, ``mode=``, ``end_to_end_steps=``,
    ``end_to_end_lr=``, ``time_limit=``, ``progress=``), and a keyword overrides the same
    field of ``config``. ``end_to_end_inputs``: the end-to-end phase's batches instead of
    ``calib_inputs`` (cycled): a list is cycled, any other iterable (e.g. a generator of fresh
    or augmented batches) is read until it runs out; if the phase leaves the error on
    ``calib_inputs`` higher than before it, it is undone. ``eval_inputs``: batches on which to
    report the model's output error before and after. The teacher is only read (``no_grad``,
    hooks removed after; its buffers and the RNG state are as they were when this returns).
    """
    t_start = time.perf_counter()
    cfg = _settings(config, settings)
    layers = _check_models(compressed, teacher)
    if isinstance(calib_inputs, (torch.Tensor, dict, Inputs)):
        raise TypeError(f"distill: calib_inputs must be an iterable of batches (e.g. a list), "
                        f"got one {type(calib_inputs).__name__}; wrap it in a list")
    batches = [prepare(b, teacher, f"calib_inputs[{i}]") for i, b in enumerate(calib_inputs)]
    if not batches:
        raise ValueError("distill: calib_inputs is empty; give at least one batch")
    evals = ([prepare(b, teacher, f"eval_inputs[{i}]") for i, b in enumerate(eval_inputs)]
             if eval_inputs is not None else None)
    _check_batches(compressed, batches, "calib_inputs")
    if evals:
        _check_batches(compressed, evals, "eval_inputs")
    paths = {n: _teacher_path(n, teacher) for n in layers}
    if teacher.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in teacher.modules()):
        warnings.warn("distill: the teacher is in training mode (dropout active), so its "
                      "targets are noisy; call teacher.eval() first", stacklevel=2)
    with no_side_effects(teacher):
        return _run(compressed, teacher, layers, paths, batches, evals, end_to_end_inputs, cfg,
                    t_start)


def _run(compressed: nn.Module, teacher: nn.Module, layers: dict[str, nn.Module],
         paths: dict[str, str], batches: list[Inputs], evals: Optional[list[Inputs]],
         extra: Optional[Iterable], cfg: DistillConfig, t_start: float) -> DistillResult:
    """The two phases on checked arguments, with the model's output error around them."""
    result = DistillResult(mode=cfg.mode)
    targets = _teacher_outputs(teacher, batches)
    eval_targets = _teacher_outputs(teacher, evals, "eval_inputs") if evals else None
    t_eval = time.perf_counter()
    result.model_error_before = _model_error(compressed, targets, batches)
    if evals:
        result.eval_error_before = _model_error(compressed, eval_targets, evals)
    t_eval = time.perf_counter() - t_eval   # the same evaluations close the call: keep time

    result.layers = layerwise_phase(compressed, teacher, layers, paths, batches,
                                    steps=cfg.steps, lr=cfg.lr, mode=cfg.mode,
                                    progress=cfg.progress)
    result.model_error_after_layers = _model_error(compressed, targets, batches)
    result.model_error_after = result.model_error_after_layers
    if cfg.end_to_end_steps:
        saved = {k: p.detach().clone() for k, p in _structured_params(layers).items()}
        deadline = (None if cfg.time_limit is None
                    else t_start + cfg.time_limit - 1.5 * t_eval)
        result.end_to_end_steps = end_to_end_phase(
            compressed, teacher, layers, batch_stream(batches, targets, extra, teacher),
            steps=cfg.end_to_end_steps, lr=cfg.end_to_end_lr, progress=cfg.progress,
            deadline=deadline)
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
