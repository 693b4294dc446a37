"""The ``structfx`` command (also ``python -m structfx``).

    structfx compress MODEL_DIR --out OUT_DIR --params 0.5 [--structure auto]
                      [--calib sentences.txt | data.jsonl] [--distill-seconds 300] [--onnx]
    structfx report OUT_DIR
    structfx sweep MODEL_DIR --params 0.9,0.75,0.5 --calib sentences.txt [--plot sweep.png]
    structfx demo

``compress`` loads a local Hugging Face folder offline (Auto classes; a sentence-transformers
folder too), tokenizes the calibration text (every 5th line held out for the fidelity
check), compresses, optionally distills, and saves a folder ``structfx.load`` /
``structfx.from_pretrained`` (or ``SentenceTransformer(OUT_DIR, trust_remote_code=True)``)
reads, with ``report.json``, ``report.md`` and, when matplotlib is installed,
``report.png``. ``sweep`` compresses at each budget and prints the held-out fidelity
(embedding cosine for encoders, next-token agreement for causal LMs) and the speedup. A
problem with the user's input (a missing folder, a class that can't be loaded, a budget that
can't be met) is a one-line message and exit code 2.

``demo``: compress and compile a small transformer, print the report.

The default model is a 4-layer BERT (hidden 512) built offline from a transformers config with
random weights (no download); the candidate grid is trimmed (blocks 2 and 4, three ranks) so
the whole demo runs in about two and a half minutes on two CPU cores (measured 2026-12-01:
compress 47 s, torch.compile 56 s, then the timings). Random weights are the hard case for
compression (no structure to find), so the errors shown are an upper bound;
examples/minilm.py runs real weights.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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

    with torch.no_grad():   # inference: the compiled graphs were built under no_grad too
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


# ----------------------------------------------------------------------------- compress / sweep
class CliError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


HELD_OUT_EVERY = 5   # every 5th calibration line is held out for the fidelity check


@dataclass
class Loaded:
    model: "torch.nn.Module"   # what is compressed (the HF model; a sentence-transformers
    tokenizer: object          # folder's module-0 model)
    kind: str                  # "causal" or "encoder"
    folder: Path
    sentence_transformers: bool = False


def _progress(msg: str) -> None:
    print(f"structfx: {msg}", file=sys.stderr, flush=True)


def _model_class(name: Optional[str], config):
    import transformers

    if name:
        if "." in name:
            import importlib

            mod, _, attr = name.rpartition(".")
            try:
                return getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError) as e:
                raise CliError(f"can't import model class {name!r}: {e}") from None
        cls = getattr(transformers, name, None)
        if cls is None:
            raise CliError(f"transformers has no class {name!r} (try AutoModel, "
                           f"AutoModelForCausalLM, or a dotted path)")
        return cls
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def load_folder(folder, model_class: Optional[str] = None) -> Loaded:
    """The model and tokenizer of a local Hugging Face (or sentence-transformers) folder,
    offline."""
    folder = Path(folder)
    if not folder.exists():
        raise CliError(f"no model folder at {str(folder)!r}")
    if not folder.is_dir():
        raise CliError(f"{str(folder)!r} is a file; give the model's folder")
    if not (folder / "config.json").is_file():
        raise CliError(f"{str(folder)!r} has no config.json: not a Hugging Face model folder")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read the config is the user's
        raise CliError(f"can't read {folder / 'config.json'}: {e}") from None
    st = (folder / "modules.json").is_file() and not model_class
    cls = _model_class(None if st else model_class, config)
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"can't load {str(folder)!r} as {cls.__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception:  # noqa: BLE001 - a folder without a tokenizer works data-free
        tok = None
    kind = "causal" if getattr(cls, "__name__", "").endswith(("ForCausalLM", "LMHeadModel")) \
        or "CausalLM" in type(model).__name__ or "LMHead" in type(model).__name__ else "encoder"
    return Loaded(model.eval(), tok, kind, folder, sentence_transformers=st)


def read_texts(path) -> list[str]:
    """Lines of a .txt file, or the ``"text"`` field (or the string) of each JSON line."""
    path = Path(path)
    if not path.is_file():
        raise CliError(f"no calibration file at {str(path)!r}")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CliError(f"{path}:{i}: not JSON ({e})") from None
            if isinstance(obj, dict):
                obj = obj.get("text")
            if not isinstance(obj, str):
                raise CliError(f"{path}:{i}: expected a string or an object with a \"text\" "
                               f"string")
            line = obj
        out.append(line)
    if len(out) < 2:
        raise CliError(f"{path}: needs at least 2 texts (one is held out), found {len(out)}")
    return out


def split_texts(texts: list[str]) -> tuple[list[str], list[str]]:
    held = [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    fit = [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return fit, held


def tokenize(tokenizer, texts: list[str], batch_size: int, max_length: int,
             desc: str = "tokenizing", kind: str = "encoder") -> list[dict]:
    """Batches of keyword inputs (``input_ids``, ``attention_mask``, and for encoders
    ``token_type_ids``), texts sorted by length so that batches carry little padding."""
    keys = ("input_ids", "attention_mask") + (("token_type_ids",) if kind == "encoder" else ())
    from tqdm.auto import tqdm

    tok = tokenizer
    if tok.pad_token is None:  # causal LM tokenizers: pad with EOS (masked out anyway)
        tok = copy.copy(tokenizer)
        tok.pad_token = tok.eos_token or tok.unk_token
        if tok.pad_token is None:
            raise CliError("the tokenizer has no pad, EOS or UNK token to pad batches with")
    order = sorted(texts, key=lambda t: len(t))
    out = []
    for i in tqdm(range(0, len(order), batch_size), desc=f"structfx: {desc}", leave=False):
        enc = tok(order[i:i + batch_size], padding=True, truncation=True,
                  max_length=max_length, return_tensors="pt")
        out.append({k: v for k, v in enc.items() if k in keys})
    return out


def random_batch(model, batch: int = 4, seq: int = 32) -> dict:
    vocab = int(getattr(model.config, "vocab_size", 1000))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def fidelity(dense, small, batches: list[dict], kind: str) -> dict:
    """Held-out fidelity of ``small`` to ``dense``: for encoders the cosine of mean-pooled
    sentence embeddings, for causal LMs the next-token (argmax) agreement over real tokens and
    both perplexities."""
    if kind == "causal":
        agree = total = 0
        nll_d = nll_s = 0.0
        for b in batches:
            kw = dict(b, use_cache=False)
            ld, ls = dense(**kw).logits.float(), small(**kw).logits.float()
            mask = b["attention_mask"].bool()
            agree += int(((ld.argmax(-1) == ls.argmax(-1)) & mask).sum())
            total += int(mask.sum())
            tgt, m = b["input_ids"][:, 1:], mask[:, 1:]
            for logits, acc in ((ld, "d"), (ls, "s")):
                lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tgt[..., None])[..., 0]
                v = float(-(lp * m).sum())
                if acc == "d":
                    nll_d += v
                else:
                    nll_s += v
        n = max(1, int(sum(int(b["attention_mask"][:, 1:].sum()) for b in batches)))
        return {"metric": "next-token agreement", "value": agree / max(1, total),
                "perplexity_dense": math.exp(nll_d / n), "perplexity": math.exp(nll_s / n)}
    cos = []
    for b in batches:
        hd, hs = _hidden(dense, b), _hidden(small, b)
        m = b["attention_mask"][..., None].to(hd.dtype)
        ed = torch.nn.functional.normalize((hd * m).sum(1) / m.sum(1), dim=-1)
        es = torch.nn.functional.normalize((hs * m).sum(1) / m.sum(1), dim=-1)
        cos.append((ed * es).sum(-1))
    c = torch.cat(cos)
    return {"metric": "embedding cosine", "value": float(c.mean()), "min": float(c.min())}


def _hidden(model, batch):
    out = model(**batch)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _config(args, params: float):
    import structfx

    kw = dict(structure=args.structure, params=params, include=tuple(args.include or ()),
              exclude=tuple(args.exclude or ()), force=args.force, progress=not args.quiet)
    for name in ("min_params", "steps", "estimate_steps"):
        v = getattr(args, name, None)
        if v is not None:
            kw[name] = v
    for name, typ in (("blocks", int), ("rank_fractions", float), ("compressions", int)):
        v = getattr(args, name, None)
        if v:
            try:
                kw[name] = tuple(typ(x) for x in v.split(",") if x.strip())
            except ValueError:
                raise CliError(f"--{name.replace('_', '-')}: expected comma-separated "
                               f"numbers, got {v!r}") from None
    try:
        return structfx.Config(**kw)
    except ValueError as e:
        raise CliError(str(e)) from None


def _data(args, loaded: Loaded):
    """(example, fit batches or None, held-out batches or None)."""
    if not args.calib:
        _progress("no --calib: data-free factorization on random token ids")
        return random_batch(loaded.model), None, None
    if loaded.tokenizer is None:
        raise CliError(f"{str(loaded.folder)!r} has no tokenizer to read --calib with")
    fit, held = split_texts(read_texts(args.calib))
    fit_b = tokenize(loaded.tokenizer, fit, args.batch_size, args.max_length, kind=loaded.kind)
    held_b = tokenize(loaded.tokenizer, held, args.batch_size, args.max_length,
                      desc="tokenizing held-out", kind=loaded.kind)
    return fit_b[0], fit_b, held_b


def _compress(loaded: Loaded, example, calib, config, measure: bool = False):
    import structfx

    try:
        return structfx.compress(loaded.model, example, config, calibration=calib,
                                 measure=measure)
    except ValueError as e:  # a budget that can't be met, a bad include glob, ...
        raise CliError(f"compress: {e}") from None


def cmd_compress(args) -> int:
    import structfx

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {str(out)!r} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise CliError(f"--out {str(out)!r} is not empty; pass --overwrite to write into it")
    _progress(f"loading {args.model_dir}")
    loaded = load_folder(args.model_dir, args.model_class)
    example, calib, held = _data(args, loaded)
    config = _config(args, args.params)
    _progress(f"compressing {type(loaded.model).__name__} to {args.params:g} of its linear "
              f"parameters ({args.structure})")
    small = _compress(loaded, example, calib, config)
    report = small.structfx_report
    if report.output != "model":
        raise CliError("compress returned a graph, not a model copy (see the report notes); "
                       "the CLI can only save model copies: " + "; ".join(report.notes))
    if args.distill_seconds:
        _progress(f"distilling for up to {args.distill_seconds:g} s")
        result = structfx.distill(small, loaded.model, calib or [example],
                                  end_to_end_steps=args.distill_steps,
                                  end_to_end_lr=3e-3, eval_inputs=held,
                                  time_limit=args.distill_seconds, progress=not args.quiet)
        report.notes.append(f"distilled for {result.seconds:.0f} s: model output error "
                            f"{_fmt(result.model_error_before)} -> "
                            f"{_fmt(result.model_error_after)} on the calibration batches")
    if held:
        f = fidelity(loaded.model, small, held, loaded.kind)
        n = sum(int(b["input_ids"].shape[0]) for b in held)
        report.notes.append(f"held-out fidelity ({n} texts): {f['metric']} {f['value']:.4f}" + (
                                f" (perplexity {f['perplexity']:.2f} vs dense "
                                f"{f['perplexity_dense']:.2f})" if "perplexity" in f else ""))
    _progress(f"saving to {out}")
    save_folder(small, loaded, out, report)
    if args.onnx:
        _progress("exporting ONNX")
        structfx.export_onnx(small, example, out / "model.onnx")
    print(report)
    if _plot(report, out / "report.png"):
        _progress(f"wrote {out / 'report.png'}")
    return 0


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def save_folder(small, loaded: Loaded, out: Path, report) -> None:
    """structfx.save, plus (for a sentence-transformers folder) its other modules' files and a
    modules.json whose module 0 is structfx's loader."""
    import structfx

    out.mkdir(parents=True, exist_ok=True)
    if loaded.sentence_transformers:
        from .st_module import CLASS_REF

        skip = {"model.safetensors", "pytorch_model.bin", "config.json", "modules.json",
                "report.json", "report.md", "structfx.json"}
        for item in loaded.folder.rglob("*"):
            rel = item.relative_to(loaded.folder)
            if item.is_file() and not (len(rel.parts) == 1 and rel.name in skip) \
                    and not rel.name.endswith(".onnx"):
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(item, out / rel)
        modules = json.loads((loaded.folder / "modules.json").read_text())
        for m in modules:
            if m.get("path", "") == "" and "Transformer" in m.get("type", ""):
                m["type"] = CLASS_REF
        (out / "modules.json").write_text(json.dumps(modules, indent=2))
    structfx.save(small, out, tokenizer=loaded.tokenizer, report=report)


