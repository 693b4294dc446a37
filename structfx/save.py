"""``structfx.save`` / ``structfx.load`` / ``structfx.from_pretrained``: compressed checkpoints.

A saved folder holds (safetensors and JSON only, never pickle):

  * ``model.safetensors``: every tensor of the model's ``state_dict``, the structured factors
    (``U, S, V`` / ``P``, bias, SS1's ``hash_seed``) and the dense weights that were kept;
    each shared tensor once (tied weights: the ties are in ``structfx.json``);
  * ``structfx.json``: the format and structfx versions, the model class, and per structured
    module path its structure, blocks / rank or compression / seed / block sizes, dtype,
    in / out features, bias, and the class of the layer it replaced;
  * for Hugging Face models ``config.json`` (and ``generation_config.json``), and the tokenizer
    when given, so the folder reads like a checkpoint.

``load`` builds the architecture with its parameters on the ``meta`` device (no dense weight
is materialized: the tensors come straight from the file), swaps in the structured modules
and fills every parameter from the file: no factorization, bit-identical outputs. Everything in
``structfx.json`` and every tensor's shape and dtype are checked against the architecture; a
mismatch is a ``CheckpointError`` naming the module and what is wrong.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import fx, nn

from . import swap
from .layers import BlastLinear, SS1Linear
from .kernels import ss1_hash

FORMAT = "structfx"
FORMAT_VERSION = 1
TENSORS = "model.safetensors"
META = "structfx.json"


class CheckpointError(ValueError):
    """A saved folder that does not match what it claims or what it is loaded into."""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("structfx")
    except Exception:  # noqa: BLE001
        return "unknown"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: Any, where: str) -> torch.dtype:
    d = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise CheckpointError(f"{where}: dtype {name!r} is not a floating-point torch dtype")
    return d


# ----------------------------------------------------------------------------- save
def _layer_record(module: nn.Module, replaced: str) -> dict:
    rec = {"in_features": module.in_features, "out_features": module.out_features,
           "bias": module.bias is not None, "dtype": _dtype_name(_param_dtype(module)),
           "replaced": replaced}
    if isinstance(module, BlastLinear):
        rec.update(structure="blast", blocks=list(module.blocks), rank=module.rank)
    else:
        rec.update(structure="ss1", compression=module.compression, seed=module.seed,
                   block_k=module.block_k, block_n=module.block_n)
    return rec


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _ties(model: nn.Module) -> dict[str, str]:
    """``alias -> first name`` for state-dict entries that are the same tensor."""
    first: dict[int, str] = {}
    ties = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t is None:
            continue
        key = id(t)
        if key in first:
            ties[name] = first[key]
        else:
            first[key] = name
    return ties


def save(model: nn.Module, path, tokenizer=None, *, report=None) -> Path:
    """Save a model ``structfx.compress`` returned (or one ``load`` gave) into the folder
    ``path`` (created if needed): ``model.safetensors`` + ``structfx.json``, for Hugging Face
    models also ``config.json`` / ``generation_config.json``, ``tokenizer`` (anything with
    ``save_pretrained``) if given, and ``report`` (a ``structfx.Report``; default the model's
    own ``structfx_report``) as ``report.json`` / ``report.md``. Returns the folder.

    The rewritten ``GraphModule`` (compress's fallback for layers it can't swap) has no class
    to rebuild it from: save it with ``torch.export`` instead."""
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"structfx.save: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        raise TypeError("structfx.save: this is a GraphModule (compress returned the rewritten "
                        "graph, see its report's notes), which has no class to rebuild it "
                        "from; save it with torch.export.save(torch.export.export(gm, args), "
                        "file), or compress with output='model' where possible")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"structfx.save: {str(path)!r} is a file; give a folder")
    path.mkdir(parents=True, exist_ok=True)

    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, (BlastLinear, SS1Linear)):
            replaced = getattr(m, "_structfx_replaced", "Linear")
            layers[name] = _layer_record(m, replaced)
    ties = _ties(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if k not in ties and v is not None}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "structfx_version": _version(),
            "torch_version": torch.__version__,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "hf": _is_hf(model), "layers": layers, "tied": ties}
    tmp = path / f".{TENSORS}.{os.getpid()}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "structfx_format": str(FORMAT_VERSION)})
    os.replace(tmp, path / TENSORS)
    (path / META).write_text(json.dumps(meta, indent=1))
    if _is_hf(model):
        model.config.save_pretrained(path)
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(model, "can_generate", lambda: False)():
            gen.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    report = report if report is not None else getattr(model, "structfx_report", None)
    if report is not None:
        report.save(path)
    return path


def _is_hf(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "save_pretrained")


# ----------------------------------------------------------------------------- load
@contextlib.contextmanager
def empty_parameters():
    """Every parameter registered inside this block lives on the ``meta`` device (buffers and
    plain tensor attributes stay real: non-persistent buffers such as position ids or rotary
    frequencies are computed as usual). A layer's weight is allocated only until it is
    registered, so building a model holds at most one dense weight at a time."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        original(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _read_meta(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"structfx.load: no folder at {str(path)!r}")
    f = path / META
    if not f.is_file():
        raise CheckpointError(f"structfx.load: {str(path)!r} has no {META}; it was not "
                              f"written by structfx.save")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"structfx.load: {f}: invalid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"structfx.load: {f}: not a structfx checkpoint (no "
                              f"\"format\": \"{FORMAT}\")")
    v = meta.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION or v < 1:
        raise CheckpointError(f"structfx.load: {f}: format_version {v!r} is not one this "
                              f"structfx ({_version()}) reads (1..{FORMAT_VERSION}); it was "
                              f"written by structfx {meta.get('structfx_version')!r}")
    if not isinstance(meta.get("layers"), dict) or not isinstance(meta.get("tied", {}), dict):
        raise CheckpointError(f"structfx.load: {f}: 'layers' and 'tied' must be objects")
    if not (path / TENSORS).is_file():
        raise CheckpointError(f"structfx.load: {str(path)!r} has no {TENSORS}")
    return meta


