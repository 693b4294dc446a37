"""Shared by the example scripts: greedy generation with the KV cache, timed."""
from __future__ import annotations

import time

import torch


@torch.no_grad()
def generate(model, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float, float]:
    """Greedy decoding with the KV cache; returns (tokens, prefill seconds, decode tokens/s)."""
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync()
    t1 = time.perf_counter()
    tokens = [nxt]
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens.append(nxt)
    sync()
    t2 = time.perf_counter()
    return torch.cat(tokens, 1), t1 - t0, prompt.shape[0] * (new_tokens - 1) / (t2 - t1)