def _plot(report, path) -> bool:
    try:
        report.plot(path)
        return True
    except ImportError as e:
        _progress(f"no plot: {e}")
        return False


def cmd_report(args) -> int:
    from .report import Report

    try:
        print(Report.load(args.out_dir))
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    return 0


def cmd_sweep(args) -> int:
    from tabulate import tabulate

    try:
        budgets = [float(p) for p in args.params.split(",") if p.strip()]
    except ValueError:
        raise CliError(f"--params: expected comma-separated fractions, got {args.params!r}") \
            from None
    if not budgets:
        raise CliError("--params: give at least one budget")
    loaded = load_folder(args.model_dir, args.model_class)
    _, fit_b, held_b = _data(args, loaded)
    rows = []
    for p in budgets:
        _progress(f"budget {p:g}")
        small = _compress(loaded, fit_b[0], fit_b, _config(args, p), measure=args.measure)
        rep = small.structfx_report
        f = fidelity(loaded.model, small, held_b, loaded.kind)
        kept = sum(d.params for d in rep.layers) / max(1, sum(d.dense_params for d in rep.layers))
        rk = sum(d.params for d in rep.replaced) / max(1, sum(d.dense_params
                                                               for d in rep.replaced))
        rows.append({"budget": p, "params_kept": kept, "replaced": len(rep.replaced),
                     "replaced_layers_kept": rk if rep.replaced else None,
                     "metric": f["metric"], "fidelity": f["value"],
                     "perplexity": f.get("perplexity"),
                     "predicted_speedup": rep.predicted_speedup,
                     "measured_speedup": rep.measured_speedup})
        del small
    metric = rows[0]["metric"]
    table = [[f"{r['budget']:g}", f"{r['params_kept']:.1%}", r["replaced"],
              f"{r['fidelity']:.4f}"] + ([f"{r['perplexity']:.2f}"] if r["perplexity"] else [])
             + [_x(r["predicted_speedup"]), _x(r["measured_speedup"])] for r in rows]
    head = ["budget", "linear params kept", "layers replaced", metric] + (
        ["perplexity"] if rows[0]["perplexity"] else []) + ["pred. speedup", "meas. speedup"]
    print(tabulate(table, head, tablefmt="simple", disable_numparse=True))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        try:
            plot_sweep(rows, args.plot)
            _progress(f"wrote {args.plot}")
        except ImportError as e:
            _progress(f"no plot: {e}")
    return 0


