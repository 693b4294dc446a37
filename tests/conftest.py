import os

# Triton kernels run on CPU tensors through the interpreter; it must be set before triton
# is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_structfx_state():
    """Every test starts with an empty string-backend store and no reports."""
    yield
    import sys

    if "structfx" in sys.modules:
        import importlib

        # The modules, not the package's attributes: ``structfx.backend`` is also the name of
        # the backend function the package exports, which shadows the module.
        importlib.import_module("structfx.backend").DEFAULT_STORE.clear()
        importlib.import_module("structfx.report").clear_reports()


# ----------------------------------------------------------------------------- shared helpers
# Plain functions the test files import (``from conftest import mlp, rel``): each file still
# says which sizes it builds, and the builders are written once.
def rel(a, b) -> float:
    """Relative Frobenius error ``||a - b|| / ||b||`` in float64 (``b`` the reference)."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def snapshot(model) -> dict:
    """A copy of ``model``'s state, to check later that nothing changed it."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before: dict, *, types=None, training=None) -> None:
    """``model``'s state equals ``before`` (a ``snapshot``) bit for bit; with ``types`` (the
    list of its module types taken with the snapshot), no module was swapped; with
    ``training`` (a bool), it is in that mode and no parameter holds a gradient."""
    import torch

    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    if types is not None:
        assert [type(m) for m in model.modules()] == types
    if training is not None:
        assert all(p.grad is None for p in model.parameters())
        assert model.training == training


def mlp(*widths: int, seed: int = 0, act=None):
    """``Linear(widths[0], widths[1]), act, Linear(widths[1], widths[2]), ...`` (no activation
    after the last), seeded, in eval mode. ``act``: the activation class (GELU)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    act = act or nn.GELU
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Linear(a, b)] + ([act()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers).eval()


def tiny_bert(vocab: int = 100, hidden: int = 128, layers: int = 2, intermediate: int = 256,
              positions: int = 64):
    """A seeded random-weight ``BertModel`` (2 heads, eager attention, no pooler), eval mode."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=2, intermediate_size=intermediate,
                                  max_position_embeddings=positions, attn_implementation="eager")
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def tiny_gpt2(vocab: int = 100, hidden: int = 128, lm_head: bool = True):
    """A seeded random-weight GPT-2 (2 layers, 2 heads, no cache, eager attention), eval mode:
    ``GPT2LMHeadModel``, or ``GPT2Model`` without ``lm_head``."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=2,
                                  n_positions=64, use_cache=False, attn_implementation="eager")
    return (transformers.GPT2LMHeadModel if lm_head else transformers.GPT2Model)(cfg).eval()


def generating_gpt2():
    """A seeded random-weight ``GPT2LMHeadModel`` as users load it (stock ``use_cache=True``,
    token ids 0 for bos / eos / pad, so ``.generate()`` runs), eval mode."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def generating_llama():
    """The same for ``LlamaForCausalLM`` (2 layers, grouped-query attention)."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def run_in_threads(work, n: int = 2) -> list:
    """Run ``work(k)`` for k in range(n) in n threads at once; return the exceptions raised."""
    import threading

    errors = []

    def guarded(k):
        try:
            work(k)
        except Exception as e:  # noqa: BLE001 - the caller asserts there are none
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
