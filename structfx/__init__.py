"""structfx: replace dense Linear layers with BLAST / SS1 structured matrices.

    compiled = torch.compile(model, backend="structfx")          # rewrite + inductor
    model_s  = structfx.compress(model, example_inputs, config)   # eager, trainable factors
    structfx.export_onnx(model_s, example_inputs, "m.onnx")       # runs in plain onnxruntime
    print(structfx.last_report())                                 # per-layer table
    structfx.distill(model_s, model, calib_batches)               # recover fidelity
    structfx.save(model_s, "out/"); structfx.load(ModelClass, "out/")  # safetensors
"""
from .kernels import ops as _ops  # registers torch.ops.structfx.*
from .layers import BlastLinear, SS1Linear
from .config import Config
from .report import LayerDecision, Report, clear_reports, last_report, reports
from .passes.factorize_blast import factorize_blast
from .passes.project_ss1 import project_ss1
from .passes.store import FactorStore
from .inputs import Inputs
from .compress import compress
from .save import CheckpointError, from_pretrained, load, save
from .backend import backend
from .distillation import DistillConfig, DistillResult, distill

# Imported on first use: `import structfx` is also how torch.compile loads the backend (the
# torch_dynamo_backends entry point), and onnx / onnxscript cost ~0.7 s that compiling never needs.
_LAZY = {"export_onnx": "export", "onnx_session": "export"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["BlastLinear", "SS1Linear", "Config", "Report", "LayerDecision", "last_report",
           "reports", "clear_reports", "factorize_blast", "project_ss1", "compress", "backend",
           "export_onnx", "onnx_session", "distill", "DistillConfig", "DistillResult",
           "FactorStore", "Inputs", "save", "load", "from_pretrained", "CheckpointError"]
