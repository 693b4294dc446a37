"""``structfx.Config``: what to compress, how far, and how to decide."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

STRUCTURES = ("blast", "ss1", "lowrank", "auto")


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
    steps: int = 100
    estimate_steps: int = 15
    seed: int = 0
    device: Optional[str] = None          # device-table entry for the cost model; None: current
    measure: bool = False                 # time candidates on the device instead of estimating
    cache_dir: Optional[str] = None       # on-disk factor cache (safetensors)
    on_stale: str = "refactorize"         # weight changed after compiling: "refactorize" | "raise"
    stale_check: str = "sample"           # how a change is seen: "version" | "sample" | "full"
    strict: bool = False                  # compile backend: raise instead of falling back
    report: bool = False                  # print the report after compiling
    progress: bool = True                 # tqdm bar while factorizing

    def __post_init__(self):
        if self.structure not in STRUCTURES:
            raise ValueError(f"Config.structure must be one of {STRUCTURES}, got {self.structure!r}")
        for name in ("params", "flops"):
            v = getattr(self, name)
            if v is not None and not (0 < v <= 1):
                raise ValueError(f"Config.{name} must be a fraction in (0, 1], got {v!r}")
        if self.max_error is not None and self.max_error <= 0:
            raise ValueError(f"Config.max_error must be > 0, got {self.max_error!r}")
        if self.on_stale not in ("refactorize", "raise"):
            raise ValueError(f"Config.on_stale must be 'refactorize' or 'raise', got {self.on_stale!r}")
        if self.stale_check not in ("version", "sample", "full"):
            raise ValueError(f"Config.stale_check must be 'version', 'sample' or 'full', got {self.stale_check!r}")
        if any(b < 1 for b in self.blocks) or any(c < 1 for c in self.compressions):
            raise ValueError("Config.blocks and Config.compressions must be >= 1")
        for name in ("include", "exclude", "blocks", "compressions", "rank_fractions"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = (v,)
            object.__setattr__(self, name, tuple(v))

    @classmethod
    def from_options(cls, options: Optional[dict]) -> "Config":
        """Build from ``torch.compile(..., options={...})``: unknown keys are an error."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown structfx option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)