def _int(rec: dict, key: str, where: str, low: int = 1) -> int:
    v = rec.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise CheckpointError(f"{where}: {key!r} must be an integer >= {low}, got {v!r}")
    return v


def _build_layer(rec: Any, where: str) -> nn.Module:
    """The (meta-device) structured module ``rec`` describes; errors name ``where``."""
    if not isinstance(rec, dict):
        raise CheckpointError(f"{where}: expected an object, got {type(rec).__name__}")
    n, m = _int(rec, "in_features", where), _int(rec, "out_features", where)
    bias = rec.get("bias")
    if not isinstance(bias, bool):
        raise CheckpointError(f"{where}: 'bias' must be true or false, got {bias!r}")
    dtype = _dtype(rec.get("dtype"), where)
    kw = dict(bias=bias, device="meta", dtype=dtype)
    structure = rec.get("structure")
    try:
        if structure == "blast":
            blocks = rec.get("blocks")
            if not (isinstance(blocks, list) and len(blocks) == 2
                    and all(isinstance(b, int) and not isinstance(b, bool) for b in blocks)):
                raise CheckpointError(f"{where}: 'blocks' must be [b1, b2], got {blocks!r}")
            return BlastLinear(n, m, tuple(blocks), _int(rec, "rank", where), **kw)
        if structure == "ss1":
            layer = SS1Linear(n, m, _int(rec, "compression", where),
                              _int(rec, "seed", where, low=0),
                              block_k=_int(rec, "block_k", where),
                              block_n=_int(rec, "block_n", where), **kw)
            return layer
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    raise CheckpointError(f"{where}: unknown structure {structure!r} (known: 'blast', 'ss1')")


