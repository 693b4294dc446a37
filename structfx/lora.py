"""LoRA (PEFT) on a compressed model, the structured layers included.

PEFT wraps ``nn.Linear`` and Hugging Face ``Conv1D`` by itself, so LoRA on the layers
``structfx.compress`` kept dense needs nothing from structfx. PEFT does not know
``BlastLinear`` / ``SS1Linear`` (a plain ``LoraConfig`` that targets one raises PEFT's
"Target module BlastLinear(...) is not supported"); :func:`register` adds structfx's LoRA
layer for both to a ``LoraConfig``::

    from peft import LoraConfig, get_peft_model
    config = structfx.lora.register(LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    peft_model = get_peft_model(small, config)

The adapter adds ``scale * B(A(dropout(x)))`` to the structured layer's output, as PEFT's own
LoRA does for ``nn.Linear``. ``merge_and_unload()`` merges it exactly into a ``BlastLinear``:
``B @ A`` in BLAST form is rank ``r`` in every block, so the layer's rank grows by ``r``
(``BlastLinear.add_low_rank_``) and it stays a ``BlastLinear`` that ``structfx.save`` can
save. An ``SS1Linear`` shares each parameter among ``compression`` weights and can't hold the
update: merging raises and names the layer (keep the PEFT model, or ``unload()`` to drop the
adapter). Plain LoRA only: DoRA and the initializations that read the dense base weight
(PiSSA, OLoRA, LoftQ, ...) raise, naming the layer.
"""
from __future__ import annotations

from typing import Optional

import torch

from .layers import BlastLinear, SS1Linear

try:
    from peft.tuners.lora.layer import Linear as _PeftLoraLinear
    from peft.tuners.tuners_utils import check_adapters_to_merge
except ImportError as e:  # pragma: no cover - exercised only without peft
    raise ImportError("structfx.lora needs peft (pip install 'structfx[clients]')") from e

_INITS = (True, False, "gaussian")


def register(config):
    """Add structfx's LoRA layer for ``BlastLinear`` and ``SS1Linear`` to the PEFT
    ``LoraConfig`` ``config`` (PEFT's custom-module mapping); returns ``config``. Needed again
    for a config read back from a saved adapter (``LoraConfig.from_pretrained``), before
    ``PeftModel.from_pretrained(model, folder, config=config)``."""
    register_custom = getattr(config, "_register_custom_module", None)
    if register_custom is None:
        raise TypeError(f"structfx.lora.register: expected a peft LoraConfig, got "
                        f"{type(config).__name__} (LoRA is the PEFT method structfx supports "
                        f"on its structured layers)")
    register_custom({BlastLinear: StructuredLoraLinear, SS1Linear: StructuredLoraLinear})
    return config


class StructuredLoraLinear(_PeftLoraLinear):
    """PEFT's LoRA layer around a ``BlastLinear`` / ``SS1Linear``: the same forward as PEFT's
    ``lora.Linear`` (base output plus ``scale * B(A(dropout(x)))``); merging goes into the
    BLAST factors (exact, rank + r) instead of a dense weight."""

    def __init__(self, base_layer, adapter_name: str, config, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.fan_in_fan_out = False  # the structured layers compute x @ W.T, like nn.Linear
        self._merged_ranks: list[int] = []

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs) -> None:
        # also the path of a second adapter added to this layer (PEFT calls update_layer)
        init = config.init_lora_weights
        if not any(init is ok or (isinstance(ok, str) and init == ok) for ok in _INITS):
            raise ValueError(f"structfx.lora: layer {self._where()!r} "
                             f"({type(self.get_base_layer()).__name__}): init_lora_weights="
                             f"{init!r} reads the dense base weight, which a structured layer "
                             f"does not have; use True, False or 'gaussian'")
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module):
        # PEFT's generic lookup warns "Unsupported layer type" for layers it doesn't know
        return module.in_features, module.out_features

    @property
    def lora_variants(self):
        return {(): None}

    def resolve_lora_variant(self, *, config, **kwargs):
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as e:
            raise ValueError(f"structfx.lora: layer {self._where()!r} "
                             f"({type(self.get_base_layer()).__name__}): only plain LoRA is "
                             f"supported on structured layers, not a LoRA variant such as DoRA "
                             f"(PEFT: {e})") from None

    def _where(self) -> str:
        return self.kwargs.get("target_name") or type(self.get_base_layer()).__name__

    def get_delta_weight(self, adapter) -> torch.Tensor:
        """The ``(out_features, in_features)`` update ``scale * B @ A`` of ``adapter``."""
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return (B.float() @ A.float() * self.scaling[adapter]).to(B.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            if not isinstance(base, BlastLinear):
                raise ValueError(
                    f"structfx.lora: can't merge adapter {name!r} into layer {self._where()!r} "
                    f"({type(base).__name__}): SS1 shares each parameter among several weights "
                    f"and can't hold a low-rank update; keep the PEFT model (the adapter runs "
                    f"beside the layer) or call unload() to drop it")
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            scale = self.scaling[name]
            bias = None
            if self.lora_bias[name]:
                if base.bias is None:
                    raise RuntimeError(f"structfx.lora: can't merge adapter {name!r} with "
                                       f"lora_bias=True into {self._where()!r}: the layer has "
                                       f"no bias")
                bias = base.bias + self.lora_B[name].bias * scale
            if safe_merge and not (torch.isfinite(A).all() and torch.isfinite(B).all() and (
                    bias is None or torch.isfinite(bias).all())):
                raise ValueError(f"structfx.lora: NaN / inf in adapter {name!r} of "
                                 f"{self._where()!r}; not merged")
            base.add_low_rank_(B, A, scale)
            if bias is not None:
                with torch.no_grad():
                    base.bias.copy_(bias)
            self._merged_ranks.append(A.shape[0])
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            k = self._merged_ranks.pop()
            base.truncate_rank_(base.rank - k)
            if self.lora_bias[name]:
                with torch.no_grad():
                    base.bias.sub_(self.lora_B[name].bias * self.scaling[name])

    def __repr__(self) -> str:
        return "structfx." + super().__repr__()
