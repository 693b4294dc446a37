"""The structured ops as ONNX functions of the custom domain ``ai.structfx`` (opset version 1).

An exported model holds one ``ai.structfx.BlastLinear`` / ``ai.structfx.SS1Linear`` node per
structured layer, and the definitions of those ops ship inside the model as functions written
in standard ONNX ops only (MatMul, Mul, ReduceSum, Gather, Reshape, Transpose, Split, Concat,
Pad, Slice, ...). A runtime that expands model-local functions (onnxruntime does) runs the model
with no plugin; a runtime with a native kernel for the domain can match the node instead.

    BlastLinear(x, U, S, V, [bias]) <in_features, out_features>          (docs/design.md, "BLAST")
    SS1Linear(x, P, [bias]) <compression, block_k, block_n, r0, r1, r2, r3>   (docs/design.md, "SS1")

``x (..., in_features)``; ``bias`` is an optional last input. Overloads (``"b1xb2"``,
``"b1xb2_bias"``; SS1's ``""``, ``"bias"``) pick the body for the block grid and the bias.
The bodies are dtype-generic and read every size from the factors' shapes or the attributes, so
after onnxruntime expands a function, everything but the activations is a constant: its
constant folding precomputes the per-block weights, the crops and SS1's gather indices once at
session start, and the GEMMs get constant, pre-packed right-hand sides.

BLAST has one body per block grid ``(b1, b2)``: the grid decides the body's shape. With
``b1 == 1`` or ``b2 == 1`` the matrix has rank r (``W = A @ B.T``, S folded into A or B), so
the body is two GEMMs. Otherwise stage 1 is one 2-D GEMM per block-column (the zero padding of
``x`` becomes cropping the last block of V), stage 2 one Mul per block and a Sum per block-row
(Mul + ReduceSum over the stacked blocks beyond ``MIX_UNROLL`` block-columns), stage 3 one Gemm
per block-row (bias as its C), concatenated. Plain 2-D GEMMs on constant factors are what
onnxruntime's CPU MatMul runs fastest (it pre-packs them); a batched 3-D MatMul over the blocks
with transposes around it measured 10-20 % slower per layer.
"""
from __future__ import annotations

import functools

import onnx
from onnx import AttributeProto, helper

from . import ss1_hash

DOMAIN = "ai.structfx"
DOMAIN_VERSION = 1
ONNX_OPSET = 20  # the standard opset the bodies use; the model must import the same version

BLAST = "BlastLinear"
SS1 = "SS1Linear"
BLAST_ATTRS = ("in_features", "out_features")
SS1_ATTRS = ("compression", "block_k", "block_n", "r0", "r1", "r2", "r3")


