"""A Llama-style decoder with Llama-7B layer sizes: prefill and decode throughput, dense vs
BLAST and SS1 at 50% of the linear parameters, all under torch.compile.

    python examples/llama_gpu.py                         # GPU: 4096 / 11008, 2 layers, bf16
    python examples/llama_gpu.py --layers 4 --mode reduce-overhead   # CUDA graphs for decode
    python examples/llama_gpu.py --device cpu            # CPU: scaled down (1024 / 2752), fp32

Weights are random and the layers are forced to exactly 50% (``force=True``, one rank / one
compression per structure) so the table compares like with like; the factorization runs only
a few steps, since speed does not depend on the factor values. lm_head stays dense unless
``--lm-head``. Throughputs are medians of 3 runs in one process.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
from tabulate import tabulate

import structfx
from common import generate

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32)
SCALED = dict(hidden_size=1024, intermediate_size=2752, num_attention_heads=8)


def llama(layers: int, sizes: dict, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32000, num_hidden_layers=layers,
                      num_key_value_heads=sizes["num_attention_heads"],
                      max_position_embeddings=4096, attn_implementation="sdpa", **sizes)
    return LlamaForCausalLM(cfg).eval()


def configs(lm_head: bool) -> dict[str, structfx.Config]:
    common = dict(params=0.5, force=True, steps=5, estimate_steps=1, min_params=0,
                  exclude=() if lm_head else ("lm_head",))
    return {
        "BLAST b=4": structfx.Config(structure="blast", blocks=(4,), rank_fractions=(0.5,),
                                     **common),
        "BLAST b=2": structfx.Config(structure="blast", blocks=(2,), rank_fractions=(0.5,),
                                     **common),
        "SS1 c=2": structfx.Config(structure="ss1", compressions=(2,), **common),
    }


def measure(model, prompt, new_tokens):
    runs = [generate(model, prompt, new_tokens) for _ in range(3)]
    prefill = sorted(r[1] for r in runs)[1]
    decode = sorted(r[2] for r in runs)[1]
    return prompt.numel() / prefill, decode


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on GPU, 2 on CPU")
    ap.add_argument("--prompt", type=int, default=None, help="default: 512 on GPU, 128 on CPU")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead")
    ap.add_argument("--only", nargs="*", default=None,
                    help="subset of: 'BLAST b=4' 'BLAST b=2' 'SS1 c=2'")
    ap.add_argument("--lm-head", action="store_true", help="compress lm_head too")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)

    gpu = args.device.startswith("cuda")
    sizes = LLAMA_7B if gpu else SCALED
    dtype = torch.bfloat16 if gpu else torch.float32
    batch = args.batch or (8 if gpu else 2)
    plen = args.prompt or (512 if gpu else 128)
    model = llama(args.layers, sizes).to(args.device, dtype)
    prompt = torch.randint(0, 32000, (batch, plen), device=args.device)
    name = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"Llama-style decoder, {args.layers} layers, hidden {sizes['hidden_size']}, "
          f"MLP {sizes['intermediate_size']}, {dtype} on {name}; batch {batch}, prompt {plen}, "
          f"{args.new_tokens} new tokens; torch.compile mode={args.mode}")

    rows = []
    torch._dynamo.reset()
    dense = torch.compile(model, mode=args.mode)
    generate(dense, prompt, 4)
    base = measure(dense, prompt, args.new_tokens)
    rows.append(("dense", f"{base[0]:.0f}", f"{base[1]:.1f}", "", ""))
    for label, cfg in configs(args.lm_head).items():
        if args.only and label not in args.only:
            continue
        torch._dynamo.reset()
        structfx.clear_reports()
        t0 = time.perf_counter()
        ours = torch.compile(model, backend=structfx.backend(cfg), mode=args.mode)
        generate(ours, prompt, 4)
        setup = time.perf_counter() - t0
        rep = structfx.reports()[0] if structfx.reports() else None
        pre, dec = measure(ours, prompt, args.new_tokens)
        rows.append((label, f"{pre:.0f}", f"{dec:.1f}", f"{pre / base[0]:.2f}x / {dec / base[1]:.2f}x",
                     f"{setup:.0f} s"))
        if rep:
            print(f"\n{label}: " + rep.totals().splitlines()[0])
    print()
    print(tabulate(rows, headers=["model", "prefill tokens/s", "decode tokens/s",
                                  "speedup prefill / decode", "compile + factorize"]))


if __name__ == "__main__":
    main()
