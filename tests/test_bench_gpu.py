"""``python -m structfx.bench gpu --dry-run``: the rehearsal of the one-run GPU proof.

On CPU with TRITON_INTERPRET=1 at tiny sizes it must go through every step (so a typo can't
burn a GPU run), write its files, and check the Triton kernels against the fp64 references for
real: the kernel checks below would fail on a wrong kernel. A failure injected into one step is
reported with its case and the run goes on. Subprocesses: the command is what a user types,
and the benchmark's process-wide settings stay out of the test session. No timing is asserted.
"""
import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from structfx import bench_gpu

REPO = Path(__file__).resolve().parents[1]


def run_gpu(out, *extra, timeout=900):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "structfx.bench", "gpu", "--dry-run", "--out",
                           str(out), *extra], capture_output=True, text=True, timeout=timeout,
                          env=env)


def load(out):
    return json.loads((out / "bench-gpu.json").read_text())


def test_dry_run_goes_through_every_step(tmp_path):
    proc = run_gpu(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = load(tmp_path)
    steps = data["steps"]
    assert data["dry_run"] and list(steps) == bench_gpu.STEPS == data["selected"]
    status = {name: s["status"] for name, s in steps.items()}
    assert set(status.values()) <= {"ok", "skipped"}, status
    assert status["env"] == status["blast-kernels"] == status["ss1-kernels"] == "ok"

    # The kernel checks ran and compared against the references, every kernel and dtype.
    for name in ("blast-kernels", "ss1-kernels", "ops-autograd", "compile-fullgraph",
                 "backend-bert", "ops-table"):
        cases = steps[name]["cases"]
        assert cases, name
        for c in cases:
            assert c["ok"] and c["unwritten"] == 0 and 0 <= c["error"] <= c["tol"], (name, c)
    blast = {c["what"] for c in steps["blast-kernels"]["cases"]}
    assert blast >= {"stage1 z", "fused mix+U-GEMM", "mix", "forward", "backward dx",
                     "backward dU", "backward dS", "backward dV", "backward dbias"}
    assert {c["what"] for c in steps["ss1-kernels"]["cases"]} == {"forward", "dx", "dP"}
    for name in ("blast-kernels", "ss1-kernels", "ops-autograd"):
        assert {c["dtype"] for c in steps[name]["cases"]} == {"bf16", "fp16", "fp32"}, name
    labels = " ".join(c["case"] for c in steps["blast-kernels"]["cases"])
    for T in bench_gpu.DRY_SIZES.tokens:
        assert f"T={T} " in labels + " "
    assert "bias" in labels and "config #0" in labels

    # Tables: every timed method of the ops table, llama rows dense and structured per mode.
    cells = steps["ops-table"]["data"]["cells"]
    assert len(cells) == 4
    assert all(e["ms"] > 0 and math.isfinite(e["ms"]) for c in cells for e in c["methods"].values())
    assert {"dense", "low rank", "BLAST b=2", "BLAST b=4", "SS1 c=2"} <= set(cells[0]["methods"])
    rows = steps["llama"]["data"]["rows"]
    assert {(r["mode"], r["model"]) for r in rows} == {
        ("default", "dense"), ("default", "SS1 c=2"), ("reduce-overhead", "dense"),
        ("reduce-overhead", "SS1 c=2")}
    assert all(r["replaced"] > 0 for r in rows if r["model"] != "dense")
    assert all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in rows)
    assert steps["onnx-cuda"]["data"]["cells"][0]["max_rel_err"] < 1e-3

    md = (tmp_path / "bench-gpu.md").read_text()
    assert "DRY RUN" in md and "no number here is a GPU figure" in md
    assert f"Command: `python -m structfx.bench gpu --dry-run --out {tmp_path}`" in md
    assert "Date: 20" in md
    for section in ("## Environment", "## Steps", "## Ceilings", "## Ops table",
                    "## examples/llama_gpu.py", "## onnxruntime"):
        assert section in md
    log = (tmp_path / "log.txt").read_text()
    for name in bench_gpu.STEPS:
        assert f"== {name}:" in log
    # The summary table is printed last: one row per step.
    tail = proc.stdout.strip().splitlines()[-len(bench_gpu.STEPS):]
    assert [line.split("|")[1].strip() for line in tail] == bench_gpu.STEPS