class _Body:
    """Nodes of one function body: each call appends a node and returns its output name(s)."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []

    def __call__(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        names = [f"t{len(self.nodes)}_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def ints(self, *values: int) -> str:
        return self("Constant", value_ints=list(values))

    def scalar(self, value: int) -> str:
        return self("Constant", value_int=value)

    def attr(self, name: str) -> str:
        """The int attribute ``name`` of the calling node, as a 1-D tensor of one element."""
        node = helper.make_node("Constant", [], [f"t{len(self.nodes)}_0"])
        node.attribute.append(helper.make_attribute_ref("value_int", AttributeProto.INT,
                                                        ref_attr_name=name))
        self.nodes.append(node)
        return self("Unsqueeze", node.output[0], self.ints(0))

    def dim(self, tensor: str, axis: int) -> str:
        return self("Shape", tensor, start=axis, end=axis + 1)

    def rows(self, tensor: str, stop: str) -> str:
        """``tensor[:stop]``."""
        return self("Slice", tensor, self.ints(0), stop, self.ints(0))

    def function(self, name: str, inputs, output: str, attributes, overload: str = "",
                 doc: str = "") -> onnx.FunctionProto:
        return helper.make_function(DOMAIN, name, list(inputs), [output], self.nodes,
                                    [helper.make_opsetid("", ONNX_OPSET)],
                                    attributes=list(attributes), doc_string=doc,
                                    overload=overload)


def _flatten_rows(f: _Body, x: str, features: str) -> str:
    """``x (..., k) -> (T, k)``."""
    return f("Reshape", x, f("Concat", f.ints(-1), features, axis=0))


def _unflatten_rows(f: _Body, y: str, x: str, features: str) -> str:
    """``y (T, m) -> (..., m)`` with the leading dims of ``x``."""
    return f("Reshape", y, f("Concat", f("Shape", x, start=0, end=-1), features, axis=0))


def blast_overload(b1: int, b2: int, bias: bool) -> str:
    return f"{b1}x{b2}" + ("_bias" if bias else "")


MIX_UNROLL = 4  # up to this many block-columns, stage 2 is one Mul per block and a Sum


def blast_function(b1: int, b2: int, bias: bool) -> onnx.FunctionProto:
    """``BlastLinear`` for the block grid ``(b1, b2)``: ``U (b1, p, r)``, ``S (b1, b2, r)``,
    ``V (b2, q, r)``; rows of ``W`` past ``out_features`` and columns past ``in_features`` are
    padding and never computed. With ``bias``, the last GEMM adds it (Gemm's C)."""
    f = _Body()
    n, m = f.attr("in_features"), f.attr("out_features")
    x2 = _flatten_rows(f, "x", n)                                            # (T, n)
    r = f.dim("V", 2)

    def gemm_t(a: str, b: str, lo=None, hi=None) -> str:  # a @ b.T + bias[lo:hi]
        c = []
        if bias:
            c = ["bias"] if lo is None else [f("Slice", "bias", lo, hi, f.ints(0))]
        return f("Gemm", a, b, *c, transB=1)

    if b1 == 1 or b2 == 1:
        # Rank r: W = A @ B.T with A (m, r), B (n, r); S scales A's rows of block i (b2 == 1)
        # or B's rows of block j (b1 == 1).
        U, V = "U", "V"
        if b2 == 1:
            U = f("Mul", "U", "S")                                           # S (b1, 1, r)
        else:
            V = f("Mul", "V", f("Transpose", "S", perm=[1, 0, 2]))          # S.T (b2, 1, r)
        flat = f("Concat", f.ints(-1), r, axis=0)
        A = f.rows(f("Reshape", U, flat), m)
        B = f.rows(f("Reshape", V, flat), n)
        y = gemm_t(f("MatMul", x2, B), A)
    else:
        p, q = f.dim("U", 1), f.dim("V", 1)
        last_in = f("Sub", n, f("Mul", q, f.ints(b2 - 1)))                   # width of block b2-1
        last_out = f("Sub", m, f("Mul", p, f.ints(b1 - 1)))
        chunks = f("Split", x2, f("Concat", *[q] * (b2 - 1), last_in, axis=0), axis=1,
                   outputs=b2)
        z = []
        for j in range(b2):                                                  # z[j] = x[j] @ V[j]
            Vj = f("Gather", "V", f.scalar(j), axis=0)
            z.append(f("MatMul", chunks[j], f.rows(Vj, last_in) if j == b2 - 1 else Vj))
        if b2 > MIX_UNROLL:
            zs = f("Reshape", f("Concat", *z, axis=1), f("Concat", f.ints(0, b2), r, axis=0))
        ys = []
        for i in range(b1):                      # y[i] = (sum_j S[i, j] * z[j]) @ U[i].T
            Si = f("Gather", "S", f.scalar(i), axis=0)                       # (b2, r)
            if b2 > MIX_UNROLL:
                w = f("ReduceSum", f("Mul", zs, Si), f.ints(1), keepdims=0)  # (T, r)
            else:
                w = f("Sum", *[f("Mul", z[j], f("Gather", Si, f.scalar(j), axis=0))
                               for j in range(b2)])
            Ui = f("Gather", "U", f.scalar(i), axis=0)
            Ui = f.rows(Ui, last_out) if i == b1 - 1 else Ui
            lo = f("Mul", p, f.ints(i))
            ys.append(gemm_t(w, Ui, lo, f("Add", lo, p)))
        y = f("Concat", *ys, axis=1)                                         # (T, m)
    inputs = ["x", "U", "S", "V"] + (["bias"] if bias else [])
    return f.function(BLAST, inputs, _unflatten_rows(f, y, "x", m), BLAST_ATTRS,
                      overload=blast_overload(b1, b2, bias),
                      doc=f"x @ W.T{' + bias' if bias else ''}, W the BLAST matrix of "
                          f"(U, S, V) on a {b1}x{b2} block grid")


def ss1_overload(bias: bool) -> str:
    return "bias" if bias else ""


def ss1_function(bias: bool) -> onnx.FunctionProto:
    """``SS1Linear``: ``x (..., K) @ W`` with ``W (K, N)`` read from ``P (N, K_red)``.

    Sketch, then one batched MatMul over the column blocks, computed transposed so that the
    gather copies whole rows: ``xs[j] = sum_u x_pad.T[index[u, j]]`` ``(n_blocks, K_red, T)``,
    ``y.T[block j] = P[block j] @ xs[j]``. ``x_pad`` is ``x`` zero-padded to ``c * K_red``
    features (the padded rows of W). The index map is ``ss1_hash``'s, rebuilt from P's shape
    and the attributes (``r0..r3 = ss1_hash.hash_coeffs(seed)``)."""
    f = _Body()
    K = f("Shape", "x", start=-1)
    N, K_red = f.dim("P", 0), f.dim("P", 1)
    c, bk, bn = f.attr("compression"), f.attr("block_k"), f.attr("block_n")
    zero, one = f.scalar(0), f.scalar(1)
    n_blocks = f("Div", f("Sub", f("Add", N, bn), one), bn)

    def arange(stop, axes):  # 0..stop-1 along one axis of a 3-D broadcast shape
        return f("Unsqueeze", f("Range", zero, f("Squeeze", stop), one), f.ints(*axes))

    u, j, col = arange(c, (1, 2)), arange(n_blocks, (0, 2)), arange(K_red, (0, 1))
    t, v = f("Div", col, bk), f("Mod", col, bk)
    R0, R1, R2, R3 = (f.attr(name) for name in ("r0", "r1", "r2", "r3"))
    h = f("Add", f("Add", R3, f("Mul", R2, j)),
          f("Add", f("Mul", R1, f("Add", t, one)), f("Mul", R0, f("Add", u, one))))
    s = f("Mod", f("Mul", f.scalar(ss1_hash.VEC), h), bk)                    # rotation
    index = f("Add", f("Mul", f("Add", f("Mul", t, c), u), bk),
              f("Mod", f("Add", v, s), bk))                                  # (c, n_blocks, K_red)

    x2 = _flatten_rows(f, "x", K)
    x2 = f("Pad", x2, f("Concat", f.ints(0, 0, 0), f("Sub", f("Mul", c, K_red), K), axis=0))
    xs = f("ReduceSum", f("Gather", f("Transpose", x2, perm=[1, 0]), index, axis=0),
           f.ints(0), keepdims=0)                                            # (n_blocks, K_red, T)
    Pb = f("Pad", "P", f("Concat", f.ints(0, 0), f("Sub", f("Mul", n_blocks, bn), N),
                         f.ints(0), axis=0))
    Pb = f("Reshape", Pb, f("Concat", n_blocks, bn, K_red, axis=0))         # (n_blocks, BN, K_red)
    T = f.dim(x2, 0)
    yt = f("Reshape", f("MatMul", Pb, xs), f("Concat", f.ints(-1), T, axis=0))
    y = f("Transpose", f.rows(yt, N), perm=[1, 0])                           # (T, N)
    if bias:
        y = f("Add", y, "bias")
    return f.function(SS1, ["x", "P"] + (["bias"] if bias else []),
                      _unflatten_rows(f, y, "x", N), SS1_ATTRS, overload=ss1_overload(bias),
                      doc=f"x @ W{' + bias' if bias else ''}, W read from P by the SS1 hash")


def function_proto(name: str, overload: str = "") -> onnx.FunctionProto:
    """The definition of ``ai.structfx`` op ``name`` (and overload) to append to a model."""
    grid, _, extra = overload.partition("_")
    if name == BLAST and extra in ("", "bias"):
        b1, b2 = (int(b) for b in grid.split("x"))
        return blast_function(b1, b2, bias=extra == "bias")
    if name == SS1 and overload in ("", "bias"):
        return ss1_function(bias=overload == "bias")
    raise ValueError(f"no ai.structfx function {name!r} (overload {overload!r})")


# ----------------------------------------------------------------------------- export
def _static(dim, what: str) -> int:
    if not isinstance(dim, int):
        raise ValueError(f"ONNX export of {what}: the feature axis must be static, got {dim}; "
                         f"leave the last axis out of dynamic_shapes")
    return dim


@functools.lru_cache(maxsize=None)
def _node(name: str):
    """An onnxscript op that records one opaque ``ai.structfx`` node during export (calling
    an onnxscript function instead would get its body inlined by the exporter). Built on
    first use: onnxscript takes half a second to import."""
    from onnx.defs import OpSchema
    from onnxscript.values import Op, Opset

    inputs, attributes = {BLAST: (["x", "U", "S", "V"], BLAST_ATTRS),
                          SS1: (["x", "P"], SS1_ATTRS)}[name]
    optional = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        name, DOMAIN, DOMAIN_VERSION,
        inputs=[OpSchema.FormalParameter(i, "T") for i in inputs]
        + [OpSchema.FormalParameter("bias", "T", param_option=optional)],
        outputs=[OpSchema.FormalParameter("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)",
                                 "tensor(double)"], "")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in attributes])
    return Op(Opset(DOMAIN, DOMAIN_VERSION), name, op_schema=schema)


def blast_linear_translation(x, U, S, V, bias, out_features: int):
    """``custom_translation_table`` entry for ``torch.ops.structfx.blast_linear``."""
    y = _node(BLAST)(x, U, S, V, bias, in_features=_static(x.shape[-1], "blast_linear"),
                     out_features=out_features)
    y.producer().overload = blast_overload(U.shape[0], V.shape[0], bias is not None)
    return y


def ss1_linear_translation(x, P, bias, compression: int, seed: int, block_k: int,
                           block_n: int):
    """``custom_translation_table`` entry for ``torch.ops.structfx.ss1_linear``."""
    r0, r1, r2, r3 = ss1_hash.hash_coeffs(seed)
    y = _node(SS1)(x, P, bias, compression=compression, block_k=block_k, block_n=block_n,
                   r0=r0, r1=r1, r2=r2, r3=r3)
    y.producer().overload = ss1_overload(bias is not None)
    return y
