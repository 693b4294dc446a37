"""``structfx.distill``: layer-wise (and end-to-end) fine-tuning of a compressed model on its
dense teacher. Small random-weight models on CPU; the file runs in well under a minute."""
import copy
import itertools
import time

import pytest
import torch
from torch import nn

import structfx
from structfx import BlastLinear, Config, SS1Linear
from structfx import DistillResult, distill
from structfx.distill_layerwise import LayerStats, virtual_rows

from conftest import assert_untouched, snapshot, tiny_bert
from conftest import mlp as _mlp

CFG = Config(params=0.5, min_params=1024, progress=False, steps=20, estimate_steps=3,
             force=True, blocks=(1, 2, 4), rank_fractions=(0.25, 0.5))


def mlp(seed=0):
    return _mlp(64, 128, 64, 32, seed=seed)


def batches(n, rows=64, width=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    # Anisotropic inputs: what a layer sees matters, so fitting them pays off.
    scale = torch.logspace(-1, 1, width)
    return [(torch.randn(rows, width, generator=g) * scale,) for _ in range(n)]


@pytest.mark.parametrize("mode", ["correct", "student", "teacher"])
def test_distill_reduces_layer_and_model_error_and_leaves_teacher_alone(mode):
    teacher = mlp()
    calib, held = batches(6), batches(2, seed=2)
    small = structfx.compress(teacher, calib[0], CFG)          # data-free start
    before = snapshot(teacher)
    with torch.no_grad():
        out_before = teacher(*held[0]).clone()
    res = distill(small, teacher, calib, steps=60, mode=mode, eval_inputs=held, progress=False)

    assert_untouched(teacher, before, training=False)
    with torch.no_grad():
        assert torch.equal(teacher(*held[0]), out_before)
    assert isinstance(res, DistillResult) and res.mode == mode
    assert [d.name for d in res.layers] == ["0", "2", "4"]       # graph order
    for d in res.layers:
        assert d.rows == 6 * 64 - 6 * 64 // 8                      # every 8th row held out
        assert d.error_after <= d.error_before
    assert sum(d.error_after for d in res.layers) < 0.8 * sum(d.error_before for d in res.layers)
    assert res.model_error_after < 0.8 * res.model_error_before
    assert res.eval_error_after < res.eval_error_before            # held-out batches too
    assert res.fidelity_gain == pytest.approx(res.eval_error_before / res.eval_error_after)
    text = str(res)
    assert "output err before" in text and "fidelity gain" in text


def test_correct_mode_absorbs_upstream_error():
    # Inputs from the compressed model, targets from the teacher: the last layer is fit to
    # undo what reaches it, which the purely local "teacher" mode cannot do.
    teacher, calib, held = mlp(), batches(8), batches(3, seed=2)
    errs = {}
    for mode in ("correct", "teacher"):
        small = structfx.compress(teacher, calib[0], CFG)
        errs[mode] = distill(small, teacher, calib, steps=80, mode=mode, eval_inputs=held,
                             progress=False).eval_error_after
    assert errs["correct"] < errs["teacher"], errs


def test_distill_tiny_bert_and_end_to_end():
    pytest.importorskip("transformers")
    teacher = tiny_bert(hidden=64, intermediate=128, positions=32)
    g = torch.Generator().manual_seed(3)
    calib = [torch.randint(0, 100, (4, 16), generator=g) for _ in range(4)]
    before = snapshot(teacher)
    small = structfx.compress(teacher, calib[0], CFG.replace(min_params=2048))
    structured = {n for n, m in small.named_modules() if isinstance(m, (BlastLinear, SS1Linear))}
    assert structured == {d.name for d in small.structfx_report.replaced}
    assert len(structured) >= 8

    res = distill(small, teacher, calib, steps=40, end_to_end_steps=20, progress=False)
    assert_untouched(teacher, before, training=False)
    assert {d.name for d in res.layers} == structured
    assert sum(d.error_after for d in res.layers) < sum(d.error_before for d in res.layers)
    assert res.model_error_after_layers < res.model_error_before
    assert res.model_error_after <= res.model_error_after_layers
    assert res.end_to_end_steps == 20
    # The result is still the compressed model: same structured modules, same sizes.
    assert {n for n, m in small.named_modules()
            if isinstance(m, (BlastLinear, SS1Linear))} == structured


def test_end_to_end_phase_on_its_own_and_from_a_generator():
    teacher, calib = mlp(), batches(4)
    small = structfx.compress(teacher, calib[0], CFG)
    fresh = (b for b in batches(50, seed=9))                    # read once, 50 batches
    res = distill(small, teacher, calib, steps=0, end_to_end_steps=200,
                  end_to_end_inputs=fresh, end_to_end_lr=1e-2, progress=False)
    assert all(d.error_after == d.error_before for d in res.layers)   # steps=0: untouched
    assert res.model_error_after_layers == pytest.approx(res.model_error_before)
    assert res.end_to_end_steps == 50                           # the generator ran out
    assert not res.end_to_end_reverted
    assert res.model_error_after < 0.8 * res.model_error_before


def test_time_limit_cuts_the_end_to_end_phase_short():
    teacher, calib = mlp(), batches(4)
    small = structfx.compress(teacher, calib[0], CFG)

    def slow():                                   # 0.05 s a batch: 10,000 steps can't fit
        for b in itertools.cycle(batches(8, seed=5)):
            time.sleep(0.05)
            yield b

    # The limit covers the whole run: leave the end-to-end phase a few seconds beyond what the
    # layer phase takes on this machine (a shared CI core can be several times slower).
    t0 = time.perf_counter()
    distill(copy.deepcopy(small), teacher, calib, steps=20, progress=False)
    limit = 2 * (time.perf_counter() - t0) + 3.0
    res = distill(small, teacher, calib, steps=20, end_to_end_steps=10_000,
                  end_to_end_inputs=slow(), end_to_end_lr=1e-2, time_limit=limit,
                  progress=False)
    structured = [m for m in small.modules() if isinstance(m, (BlastLinear, SS1Linear))]
    assert len(res.layers) == len(structured) > 0               # layer phase completed
    assert 0 < res.end_to_end_steps <= limit / 0.05 + 1         # cut short by the limit
    assert res.model_error_after <= res.model_error_after_layers


def test_end_to_end_phase_that_hurts_is_undone():
    teacher, calib = mlp(), batches(4)
    small = structfx.compress(teacher, calib[0], CFG)
    res = distill(small, teacher, calib, steps=30, progress=False)
    state = snapshot(small)
    # A huge step size wrecks the factors; the calibration error exposes it.
    res = distill(small, teacher, calib, steps=0, end_to_end_steps=5, end_to_end_lr=10.0,
                  progress=False)
    assert res.end_to_end_reverted
    assert res.model_error_after == res.model_error_after_layers
    assert_untouched(small, state, training=small.training)


def test_distill_accepts_a_hand_built_model():
    teacher = mlp()
    student = mlp()
    student[2] = BlastLinear.from_linear(teacher[2], blocks=2, params=0.3, steps=5)
    student[0].load_state_dict(teacher[0].state_dict())
    student[4].load_state_dict(teacher[4].state_dict())
    res = distill(student, teacher, batches(4), steps=50, progress=False)
    assert [d.name for d in res.layers] == ["2"]
    assert res.layers[0].error_after < res.layers[0].error_before
    assert res.layers[0].structure.startswith("blast b=2")


def test_virtual_rows_give_the_real_loss_up_to_a_constant():
    # The layer-wise loss is evaluated on in_features + 1 rows instead of N: check the identity
    # ||[X, 1] A^T - Y||^2 - ||Xv A^T - Yv||^2 = const for random affine maps A.
    g = torch.Generator().manual_seed(5)
    X, Y = torch.randn(300, 12, generator=g), torch.randn(300, 7, generator=g)
    stats = LayerStats.empty(12, 7, X.device)
    stats.add(X, Y)
    keep = torch.arange(300) % 8 != 7
    Xa = torch.cat([X[keep], torch.ones(int(keep.sum()), 1)], 1).double()
    Xv, Yv = virtual_rows(stats)
    consts = []
    for _ in range(3):
        A = torch.randn(7, 13, generator=g).double()
        real = (Xa @ A.T - Y[keep].double()).pow(2).sum()
        virtual = (Xv.double() @ A.T - Yv.double()).pow(2).sum()
        consts.append(float(real - virtual))
    assert stats.rows == int(keep.sum()) and stats.held == 300 - int(keep.sum())
    assert max(consts) - min(consts) < 1e-3 * float(Y.pow(2).sum())


def test_bad_inputs_raise_clear_errors():
    teacher, calib = mlp(), batches(2)
    small = structfx.compress(teacher, calib[0], CFG)
    state, teacher_state = snapshot(small), snapshot(teacher)
    with pytest.raises(ValueError, match="no structured layers"):
        distill(mlp(1), teacher, calib, progress=False)
    with pytest.raises(ValueError, match="same module"):
        distill(small, small, calib, progress=False)
    with pytest.raises(ValueError, match="teacher holds structured layers"):
        distill(teacher, small, calib, progress=False)
    with pytest.raises(ValueError, match="calib_inputs is empty"):
        distill(small, teacher, [], progress=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        distill(small, teacher, calib, mode="fast", progress=False)
    with pytest.raises(ValueError, match="steps must be an integer"):
        distill(small, teacher, calib, steps=-1, progress=False)
    with pytest.raises(ValueError, match="lr must be > 0"):
        distill(small, teacher, calib, lr=0.0, progress=False)
    with pytest.raises(ValueError, match="time_limit must be a number of seconds > 0"):
        distill(small, teacher, calib, time_limit=0, progress=False)
    # A teacher without the compressed model's layer paths.
    other = nn.ModuleDict({"net": teacher}).eval()
    with pytest.raises(ValueError, match="teacher has no module '0'"):
        distill(small, other, calib, progress=False)
    # Same paths, different widths: the models don't match.
    wide = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.GELU(),
                         nn.Linear(64, 32)).eval()
    with pytest.raises(ValueError, match="don't match"):
        distill(small, wide, calib, progress=False)
    # The failed calls changed nothing.
    assert_untouched(small, state, training=small.training)
    assert_untouched(teacher, teacher_state, training=False)


def test_teacher_in_training_mode_warns():
    teacher = nn.Sequential(nn.Linear(64, 128), nn.Dropout(0.1), nn.Linear(128, 32))
    calib = batches(2)
    small = structfx.compress(teacher.eval(), calib[0], CFG)
    teacher.train()
    with pytest.warns(UserWarning, match="training mode"):
        distill(small, teacher, calib, steps=1, progress=False)
    assert teacher.training


def test_progress_bar(capsys):
    teacher, calib = mlp(), batches(2)
    small = structfx.compress(teacher, calib[0], CFG)
    distill(small, teacher, calib, steps=2, end_to_end_steps=2, progress=True)
    err = capsys.readouterr().err
    assert "structfx: distill" in err and "end to end" in err
