"""Inputs as users pass them: one ``(args, kwargs)`` pair from a tensor, a tuple, or a dict.

Every entry point that runs the user's model on the user's data (``compress`` and its
``calibration`` batches, ``export_onnx``, ``distill``) goes through :func:`normalize`:

  * a tensor                 -> one positional input;
  * a tuple or list          -> positional inputs;
  * a dict / ``BatchEncoding`` (any mapping with string keys) -> keyword inputs, the way
    Hugging Face models are called (``model(**tokenizer(texts, return_tensors="pt"))``);
    when the model's ``forward`` names none of the keys but takes one dict input (a
    sentence-transformers model takes its features dict so), the dict is that input;
  * ``structfx.Inputs(args, kwargs)`` -> both, explicitly.

Anything else is an error that names what was passed and what is accepted.

Capture-only adjustments live here too: :func:`for_capture` turns off ``use_cache`` where the
model's ``forward`` takes it, so Hugging Face outputs that hold a ``DynamicCache`` never reach
``torch.export`` (the cache does not change what the linear layers compute).
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

ACCEPTED = ("a tensor, a tuple/list of positional inputs, a dict or BatchEncoding of keyword "
            "inputs, or structfx.Inputs(args, kwargs)")


@dataclass
class Inputs:
    """Positional and keyword inputs of one model call: ``model(*args, **kwargs)``."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.args = tuple(self.args)
        self.kwargs = dict(self.kwargs)

    def call(self, model):
        return model(*self.args, **self.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        leaves = torch.utils._pytree.tree_leaves((self.args, self.kwargs))
        return [t for t in leaves if isinstance(t, torch.Tensor)]

    def describe(self) -> str:
        parts = [_describe(a) for a in self.args]
        parts += [f"{k}={_describe(v)}" for k, v in self.kwargs.items()]
        return "(" + ", ".join(parts) + ")"


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
    if isinstance(v, (tuple, list)):
        return type(v).__name__ + "[" + ", ".join(_describe(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {_describe(x)}" for k, x in v.items()) + "}"
    return type(v).__name__ if not isinstance(v, (bool, int, float, type(None), str)) else repr(v)


def _forward_params(model: Optional[nn.Module]) -> Optional[inspect.Signature]:
    if model is None:
        return None
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _named(sig: inspect.Signature) -> set[str]:
    return {n for n, p in sig.parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _dict_is_one_input(model: Optional[nn.Module], keys) -> bool:
    """A mapping none of whose keys ``forward`` names, for a ``forward`` whose one required
    input is annotated as a dict (``SentenceTransformer.forward(input: dict[str, Tensor])``),
    is that one input."""
    sig = _forward_params(model)
    if sig is None:
        return False
    if any(k in _named(sig) for k in keys):
        return False
    positional = [p for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional or any(p.default is p.empty for p in positional[1:]):
        return False
    ann = positional[0].annotation
    ann = ann if isinstance(ann, str) else getattr(ann, "__name__", repr(ann))
    return any(w in str(ann) for w in ("dict", "Dict", "Mapping"))


def _check_leaf(v: Any, where: str, what: str) -> None:
    if isinstance(v, (torch.Tensor, bool, int, float, str, type(None), torch.dtype,
                      torch.device)):
        return
    if isinstance(v, (tuple, list)):
        for i, x in enumerate(v):
            _check_leaf(x, f"{where}[{i}]", what)
        return
    if isinstance(v, Mapping):
        for k, x in v.items():
            _check_leaf(x, f"{where}[{k!r}]", what)
        return
    try:  # numpy arrays: say how to convert
        import numpy as np

        if isinstance(v, np.ndarray):
            raise TypeError(f"{what}: {where} is a numpy array; pass torch.from_numpy(...) "
                            f"instead")
    except ImportError:
        pass
    if type(v).__name__.endswith("Cache") or hasattr(v, "to_tuple"):
        return  # HF caches / ModelOutputs: torch.export's pytree registrations handle them
    raise TypeError(f"{what}: {where} is a {type(v).__name__}, which structfx can't pass to "
                    f"the model; inputs may hold tensors, numbers, strings, None, and "
                    f"tuples/lists/dicts of them")


def normalize(inputs: Any, model: Optional[nn.Module] = None, *,
              what: str = "example_inputs", check: bool = True) -> Inputs:
    """``Inputs(args, kwargs)`` from what the user passed (see the module docstring).
    ``model`` (optional) lets a dict be recognized as one positional features dict; ``what``
    names the argument in errors."""
    if isinstance(inputs, Inputs):
        out = Inputs(inputs.args, inputs.kwargs)
    elif isinstance(inputs, torch.Tensor):
        out = Inputs((inputs,), {})
    elif isinstance(inputs, (tuple, list)):
        out = Inputs(tuple(inputs), {})
    elif isinstance(inputs, Mapping) or _is_batch_encoding(inputs):
        d = dict(inputs.items())
        bad = [k for k in d if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{what}: a dict of keyword inputs needs string keys (parameter "
                            f"names of the model's forward), got key {bad[0]!r}")
        out = Inputs((d,), {}) if _dict_is_one_input(model, d) else Inputs((), d)
    else:
        raise TypeError(f"{what}: got {_describe(inputs)}; structfx accepts {ACCEPTED}")
    for i, a in enumerate(out.args):
        _check_leaf(a, f"positional input {i}", what)
    for k, v in out.kwargs.items():
        _check_leaf(v, f"keyword input {k!r}", what)
    if model is not None and check:
        check_signature(model, out, what)
    return out


def prepare(inputs: Any, model: nn.Module, what: str = "example_inputs") -> Inputs:
    """What a capture / an export / a distillation run feeds ``model``: :func:`normalize`,
    then :func:`for_capture`, checked against ``forward``'s signature."""
    out = for_capture(model, normalize(inputs, model, what=what, check=False))
    check_signature(model, out, what)
    return out


def _is_batch_encoding(x: Any) -> bool:
    return type(x).__name__ == "BatchEncoding" and hasattr(x, "items")


def check_signature(model: nn.Module, inputs: Inputs, what: str = "example_inputs") -> None:
    """The inputs bind to ``model.forward``'s parameters, or an error says which don't."""
    sig = _forward_params(model)
    if sig is None:
        return
    try:
        sig.bind(*inputs.args, **inputs.kwargs)
    except TypeError as e:
        params = ", ".join(str(p) for p in sig.parameters.values())
        raise TypeError(f"{what}: {inputs.describe()} doesn't fit "
                        f"{type(model).__name__}.forward({params}): {e}") from None


def normalize_batches(batches: Any, model: Optional[nn.Module] = None, *,
                      what: str = "calibration") -> list[Inputs]:
    """A list of ``Inputs`` from an iterable of batches (each as :func:`normalize` takes)."""
    if batches is None:
        return []
    if isinstance(batches, (torch.Tensor, Mapping, Inputs)) or _is_batch_encoding(batches):
        raise TypeError(f"{what}: expected an iterable of batches (e.g. a list), got one "
                        f"{type(batches).__name__}; wrap it in a list: [{what}]")
    try:
        items = list(batches)
    except TypeError:
        raise TypeError(f"{what}: expected an iterable of batches, each {ACCEPTED}; got "
                        f"{type(batches).__name__}") from None
    return [normalize(b, model, what=f"{what}[{i}]", check=False) for i, b in enumerate(items)]


def for_capture(model: nn.Module, inputs: Inputs) -> Inputs:
    """The inputs ``torch.export`` gets: ``use_cache=False`` added where ``forward`` takes
    ``use_cache`` (a cache in the outputs can't be captured, and it is not needed to decide
    and record the linear layers). The user's own ``Inputs`` are not changed."""
    sig = _forward_params(model)
    if sig is None or "use_cache" not in _named(sig):
        return inputs
    kwargs = dict(inputs.kwargs)
    kwargs["use_cache"] = False
    names = list(sig.parameters)
    i = names.index("use_cache")
    args = inputs.args
    if i < len(args):  # passed positionally: override in place
        args = args[:i] + (False,) + args[i + 1:]
        kwargs.pop("use_cache")
    return Inputs(args, kwargs)


def dynamic_shapes(model: nn.Module, inputs: Inputs, feature_axis: bool = False):
    """``torch.export`` dynamic shapes for ``inputs``: ``Dim.AUTO`` on every axis of every
    tensor (``feature_axis=False``: but the last axis of floating-point tensors, a layer
    width), keyed by ``forward``'s parameter names. None where the inputs can't be bound."""
    from torch.export import Dim

    def spec(a):
        if isinstance(a, torch.Tensor):
            n = a.dim() - 1 if (a.is_floating_point() and not feature_axis and a.dim()) \
                else a.dim()
            return {i: Dim.AUTO for i in range(n)} or None
        if isinstance(a, (tuple, list)):
            return type(a)(spec(x) for x in a)
        if isinstance(a, Mapping):
            return {k: spec(v) for k, v in a.items()}
        return None

    sig = _forward_params(model)
    if sig is None:
        return None if inputs.kwargs else tuple(spec(a) for a in inputs.args)
    try:
        bound = sig.bind(*inputs.args, **inputs.kwargs)
    except TypeError:
        return None
    out = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(spec(a) for a in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: spec(v) for k, v in value.items()}
        else:
            out[name] = spec(value)
    return out