def _x(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def plot_sweep(rows: list[dict], path) -> None:
    """Fidelity and speedup against the parameter budget: the curve to pick a point on."""
    from .report import figure

    fig = figure("structfx sweep --plot", figsize=(6.5, 4.2))
    ax = fig.subplots()
    kept = [r["params_kept"] for r in rows]
    ax.plot(kept, [r["fidelity"] for r in rows], "o-", color="#4c72b0")
    ax.set_xlabel("linear parameters kept")
    ax.set_ylabel(rows[0]["metric"], color="#4c72b0")
    ax.invert_xaxis()
    ax2 = ax.twinx()
    for key, style, label in (("predicted_speedup", "s--", "predicted"),
                              ("measured_speedup", "^:", "measured")):
        ys = [r[key] for r in rows]
        if any(y is not None for y in ys):
            ax2.plot(kept, [float("nan") if y is None else y for y in ys], style,
                     color="#dd8452", label=f"{label} speedup")
    ax2.set_ylabel("speedup of the linear layers (x)", color="#dd8452")
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(loc="lower left", fontsize=8)
    fig.suptitle("structfx budget sweep")
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------- main
def _common(p) -> None:
    p.add_argument("--structure", default="blast", choices=["blast", "ss1", "lowrank", "auto"])
    p.add_argument("--calib", help="calibration text: a .txt (one text a line) or .jsonl "
                                   "(a string or {\"text\": ...} a line)")
    p.add_argument("--include", action="append", help="glob on module paths (repeatable)")
    p.add_argument("--exclude", action="append", help="glob on module paths (repeatable)")
    p.add_argument("--model-class", help="transformers class (AutoModelForCausalLM, ...) or a "
                                         "dotted path; default from config.json")
    p.add_argument("--min-params", type=int, help="size floor: smaller layers stay dense")
    p.add_argument("--steps", type=int, help="factorization iterations")
    p.add_argument("--estimate-steps", type=int, help="iterations of the error estimates")
    p.add_argument("--blocks", help="BLAST block counts to try, e.g. 2,4")
    p.add_argument("--rank-fractions", help="BLAST ranks to try, e.g. 0.25,0.5")
    p.add_argument("--compressions", help="SS1 compressions to try, e.g. 2,4")
    p.add_argument("--force", action="store_true",
                   help="also replace layers predicted to get slower")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128, help="tokens per text at most")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="structfx",
                                     description="structfx command line (also: python -m structfx)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compress", help="compress a local Hugging Face model folder and save it")
    c.add_argument("model_dir")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--params", type=float, default=0.5,
                   help="fraction of the linear layers' parameters to keep")
    c.add_argument("--distill-seconds", type=float, default=0,
                   help="then distill (structfx.distill) for up to this many seconds")
    c.add_argument("--distill-steps", type=int, default=600, help="end-to-end distill steps")
    c.add_argument("--onnx", action="store_true", help="also export OUT_DIR/model.onnx")
    c.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    _common(c)
    r = sub.add_parser("report", help="print the report of a saved folder")
    r.add_argument("out_dir")
    s = sub.add_parser("sweep", help="fidelity and speed against the parameter budget")
    s.add_argument("model_dir")
    s.add_argument("--params", default="0.9,0.75,0.5", help="comma-separated budgets")
    s.add_argument("--plot", help="write the curve to this image file (needs matplotlib)")
    s.add_argument("--json", help="write the rows to this JSON file")
    s.add_argument("--measure", action="store_true",
                   help="also time dense vs compressed (whole model, on this machine)")
    _common(s)
    s.set_defaults(calib=None)
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
    try:
        if args.cmd == "demo":
            demo(args)
            return 0
        if args.cmd == "sweep" and not args.calib:
            raise CliError("sweep needs --calib (its held-out part measures the fidelity)")
        return {"compress": cmd_compress, "report": cmd_report, "sweep": cmd_sweep}[args.cmd](args)
    except CliError as e:
        print(f"structfx {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("structfx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
