"""GPT-2 (small config, random weights, built offline) under ``torch.compile(backend="structfx")``.

Prints the per-layer report and greedy-generation throughput (tokens/s) of the dense model and
of the structfx-compiled one, measured in the same process. Both use the KV cache, so prefill
(the prompt, many tokens per layer) and decode (one token per layer) are separate graphs, and
the cost model decides for each at its own token count.

    python examples/gpt2.py                      # 4 layers, CPU-sized
    python examples/gpt2.py --layers 12 --device cuda --dtype bfloat16

Random weights are the hard case for compression (nothing low-rank to find): read the report
for speed, examples/minilm.py for fidelity on real weights.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

import structfx
from common import generate


def gpt2_small(layers: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=768, n_layer=layers, n_head=12, n_positions=1024,
                     attn_implementation="eager")
    return GPT2LMHeadModel(cfg).eval()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128, help="prompt length")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--structure", default="blast", choices=["blast", "ss1", "lowrank", "auto"])
    ap.add_argument("--params", type=float, default=0.5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--force", action="store_true",
                    help="replace layers even where the cost model predicts a slowdown")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)

    dtype = getattr(torch, args.dtype)
    model = gpt2_small(args.layers).to(args.device, dtype)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt),
                           device=args.device)
    config = structfx.Config(structure=args.structure, params=args.params, force=args.force,
                             blocks=(2, 4, 8), rank_fractions=(0.375, 0.5, 0.625),
                             steps=60, estimate_steps=5, report=False)
    print(f"GPT-2 small config, {args.layers} layers, random weights, {args.dtype} on "
          f"{args.device}; batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens")

    torch._dynamo.reset()
    structfx.clear_reports()
    dense = torch.compile(model)
    ours = torch.compile(model, backend=structfx.backend(config))
    t0 = time.perf_counter()
    generate(ours, prompt, 3)            # compiles the prefill and the decode graphs
    print(f"structfx compile (prefill + decode graphs): {time.perf_counter() - t0:.1f} s")
    reports = structfx.reports()
    generate(dense, prompt, 3)

    for r in reports:
        print()
        print(r)
    rows = []
    results = {}
    for name, m in (("dense (inductor)", dense), ("structfx", ours)):
        runs = [generate(m, prompt, args.new_tokens) for _ in range(3)]
        prefill = sorted(r[1] for r in runs)[1]
        tps = sorted(r[2] for r in runs)[1]
        results[name] = (runs[0][0], prefill, tps)
        rows.append((name, f"{prefill * 1e3:.1f}", f"{tps:.1f}"))
    from tabulate import tabulate

    (d_tok, d_pre, d_tps), (s_tok, s_pre, s_tps) = results.values()
    rows.append(("ratio (structfx / dense)", f"{d_pre / s_pre:.2f}x faster",
                 f"{s_tps / d_tps:.2f}x"))
    print()
    print(tabulate(rows, headers=["model", "prefill ms", "decode tokens/s"]))
    same = (d_tok == s_tok).float().mean().item()
    print(f"\ngenerated tokens equal to dense: {same:.0%} (random weights: not a quality measure)")


if __name__ == "__main__":
    main()
