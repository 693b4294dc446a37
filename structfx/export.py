"""``structfx.export_onnx`` and ``structfx.onnx_session``: structured models in ONNX.

Every ``structfx::blast_linear`` / ``structfx::ss1_linear`` call becomes one node of the custom
domain ``ai.structfx`` (opset version 1); the model also carries the definitions of those ops as
ONNX functions made of standard ops (``kernels/onnx_functions.py``). The file holds the factors
(``U, S, V`` / ``P``), never a dense weight, and stock onnxruntime runs it with no plugin: it
expands model-local functions when it loads the model. A runtime with its own kernel for
``ai.structfx`` can use that instead of the function body.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.export import Dim

from .compress import capture_lock, compress
from .config import Config
from .inputs import dynamic_shapes as _dynamic_shapes, normalize, prepare
from .kernels import onnx_functions
from .layers import BlastLinear, SS1Linear

TRANSLATIONS = {
    torch.ops.structfx.blast_linear.default: onnx_functions.blast_linear_translation,
    torch.ops.structfx.ss1_linear.default: onnx_functions.ss1_linear_translation,
}


def is_structured(model: nn.Module) -> bool:
    """Whether ``model`` holds structfx layers (i.e. was compressed already)."""
    return any(isinstance(m, (BlastLinear, SS1Linear)) for m in model.modules())


def default_dynamic_shapes(args: tuple) -> tuple:
    """``Dim.AUTO`` on every axis of every tensor input except the feature axis (the last) of
    floating-point inputs: batch and sequence axes vary, layer widths do not. ``torch.export``
    keeps an axis static where the model needs it to be."""
    def dims(a):
        if not isinstance(a, torch.Tensor):
            return None
        n = a.dim() - 1 if a.is_floating_point() else a.dim()
        return {i: Dim.AUTO for i in range(n)}
    return tuple(dims(a) for a in args)


def _check_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"export_onnx: path must be a file path (str or os.PathLike), "
                        f"got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"export_onnx: {str(path)!r} is a directory; give a file path "
                                f"such as {str(path / 'model.onnx')!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"export_onnx: directory {str(path.parent)!r} does not exist; "
                                f"create it first")
    return path


def _add_functions(onnx_program) -> None:
    """Append the definitions of the ``ai.structfx`` ops (and overloads) the graph uses.

    The exporter inlines the onnxscript functions it is given, which is why the translations
    emit opaque nodes and the bodies are attached here, after export."""
    import onnx_ir as ir

    model = onnx_program.model
    used = {(node.op_type, node.overload)
            for node in ir.traversal.RecursiveGraphIterator(model.graph)
            if node.domain == onnx_functions.DOMAIN}
    opset = model.opset_imports.get("", onnx_functions.ONNX_OPSET)
    if used and opset != onnx_functions.ONNX_OPSET:
        raise RuntimeError(f"export_onnx: the exporter wrote opset {opset}, but the ai.structfx "
                           f"function bodies use opset {onnx_functions.ONNX_OPSET}")
    for name, overload in sorted(used):
        fn = ir.serde.deserialize_function(onnx_functions.function_proto(name, overload))
        model.functions[fn.identifier()] = fn
    if used:
        model.opset_imports[onnx_functions.DOMAIN] = onnx_functions.DOMAIN_VERSION


def export_program(model: nn.Module, args: Any, path: Optional[Path],
                   dynamic_shapes=None, external_data: bool = True):
    """``torch.onnx.export(dynamo=True)`` with the ``ai.structfx`` translations and functions
    (a dense model exports as usual). ``args``: the inputs as ``compress`` takes them (a
    tuple of positional inputs, a tensor, a dict of keyword inputs, ``Inputs``); Hugging Face
    models are exported with ``use_cache=False``. Returns the ``torch.onnx.ONNXProgram``;
    saves it to ``path`` unless that is None."""
    inp = prepare(args, model)
    if dynamic_shapes is None:
        dynamic_shapes = (default_dynamic_shapes(inp.args) if not inp.kwargs
                          else _dynamic_shapes(model, inp))
    with capture_lock():
        program = torch.onnx.export(model, inp.args, kwargs=inp.kwargs or None, dynamo=True,
                                    dynamic_shapes=dynamic_shapes,
                                    custom_translation_table=TRANSLATIONS,
                                    opset_version=onnx_functions.ONNX_OPSET, verbose=False)
    _add_functions(program)
    if path is not None:
        program.save(path, external_data=external_data)
    return program


def export_onnx(model: nn.Module, example_inputs: Any, path, config: Optional[Config] = None,
                dynamic_shapes=None, *, external_data: bool = True) -> Path:
    """Export ``model`` to ONNX at ``path`` with its structured layers as ``ai.structfx`` ops.

    ``model``: a dense model (compressed first with ``config``, default ``Config()``, exactly
    as ``structfx.compress`` does) or an already compressed one (it holds ``BlastLinear`` /
    ``SS1Linear`` modules; then ``config`` must be None). ``example_inputs``: a tensor, a
    tuple of positional inputs, a dict / ``BatchEncoding`` of keyword inputs (the ONNX inputs
    then take their names), or ``structfx.Inputs``. ``dynamic_shapes``: as in ``torch.export``; by default every
    axis of every input may vary except the feature axis of floating-point inputs (sizes of 1
    included). ``external_data``: weights in ``path + ".data"`` beside the model (the
    exporter's default) or inside the ``.onnx`` file.

    The user's model is left untouched. Returns ``path``. Run the file with
    ``structfx.onnx_session(path)`` or any onnxruntime ``InferenceSession``."""
    path = _check_path(path)
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx: model must be an nn.Module, got {type(model).__name__}")
    args = normalize(example_inputs, model, check=False)
    if is_structured(model):
        if config is not None:
            raise ValueError("export_onnx: the model is already compressed (it holds "
                             "BlastLinear/SS1Linear layers); pass config=None to export it as "
                             "it is, or pass the dense model to compress it with config")
        small = model
    else:
        # compress() captures in the model's mode; the copy it returns is ours to put in eval.
        small = compress(model, args, config or Config()).eval()
        if not is_structured(small):
            warnings.warn("export_onnx: the config replaced no layer (structfx.last_report() "
                          "says why); exporting the dense model", stacklevel=2)
    export_program(small, args, path, dynamic_shapes, external_data)
    return path


def onnx_session(path, providers: Optional[Sequence] = None, sess_options=None, *,
                 verbose: bool = True):
    """An ``onnxruntime.InferenceSession`` for ``path`` on the best execution provider here.

    ``providers`` None: CUDA (``CUDAExecutionProvider``, then CPU as fallback) when
    onnxruntime-gpu is installed and a GPU is present, else CPU. The provider that runs the
    model is in ``session.structfx_provider``, and printed as one line unless ``verbose=False``.
    """
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FileNotFoundError(f"onnx_session: no model file at {str(path)!r}")
    if providers is None:
        available = ort.get_available_providers()
        gpu = torch.cuda.is_available() and "CUDAExecutionProvider" in available
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu
                     else ["CPUExecutionProvider"])
    session = ort.InferenceSession(str(path), sess_options=sess_options,
                                   providers=list(providers))
    session.structfx_provider = session.get_providers()[0]
    if verbose:
        print(f"structfx: onnxruntime {ort.__version__} runs {Path(path).name} on "
              f"{session.structfx_provider}")
    return session


def ort_session(path: str, threads: Optional[int], providers: Optional[list] = None):
    """``structfx.onnx_session`` with ``threads`` intra-op threads (None: onnxruntime's
    default), quiet; ``providers`` as for ``onnx_session`` (None: the best one here)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnx_session(path, providers=providers, sess_options=options, verbose=False)
