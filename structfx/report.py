"""``structfx.Report``: what the pipeline decided for every linear layer, and the totals.

Built from the pipeline's ``LayerDecision`` records, never re-derived. ``print(report)`` shows a
table a person can read at a glance; ``report.to_json()`` gives the same numbers for tools.
"""
from __future__ import annotations

import dataclasses
import json
import math
import threading
from dataclasses import dataclass, field
from typing import Optional

from tabulate import tabulate


@dataclass
class LayerDecision:
    name: str
    shape: tuple[int, int]                 # (out_features, in_features)
    tokens: int
    dense_mflops: float
    structure: str                         # "dense", "blast", "ss1"
    settings: str                          # "b=4 r=96", "c=2", "" ...
    params: int                            # weight params kept (bias excluded)
    dense_params: int
    weight_error: Optional[float] = None
    output_error: Optional[float] = None   # on the example inputs (held-out calibration rows)
    estimated_error: Optional[float] = None  # what select priced it at (estimate pass)
    predicted_speedup: Optional[float] = None
    measured_speedup: Optional[float] = None
    skip: Optional[str] = None             # why it stayed dense

    @property
    def params_kept(self) -> float:
        return self.params / self.dense_params if self.dense_params else 1.0


@dataclass
class Report:
    layers: list[LayerDecision] = field(default_factory=list)
    device: str = ""
    model_params_before: Optional[int] = None
    model_params_after: Optional[int] = None
    dense_flops: Optional[int] = None          # linear layers, at the example token counts
    structured_flops: Optional[int] = None
    predicted_speedup: Optional[float] = None  # linear layers, by the cost model
    measured_speedup: Optional[float] = None   # whole model, when measured
    model_output_error: Optional[float] = None  # whole model, relative, on the example inputs
    notes: list[str] = field(default_factory=list)
    fallback: Optional[str] = None  # compile backend: why this graph was left to plain inductor
    output: str = "model"    # what compress returned: "model" (a copy, layers swapped) / "graph"

    @property
    def replaced(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.structure != "dense"]

    def table(self) -> str:
        rows = []
        for d in self.layers:
            rows.append([
                d.name, f"{d.shape[0]}x{d.shape[1]}", d.tokens, f"{d.dense_mflops:.1f}",
                d.structure if not d.settings else f"{d.structure} {d.settings}",
                f"{d.params_kept:.0%}", _num(d.weight_error), _num(d.output_error),
                _x(d.predicted_speedup), _x(d.measured_speedup), d.skip or "",
            ])
        head = ["layer", "shape", "tokens", "dense MFLOPs", "structure", "params kept",
                "weight err", "output err", "pred. speedup", "meas. speedup", "skipped because"]
        return tabulate(rows, head, tablefmt="simple", disable_numparse=True)

    def totals(self) -> str:
        lin_dense = sum(d.dense_params for d in self.layers)
        lin_kept = sum(d.params for d in self.layers)
        rep_dense = sum(d.dense_params for d in self.replaced)
        rep_kept = sum(d.params for d in self.replaced)
        lines = [f"graph left to plain inductor (all layers dense): {self.fallback}"] \
            if self.fallback else []
        lines += [f"linear layers: {len(self.replaced)} of {len(self.layers)} replaced; "
                 f"weights {lin_kept:,} of {lin_dense:,} ({_pct(lin_kept, lin_dense)}); "
                 f"the replaced layers keep {_pct(rep_kept, rep_dense)} of theirs"]
        if self.model_params_before is not None and self.model_params_after is not None:
            lines.append(f"model parameters: {self.model_params_after:,} of "
                         f"{self.model_params_before:,} "
                         f"({_pct(self.model_params_after, self.model_params_before)})")
        if self.dense_flops:
            lines.append(f"linear FLOPs: {self.structured_flops / 1e6:,.1f} M of "
                         f"{self.dense_flops / 1e6:,.1f} M "
                         f"({_pct(self.structured_flops, self.dense_flops)})")
        if self.predicted_speedup is not None:
            lines.append(f"predicted speedup of the linear layers ({self.device}): "
                         f"{self.predicted_speedup:.2f}x")
        if self.model_output_error is not None:
            lines.append(f"model output error on the example inputs: "
                         f"{self.model_output_error:.3g} (relative to the dense output)")
        if self.measured_speedup is not None:
            lines.append(f"measured model speedup: {self.measured_speedup:.2f}x")
        return "\n".join(lines + self.notes)

    def __str__(self) -> str:
        return f"structfx report\n{self.table()}\n\n{self.totals()}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for row, layer in zip(d["layers"], self.layers):
            row["params_kept"] = layer.params_kept
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        """The report ``to_dict`` gave (unknown keys are ignored: a newer structfx's report
        still loads)."""
        if not isinstance(d, dict) or not isinstance(d.get("layers", []), list):
            raise ValueError("Report.from_dict: expected a dict with a 'layers' list (what "
                             "Report.to_dict / to_json writes)")
        names = {f.name for f in dataclasses.fields(LayerDecision)}
        layers = []
        for i, row in enumerate(d.get("layers", [])):
            kw = {k: v for k, v in row.items() if k in names}
            try:
                kw["shape"] = tuple(kw["shape"])
                layers.append(LayerDecision(**kw))
            except (KeyError, TypeError) as e:
                raise ValueError(f"Report.from_dict: layer {i} ({row.get('name')!r}) is not "
                                 f"a LayerDecision record: {e}") from None
        top = {f.name for f in dataclasses.fields(cls)} - {"layers"}
        return cls(layers=layers, **{k: v for k, v in d.items() if k in top})

    @classmethod
    def from_json(cls, text: str) -> "Report":
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path) -> "Report":
        """Read a ``report.json`` (a file, or a folder holding one, as ``structfx compress``
        writes)."""
        from pathlib import Path

        path = Path(path)
        if path.is_dir():
            path = path / "report.json"
        if not path.is_file():
            raise FileNotFoundError(f"no structfx report at {str(path)!r}")
        try:
            return cls.from_json(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(path)!r} is not a structfx report (invalid JSON: {e})") \
                from None

    def save(self, folder) -> None:
        """Write ``report.json`` and ``report.md`` into ``folder``."""
        from pathlib import Path

        folder = Path(folder)
        (folder / "report.json").write_text(self.to_json(indent=1))
        (folder / "report.md").write_text(self.to_markdown())

    def to_markdown(self) -> str:
        rows = [[d.name, f"{d.shape[0]}x{d.shape[1]}", d.tokens,
                 d.structure if not d.settings else f"{d.structure} {d.settings}",
                 f"{d.params_kept:.0%}", _num(d.weight_error), _num(d.output_error),
                 _x(d.predicted_speedup), _x(d.measured_speedup), d.skip or ""]
                for d in self.layers]
        head = ["layer", "shape", "tokens", "structure", "params kept", "weight err",
                "output err", "pred. speedup", "meas. speedup", "skipped because"]
        table = tabulate(rows, head, tablefmt="github", disable_numparse=True)
        totals = "\n".join(f"- {line}" for line in self.totals().splitlines())
        return f"# structfx report\n\n{table}\n\n{totals}\n"

    def plot(self, path, *, title: Optional[str] = None):
        """Draw, per linear layer, the parameters kept, the weight / output error and the
        predicted / measured speedup into ``path`` (any format matplotlib writes: .png,
        .svg, .pdf). Needs matplotlib (``pip install 'structfx[plot]'``). Returns ``path``."""
        rows = self.layers
        if not rows:
            raise ValueError("Report.plot: the report has no layers to draw")
        fig = figure("Report.plot", figsize=(max(6.0, 0.28 * len(rows) + 2), 8.5))
        axes = fig.subplots(3, 1, sharex=True)
        x = list(range(len(rows)))
        names = [d.name for d in rows]
        kept = [d.params_kept for d in rows]
        colors = ["#4c72b0" if d.structure != "dense" else "#bbbbbb" for d in rows]
        axes[0].bar(x, kept, color=colors)
        axes[0].set_ylabel("params kept")
        axes[0].set_ylim(0, 1.05)
        axes[0].axhline(1.0, color="#888888", lw=0.6)
        nan = float("nan")
        werr = [d.weight_error if d.weight_error is not None else nan for d in rows]
        oerr = [d.output_error if d.output_error is not None else nan for d in rows]
        axes[1].plot(x, werr, "o", label="weight error")
        axes[1].plot(x, oerr, "s", label="output error")
        axes[1].set_ylabel("relative error")
        axes[1].legend(loc="upper right", fontsize=8)
        pred = [d.predicted_speedup if d.predicted_speedup is not None else nan for d in rows]
        meas = [d.measured_speedup if d.measured_speedup is not None else nan for d in rows]
        axes[2].plot(x, pred, "o", label="predicted")
        axes[2].plot(x, meas, "s", label="measured")
        axes[2].axhline(1.0, color="#888888", lw=0.6)
        axes[2].set_ylabel("speedup (x)")
        axes[2].legend(loc="upper right", fontsize=8)
        axes[2].set_xticks(x)
        axes[2].set_xticklabels(names, rotation=90, fontsize=7)
        kept_total = sum(d.params for d in rows) / max(1, sum(d.dense_params for d in rows))
        fig.suptitle(title or f"structfx: {len(self.replaced)} of {len(rows)} linear layers "
                              f"replaced, {kept_total:.0%} of their weights kept")
        fig.tight_layout()
        fig.savefig(path)
        return path


