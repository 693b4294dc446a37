"""CostModel: exact sizes, the structure of the roofline, the candidate grid. No timing asserts."""
import math

import pytest
import torch

from structfx import BlastLinear, SS1Linear
from structfx.config import Config
from structfx.kernels import ops, ss1_hash
from structfx.passes.cost_model import Candidate, CostModel, blast_rank, describe_layer
from structfx.passes.device import DEVICE_TABLE, DeviceProfile, cpu_profile, device_profile
from structfx.passes.select import candidate_grid

H100 = DEVICE_TABLE["H100 SXM"]
# A fixed CPU-like profile, so the CPU-path tests don't depend on this machine's load.
CPU = DeviceProfile("test-cpu", {"float32": 1e11}, 2e10, 3e-6, kind="cpu",
                    call_overhead_s=5e-5, gemm_knee=32, gemm_floor=0.15)


@pytest.mark.parametrize("name", ["H100 SXM", "H200", "A100 80GB", "L4", "A10G", "RTX 4090"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,n,T", [(4096, 4096, 1), (4096, 4096, 8192), (1024, 4096, 256)])
def test_a_dense_gemm_is_the_roofline_worked_by_hand(name, dtype, m, n, T):
    """One GEMM: the classic roofline of the table's figures, max(FLOPs / (peak * eff),
    bytes / bandwidth) plus one launch, worked out here by hand; eff < 1 only for dimensions
    under the tensor-core tile (T = 1 here)."""
    p = device_profile(name)
    assert p is DEVICE_TABLE[name] and p.kind == "cuda"
    e = dtype.itemsize
    flops = 2 * T * m * n
    moved = e * (m * n + T * n + T * m)        # W, x and y each cross memory once
    peak = p.peak_flops[str(dtype).removeprefix("torch.")]
    eff = math.prod(min(1.0, max(p.gemm_floor, d / p.gemm_knee)) for d in (T, m, n))
    assert eff == (1 / 128 if T == 1 else 1.0)
    want = max(flops / (peak * eff), moved / p.bandwidth) + p.kernel_overhead_s
    d = CostModel(p, dtype).dense(m, n, T)
    assert (d.flops, d.bytes) == (flops, moved)
    assert d.time_s == pytest.approx(want, rel=1e-12)
    # A big prefill is compute bound at the datasheet peak, on every entry of the table.
    if T == 8192:
        assert d.time_s == pytest.approx(flops / peak + p.kernel_overhead_s, rel=1e-12)


def test_device_profile_lookup():
    assert device_profile("H100 SXM") is H100
    assert device_profile("h100") is H100
    assert device_profile("NVIDIA H100 80GB HBM3") is H100
    assert device_profile("NVIDIA A100-SXM4-80GB") is DEVICE_TABLE["A100 80GB"]
    assert device_profile("NVIDIA L4") is DEVICE_TABLE["L4"]
    with pytest.raises(ValueError, match="unknown device"):
        device_profile("NVIDIA L40S")                # not the L4
    if not torch.cuda.is_available():
        p = device_profile(None)
        assert p is cpu_profile() is device_profile("cpu")   # measured once per process
        assert p.kind == "cpu" and p.bandwidth > 0 and p.kernel_overhead_s > 0
        assert p.peak_flops["float32"] > 0 and p.call_overhead_s >= 0


def test_dtype_must_be_in_profile():
    with pytest.raises(ValueError, match="bfloat16"):
        CostModel(CPU, torch.bfloat16)          # the test profile only knows float32
    assert CostModel(H100, torch.float64).peak == 67e12


@pytest.mark.parametrize("profile", [H100, CPU], ids=["h100", "cpu"])
@pytest.mark.parametrize("m,n,T", [(256, 512, 7), (300, 200, 1), (96, 96, 64)])
def test_sizes_and_flops_are_exact(profile, m, n, T):
    cm = CostModel(profile, torch.bfloat16 if profile is H100 else torch.float32)
    d = cm.dense(m, n, T)
    assert (d.params, d.flops, d.describe()) == (m * n, 2 * T * m * n, "dense")
    for blocks, r in (((1, 1), 17), ((4, 4), 9), ((2, 8), 5), ((3, 3), 4)):
        c = cm.blast(m, n, T, blocks, r)
        layer = BlastLinear(n, m, blocks, r)
        assert c.params == layer.num_structured_params()
        if m % blocks[0] == 0 and n % blocks[1] == 0:
            assert c.params == r * (m + n + blocks[0] * blocks[1])
        assert c.flops == ops.blast_flops((T, n), layer.U.shape, layer.S.shape, layer.V.shape)
    for comp in (2, 3, 8):
        c = cm.ss1(m, n, T, comp)
        K_red = ss1_hash.reduced_k(n, comp, 32)
        layer = SS1Linear(n, m, comp)
        assert c.params == m * K_red == layer.P.numel()
        assert c.flops == ops.ss1_flops((T, n), (m, K_red), 64)


@pytest.mark.parametrize("blocks,rank,want", [((4, 4), 96, "blast b=4 r=96"),
                                               ((2, 4), 8, "blast b=2x4 r=8"),
                                               ((1, 1), 128, "lowrank r=128")])
def test_a_blast_candidate_and_its_module_carry_one_label(blocks, rank, want):
    """The label names the module the candidate builds: same label, same parameter count."""
    c = CostModel(H100, torch.bfloat16).blast(64, 64, 1, blocks, rank)
    layer = BlastLinear(64, 64, blocks, rank)
    assert c.describe() == describe_layer(layer) == want
    assert f"{c.kind} {c.settings}" == want
    assert c.params == sum(p.numel() for p in layer.parameters() if p is not layer.bias)


@pytest.mark.parametrize("comp", [2, 3, 8])
def test_an_ss1_candidate_and_its_module_carry_one_label(comp):
    c = CostModel(H100, torch.bfloat16).ss1(64, 96, 1, comp)
    layer = SS1Linear(96, 64, comp)
    assert c.describe() == describe_layer(layer) == f"ss1 c={comp}"
    assert (c.kind, c.settings) == ("ss1", f"c={comp}")
    assert c.params == layer.P.numel()
    dense = CostModel(H100, torch.bfloat16).dense(64, 96, 1)
    assert dense.describe() == describe_layer(torch.nn.Linear(96, 64)) == "dense"
    assert (dense.kind, dense.settings) == ("dense", "")


def test_gpu_bytes_charge_the_blast_intermediate():
    cm = CostModel(H100, torch.bfloat16)
    m = n = 1024
    for T in (1, 64, 4096):
        for b, r in ((1, 256), (4, 200), (16, 100)):
            c = cm.blast(m, n, T, (b, b), r)
            # weights + x + y + z (T*b*r values) written once and read once
            assert c.bytes == 2 * (c.params + T * n + T * m + 2 * T * b * r)
    # The intermediate grows with b*r*T: at fixed weights, more blocks cost more at large T.
    small_b, big_b = cm.blast(m, n, 4096, (2, 2), 256), cm.blast(m, n, 4096, (16, 16), 256)
    assert big_b.bytes - small_b.bytes == 2 * 2 * 4096 * (16 - 2) * 256 + 2 * 256 * (256 - 4)
    assert big_b.time_s > small_b.time_s
    ss1 = cm.ss1(m, n, 256, 4)
    assert ss1.bytes == 2 * (ss1.params + 256 * n * (m // 64) + 256 * m)   # x re-read per block


def test_cpu_bytes_charge_the_mixing_passes():
    cm = CostModel(CPU)
    m = n = 1024
    prev = None
    for b in (2, 4, 8, 16):
        c = cm.blast(m, n, 256, (b, b), 128)
        if prev is not None:
            assert c.bytes > prev.bytes and c.time_s > prev.time_s
        prev = c
    # More tokens: more intermediate traffic, linearly beyond the weights.
    t1, t2 = cm.blast(m, n, 128, (8, 8), 128), cm.blast(m, n, 256, (8, 8), 128)
    w = 4 * t1.params
    assert t2.bytes - w == pytest.approx(2 * (t1.bytes - w), rel=1e-6)


@pytest.mark.parametrize("profile", [H100, CPU], ids=["h100", "cpu"])
def test_larger_rank_costs_more(profile):
    cm = CostModel(profile, torch.bfloat16 if profile is H100 else torch.float32)
    for T in (1, 16, 256):
        for b in (1, 4, 16):
            cands = [cm.blast(2048, 2048, T, (b, b), r) for r in (64, 256, 512, 1024)]
            for lo, hi in zip(cands, cands[1:]):
                assert hi.params > lo.params and hi.flops > lo.flops and hi.bytes > lo.bytes
                assert hi.time_s > lo.time_s
    ss1 = [cm.ss1(2048, 2048, 16, c) for c in (8, 4, 2)]
    assert ss1[0].time_s < ss1[1].time_s < ss1[2].time_s


def test_decode_half_size_blast_beats_dense_on_h100():
    cm = CostModel(H100, torch.bfloat16)
    for m, n in ((4096, 4096), (11008, 4096), (4096, 11008)):
        dense = cm.dense(m, n, 1)
        for b in (1, 4, 16):
            c = cm.blast(m, n, 1, (b, b), blast_rank(m, n, (b, b), 0.5))
            assert c.params <= dense.params / 2
            assert c.time_s < dense.time_s
    # ...but launches dominate a small layer: two kernels lose to one GEMM.
    assert cm.blast(256, 256, 1, (4, 4), 64).time_s > cm.dense(256, 256, 1).time_s


def test_time_is_the_roofline():
    cm = CostModel(H100, torch.bfloat16)
    d = cm.dense(8192, 8192, 8192)              # big: compute bound at peak
    assert d.time_s == pytest.approx(d.flops / 989e12 + 2e-6)
    d = cm.dense(8192, 8192, 1)                 # decode: weight bound
    assert d.time_s == pytest.approx(d.bytes / 3.35e12 + 2e-6)


def _key(c: Candidate):
    return (c.structure, c.blocks, c.rank, c.compression)


def test_candidate_grid():
    m, n, T = 1024, 768, 16
    cm = CostModel(CPU)
    dense = cm.dense(m, n, T)
    forced = cm.candidates(m, n, T, Config(structure="auto", force=True))
    assert forced[0] == dense
    keys = [_key(c) for c in forced]
    assert len(keys) == len(set(keys))                       # no duplicates
    assert all(c.params < dense.params for c in forced[1:])
    assert {c.structure for c in forced[1:]} == {"blast", "ss1"}
    cfg = Config()
    for b in cfg.blocks:
        ranks = {c.rank for c in forced if c.blocks == (b, b)}
        want = {blast_rank(m, n, (b, b), f) for f in cfg.rank_fractions}
        assert ranks == {r for r in want if r * (m + n + b * b) < m * n}
    assert {c.compression for c in forced if c.structure == "ss1"} == {2, 3, 4, 8}

    assert cm.candidates(m, n, T, Config(structure="auto")) == forced   # the policy is select's
    unforced = candidate_grid(cm, m, n, T, Config(structure="auto"))
    assert unforced[0] == dense
    assert all(c.time_s < dense.time_s for c in unforced[1:])
    assert set(map(_key, unforced)) <= set(keys)
    assert [c for c in forced[1:] if c.time_s < dense.time_s] == unforced[1:]
    # On a GPU at decode, BLAST's second launch sinks a small layer: no BLAST survives.
    gpu = CostModel(H100, torch.bfloat16)
    assert candidate_grid(gpu, 128, 128, 1, Config()) == [gpu.dense(128, 128, 1)]
    assert len(candidate_grid(gpu, 128, 128, 1, Config(force=True))) > 1


def test_candidate_grid_per_structure():
    cm = CostModel(CPU)
    low = cm.candidates(512, 512, 8, Config(structure="lowrank", force=True))
    assert {c.blocks for c in low[1:]} == {(1, 1)} and len(low) == 1 + 6
    ss1 = cm.candidates(512, 512, 8, Config(structure="ss1", force=True, compressions=(1, 2, 4)))
    assert [c.compression for c in ss1[1:]] == [2, 4]       # c = 1 saves nothing
    blast = cm.candidates(512, 512, 8, Config(structure="blast", force=True, blocks=(1, 4),
                                              rank_fractions=(0.5, 0.5, 0.25)))
    assert [(c.blocks, c.rank) for c in blast[1:]] == [((1, 1), 127), ((1, 1), 63),
                                                      ((4, 4), 126), ((4, 4), 63)]
    # Blocks that don't fit the layer are skipped; a fraction rounding to r = 0 gives r = 1.
    tiny = cm.candidates(8, 12, 1, Config(structure="blast", force=True, blocks=(2, 16),
                                          rank_fractions=(0.01,)))
    assert [(c.blocks, c.rank) for c in tiny[1:]] == [((2, 2), 1)]


def test_measure_returns_measured_candidates():
    cm = CostModel(CPU, time_candidates=True)
    cands = cm.candidates(96, 64, 4, Config(structure="auto", force=True, blocks=(1, 4),
                                            rank_fractions=(0.25,), compressions=(2,)))
    assert [c.describe() for c in cands] == ["dense", "lowrank r=9", "blast b=4 r=8",
                                             "ss1 c=2"]
    for c in cands:
        assert c.measured and c.time_s > 0
        assert c.bytes > 0 and c.flops > 0
    unforced = candidate_grid(cm, 96, 64, 4, Config(structure="auto", blocks=(1, 4),
                                                    rank_fractions=(0.25,), compressions=(2,)))
    assert unforced[0].measured and all(c.time_s < unforced[0].time_s for c in unforced[1:])