def _check_host(model: nn.Module, name: str, rec: dict, where: str) -> None:
    """The architecture's module at ``name`` is a linear layer of the recorded size (or the
    same structured layer, when loading into an already compressed model)."""
    try:
        host = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{where}: {type(model).__name__} has no module {name!r}; the "
                              f"checkpoint is for another architecture") from None
    if isinstance(host, (BlastLinear, SS1Linear)):
        n, m = host.in_features, host.out_features
    elif swap.is_hf_conv1d(host):
        n, m = host.weight.shape
    elif isinstance(host, nn.Linear):
        n, m = host.in_features, host.out_features
    else:
        raise CheckpointError(f"{where}: the architecture's {name!r} is a "
                              f"{type(host).__name__}, not a linear layer")
    if (n, m) != (rec["in_features"], rec["out_features"]):
        raise CheckpointError(f"{where}: the architecture's {name!r} maps {n} -> {m} "
                              f"features, the checkpoint's layer {rec['in_features']} -> "
                              f"{rec['out_features']}")


def _slots(model: nn.Module):
    """``(module, kind, key, qualified name, tensor)`` for every parameter and buffer slot,
    aliases included."""
    for prefix, mod in model.named_modules(remove_duplicate=False):
        for kind, slots in (("param", mod._parameters), ("buffer", mod._buffers)):
            for key, t in slots.items():
                if t is not None:
                    yield mod, slots, key, f"{prefix}.{key}" if prefix else key, t


def _fill(model: nn.Module, path: Path, meta: dict, device: torch.device) -> None:
    """Put every tensor of the file into the model's slots, ties kept, shapes / dtypes
    checked; every meta tensor of the model must get one."""
    from safetensors import SafetensorError, safe_open

    file = path / TENSORS
    ties = meta.get("tied", {})
    persistent = set(model.state_dict(keep_vars=True))
    try:
        handle = safe_open(str(file), framework="pt", device=str(device))
    except (SafetensorError, OSError, Exception) as e:  # noqa: BLE001
        raise CheckpointError(f"structfx.load: {file}: not a readable safetensors file "
                              f"({e})") from None
    with handle as f:
        keys = set(f.keys())
        want = {n for n in persistent if n not in ties}
        missing = sorted(want - keys)
        extra = sorted(keys - persistent)
        if missing:
            raise CheckpointError(f"structfx.load: {file} lacks {len(missing)} tensor(s) "
                                  f"the model needs, e.g. {missing[0]!r}")
        if extra:
            raise CheckpointError(f"structfx.load: {file} holds {len(extra)} tensor(s) the "
                                  f"model has no place for, e.g. {extra[0]!r}")
        bad_ties = [(a, b) for a, b in ties.items() if a not in persistent or b not in keys]
        if bad_ties:
            raise CheckpointError(f"structfx.load: {META}: tie {bad_ties[0][0]!r} -> "
                                  f"{bad_ties[0][1]!r} names a tensor that is not there")
        new: dict[int, torch.Tensor] = {}      # architecture tensor -> its value
        by_name: dict[str, torch.Tensor] = {}  # file tensor -> its value (ties share it)
        for mod, slots, key, qual, t in list(_slots(model)):
            if qual not in persistent:
                if t.device.type == "meta":
                    raise CheckpointError(f"structfx.load: {qual!r} is not saved and was "
                                          f"not built by the architecture")
                continue
            src = ties.get(qual, qual)
            if id(t) in new or src in by_name:
                slots[key] = new.get(id(t), by_name.get(src))
                continue
            value = f.get_tensor(src)
            module = qual.rsplit(".", 1)[0] if "." in qual else "<root>"
            if tuple(value.shape) != tuple(t.shape):
                raise CheckpointError(f"structfx.load: module {module!r}: tensor {src!r} has "
                                      f"shape {tuple(value.shape)} in the file, the model "
                                      f"needs {tuple(t.shape)}")
            if value.dtype.is_floating_point != t.dtype.is_floating_point or (
                    not t.dtype.is_floating_point and value.dtype != t.dtype):
                raise CheckpointError(f"structfx.load: module {module!r}: tensor {src!r} is "
                                      f"{value.dtype} in the file, the model needs {t.dtype}")
            if isinstance(t, nn.Parameter):
                value = nn.Parameter(value, requires_grad=t.requires_grad)
            new[id(t)] = by_name[src] = slots[key] = value


