"""The end-to-end phase of ``structfx.distill``: every structured layer at once, on the model's
outputs.

After the layer-wise fit (``distill_layerwise.py``), ``DistillConfig.end_to_end_steps`` Adam
steps train all structured layers together to match the teacher's floating-point outputs, one
batch a step: the calibration batches (their teacher outputs computed once, cycled) or
``end_to_end_inputs`` (labelled by the teacher as they come). With a time limit, the step-size
schedule runs on time as well as steps, so it still decays to 0 when the phase is cut short.
``distill`` undoes the phase if it left the calibration error higher than before it.
"""
from __future__ import annotations

import math
import time
from typing import Iterable, Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .compress import float_leaves
from .distill_layerwise import RelativeAdam
from .inputs import Inputs, prepare

Stream = Iterator[tuple[Inputs, Optional[list]]]


def batch_stream(batches: list[Inputs], targets: list, extra: Optional[Iterable],
                 teacher: nn.Module) -> Stream:
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
            yield prepare(b, teacher, "end_to_end_inputs"), None
        if empty or not isinstance(extra, (list, tuple)):
            return


def end_to_end_phase(student: nn.Module, teacher: nn.Module, layers: dict[str, nn.Module],
                     stream: Stream, *, steps: int, lr: float, progress: bool,
                     deadline: Optional[float] = None) -> int:
    """Adam (``RelativeAdam``) on every structured layer at once, one batch of ``stream`` per
    step; loss: squared output error relative to the teacher's output norm. Stops after
    ``steps``, when ``stream`` runs out, or at ``deadline`` (a ``time.perf_counter()`` value).
    Returns the steps taken."""
    params = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
    opt = RelativeAdam(params, lr, steps)
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
                ref = [r.detach() for r in float_leaves(args.call(teacher))]
        with torch.enable_grad():
            got = float_leaves(args.call(student))
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
