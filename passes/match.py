"""Match: find the linear-like nodes of a graph and the real weight tensors behind them.

Three graph flavours reach structfx:
  * Dynamo graphs (the compile backend): ``F.linear`` whose weight is a placeholder; the
    parameter is the matching entry of ``example_inputs`` (inlined nn modules);
  * ``symbolic_trace`` graphs: ``call_module`` on an ``nn.Linear``;
  * ``torch.export`` ATen graphs (``ExportedProgram.module()``, used by ``compress``):
    ``aten.linear`` / ``addmm`` / ``mm`` / ``matmul`` with a ``get_attr`` parameter operand,
    directly or through ``aten.t`` — HF GPT-2's ``Conv1D`` stores its weight ``(in, out)``.

Every linear-like node becomes a ``LinearSite``; the ones that must stay dense carry the reason
in ``skip`` (shared or tied weights, buffers, non-float dtypes, below the size floor, filtered
out).

A bias structfx takes over (copies into the structured layer) is only a plain parameter of
shape ``(out_features,)``; any other bias value (``lin.bias * scale``, an input, a broadcast
scalar) stays in the graph and is added after the structured op (``LinearSite.bias_arg``).
"""
from __future__ import annotations

import fnmatch
import operator
import re
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten
_TRANSPOSES = (aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default,
               torch.t)
_ADDMM = (aten.addmm.default, torch.addmm)
_MM = (aten.mm.default, aten.matmul.default, torch.mm, torch.matmul, operator.matmul)
_EMBEDDINGS = (aten.embedding.default, F.embedding, torch.embedding)


@dataclass(frozen=True, eq=False)
class LinearSite:
    """One linear-like node: ``y = x @ weight.T + bias`` in nn.Linear terms. Frozen: a pass
    that learns something about a site (its token count, why it stays dense) makes a new one
    (``dataclasses.replace``)."""

    name: str                          # module path, e.g. "encoder.layer.0.attention.self.query"
    node: fx.Node                      # the node computing y
    x: fx.Node                         # its activation input
    weight: torch.Tensor               # the real tensor as stored (a Parameter)
    bias: Optional[torch.Tensor]
    transposed: bool                   # stored (in, out), as GPT-2's Conv1D
    tokens: int                        # rows of x in the example inputs
    weight_input: Optional[int] = None  # Dynamo graphs: index of the weight among the inputs
    bias_input: Optional[int] = None    # ... and of the bias
    weight_nodes: list = field(default_factory=list)  # nodes that read the weight (get_attr, t)
    skip: Optional[str] = None
    # Where ``node`` holds its operands: the rewrite reads them from the node as it is then
    # (an earlier rewrite may have replaced the node producing ``x``). ``bias_arg``: the
    # position (int) or keyword (str) of a bias that is not a plain parameter, so it stays a
    # graph value added after the structured op; None when ``bias`` (or no bias) is all.
    x_arg: int = 0
    bias_arg: Optional[object] = None

    @property
    def linear_weight(self) -> torch.Tensor:
        """The weight in nn.Linear layout ``(out_features, in_features)``."""
        return self.weight.t() if self.transposed else self.weight

    @property
    def out_features(self) -> int:
        return self.linear_weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.linear_weight.shape[1]


# ----------------------------------------------------------------------------- helpers
def _hint(d) -> int:
    if isinstance(d, torch.SymInt):
        hint = d.node.hint
        return int(hint) if hint is not None else 1
    return int(d)


def _meta_val(node) -> Optional[torch.Tensor]:
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val", node.meta.get("example_value"))
    return v if isinstance(v, torch.Tensor) else None


def _tokens(x: fx.Node) -> int:
    v = _meta_val(x)
    if v is None or v.dim() == 0:
        return 1
    t = 1
    for d in v.shape[:-1]:
        t *= _hint(d)
    return t