def _architecture(model_or_class: Any, path: Path, meta: dict, **kwargs) -> nn.Module:
    if isinstance(model_or_class, nn.Module):
        return model_or_class
    if not callable(model_or_class):
        raise TypeError(f"structfx.load: expected a model, a model class or a factory, got "
                        f"{type(model_or_class).__name__}")
    with empty_parameters():
        if _is_hf_class(model_or_class):
            if not (path / "config.json").is_file():
                raise CheckpointError(f"structfx.load: {str(path)!r} has no config.json to "
                                      f"build {model_or_class.__name__} from")
            config = _hf_config(model_or_class, path)
            build = getattr(model_or_class, "from_config", None) or model_or_class._from_config
            return build(config, **kwargs)
        return model_or_class(**kwargs)


def _is_hf_class(cls) -> bool:
    """An Auto class (``from_config``) or a ``PreTrainedModel`` subclass (``_from_config``)."""
    return isinstance(cls, type) and (hasattr(cls, "from_config") or (
        hasattr(cls, "_from_config") and hasattr(cls, "config_class")))


def _hf_config(cls, path: Path):
    config_class = getattr(cls, "config_class", None)
    if config_class is None or not hasattr(config_class, "from_pretrained"):
        from transformers import AutoConfig

        config_class = AutoConfig
    return config_class.from_pretrained(str(path), local_files_only=True)


def load(model_or_class: Any, path, *, device="cpu", **kwargs) -> nn.Module:
    """A model saved by ``structfx.save``. ``model_or_class``: a Hugging Face class (an Auto
    class or a model class: built from the folder's ``config.json``), any other model class or
    factory (called with ``kwargs``), or a model instance (filled in place: its replaced layers
    swapped, every tensor overwritten). The architecture is built with its parameters on the
    ``meta`` device, so no dense weight is materialized; the structured modules are built from
    ``structfx.json`` and every tensor comes from ``model.safetensors`` (no factorization):
    the outputs are bit-identical to the saved model's. Returns the model in eval mode."""
    path = Path(path)
    meta = _read_meta(path)
    device = torch.device(device)
    model = _architecture(model_or_class, path, meta, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"structfx.load: {model_or_class!r} built a {type(model).__name__}, "
                        f"not an nn.Module")
    for name, rec in meta["layers"].items():
        where = f"structfx.load: {path / META}: layer {name!r}"
        layer = _build_layer(rec, where)
        _check_host(model, name, rec, where)
        layer._structfx_replaced = rec.get("replaced", "Linear")
        old = model.get_submodule(name)
        for parent, key in swap._parents(model, old):
            parent._modules[key] = layer
    _fill(model, path, meta, device)
    for name, m in model.named_modules():  # SS1's seed attribute follows its saved buffer
        if isinstance(m, SS1Linear):
            m.seed = int(m.hash_seed)
            rec = meta["layers"].get(name)
            if rec is not None and m.seed != rec["seed"]:
                raise CheckpointError(f"structfx.load: layer {name!r}: hash_seed {m.seed} in "
                                      f"{TENSORS}, seed {rec['seed']} in {META}")
    leftover = [q for _, _, _, q, t in _slots(model) if t.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"structfx.load: {len(leftover)} tensor(s) got no value, e.g. "
                              f"{leftover[0]!r}")
    if not isinstance(model_or_class, nn.Module):
        model.to(device)
    return model.eval()


def from_pretrained(cls, path, **kwargs) -> nn.Module:
    """``structfx.load`` for Hugging Face classes: ``structfx.from_pretrained(
    AutoModelForCausalLM, folder)`` (the counterpart of ``cls.from_pretrained`` for a folder
    ``structfx.save`` wrote)."""
    if not _is_hf_class(cls):
        raise TypeError(f"structfx.from_pretrained: {cls!r} is not a Hugging Face model class "
                        f"(it has no from_config / _from_config); use structfx.load")
    return load(cls, path, **kwargs)
