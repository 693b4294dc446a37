"""A sentence-transformers ``Transformer`` module whose model is a structfx checkpoint.

``structfx compress`` on a sentence-transformers folder writes ``modules.json`` with this class
as module 0, so the output folder loads with
``SentenceTransformer(folder, trust_remote_code=True)`` (sentence-transformers asks for
``trust_remote_code`` before importing any module class outside its own package; the class
imported is this one, from the installed structfx). Loading goes through ``structfx.load``:
the structured layers are rebuilt from ``structfx.json`` and ``model.safetensors``.
"""
from __future__ import annotations

try:  # sentence-transformers >= 6
    from sentence_transformers.base.modules.transformer import Transformer as _Transformer
except ImportError:  # older releases
    from sentence_transformers.models import Transformer as _Transformer

CLASS_REF = "structfx.st_module.Transformer"


class Transformer(_Transformer):
    def _load_model(self, model_name_or_path, transformer_task, config, backend,
                    is_peft_model, **model_kwargs):
        from .save import load

        if backend != "torch":
            raise ValueError(f"structfx checkpoints load with backend='torch', not {backend!r}")
        from transformers import AutoModel

        return load(AutoModel, model_name_or_path)

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        from .save import save

        save(self.model, output_path)
        self.processor.save_pretrained(output_path)
        self.save_config(output_path)