def figure(what: str, **kw):
    """A matplotlib ``Figure`` (no pyplot: no global backend state touched), or an
    ImportError that says how to install matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"{what} needs matplotlib, an optional extra: pip install "
                          f"'structfx[plot]' (or pip install matplotlib)") from None
    return Figure(**kw)


def _num(v: Optional[float]) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _x(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.2f}x"


def _pct(a: int, b: int) -> str:
    return f"{a / b:.1%}" if b else "n/a"


_LAST: Optional[Report] = None
_ALL: list[Report] = []
_KEEP = 256
_LOCK = threading.Lock()  # compiles / compresses in several threads


def last_report() -> Optional[Report]:
    """The report of the most recent compile / compress in this process."""
    return _LAST


def reports() -> list[Report]:
    """Every report since the last ``clear_reports()`` (oldest first; the last 256 kept). A
    ``torch.compile`` with graph breaks, or a model run at new shapes (prefill, then decode),
    compiles several graphs: one report each."""
    with _LOCK:
        return list(_ALL)


def clear_reports() -> None:
    global _LAST
    with _LOCK:
        _LAST = None
        _ALL.clear()


def set_last_report(report: Report) -> None:
    global _LAST
    with _LOCK:
        _LAST = report
        _ALL.append(report)
        del _ALL[:-_KEEP]