def test_injected_failure_is_reported_and_the_run_goes_on(tmp_path):
    proc = run_gpu(tmp_path, "--only", "ss1-kernels,ops-autograd",
                   "--inject-failure", "ss1-kernels")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = load(tmp_path)["steps"]
    assert list(steps) == ["env", "ss1-kernels", "ops-autograd"]
    ss1 = steps["ss1-kernels"]
    assert ss1["status"] == "failed"
    # the first case failed with its shape named; the step's other cases still ran
    assert len(ss1["failures"]) == 1 and "injected failure" in ss1["failures"][0]
    assert "K=" in ss1["failures"][0] and "T=" in ss1["failures"][0]
    assert ss1["cases"] and all(c["ok"] for c in ss1["cases"])
    assert steps["env"]["status"] == steps["ops-autograd"]["status"] == "ok"
    assert "injected failure" in (tmp_path / "bench-gpu.md").read_text()


def test_steps_that_no_longer_fit_the_budget_are_skipped_and_say_so(tmp_path):
    proc = run_gpu(tmp_path, "--budget-s", "2", "--only", "ceilings,ss1-kernels")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = load(tmp_path)["steps"]
    assert steps["env"]["status"] == "ok"  # env always runs; it outlasts the 2 s budget
    for name in ("ceilings", "ss1-kernels"):
        assert steps[name]["status"] == "skipped" and "budget" in steps[name]["note"], name
        assert not steps[name]["cases"]
    assert "skipped" in (tmp_path / "bench-gpu.md").read_text()


def test_staged_launcher_runs_without_pip(tmp_path):
    """benchmarks/gpu.sh's no-pip fallback: the package layout staged on PYTHONPATH."""
    env = dict(os.environ, TRITON_INTERPRET="1", STRUCTFX_STAGE="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), str(tmp_path),
                           "--dry-run", "--only", "env"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu.sh: structfx staged at" in proc.stdout
    info = load(tmp_path)["steps"]["env"]["data"]["info"]
    assert info["structfx from"].endswith("/site/structfx")


def _step(tmp_path):
    args = argparse.Namespace(out=str(tmp_path), dry_run=True, budget_s=60.0, argv=[],
                              params=0.5, only=None, inject_failure=None)
    run = bench_gpu.Run(args)
    return bench_gpu.Step(run, bench_gpu.StepResult("t"), float("inf"), inject=False)


def test_poisoning_shows_unwritten_elements():
    originals = (torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty)
    with bench_gpu.poisoned_outputs() as count:
        y = torch.empty(4, 5)
        y[:3] = 1.0                      # a "kernel" that misses the last row
        idx = torch.empty(3, dtype=torch.int64)
        z = y.new_empty(2)
    assert count[0] == 2                 # float allocations only
    assert torch.isnan(y[3]).all() and not torch.isnan(y[:3]).any() and torch.isnan(z).all()
    assert idx.dtype == torch.int64
    assert (torch.empty, torch.empty_like, torch.empty_strided,
            torch.Tensor.new_empty) == originals  # restored


def test_compare_flags_errors_and_unwritten(tmp_path):
    st = _step(tmp_path)
    ref = torch.randn(64, 32, dtype=torch.float64)
    assert st.compare("a", "close", ref * (1 + 1e-3), ref, torch.bfloat16)
    assert not st.compare("b", "far", ref * 1.05, ref, torch.bfloat16)
    assert not st.compare("c", "fp32 tolerance", ref * (1 + 1e-3), ref, torch.float32)
    holey = ref.clone()
    holey[5, 7] = float("nan")
    assert not st.compare("d", "unwritten", holey, ref, torch.bfloat16)
    assert not st.compare("e", "shape", ref[:10], ref, torch.bfloat16)
    fails = st.r.failures
    assert len(fails) == 4 and "NaN" in fails[2] and "shape" in fails[3]
    assert [c["ok"] for c in st.r.cases] == [True, False, False, False, False]
    st.run.log_file.close()


@pytest.mark.parametrize("dry", [True, False])
def test_cases_cover_every_value(tmp_path, dry):
    st = _step(tmp_path)
    st.run.dry = dry
    axes = (["a", "b", "c"], [1, 2, 3, 4, 5], [False, True])
    cases = bench_gpu.cases_for(st.run, *axes)
    for k, axis in enumerate(axes):
        assert {c[k] for c in cases} == set(axis)
    assert len(cases) == (30 if not dry else len(set(cases)))
    st.run.log_file.close()