def _dotted(source_name: str) -> str:
    """``L['self']._modules['h']._modules['0']`` or ``L['self'].h[0]`` -> ``h.0``."""
    mods = re.findall(r"_(?:modules|parameters|buffers)\['([^']+)'\]", source_name)
    if mods:
        return ".".join(mods)
    s = re.sub(r"^[A-Za-z_]+\['[^']*'\]\.?", "", source_name)
    return re.sub(r"\[['\"]?([^]'\"]+)['\"]?\]", r".\1", s).strip(".")


def _module_path(node: fx.Node) -> Optional[str]:
    """Path of the innermost module that made ``node``, if it is a layer (has a ``weight``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", "")
    if not cls_name.split(".")[-1] in ("Linear", "Conv1D", "NonDynamicallyQuantizableLinear"):
        return None
    return _dotted(path)


class _Weights:
    """Resolves a graph value to the real tensor behind it (placeholder or get_attr)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Optional[Sequence]):
        self.gm = gm
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.inputs = list(example_inputs) if example_inputs is not None else None

    def tensor(self, node) -> tuple[Optional[torch.Tensor], Optional[int], str]:
        if not isinstance(node, fx.Node):
            return None, None, ""
        if node.op == "get_attr":
            t = _get_attr(self.gm, node.target)
            return (t if isinstance(t, torch.Tensor) else None), None, node.target
        if node.op == "placeholder" and self.inputs is not None:
            i = self.placeholders.index(node)
            t = self.inputs[i] if i < len(self.inputs) else None
            src = node.meta.get("grapharg")
            name = _dotted(src.source.name) if src is not None else node.name
            # A weight is a parameter (or a buffer marked static by Dynamo), never a user input.
            static = node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")
            if isinstance(t, nn.Parameter) or static is not None:
                return t, i, name
        return None, None, ""


def _get_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _through_transpose(node) -> tuple[object, bool]:
    """``aten.t(w)`` -> (w, True); anything else -> (node, False)."""
    if not isinstance(node, fx.Node):
        return node, False
    if node.op == "call_method" and node.target in ("t", "T"):
        return node.args[0], True
    if node.op == "call_function" and node.target in _TRANSPOSES:
        if node.target is aten.permute.default and list(node.args[1]) != [1, 0]:
            return node, False
        return node.args[0], True
    return node, False


# ----------------------------------------------------------------------------- matching
def _linear_like(node: fx.Node, gm: fx.GraphModule):
    """``(x, weight, weight_operand, bias, stored_transposed, x_arg, bias_arg)`` or None.
    ``weight`` is the value holding the parameter; ``weight_operand`` the node's own argument
    (``weight`` or its ``t``); ``x_arg`` / ``bias_arg`` where the node holds ``x`` / ``bias``."""
    if node.op == "call_module":
        mod = _get_attr(gm, node.target)
        if isinstance(mod, nn.Linear):
            return node.args[0], mod, None, None, False, 0, None
        return None
    if node.op != "call_function":
        return None
    t, a, kw = node.target, node.args, node.kwargs
    if t in (F.linear, torch._C._nn.linear, aten.linear.default) and len(a) >= 2:
        where = 2 if len(a) > 2 else "bias"
        bias = a[2] if len(a) > 2 else kw.get("bias")
        return a[0], a[1], a[1], bias, False, 0, where
    if t in _ADDMM and kw.get("beta", 1) == 1 and kw.get("alpha", 1) == 1 and len(a) == 3:
        w, tr = _through_transpose(a[2])
        return a[1], w, a[2], a[0], not tr, 1, 0
    if t in _MM and len(a) == 2:
        w, tr = _through_transpose(a[1])
        return a[0], w, a[1], None, not tr, 0, None
    return None


def _owned_bias(bias: Optional[torch.Tensor], out_features: int) -> bool:
    """A bias the structured layer may take over: a plain parameter of shape ``(out,)``."""
    return (isinstance(bias, nn.Parameter) and bias.dim() == 1
            and bias.shape[0] == out_features and bias.is_floating_point())


