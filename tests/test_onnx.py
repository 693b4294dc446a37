"""ONNX export: ai.structfx nodes + function bodies that stock onnxruntime runs (CPU).

Every check runs the exported file in onnxruntime and compares with the torch model it came
from, over several batch sizes and sequence lengths through one file.
"""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import structfx
from structfx import BlastLinear, Config, SS1Linear
from structfx.export import export_onnx, onnx_session
from structfx.kernels import onnx_functions, ss1_hash

from conftest import assert_untouched, snapshot, tiny_bert, tiny_gpt2
from conftest import mlp as _mlp

transformers = pytest.importorskip("transformers")

DOMAIN = onnx_functions.DOMAIN
FAST = dict(progress=False, steps=5, estimate_steps=1, force=True, rank_fractions=(0.5,))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # Factorization's small SVDs / solves: with two threads on a machine whose other core is
    # busy, OpenMP waits make them ~50x slower; one thread keeps this file fast anywhere.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(got: np.ndarray, want: torch.Tensor) -> float:
    want = want.detach().double().numpy()
    return float(np.abs(got - want).max() / np.abs(want).max())


def run(sess, *inputs) -> np.ndarray:
    feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feed)[0]


def cpu_session(path):
    return onnx_session(path, providers=["CPUExecutionProvider"], verbose=False)


def file_bytes(path) -> int:
    path = str(path)
    data = path + ".data"
    return os.path.getsize(path) + (os.path.getsize(data) if os.path.exists(data) else 0)


def dense_shapes(model: nn.Module) -> set:
    """Shapes a dense weight of one of ``model``'s structured layers would have in the file,
    where no other tensor of the model has that shape."""
    shapes = set()
    for m in model.modules():
        if isinstance(m, (BlastLinear, SS1Linear)):
            shapes |= {(m.out_features, m.in_features), (m.in_features, m.out_features)}
    own = {tuple(t.shape) for t in model.state_dict().values()}
    return shapes - own - {s[::-1] for s in own}


def check_file(path, model) -> onnx.ModelProto:
    """The checker passes; one ai.structfx node per structured layer, each with its function
    (by overload) in the file; the factors are initializers, no dense weight is."""
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    layers = [m for m in model.modules() if isinstance(m, (BlastLinear, SS1Linear))]
    nodes = [n for n in proto.graph.node if n.domain == DOMAIN]
    assert len(nodes) == len(layers) > 0
    assert {(o.domain, o.version) for o in proto.opset_import} >= {(DOMAIN, 1), ("", 20)}
    functions = {(f.domain, f.name, f.overload) for f in proto.functions}
    assert {(n.domain, n.op_type, n.overload) for n in nodes} == functions
    for f in proto.functions:
        assert {n.domain for n in f.node} == {""}  # standard ops only
    kinds = sorted(n.op_type for n in nodes)
    assert kinds == sorted("BlastLinear" if isinstance(m, BlastLinear) else "SS1Linear"
                           for m in layers)
    init_shapes = {tuple(t.dims) for t in proto.graph.initializer}
    assert not init_shapes & dense_shapes(model)
    # no more floats than the torch model has (a dense weight would be many more)
    floats = sum(int(np.prod(t.dims)) for t in proto.graph.initializer
                 if t.data_type == onnx.TensorProto.FLOAT)
    assert floats <= sum(t.numel() for t in model.state_dict().values()
                         if t.is_floating_point())
    # the factors are stored as they are
    factor_shapes = {tuple(p.shape) for m in layers for p in m.parameters()}
    assert factor_shapes <= init_shapes
    return proto


