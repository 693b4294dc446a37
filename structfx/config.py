"""``structfx.Config``: what to compress, how far, and how to decide."""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

STRUCTURES = ("blast", "ss1", "lowrank", "auto")
STALE_CHECKS = ("version", "sample", "full")
ON_STALE = ("refactorize", "raise")


def _bad(field: str, expected: str, value) -> None:
    raise ValueError(f"Config.{field} must be {expected}, got {value!r}")


def _integer(v) -> bool:
    """An int (numpy ints too), never a bool or a float."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real(v) -> bool:
    """A finite real number, never a bool or a string."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_device(device) -> None:
    import torch

    if isinstance(device, torch.device):
        return
    if not isinstance(device, str) or not device:
        _bad("device", "a device name ('cpu', 'cuda', 'h100', ...) or None", device)
    from .passes import device as devices

    if devices.match_table(device) is not None:
        return
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        _bad("device", f"'cpu', 'cuda[:i]' or a device-table name "
             f"{sorted(devices.DEVICE_TABLE)}", device)


def _sequence(v) -> bool:
    return isinstance(v, (tuple, list, range)) or (
        isinstance(v, Sequence) and not isinstance(v, (str, bytes)))


@dataclass(frozen=True)
class Config:
    """Settings of one compression run (``torch.compile(..., options=...)`` takes the same keys).

    Budget (over the linear layers that are candidates; layers left dense count in full):
      ``params``: keep at most this fraction of their parameters (default 0.5);
      ``flops``: keep at most this fraction of their dense FLOPs at the graph's token count;
      ``max_error``: no layer may exceed this relative weight error.
    The per-layer choice meets the budget with the least total relative squared weight error
    (an exact multiple-choice knapsack, see ``passes/select.py``).

    Which layers: ``include`` / ``exclude`` are globs on module paths (``"*.attention.*"``);
    layers with fewer than ``min_params`` weights stay dense; layers the cost model predicts to
    get slower stay dense unless ``force=True``.

    Structures: ``structure`` is ``"blast"``, ``"ss1"``, ``"lowrank"`` (BLAST with b = 1) or
    ``"auto"`` (any of them per layer); ``blocks`` / ``compressions`` are the grids tried.

    ``calib_blend``: with calibration data, how much of the data-free objective the data-aware
    one keeps: every factorization fits the inputs' Gram blended with the identity,
    ``(1 - a) C + a mean(diag C) I`` (``passes/factorize_blast.blend_gram``). 0 fits the
    calibration rows alone; a little keeps the directions they never excite, which matters
    when the calibration text is of another kind than what the model will see.

    ``sensitivity``: with calibration data, weigh each layer's output error in the budget's
    objective by how much the model's output moves per unit of it (measured by one perturbed
    forward pass per layer on the first calibration batch, ``passes/sensitivity.py``) instead
    of by the layer's parameter count.

    ``calib_memory``: with calibration data, the bytes of calibration statistics (per distinct
    input of a layer: an ``n x n`` fp64 Gram and the held-out rows) held at once. When all the
    layers' statistics fit they are recorded once; otherwise they are recorded in groups that
    fit, each dropped after use, at the cost of more forward passes over the calibration
    batches (each stops after its group's last layer). Llama-7B's come to ~44 GB in all.

    ``time_candidates``: time every candidate on this device instead of predicting its time
    with the roofline model (``compress(measure=True)`` is something else: it times the whole
    model, dense and compressed). ``measure=`` is its former name, still accepted (with a
    ``DeprecationWarning``) by ``Config(...)``, ``replace`` and ``from_options``.
    """

    structure: str = "blast"
    params: Optional[float] = 0.5
    flops: Optional[float] = None
    max_error: Optional[float] = None
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    min_params: int = 16384
    force: bool = False
    blocks: Sequence[int] = (1, 2, 4, 8, 16)
    compressions: Sequence[int] = (2, 3, 4, 8)
    rank_fractions: Sequence[float] = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
    steps: int = 300                      # BLAST descent: at most this many (stops on convergence)
    estimate_steps: int = 10               # per estimate run (data-free: extrapolated)
    calib_blend: float = 0.0              # data-aware: share of the data-free objective
    sensitivity: bool = False             # data-aware: weigh layers by output sensitivity
    calib_memory: int = 1 << 30           # data-aware: bytes of statistics held at once
    seed: int = 0
    device: Optional[str] = None          # device-table entry for the cost model; None: current
    time_candidates: bool = False         # time candidates on the device instead of estimating
    cache_dir: Optional[str] = None       # on-disk factor cache (safetensors)
    on_stale: str = "refactorize"         # weight changed after compiling: "refactorize" | "raise"
    stale_check: str = "sample"           # how a change is seen: "version" | "sample" | "full"
    strict: bool = False                  # compile backend: raise instead of falling back
    report: bool = False                  # print the report after compiling
    progress: bool = True                 # tqdm bar while factorizing

    def __post_init__(self):
        """Check every field's type and range; a bad value is a ValueError naming the field."""
        if not isinstance(self.structure, str) or self.structure not in STRUCTURES:
            _bad("structure", f"one of {STRUCTURES}", self.structure)
        for name in ("params", "flops"):
            v = getattr(self, name)
            if v is not None and not (_real(v) and 0 < v <= 1):
                _bad(name, "a fraction in (0, 1] or None", v)
        if self.max_error is not None and not (_real(self.max_error) and self.max_error > 0):
            _bad("max_error", "a finite number > 0 or None", self.max_error)
        if self.params is None and self.flops is None and self.max_error is None:
            raise ValueError("Config.params, Config.flops and Config.max_error are all None: "
                             "give a budget (params=, flops= or max_error=)")
        for name in ("include", "exclude"):
            v = getattr(self, name)
            v = (v,) if isinstance(v, str) else v
            if not _sequence(v) or not all(isinstance(g, str) for g in v):
                _bad(name, "a glob string or a sequence of glob strings", getattr(self, name))
            object.__setattr__(self, name, tuple(v))
        for name, low in (("min_params", 0), ("steps", 0), ("estimate_steps", 0),
                          ("calib_memory", 1)):
            v = getattr(self, name)
            if not (_integer(v) and v >= low):
                _bad(name, f"an integer >= {low}", v)
            object.__setattr__(self, name, int(v))
        if not isinstance(self.sensitivity, bool):
            _bad("sensitivity", "True or False", self.sensitivity)
        if not (_real(self.calib_blend) and 0 <= self.calib_blend <= 1):
            _bad("calib_blend", "a fraction in [0, 1]", self.calib_blend)
        object.__setattr__(self, "calib_blend", float(self.calib_blend))
        if not _integer(self.seed):
            _bad("seed", "an integer", self.seed)
        object.__setattr__(self, "seed", int(self.seed))
        # The grids are sequences: ``blocks=2`` is refused rather than guessed at (it reads
        # like BlastLinear's ``blocks=2``, but here it is the list of block counts to try).
        for name in ("blocks", "compressions"):
            v = getattr(self, name)
            if not _sequence(v) or not v or not all(_integer(b) and b >= 1 for b in v):
                _bad(name, "a non-empty sequence of integers >= 1 (the grid tried, e.g. (2, 4))",
                     v)
            object.__setattr__(self, name, tuple(int(b) for b in v))
        v = self.rank_fractions
        if not _sequence(v) or not v or not all(_real(f) and 0 < f <= 1 for f in v):
            _bad("rank_fractions", "a non-empty sequence of fractions in (0, 1] (the grid "
                 "tried, e.g. (0.25, 0.5))", v)
        object.__setattr__(self, "rank_fractions", tuple(float(f) for f in v))
        for name in ("force", "time_candidates", "strict", "report", "progress"):
            if not isinstance(getattr(self, name), bool):
                _bad(name, "True or False", getattr(self, name))
        if self.device is not None:
            _check_device(self.device)
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, (str, os.PathLike)) or not os.fspath(self.cache_dir):
                _bad("cache_dir", "a directory path (str or os.PathLike) or None", self.cache_dir)
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))
        if not isinstance(self.on_stale, str) or self.on_stale not in ON_STALE:
            _bad("on_stale", f"one of {ON_STALE}", self.on_stale)
        if not isinstance(self.stale_check, str) or self.stale_check not in STALE_CHECKS:
            _bad("stale_check", f"one of {STALE_CHECKS}", self.stale_check)

    @classmethod
    def from_options(cls, options: Optional[dict]) -> "Config":
        """Build from ``torch.compile(..., options={...})``: unknown keys are an error."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)} | {"measure"}  # measure: deprecated
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown structfx option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


# ``measure`` was ``time_candidates``' name; accepted (with a DeprecationWarning) for one release
# by Config(...), Config.replace / dataclasses.replace and Config.from_options, and readable.
_dataclass_init = Config.__init__


@functools.wraps(_dataclass_init)
def _init(self, *args, measure: Optional[bool] = None, **kwargs):
    if measure is not None:
        if not isinstance(measure, bool):
            _bad("measure", "True or False (it is now Config.time_candidates)", measure)
        warnings.warn("Config(measure=...) is now Config(time_candidates=...): it times the "
                      "candidates (compress(measure=True) times the whole model); 'measure' "
                      "will be removed", DeprecationWarning, stacklevel=2)
        kwargs["time_candidates"] = measure   # given, the old name wins (replace passes both)
    _dataclass_init(self, *args, **kwargs)


def _measure(self: Config) -> bool:
    warnings.warn("Config.measure is now Config.time_candidates; 'measure' will be removed",
                  DeprecationWarning, stacklevel=2)
    return self.time_candidates


Config.__init__ = _init
Config.measure = property(_measure, doc="Deprecated name of ``time_candidates``.")
