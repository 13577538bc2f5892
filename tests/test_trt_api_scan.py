"""The GPU path must run on TensorRT 10.3 (JetPack 6) through 11.x, and TensorRT
cannot be installed here, so this scan is the check: no source file under engines/,
export/ or runtime/ uses an API that TensorRT 11 removed (or that 10.0 removed before
it). The scanner reads the syntax tree, so comments and docstrings that *name* an API
(to explain why it is avoided) do not count, while attribute uses, imports and
getattr-style string literals do. A planted example proves it catches each one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("engines", "export", "runtime")

# Attribute -> why it is gone. Source: shared/reference/tensorrt.md.
REMOVED = {
    # TensorRT 11: precision comes from the (strongly typed) ONNX file.
    "FP16": "BuilderFlag.FP16 (removed in TensorRT 11)",
    "BF16": "BuilderFlag.BF16 (removed in TensorRT 11)",
    "INT8": "BuilderFlag.INT8 (removed in TensorRT 11)",
    "FP8": "BuilderFlag.FP8 (removed in TensorRT 11)",
    "INT4": "BuilderFlag.INT4 (removed in TensorRT 11)",
    "FP4": "BuilderFlag.FP4 (removed in TensorRT 11)",
    "EXPLICIT_BATCH": "NetworkDefinitionCreationFlag.EXPLICIT_BATCH (removed in TensorRT 11)",
    "platform_has_fast_fp16": "Builder.platform_has_fast_fp16 (removed in TensorRT 11)",
    "platform_has_fast_int8": "Builder.platform_has_fast_int8 (removed in TensorRT 11)",
    "device_memory_size": "ICudaEngine.device_memory_size (removed in 11; use device_memory_size_v2)",
    "create_execution_context_without_device_memory":
        "removed in 11; use create_execution_context(ExecutionContextAllocationStrategy.USER_MANAGED)",
    "int8_calibrator": "calibrators (removed in TensorRT 11)",
    # TensorRT 10.0 (older than our 10.3 floor): the binding-index API.
    "execute_async_v2": "removed in TensorRT 10; use set_tensor_address + execute_async_v3",
    "execute_v2": "binding-array execution; use execute_async_v3",
    "num_bindings": "removed in TensorRT 10; use num_io_tensors",
    "get_binding_index": "removed in TensorRT 10; tensors are addressed by name",
    "get_binding_shape": "removed in TensorRT 10; use get_tensor_shape",
    "binding_is_input": "removed in TensorRT 10; use get_tensor_mode",
    "max_workspace_size": "removed in TensorRT 10; use set_memory_pool_limit",
    "build_engine": "removed in TensorRT 10; use build_serialized_network",
}
# Precision names are only the removed API as members of BuilderFlag (our own
# Precision.FP16 and TensorRT's DataType.INT8 are fine).
FLAG_NAMES = {"FP16", "BF16", "INT8", "FP8", "INT4", "FP4"}


def _name_of(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _is_removed(name: str, owner: str) -> bool:
    if name in FLAG_NAMES:
        return owner == "BuilderFlag"
    return name in REMOVED or name.startswith("IInt8")


def _why(name: str) -> str:
    return REMOVED.get(name, "calibrators (removed in TensorRT 11)")


def removed_api_uses(source: str, filename: str = "<source>") -> list[str]:
    """Uses of a removed TensorRT API, as 'file:line: name: why'. Attribute uses,
    bare names, imports and getattr(obj, "name") count; comments and docstrings do not."""
    hits = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute):
            name, owner = node.attr, _name_of(node.value)
        elif isinstance(node, ast.Name):
            name, owner = node.id, ""
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if _is_removed(alias.name, ""):
                    hits.append(f"{filename}:{node.lineno}: {alias.name}: {_why(alias.name)} (import)")
            continue
        elif (isinstance(node, ast.Call) and _name_of(node.func) in ("getattr", "hasattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            name, owner = node.args[1].value, _name_of(node.args[0])
        else:
            continue
        if _is_removed(name, owner):
            hits.append(f"{filename}:{node.lineno}: {name}: {_why(name)}")
    return hits


def scanned_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))


def test_no_source_file_uses_an_api_removed_in_tensorrt_11():
    files = scanned_files()
    assert any(p.name == "tensorrt.py" for p in files) and any(p.name == "build.py" for p in files)
    hits = [h for p in files for h in removed_api_uses(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert hits == []


PLANTED = '''
"""A docstring may say BuilderFlag.FP16 and device_memory_size: not a use."""
import tensorrt as trt
from tensorrt import IInt8EntropyCalibrator2
config.set_flag(trt.BuilderFlag.FP16)                                   # 5
network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
if builder.platform_has_fast_fp16:                                      # 7
    size = engine.device_memory_size                                    # 8
ctx = engine.create_execution_context_without_device_memory()           # 9
config.int8_calibrator = MyCalibrator()                                 # 10
class Cal(trt.IInt8EntropyCalibrator2): pass                            # 11
flag = getattr(trt.BuilderFlag, "FP16")                                 # 12
ctx.execute_async_v2(bindings, stream)                                  # 13
config.set_flag(trt.BuilderFlag.INT8)                                   # 14
'''


def test_scanner_catches_each_planted_removed_api():
    hits = removed_api_uses(PLANTED)
    found = {(h.split(":")[1], h.split(":")[2].strip().split()[0]) for h in hits if h.count(":") >= 2}
    for line, name in [("5", "FP16"), ("6", "EXPLICIT_BATCH"), ("7", "platform_has_fast_fp16"),
                       ("8", "device_memory_size"), ("9", "create_execution_context_without_device_memory"),
                       ("10", "int8_calibrator"), ("11", "IInt8EntropyCalibrator2"), ("12", "FP16"),
                       ("13", "execute_async_v2"), ("14", "INT8")]:
        assert (line, name) in found, (line, name, hits)
    assert ("4", "IInt8EntropyCalibrator2") in found   # the import
    assert not any(":2:" in h for h in hits)   # the docstring is not a use


@pytest.mark.parametrize("allowed", [
    "size = engine.device_memory_size_v2",
    "ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)",
    "flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)",
    "dt = trt.DataType.INT8",
    "p = Precision.FP16",
    "ok = ctx.execute_async_v3(stream)",
])
def test_scanner_allows_the_apis_that_replace_them(allowed):
    assert removed_api_uses(allowed) == []