# ----------------------------------------------------------------------------- layers
class Chain(nn.Module):
    """Every body variant: BLAST low rank (1x1, 1x3, 3x1), unrolled mixing (2x4, 3x3), the
    concatenated mixing (5x6, more block-columns than onnx_functions.MIX_UNROLL), SS1 with
    custom and default block sizes; bias and no bias; no size divides by its blocks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([
            BlastLinear(100, 70, (2, 4), rank=9),
            SS1Linear(70, 90, compression=2, seed=3, bias=False, block_k=16, block_n=32),
            BlastLinear(90, 50, 3, rank=7, bias=False),
            SS1Linear(50, 77, compression=3, seed=5),
            BlastLinear(77, 65, 1, rank=6),
            BlastLinear(65, 61, (1, 3), rank=5, bias=False),
            BlastLinear(61, 59, (3, 1), rank=5),
            BlastLinear(59, 47, (5, 6), rank=4),
        ])
        with torch.no_grad():  # S = 1 would hide a mixing bug
            for m in self.layers:
                if isinstance(m, BlastLinear):
                    m.S.normal_()

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@pytest.fixture(scope="module")
def chain_file(tmp_path_factory):
    model = Chain().eval()
    path = tmp_path_factory.mktemp("chain") / "chain.onnx"
    before, types = snapshot(model), [type(m) for m in model.modules()]
    export_onnx(model, torch.randn(3, 5, 100), path)
    assert_untouched(model, before, types=types)
    return model, path


def test_layers_match_torch_for_any_batch_and_sequence(chain_file):
    model, path = chain_file
    sess = cpu_session(path)
    for shape in [(1, 1, 100), (3, 5, 100), (2, 17, 100), (7, 3, 100)]:
        x = torch.randn(shape)
        with torch.no_grad():
            want = model(x)
        got = run(sess, x)
        assert got.shape == tuple(want.shape)
        assert rel_err(got, want) < 1e-4, shape


def test_file_holds_custom_nodes_functions_and_factors(chain_file):
    model, path = chain_file
    proto = check_file(path, model)
    nodes = [n for n in proto.graph.node if n.domain == DOMAIN]
    overloads = [n.overload for n in nodes]
    assert overloads == ["2x4_bias", "", "3x3", "bias", "1x1_bias", "1x3", "3x1_bias",
                         "5x6_bias"]
    attrs = {a.name: a.i for a in nodes[0].attribute}
    assert attrs == {"in_features": 100, "out_features": 70}
    attrs = {a.name: a.i for a in nodes[1].attribute}
    assert attrs["compression"] == 2 and (attrs["block_k"], attrs["block_n"]) == (16, 32)
    coeffs = tuple(attrs[f"r{k}"] for k in range(4))
    assert coeffs == ss1_hash.hash_coeffs(3)
    # dynamic batch and sequence axes, static features
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, True, False] and dims[2].dim_value == 100


def test_ss1_body_indices_are_the_hash():
    """The SS1 body rebuilds ss1_hash's index map from the attributes: run it alone on the
    identity to read W back, and compare with ss1_hash.dense_weight."""
    import onnx.helper as oh

    K, N, c, seed, bk, bn = 70, 90, 2, 11, 16, 32
    P = torch.randn(N, ss1_hash.reduced_k(K, c, bk))
    r = ss1_hash.hash_coeffs(seed)
    node = oh.make_node("SS1Linear", ["x", "P"], ["y"], domain=DOMAIN, compression=c,
                        block_k=bk, block_n=bn, r0=r[0], r1=r[1], r2=r[2], r3=r[3])
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                  ["T", K])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["T", N])],
                          [onnx.numpy_helper.from_array(P.numpy(), "P")])
    model = oh.make_model(graph, ir_version=10, functions=[onnx_functions.ss1_function(False)],
                          opset_imports=[oh.make_opsetid("", 20), oh.make_opsetid(DOMAIN, 1)])
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    W = sess.run(None, {"x": np.eye(K, dtype=np.float32)})[0]
    want = ss1_hash.dense_weight(P, K, c, seed, bk, bn)
    np.testing.assert_array_equal(W, want.numpy())


# ----------------------------------------------------------------------------- transformers
def small_bert():
    return tiny_bert(vocab=200, hidden=64, layers=1, intermediate=200)


def small_gpt2():
    return tiny_gpt2(vocab=200, hidden=96, lm_head=False)


@pytest.mark.parametrize("make, config", [
    (small_bert, Config(structure="blast", blocks=(2,), min_params=4000, **FAST)),
    (small_gpt2, Config(structure="ss1", compressions=(2, 3), min_params=4000, **FAST)),
], ids=["bert-blast", "gpt2-ss1"])
def test_transformer_compressed_then_exported(tmp_path, make, config):
    model = make()
    ids = torch.randint(0, 200, (2, 9))
    small = structfx.compress(model, (ids,), config).eval()
    assert len(structfx.last_report().replaced) >= 4
    path = tmp_path / "model.onnx"
    export_onnx(small, (ids,), path)
    check_file(path, small)
    sess = cpu_session(path)
    for batch, seq in [(1, 1), (2, 9), (3, 20), (1, 64)]:
        ids = torch.randint(0, 200, (batch, seq))
        with torch.no_grad():
            want = small(ids).last_hidden_state
        assert rel_err(run(sess, ids), want) < 1e-4, (batch, seq)


def mlp(width=256):
    return _mlp(width, 2 * width, 2 * width, width)


def test_dense_model_is_compressed_and_left_untouched(tmp_path):
    model = mlp(96)
    before, types = snapshot(model), [type(m) for m in model.modules()]
    x = torch.randn(4, 96)
    config = Config(blocks=(2,), min_params=1000, **FAST)
    path = export_onnx(model, x, tmp_path / "mlp.onnx", config)
    assert path == tmp_path / "mlp.onnx"
    assert_untouched(model, before, types=types)
    small = structfx.compress(model, x, config)  # same decisions and factors (cached)
    check_file(path, small)
    sess = cpu_session(path)
    for batch in (1, 4, 33):
        x = torch.randn(batch, 96)
        with torch.no_grad():
            want = small(x)
        assert rel_err(run(sess, x), want) < 1e-4


# ----------------------------------------------------------------------------- file size
@pytest.fixture(scope="module")
def dense_mlp_file(tmp_path_factory):
    model = mlp()
    path = tmp_path_factory.mktemp("dense") / "dense.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(4, 256),), str(path), dynamo=True,
                          external_data=True, verbose=False)
    return model, path


@pytest.mark.parametrize("structure", ["blast", "ss1"])
def test_half_the_params_at_most_60_percent_of_the_dense_file(tmp_path, dense_mlp_file,
                                                              structure):
    model, dense_path = dense_mlp_file
    config = Config(structure=structure, params=0.5, blocks=(2,), compressions=(2,), **FAST)
    path = export_onnx(model, torch.randn(4, 256), tmp_path / "small.onnx", config)
    assert os.path.exists(str(path) + ".data")
    ratio = file_bytes(path) / file_bytes(dense_path)
    assert ratio <= 0.6, ratio
    assert len(structfx.last_report().replaced) == 3
    check_file(path, structfx.compress(model, torch.randn(4, 256), config))  # cached factors


# ----------------------------------------------------------------------------- errors
def test_bad_paths_and_arguments(tmp_path, chain_file):
    model, _ = chain_file
    x = torch.randn(2, 3, 100)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(model, x, tmp_path / "missing" / "m.onnx")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        export_onnx(model, x, tmp_path)
    with pytest.raises(ValueError, match="already compressed"):
        export_onnx(model, x, tmp_path / "m.onnx", Config())
    with pytest.raises(TypeError, match="nn.Module"):
        export_onnx(lambda t: t, x, tmp_path / "m.onnx")
    with pytest.raises(FileNotFoundError, match="no model file"):
        onnx_session(tmp_path / "nothing.onnx")
    assert not list(tmp_path.iterdir())


def test_nothing_replaced_warns_and_exports_the_dense_model(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(3, 8)
    with pytest.warns(UserWarning, match="replaced no layer"):
        path = export_onnx(model, x, tmp_path / "tiny.onnx", Config(progress=False))
    proto = onnx.load(str(path))
    assert not [n for n in proto.graph.node if n.domain == DOMAIN] and not proto.functions
    np.testing.assert_allclose(run(cpu_session(path), x), model(x).detach().numpy(),
                               rtol=1e-5, atol=1e-6)


def test_size_one_example_axes_still_vary(tmp_path):
    model = nn.Sequential(BlastLinear(40, 30, 2, rank=4)).eval()
    path = export_onnx(model, torch.randn(1, 1, 40), tmp_path / "m.onnx")
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, True, False]
    x = torch.randn(4, 6, 40)
    with torch.no_grad():
        want = model(x)
    assert rel_err(run(cpu_session(path), x), want) < 1e-4


def test_user_dynamic_shapes_are_used(tmp_path):
    model = nn.Sequential(BlastLinear(40, 30, 2, rank=4)).eval()
    path = export_onnx(model, torch.randn(3, 40), tmp_path / "m.onnx", dynamic_shapes=({},))
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [3, 40]


# ----------------------------------------------------------------------------- session
def test_session_on_cpu_says_which_provider(chain_file, capsys):
    _, path = chain_file
    sess = onnx_session(path)
    assert sess.structfx_provider == sess.get_providers()[0]
    if not torch.cuda.is_available():
        assert sess.structfx_provider == "CPUExecutionProvider"
    line = capsys.readouterr().out.strip()
    assert line.endswith(sess.structfx_provider) and "chain.onnx" in line
    assert onnx_session(path, verbose=False) and capsys.readouterr().out == ""


def test_session_prefers_cuda_when_installed_and_present(chain_file, monkeypatch):
    _, path = chain_file
    asked = []

    class FakeSession:
        def __init__(self, model, sess_options=None, providers=None):
            asked.append(providers)

        def get_providers(self):
            return asked[-1]

    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert onnx_session(path, verbose=False).structfx_provider == "CUDAExecutionProvider"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # onnxruntime-gpu, no GPU
    assert onnx_session(path, verbose=False).structfx_provider == "CPUExecutionProvider"
    assert asked == [["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]]


# ----------------------------------------------------------------------------- bench
def test_bench_onnx_quick(tmp_path):
    out = tmp_path / "onnx.json"
    proc = subprocess.run([sys.executable, "-m", "structfx.bench", "onnx", "--quick",
                           "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [[c.strip() for c in line.strip("|").split("|")]
             for line in proc.stdout.splitlines() if line.startswith("|")]
    assert lines[0] == ["batch", "seq", "dense ms", "structured ms", "ratio",
                        "ORT vs torch err"]
    assert len(lines) == 3 and lines[2][:2] == ["2", "16"]  # header, rule, one row
    data = json.loads(out.read_text())
    assert data["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert data["replaced"] == data["layers_total"] == 4
    (cell,) = data["cells"]
    assert cell["dense_ms"] > 0 and cell["structured_ms"] > 0
    assert abs(cell["ratio"] - cell["dense_ms"] / cell["structured_ms"]) < 1e-9
    assert cell["max_rel_err"] < 1e-4
    assert data["file_bytes"]["structured"] < data["file_bytes"]["dense"]
