"""structfx.save / load: safetensors + structfx.json, bit-identical reloads without factorizing,
clear errors for tampered folders."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import structfx
from structfx.save import CheckpointError

CFG = structfx.Config(params=0.5, min_params=0, force=True, blocks=(2,), rank_fractions=(0.5,),
                      compressions=(2,), steps=5, estimate_steps=1, progress=False)


class Net(nn.Module):
    def __init__(self, d=32, h=64):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(self.fc2(torch.relu(self.fc1(x))))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = Net().eval()
    small = structfx.compress(model, torch.randn(4, 32), CFG.replace(structure="auto"))
    folder = tmp_path_factory.mktemp("ckpt")
    structfx.save(small, folder)
    return small, folder


def test_round_trip_is_bit_identical_and_does_not_factorize(saved, monkeypatch):
    small, folder = saved
    import structfx.passes.factorize as fz

    def boom(*a, **k):
        raise AssertionError("load must not factorize")

    monkeypatch.setattr(fz, "factorize_blast", boom)
    monkeypatch.setattr(fz, "project_ss1", boom)
    x = torch.randn(3, 7, 32)
    for target in (Net, Net()):  # a class (built on meta) or an instance (filled in place)
        again = structfx.load(target, folder)
        assert type(again.fc1) is type(small.fc1) and type(again.fc2) is type(small.fc2)
        with torch.no_grad():
            assert torch.equal(again(x), small(x))
        for (k, a), (k2, b) in zip(sorted(again.state_dict().items()),
                                   sorted(small.state_dict().items())):
            assert k == k2 and torch.equal(a, b) and a.dtype == b.dtype


def test_folder_contents(saved):
    small, folder = saved
    meta = json.loads((folder / "structfx.json").read_text())
    assert meta["format"] == "structfx" and meta["format_version"] == 1
    assert set(meta["layers"]) == {d.name for d in small.structfx_report.replaced}
    for name, rec in meta["layers"].items():
        mod = small.get_submodule(name)
        assert rec["in_features"] == mod.in_features and rec["dtype"] == "float32"
        assert rec["replaced"] == "Linear"
        assert rec["bias"] == (mod.bias is not None)
    tensors = load_file(str(folder / "model.safetensors"))
    assert set(tensors) == set(small.state_dict())
    assert "fc1.weight" not in tensors  # the replaced dense weights are gone
    assert not [p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    assert structfx.Report.load(folder).to_dict() == small.structfx_report.to_dict()


def test_parameters_are_built_on_meta(saved, monkeypatch):
    """Building the architecture allocates no parameter on a real device."""
    small, folder = saved
    from structfx import save as save_mod

    seen = []

    class Spy(Net):
        def __init__(self):
            super().__init__()
            seen.extend(p.device.type for p in self.parameters())

    again = structfx.load(Spy, folder)
    assert seen and set(seen) == {"meta"}
    assert all(p.device.type == "cpu" for p in again.parameters())
    assert save_mod  # noqa


def _copy(folder, tmp_path):
    import shutil

    dst = tmp_path / "c"
    shutil.copytree(folder, dst)
    return dst


@pytest.mark.parametrize("edit, msg", [
    (lambda m, n: m["layers"][n].update(rank=0), r"layer 'fc1'.*'rank' must be an integer"),
    (lambda m, n: m["layers"][n].update(structure="magic"), r"layer 'fc1'.*unknown structure"),
    (lambda m, n: m["layers"][n].update(in_features=31), r"layer 'fc1'.*maps 32 -> 64"),
    (lambda m, n: m["layers"].update(nope=m["layers"][n]), r"no module 'nope'"),
    (lambda m, n: m["layers"][n].update(dtype="int8"), r"layer 'fc1'.*not a floating-point"),
    (lambda m, n: m.update(format_version=99), r"format_version 99"),
    (lambda m, n: m.update(format="other"), r"not a structfx checkpoint"),
])
def test_tampered_structfx_json(saved, tmp_path, edit, msg):
    small, folder = saved
    dst = _copy(folder, tmp_path)
    meta = json.loads((dst / "structfx.json").read_text())
    if "fc1" not in meta["layers"]:
        pytest.skip("fc1 stayed dense")
    if meta["layers"]["fc1"]["structure"] != "blast" and "rank" in msg:
        meta["layers"]["fc1"].update(structure="blast", blocks=[2, 2])
    edit(meta, "fc1")
    (dst / "structfx.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=msg):
        structfx.load(Net, dst)


def test_wrong_tensor_shape_names_the_module(saved, tmp_path):
    small, folder = saved
    dst = _copy(folder, tmp_path)
    t = load_file(str(dst / "model.safetensors"))
    key = next(k for k in t if k.startswith("fc1.") and k != "fc1.bias" and t[k].dim() >= 2)
    t[key] = torch.zeros(*[s + 1 for s in t[key].shape])
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"module 'fc1'.*{key}.*shape"):
        structfx.load(Net, dst)


def test_missing_and_extra_tensors(saved, tmp_path):
    small, folder = saved
    dst = _copy(folder, tmp_path)
    t = load_file(str(dst / "model.safetensors"))
    t.pop("norm.weight")
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*norm.weight"):
        structfx.load(Net, dst)
    t["norm.weight"] = torch.ones(32)
    t["stray"] = torch.ones(2)
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no place for.*stray"):
        structfx.load(Net, dst)


def test_garbage_files(saved, tmp_path):
    small, folder = saved
    dst = _copy(folder, tmp_path)
    (dst / "structfx.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        structfx.load(Net, dst)
    dst2 = _copy(folder, tmp_path / "x")
    (dst2 / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        structfx.load(Net, dst2)
    with pytest.raises(FileNotFoundError, match="no folder"):
        structfx.load(Net, tmp_path / "absent")


def test_graph_module_is_not_saved(tmp_path):
    small = structfx.compress(Net().eval(), torch.randn(4, 32), CFG, output="graph")
    with pytest.raises(TypeError, match="torch.export"):
        structfx.save(small, tmp_path)


def test_ss1_seed_survives(tmp_path):
    torch.manual_seed(0)
    model = Net(128, 256).eval()
    small = structfx.compress(model, torch.randn(4, 128), CFG.replace(structure="ss1"))
    ss1 = [m for m in small.modules() if isinstance(m, structfx.SS1Linear)]
    assert ss1
    structfx.save(small, tmp_path)
    again = structfx.load(lambda: Net(128, 256), tmp_path)  # a factory
    for a, b in zip(ss1, [m for m in again.modules() if isinstance(m, structfx.SS1Linear)]):
        assert a.seed == b.seed and a.compression == b.compression
    x = torch.randn(2, 128)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
