"""``python -m structfx demo``: compress and compile a small transformer, print the report.

The default model is a 4-layer BERT (hidden 512) built offline from a transformers config with
random weights (no download); the candidate grid is trimmed (blocks 2 and 4, three ranks) so
the whole demo runs in about a minute on two CPU cores. Random weights are the hard case for compression (no structure
to find), so the errors shown are an upper bound; examples/minilm.py runs real weights.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch


def small_bert(hidden: int = 256, layers: int = 4, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=4 * hidden,
                     max_position_embeddings=128, attn_implementation="eager")
    return BertModel(cfg, add_pooling_layer=False).eval()


def demo(args) -> None:
    import structfx
    from structfx.timing import median_time

    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    model = small_bert(args.hidden, args.layers)
    ids = torch.randint(0, 1000, (args.batch, args.seq))
    config = structfx.Config(structure=args.structure, params=args.params,
                             min_params=args.min_params, blocks=(2, 4),
                             rank_fractions=(0.375, 0.5, 0.625), compressions=(2, 3, 4),
                             steps=args.steps, estimate_steps=5)
    print(f"model: BERT, {args.layers} layers, hidden {args.hidden} (random weights); "
          f"input {args.batch}x{args.seq} tokens; budget: {args.params:.0%} of linear params, "
          f"structure={args.structure}\n")

    t0 = time.perf_counter()
    small = structfx.compress(model, (ids,), config)
    print(f"compress: {time.perf_counter() - t0:.1f} s")
    print(structfx.last_report())

    with torch.no_grad():
        dense_out = model(ids).last_hidden_state
        small_out = small(ids).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(dense_out.flatten(1), small_out.flatten(1))
    print(f"\noutput cosine similarity to dense (random weights): mean {cos.mean():.3f}")

    t0 = time.perf_counter()
    compiled = torch.compile(model, backend=structfx.backend(config.replace(progress=False)))
    with torch.no_grad():
        compiled_out = compiled(ids).last_hidden_state
    print(f"torch.compile(backend=structfx): {time.perf_counter() - t0:.1f} s; "
          f"max |compiled - compress| = {(compiled_out - small_out).abs().max():.2e}")

    t_dense = median_time(lambda x: model(x), ids)
    t_small = median_time(lambda x: small(x), ids)
    dense_compiled = torch.compile(model)
    t_dc = median_time(lambda x: dense_compiled(x), ids)
    t_sc = median_time(lambda x: compiled(x), ids)
    print(f"\nCPU latency ({torch.get_num_threads()} threads), same process:")
    print(f"  eager:    dense {t_dense * 1e3:.1f} ms, structfx {t_small * 1e3:.1f} ms "
          f"-> {t_dense / t_small:.2f}x")
    print(f"  compiled: dense {t_dc * 1e3:.1f} ms, structfx {t_sc * 1e3:.1f} ms "
          f"-> {t_dc / t_sc:.2f}x")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="structfx", description="structfx command line (also: python -m structfx)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="compress + compile a small BERT and print the report")
    d.add_argument("--structure", default="blast", choices=["blast", "ss1", "lowrank", "auto"])
    d.add_argument("--params", type=float, default=0.5)
    d.add_argument("--hidden", type=int, default=512)
    d.add_argument("--layers", type=int, default=4)
    d.add_argument("--batch", type=int, default=4)
    d.add_argument("--steps", type=int, default=60, help="factorization iterations")
    d.add_argument("--seq", type=int, default=128)
    d.add_argument("--min-params", type=int, default=16384)
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        demo(args)


if __name__ == "__main__":
    main()
