"""Layer-parallel compression on torch.distributed: 2 gloo ranks == 1 process, work split."""
import os

import torch
import torch.multiprocessing as mp
from torch import nn

import structfx
from structfx import Config
from structfx.passes.store import FactorStore

from conftest import mlp as _mlp

CFG = Config(params=0.5, min_params=1024, progress=False, steps=20, estimate_steps=3,
             force=True, device="H100 SXM", blocks=(1, 2, 4))


def mlp():
    return _mlp(64, 128, 96, 128, 64, act=nn.ReLU)


def _compress(store):
    torch.manual_seed(1)
    x = torch.randn(16, 64)
    small = structfx.compress(mlp(), (x,), CFG, store=store)
    return small, x


def _worker(rank: int, world: int, init: str, out: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        store = FactorStore()
        small, x = _compress(store)
        torch.save({"state": {k: v.clone() for k, v in small.state_dict().items()},
                    "y": small(x).detach(), "factorizations": store.factorizations,
                    "estimations": store.estimations,
                    "report": [(d.name, d.structure, d.settings)
                               for d in structfx.last_report().layers]},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process_and_split_the_work(tmp_path):
    store = FactorStore()
    single, x = _compress(store)
    ref_state, ref_y = single.state_dict(), single(x)
    ref_report = [(d.name, d.structure, d.settings) for d in structfx.last_report().layers]
    assert store.factorizations == 4 and store.estimations == 4

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for g in got:
        assert g["report"] == ref_report
        assert set(g["state"]) == set(ref_state)
        for k, v in ref_state.items():
            assert torch.allclose(g["state"][k], v, atol=1e-6), k
        assert torch.allclose(g["y"], ref_y, atol=1e-5)
    # each rank estimated and factorized about half of the layers
    assert sorted(g["factorizations"] for g in got) == [2, 2]
    assert sorted(g["estimations"] for g in got) == [2, 2]


def _measured_worker(rank: int, world: int, init: str, out: str):
    """A rank whose own CPU measurement says no structured layer is faster (a shared machine
    can measure that differently per process): it must still take rank 0's."""
    import dataclasses

    import torch.distributed as dist

    from structfx.passes import device

    torch.set_num_threads(1)
    real = device.cpu_profile()
    # rank 0: memory-bound (bytes decide, so fewer parameters are faster); rank 1: every op
    # so costly that nothing structured is faster. Neither depends on this machine's speed.
    fast = dataclasses.replace(real, bandwidth=1e3, kernel_overhead_s=0.0, call_overhead_s=0.0)
    slow = dataclasses.replace(real, kernel_overhead_s=1.0, call_overhead_s=1.0)
    device.cpu_profile = (lambda: fast) if rank == 0 else (lambda: slow)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(1)
        x = torch.randn(16, 64)
        cfg = CFG.replace(device=None, force=False)
        small = structfx.compress(mlp(), (x,), cfg, store=FactorStore())
        torch.save({"y": small(x).detach(),
                    "report": [(d.name, d.structure, d.settings, d.skip, d.predicted_speedup)
                               for d in structfx.last_report().layers]},
                   os.path.join(out, f"measured{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_decide_alike_when_their_cpu_measurements_differ(tmp_path):
    """Regression: each rank measured its own CPU profile, so the ranks offered different
    candidates and the gathered estimates missed layers (KeyError in select)."""
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_measured_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    a, b = (torch.load(tmp_path / f"measured{r}.pt") for r in range(2))
    assert a["report"] == b["report"]
    assert any(r[1] != "dense" for r in a["report"]), a["report"]  # rank 0's view won
    assert torch.allclose(a["y"], b["y"], atol=1e-6)


def _first_worker(rank: int, world: int, init: str, out: str):
    import torch.distributed as dist

    from structfx.pipeline import _Dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        d = _Dist()
        calls = []
        value = d.first(lambda: calls.append(rank) or f"from rank {rank}")

        def broken():
            raise ValueError(f"no profile on rank {rank}")

        try:
            d.first(broken)
            raised = None
        except ValueError as e:
            raised = str(e)
        torch.save({"value": value, "calls": calls, "raised": raised},
                   os.path.join(out, f"first{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_first_runs_on_rank_0_and_raises_its_error_everywhere(tmp_path):
    """``_Dist.first``: only rank 0 computes; its exception reaches every rank (none is left
    waiting in the broadcast)."""
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_first_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    a, b = (torch.load(tmp_path / f"first{r}.pt") for r in range(2))
    assert a["value"] == b["value"] == "from rank 0"
    assert a["calls"] == [0] and b["calls"] == []
    assert a["raised"] == b["raised"] == "no profile on rank 0"