def match_linears(gm: fx.GraphModule, example_inputs: Optional[Sequence] = None,
                  config=None) -> list[LinearSite]:
    """All linear-like nodes of ``gm`` with a parameter weight, in graph order."""
    weights = _Weights(gm, example_inputs)
    sites: list[LinearSite] = []
    for node in gm.graph.nodes:
        found = _linear_like(node, gm)
        if found is None:
            continue
        x, w, operand, b, transposed, x_arg, b_arg = found
        if isinstance(w, nn.Linear):  # call_module
            weight, bias, w_idx, b_idx, name, w_nodes = w.weight, w.bias, None, None, node.target, []
            b_arg = None
        else:
            weight, w_idx, name = weights.tensor(w)
            if weight is None:
                continue  # a product of two activations, not a layer
            name = name[: -len(".weight")] if name.endswith(".weight") else name
            name = _module_path(node) or name
            w_nodes = [n for n in {w, operand} if isinstance(n, fx.Node)]
            bias, b_idx, _ = weights.tensor(b)
            out = weight.shape[-1 if transposed else 0] if weight.dim() == 2 else -1
            if b is None:
                b_arg = None
            elif _owned_bias(bias, out):
                b_arg = None
            else:  # an expression (lin.bias * s), an input, a broadcast: stays in the graph
                bias, b_idx = None, None
        sites.append(LinearSite(name=name, node=node, x=x, weight=weight, bias=bias,
                                transposed=transposed, tokens=_tokens(x), weight_input=w_idx,
                                bias_input=b_idx, weight_nodes=w_nodes, x_arg=x_arg,
                                bias_arg=b_arg))
    why = _skip_reasons(sites, config, _embedding_storages(gm, weights))
    return [replace(s, skip=why[i]) if why[i] else s for i, s in enumerate(sites)]


def _embedding_storages(gm: fx.GraphModule, weights: "_Weights") -> set:
    out = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _EMBEDDINGS:
            w = n.args[1] if n.target is F.embedding else n.args[0]
            t = weights.tensor(w)[0]
            if t is not None:
                out.add(t.untyped_storage().data_ptr())
        elif n.op == "call_module" and isinstance(_get_attr(gm, n.target), nn.Embedding):
            out.add(_get_attr(gm, n.target).weight.untyped_storage().data_ptr())
    return out


def _skip_reasons(sites: list[LinearSite], config, embeddings: set) -> list[Optional[str]]:
    """Per site, why it stays dense whatever the budget (None: it is a candidate)."""
    by_storage: dict[int, list[LinearSite]] = {}
    for s in sites:
        by_storage.setdefault(s.weight.untyped_storage().data_ptr(), []).append(s)
    min_params = getattr(config, "min_params", 0) if config is not None else 0
    include = tuple(getattr(config, "include", ()) or ())
    exclude = tuple(getattr(config, "exclude", ()) or ())
    out: list[Optional[str]] = []
    for s in sites:
        w = s.weight
        why = None
        if not w.is_floating_point():
            why = f"non-float weight ({w.dtype})"
        elif w.dim() != 2:
            why = f"weight is {w.dim()}-D, not a matrix"
        elif not isinstance(w, nn.Parameter):
            why = "weight is a buffer or constant, not a parameter (not trainable)"
        elif w.untyped_storage().data_ptr() in embeddings:
            why = "weight tied to an embedding"
        elif len(by_storage[w.untyped_storage().data_ptr()]) > 1 or _weight_users(s):
            why = "weight shared by several nodes"
        elif include and not any(fnmatch.fnmatchcase(s.name, g) for g in include):
            why = "not in include"
        elif any(fnmatch.fnmatchcase(s.name, g) for g in exclude):
            why = "excluded"
        elif w.numel() < min_params:
            why = f"below size floor ({w.numel()} < min_params={min_params})"
        out.append(why)
    return out


def _weight_users(s: LinearSite) -> set:
    users = set()
    for wn in s.weight_nodes:
        users.update(wn.users)
    return users - set(s.weight_nodes) - {s.node}

