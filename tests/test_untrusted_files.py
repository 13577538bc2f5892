"""Loading never executes or reads what a downloaded file smuggles in.

- ONNX external data must lie inside the model's folder: absolute paths, `..`
  escapes and symlinks out are refused by `engines.onnx_files` (which every backend
  calls before opening a model), with a message naming the file and the location.
- The wire-format reader is checked against the `onnx` package as oracle: it finds
  exactly the external references `onnx.external_data_helper` finds.
- Checkpoints holding only pickle-based weights are refused unless the user passes
  the flag that says it runs code.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import _get_all_tensors, uses_external_data

from sdrt.engines.errors import ArtifactError, SdrtError
from sdrt.engines.families import FAMILIES
from sdrt.engines.onnx_files import check_external_data, external_data_refs
from sdrt.engines.specs import Stage

WEIGHTS = np.arange(16, dtype=np.float32).reshape(4, 4)


def _external(tensor: onnx.TensorProto, location: str, offset: int = 0, length: int | None = None) -> onnx.TensorProto:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset)}
    if length is not None:
        entries["length"] = str(length)
    for k, v in entries.items():
        e = tensor.external_data.add()
        e.key, e.value = k, v
    return tensor


def _matmul_model(folder: Path, location: str, write_data: bool = True) -> Path:
    """y = x @ W with W stored externally at `location` (relative to folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    w = _external(numpy_helper.from_array(WEIGHTS, "W"), location, 0, WEIGHTS.nbytes)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    if write_data:
        target = folder / location
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(WEIGHTS.tobytes())
    return path


@pytest.fixture
def outside(tmp_path) -> Path:
    """A 'secret' file next to (not inside) the model folder."""
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(WEIGHTS.tobytes())
    return secret


def test_relative_location_inside_folder_is_accepted(tmp_path):
    path = _matmul_model(tmp_path / "m", "sub/w.bin")
    refs = check_external_data(path)
    assert [(r.tensor, r.location, r.offset, r.length) for r in refs] == [("W", "sub/w.bin", 0, 64)]


def test_dotdot_location_that_stays_inside_is_accepted(tmp_path):
    path = _matmul_model(tmp_path / "m", "sub/../w.bin")
    assert check_external_data(path)[0].location == "sub/../w.bin"


def test_dotdot_escape_is_refused_naming_file_and_location(tmp_path, outside):
    path = _matmul_model(tmp_path / "m", "../outside/secret.bin", write_data=False)
    with pytest.raises(ArtifactError) as e:
        check_external_data(path)
    assert str(path) in str(e.value) and "'../outside/secret.bin'" in str(e.value) and "refused" in str(e.value)


def test_absolute_location_is_refused(tmp_path, outside):
    path = _matmul_model(tmp_path / "m", str(outside), write_data=False)
    with pytest.raises(ArtifactError, match="absolute paths are refused"):
        check_external_data(path)


@pytest.mark.parametrize("location", ["C:\\Windows\\secret.bin", "\\\\server\\share\\w.bin"])
def test_windows_absolute_location_is_refused(tmp_path, location):
    path = _matmul_model(tmp_path / "m", location, write_data=False)
    with pytest.raises(ArtifactError, match="absolute paths are refused"):
        check_external_data(path)


def test_symlink_out_of_folder_is_refused(tmp_path, outside):
    path = _matmul_model(tmp_path / "m", "w.bin", write_data=False)
    (tmp_path / "m" / "w.bin").symlink_to(outside)
    with pytest.raises(ArtifactError, match="outside"):
        check_external_data(path)


def test_symlinked_folder_out_is_refused(tmp_path, outside):
    path = _matmul_model(tmp_path / "m", "data/secret.bin", write_data=False)
    (tmp_path / "m" / "data").symlink_to(outside.parent, target_is_directory=True)
    with pytest.raises(ArtifactError, match="outside"):
        check_external_data(path)


def test_symlink_inside_folder_is_accepted(tmp_path):
    path = _matmul_model(tmp_path / "m", "w.bin", write_data=False)
    (tmp_path / "m" / "real.bin").write_bytes(WEIGHTS.tobytes())
    (tmp_path / "m" / "w.bin").symlink_to("real.bin")
    assert check_external_data(path)[0].location == "w.bin"


def test_model_file_symlinked_from_outside_is_refused(tmp_path):
    real = _matmul_model(tmp_path / "elsewhere", "w.bin")
    folder = tmp_path / "artifacts"
    folder.mkdir()
    (folder / "model.onnx").symlink_to(real)
    with pytest.raises(ArtifactError, match="resolves outside"):
        check_external_data(folder / "model.onnx", root=folder)


def test_missing_external_file_is_named(tmp_path):
    path = _matmul_model(tmp_path / "m", "w.bin", write_data=False)
    with pytest.raises(ArtifactError, match=r"w\.bin.* is missing"):
        check_external_data(path)


def test_truncated_external_file_is_named_with_sizes(tmp_path):
    path = _matmul_model(tmp_path / "m", "w.bin")
    (tmp_path / "m" / "w.bin").write_bytes(WEIGHTS.tobytes()[:40])
    with pytest.raises(ArtifactError, match=r"w\.bin: truncated: tensor 'W' needs bytes up to 64, the file has 40"):
        check_external_data(path)


def test_truncated_model_file_is_reported_corrupt(tmp_path):
    path = _matmul_model(tmp_path / "m", "w.bin")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        check_external_data(path)


def test_empty_model_file_is_reported(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"")
    with pytest.raises(ArtifactError, match="empty file"):
        external_data_refs(path)


def _nested_model(folder: Path, location: str) -> Path:
    """External tensors in every place the reader descends: a Constant node's
    attribute, a sparse initializer, an If node's subgraph and a model function."""
    folder.mkdir(parents=True, exist_ok=True)
    const = helper.make_node("Constant", [], ["c"],
                             value=_external(numpy_helper.from_array(WEIGHTS, "const_w"), location, 0, 64))
    sparse = helper.make_sparse_tensor(
        _external(numpy_helper.from_array(np.array([1.0], np.float32), "sparse_v"), location, 0, 4),
        numpy_helper.from_array(np.array([0], np.int64), "sparse_i"), [4])
    sub_const = helper.make_node("Constant", [], ["s"],
                                 value=_external(numpy_helper.from_array(WEIGHTS, "sub_w"), location, 0, 64))
    sub = helper.make_graph([sub_const], "then", [], [helper.make_tensor_value_info("s", TensorProto.FLOAT, [4, 4])])
    if_node = helper.make_node("If", ["cond"], ["z"], then_branch=sub, else_branch=sub)
    fn_const = helper.make_node("Constant", [], ["f"],
                                value=_external(numpy_helper.from_array(WEIGHTS, "fn_w"), location, 0, 64))
    fn = helper.make_function("local", "F", [], ["f"], [fn_const], [helper.make_opsetid("", 17)])
    graph = helper.make_graph(
        [const, if_node], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 4])],
        sparse_initializer=[sparse])
    model = helper.make_model(graph, functions=[fn],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    path = folder / "nested.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_reader_finds_external_tensors_in_attributes_sparse_subgraphs_and_functions(tmp_path):
    path = _nested_model(tmp_path / "m", "w.bin")
    found = sorted(r.tensor for r in external_data_refs(path))
    assert found == ["const_w", "fn_w", "sparse_v", "sub_w", "sub_w"]  # then and else branch


def test_escape_hidden_in_a_subgraph_is_refused(tmp_path, outside):
    path = _nested_model(tmp_path / "m", "../outside/secret.bin")
    with pytest.raises(ArtifactError, match="outside"):
        check_external_data(path)


def test_reader_agrees_with_onnx_package_on_exported_unet(sd15_artifacts):
    """Oracle: onnx's own walk over all tensors, on the real exported U-Net."""
    path = sd15_artifacts / "unet.onnx"
    model = onnx.load(str(path), load_external_data=False)
    expected = sorted(
        (t.name, {e.key: e.value for e in t.external_data}["location"])
        for t in _get_all_tensors(model) if uses_external_data(t))
    assert expected, "the exported U-Net is expected to use external data"
    got = sorted((r.tensor, r.location) for r in check_external_data(path))
    assert got == expected


def test_onnxruntime_backend_refuses_escape_before_opening(tmp_path, sd15_artifacts, outside):
    """The ORT engine runs the check itself; the copied U-Net whose data file is a
    symlink out of the folder is refused with our message, not ORT's."""
    from sdrt.engines.registry import open_engines
    from sdrt.engines.manifest import read_manifest

    folder = tmp_path / "a"
    # Without other tests' ORT cache: a cached graph would be opened instead of unet.onnx.
    shutil.copytree(sd15_artifacts, folder, ignore=shutil.ignore_patterns(".sdrt-cache"))
    data = folder / "unet.onnx.data"
    moved = outside.parent / "unet.onnx.data"
    shutil.move(data, moved)
    data.symlink_to(moved)
    manifest = read_manifest(folder)
    with pytest.raises(ArtifactError, match="outside"):
        open_engines(folder, manifest, "onnxruntime")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash_the_reader(tmp_path, blob):
    """Fuzz: any file either parses or raises ArtifactError; nothing else escapes."""
    path = tmp_path / "fuzz.onnx"
    path.write_bytes(blob)
    try:
        external_data_refs(path)
    except SdrtError:
        pass


def test_every_prefix_of_a_model_parses_or_is_reported(tmp_path):
    path = _nested_model(tmp_path / "m", "w.bin")
    data = path.read_bytes()
    cut = tmp_path / "cut.onnx"
    for n in range(0, len(data), max(1, len(data) // 200)):
        cut.write_bytes(data[:n])
        try:
            external_data_refs(cut)
        except ArtifactError:
            pass


# -- pickle-based checkpoints ------------------------------------------------------

class _Evil:
    """Unpickling this creates a marker file: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_checkpoint(src: Path, dst: Path, component: str = "unet", keep_safetensors: bool = False) -> Path:
    """Copy a checkpoint with one component's weights as a torch pickle (.bin)."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    st = dst / component / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), dst / component / "diffusion_pytorch_model.bin")
    if not keep_safetensors:
        st.unlink()
    return dst


def test_pickle_only_checkpoint_is_refused_naming_file_and_flag(tiny_sd15, tmp_path, capsys):
    from sdrt.engines.errors import InvalidInput
    from sdrt.export.checkpoint import open_checkpoint
    from sdrt.cli.main import main

    model = _pickle_checkpoint(tiny_sd15, tmp_path / "model")
    with pytest.raises(InvalidInput, match=r"unet/diffusion_pytorch_model\.bin.*execute code.*--allow-pickle-code-execution"):
        open_checkpoint(model)
    out = tmp_path / "out"
    assert main(["export", str(model), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "diffusion_pytorch_model.bin" in err and "Traceback" not in err
    assert not out.exists(), "a refused export must not create its output folder"


def test_pickle_weights_load_only_with_the_flag_and_match_safetensors(tiny_sd15, tmp_path):
    import torch
    from safetensors.torch import load_file

    from sdrt.export.checkpoint import load_module, open_checkpoint

    model = _pickle_checkpoint(tiny_sd15, tmp_path / "model")
    ckpt = open_checkpoint(model, allow_pickle=True)
    unet = load_module(ckpt, Stage.UNET)
    reference = load_file(tiny_sd15 / "unet" / "diffusion_pytorch_model.safetensors")
    state = unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.items())


def test_code_in_a_pickle_beside_safetensors_never_runs(tiny_sd15, tmp_path):
    """A checkpoint carrying both formats is read from safetensors; the pickle,
    which here would create a marker file when unpickled, is never opened."""
    import torch

    from sdrt.export.checkpoint import STAGE_COMPONENT, load_module, open_checkpoint

    model = tmp_path / "model"
    shutil.copytree(tiny_sd15, model)
    marker = tmp_path / "code-ran"
    for component, name in (("unet", "diffusion_pytorch_model.bin"), ("vae", "diffusion_pytorch_model.bin"),
                            ("text_encoder", "pytorch_model.bin")):
        torch.save({"x": _Evil(marker)}, model / component / name)
    ckpt = open_checkpoint(model)   # no flag: loading a pickle here would be refused or run code
    for stage in FAMILIES[ckpt.facts().family].stages:
        # The optional safety checker is not in this checkpoint; ControlNets come from their own folders.
        if STAGE_COMPONENT.get(stage) in ckpt.weights:
            load_module(ckpt, stage)
    assert not marker.exists()


def test_code_in_a_pickle_only_checkpoint_never_runs_without_the_flag(tiny_sd15, tmp_path, capsys):
    import torch

    from sdrt.cli.main import main

    model = tmp_path / "model"
    shutil.copytree(tiny_sd15, model)
    marker = tmp_path / "code-ran"
    (model / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"x": _Evil(marker)}, model / "vae" / "diffusion_pytorch_model.bin")
    assert main(["export", str(model), "--out", str(tmp_path / "out")]) == 2
    assert "--allow-pickle-code-execution" in capsys.readouterr().err
    assert not marker.exists()


def test_tensorrt_build_refuses_escape_before_touching_tensorrt(tmp_path, outside):
    """`sdrt build` checks the graph before TensorRT's parser (which reads whatever
    location it is given) sees it; the fake `trt` would fail if it were reached."""
    from sdrt.engines.build import build_plan

    path = _matmul_model(tmp_path / "m", "../outside/secret.bin", write_data=False)
    with pytest.raises(ArtifactError, match="outside"):
        build_plan(object(), path, None)


def _sharded(src: Path, dst: Path, shard_names: tuple[str, str]) -> Path:
    """Copy a checkpoint with the U-Net split into two safetensors shards + an index."""
    import json

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    unet = dst / "unet"
    state = load_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(state)
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2:])
    weight_map = {}
    for name, part in zip(("part-1.safetensors", "part-2.safetensors"), halves):
        save_file({k: state[k].contiguous() for k in part}, unet / name)
    for shard, part in zip(shard_names, halves):
        weight_map.update({k: shard for k in part})
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_sharded_safetensors_checkpoint_loads_like_the_single_file(tiny_sd15, tmp_path):
    """The positive control for the refusals below."""
    import torch
    from safetensors.torch import load_file

    from sdrt.export.checkpoint import load_module, open_checkpoint

    model = _sharded(tiny_sd15, tmp_path / "model", ("part-1.safetensors", "part-2.safetensors"))
    state = load_module(open_checkpoint(model), Stage.UNET).state_dict()
    reference = load_file(tiny_sd15 / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(state[k], v) for k, v in reference.items())


@pytest.mark.parametrize("shard", ["../../outside.safetensors", "/etc/passwd", "part-2.bin", "sub/part-2.safetensors"])
def test_shard_index_naming_a_pickle_or_a_path_out_is_refused(tiny_sd15, tmp_path, shard):
    """diffusers would torch.load a non-.safetensors shard, or read a path joined onto
    the folder; the index must not smuggle either past the pickle refusal."""
    from sdrt.engines.errors import InvalidInput
    from sdrt.export.checkpoint import open_checkpoint

    model = _sharded(tiny_sd15, tmp_path / "model", ("part-1.safetensors", shard))
    with pytest.raises(InvalidInput, match=f"shard {re.escape(repr(shard))} is not a .safetensors file"):
        open_checkpoint(model)
