"""fp16 ONNX graphs for strongly typed TensorRT networks.

TensorRT 11 removed the FP16 builder flag: a network runs in the precision its ONNX
file states. So precision is decided here, once, by rewriting an exported fp32 graph:

- weights and activations become float16, except the numerically sensitive nodes
  (`KEEP_FP32_OPS`: normalisations, whose sums of squares overflow fp16's 65504;
  softmax; the reduce-mean/pow/sqrt pattern of a hand-written norm) and every node
  upstream of a Sin/Cos (the timestep embedding: t * freq reaches ~1000, where fp16
  has a spacing of 0.5, so sin(t * freq) would be noise);
- cheap elementwise ops whose float inputs all come from fp32 nodes stay fp32 too,
  so a norm pattern is not split by needless casts;
- graph inputs and outputs stay float32 (a Cast at the boundary), so the manifest's
  tensor specs (`engines/specs.py`) and the runtime are the same for every precision.

Which inputs of a node must share a dtype is read from the ONNX operator schema
(inputs bound to one type parameter), not from a hand-kept table, so e.g. Resize's
`scales` (always float32) and Shape's input are left alone.

Checked without a GPU by tests/test_fp16.py: onnx.reference runs the fp16 graph of
each tiny stage against the fp32 graph; onnx.checker and strict shape inference pass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from sdrt.engines.errors import ArtifactError, BackendUnavailable
from sdrt.engines.files import atomic_path, temp_folder
from sdrt.engines.specs import Stage
# Export's check reads the tolerance from here (exporter.py); it lives with `sdrt build`'s.
from sdrt.engines.verify import verify_tolerance

__all__ = ["verify_tolerance", "convert_stage", "convert_model", "save_model", "check_graph"]

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:  # a runtime-only install: fp16 conversion says it needs the export extra
    onnx = None

FLOAT, HALF = 1, 10   # TensorProto.FLOAT, TensorProto.FLOAT16: fixed by the ONNX spec

# Kept in fp32: normalisations (variance overflows fp16), softmax (exp of large
# logits), the pieces of a hand-written layer norm, and the sinusoidal timestep
# embedding (see the module docstring). Everything upstream of Sin/Cos is added.
KEEP_FP32_OPS = frozenset({
    "LayerNormalization", "InstanceNormalization", "GroupNormalization",
    "RMSNormalization", "BatchNormalization", "LpNormalization",
    "Softmax", "LogSoftmax",
    "ReduceMean", "ReduceSumSquare", "ReduceL2", "Pow",
    "Sin", "Cos", "Exp",
})
EMBEDDING_OPS = frozenset({"Sin", "Cos"})
# Elementwise ops that stay fp32 when every float input already is (Add of epsilon
# and the Sqrt of a hand-written norm's variance, for example).
FOLLOW_FP32_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Neg"})
# ops whose float output type comes from an attribute rather than from an input
RETYPED_BY_ATTRIBUTE = frozenset({"Cast", "ConstantOfShape", "Constant", "CastLike"})

FP16_MAX = float(np.finfo(np.float16).max)
SMALL_TENSOR = 1 << 16   # elements: loaded before shape inference


def convert_stage(src: Path, dst: Path, stage: Stage) -> None:
    """Write an fp16 version of the fp32 graph at `src` to `dst` (float32 I/O kept).

    The U-Net's weights go to `<dst name>.data` beside `dst` (the >2 GB path is the
    normal path). Both files are written atomically, the data file first.
    """
    src, dst, stage = Path(src), Path(dst), Stage(stage)
    if onnx is None:
        raise BackendUnavailable("fp16 conversion needs the onnx package: pip install 'sdrt[export]'")
    if not src.is_file():
        raise ArtifactError(f"{src}: no such ONNX file to convert to fp16")
    model = convert_model(onnx.load(str(src), load_external_data=False), base_dir=src.parent)
    save_model(model, dst, external_data=stage.data_file is not None)


def convert_model(model: onnx.ModelProto, base_dir: Path | None = None,
                  keep_fp32_ops: Iterable[str] = KEEP_FP32_OPS) -> onnx.ModelProto:
    """Return an fp16 copy of `model`. `base_dir` locates external data, if any.
    `keep_fp32_ops` is a parameter so tests can build the naive all-fp16 graph."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in model.graph.node for a in n.attribute):
        raise ArtifactError("fp16 conversion does not handle control flow (If/Loop/Scan) graphs")
    if base_dir is None:
        model = onnx.ModelProto.FromString(model.SerializeToString())  # leave the caller's alone
    else:
        # Small tensors first (shape constants, Resize scales: shape inference reads
        # their values), then types come from the skeleton without the big weights, so
        # a >2 GB proto is never serialised.
        _load_external(model, base_dir, max_elements=SMALL_TENSOR)
    types = _tensor_types(onnx.shape_inference.infer_shapes(model, strict_mode=True))
    if base_dir is not None:
        _load_external(model, base_dir, max_elements=None)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ArtifactError("fp16 conversion needs a graph in the default ONNX domain")
    return _Converter(model, types, opset, frozenset(keep_fp32_ops)).run()


def save_model(model: onnx.ModelProto, dst: Path, external_data: bool) -> None:
    """Save atomically; with external data, to `<dst name>.data` (never a random name)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    data_name = dst.name + ".data"
    with temp_folder(dst.parent) as tmp_dir:
        staged = tmp_dir / dst.name
        # Tensors under 1 KiB (shape constants, scales) stay inline: shape inference
        # and the checker must read their values.
        onnx.save_model(model, str(staged), save_as_external_data=external_data,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        check_graph(staged)
        if external_data:
            (tmp_dir / data_name).touch()  # the manifest lists it even if nothing was large
            with atomic_path(dst.parent / data_name) as tmp:
                os.replace(tmp_dir / data_name, tmp)
        with atomic_path(dst) as tmp:
            os.replace(staged, tmp)


def check_graph(path: Path) -> None:
    """onnx.checker with strict shape and type inference: a mismatched fp16/fp32 edge
    fails here, not in a TensorRT build on the user's GPU."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ArtifactError(f"fp16 graph {path.name} is not a valid typed ONNX graph: {e}") from None


def _load_external(model: onnx.ModelProto, base_dir: Path, max_elements: int | None) -> None:
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    for t in model.graph.initializer:
        if uses_external_data(t) and (max_elements is None or int(np.prod(t.dims)) <= max_elements):
            load_external_data_for_tensor(t, str(base_dir))
            t.data_location = TensorProto.DEFAULT
            del t.external_data[:]


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


class _Converter:
    def __init__(self, model: onnx.ModelProto, types: dict[str, int], opset: int, keep: frozenset[str]):
        self.model, self.g, self.types, self.opset, self.keep = model, model.graph, types, opset, keep
        self.producer = {o: n for n in self.g.node for o in n.output if o}
        self.inits = {t.name: t for t in self.g.initializer}
        self.consts = {n.output[0]: n for n in self.g.node if n.op_type == "Constant"}
        self.half = self._classify()
        self.demand = self._initializer_demand()
        self.dtype: dict[str, int] = {}       # tensor name -> dtype in the new graph
        self.copies: dict[tuple[str, int], str] = {}  # (tensor, dtype) -> name holding it
        self.renamed: dict[str, str] = {}     # graph output -> its fp16 producer's name
        self.emitted_consts: set[str] = set()
        self.new_inits: list[TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []

    # --- which nodes run in fp16 ------------------------------------------------
    def _schema(self, node: onnx.NodeProto):
        if node.domain not in ("", "ai.onnx"):
            raise ArtifactError(f"fp16 conversion: node {node.name!r} uses unsupported domain {node.domain!r}")
        return onnx.defs.get_schema(node.op_type, self.opset, "")

    def _shared_inputs(self, node: onnx.NodeProto) -> list[int]:
        """Indices of float inputs bound to a type parameter shared with another
        input or an output: those must carry the node's compute dtype."""
        schema = self._schema(node)
        formal = [schema.inputs[min(i, len(schema.inputs) - 1)].type_str for i in range(len(node.input))]
        outs = {o.type_str for o in schema.outputs}
        shared = []
        for i, (name, ts) in enumerate(zip(node.input, formal)):
            if not name or self.types.get(name) != FLOAT or ts.startswith("tensor("):
                continue
            # A variadic input (Concat, Sum) shares its parameter with its siblings.
            if ts in outs or formal.count(ts) > 1 or schema.inputs[-1].type_str == ts and len(node.input) > len(schema.inputs):
                shared.append(i)
        return shared

    def _classify(self) -> set[str]:
        """ids of the nodes that compute in fp16 (all the others stay fp32)."""
        nodes = list(self.g.node)
        fp32 = {id(n) for n in nodes if n.op_type in self.keep}
        # Upstream of Sin/Cos, walking only the float edges a node computes on.
        stack = [n for n in nodes if n.op_type in EMBEDDING_OPS and n.op_type in self.keep]
        while stack:
            n = stack.pop()
            for i in self._shared_inputs(n):
                p = self.producer.get(n.input[i])
                if p is not None and id(p) not in fp32 and p.op_type != "Constant":
                    fp32.add(id(p))
                    stack.append(p)
        for n in nodes:  # topological order: one forward pass settles the followers
            if n.op_type in FOLLOW_FP32_OPS and id(n) not in fp32:
                srcs = [self.producer.get(n.input[i]) for i in self._shared_inputs(n)]
                computed = [p for p in srcs if p is not None and p.op_type != "Constant"]
                if computed and all(id(p) in fp32 for p in computed) and all(
                        p is not None or n.input[i] in self.inits
                        for i, p in zip(self._shared_inputs(n), srcs)):
                    fp32.add(id(n))
        return {id(n) for n in nodes if id(n) not in fp32}

    def _initializer_demand(self) -> dict[str, set[int]]:
        """For each initializer, the dtypes its consumers compute in."""
        demand: dict[str, set[int]] = {}
        for node in self.g.node:
            want = HALF if id(node) in self.half else FLOAT
            shared = self._shared_inputs(node)
            for i, name in enumerate(node.input):
                if name in self.inits and self.types.get(name) == FLOAT:
                    # An input not bound to the node's dtype (Resize scales) keeps fp32.
                    demand.setdefault(name, set()).add(want if i in shared else FLOAT)
        return demand

    # --- rewriting --------------------------------------------------------------
    def run(self) -> onnx.ModelProto:
        g = self.g
        for t in g.input:
            self.dtype[t.name] = t.type.tensor_type.elem_type
        out_names = {o.name for o in g.output}
        for node in list(g.node):
            if node.op_type == "Constant" and node.output[0] in self.types:
                self.dtype[node.output[0]] = self.types[node.output[0]]
                continue  # emitted on demand, in the dtype each consumer needs
            self._emit(node, out_names)
        for o in g.output:
            if o.name in self.renamed:
                self.nodes.append(helper.make_node("Cast", [self.renamed[o.name]], [o.name], to=FLOAT,
                                                   name=f"{o.name}/cast_to_fp32"))
        used = {i for n in self.nodes for i in n.input} | out_names
        kept_inits = [t for t in g.initializer if t.name in used] + [t for t in self.new_inits if t.name in used]
        del g.node[:]
        g.node.extend(self.nodes)
        del g.initializer[:]
        g.initializer.extend(kept_inits)
        # Stale types go; none are needed (save_model's check re-infers them from the
        # file, and re-inferring here would copy the whole model twice in memory).
        del g.value_info[:]
        return self.model

    def _emit(self, node: onnx.NodeProto, out_names: set[str]) -> None:
        half = id(node) in self.half
        want = HALF if half else FLOAT
        shared = set(self._shared_inputs(node))
        inputs = [self.renamed.get(name, name) for name in node.input]
        for i, name in enumerate(inputs):
            if not name:
                continue
            if i in shared:
                inputs[i] = self._as(name, want)
            elif name in self.consts or name in self.inits:
                inputs[i] = self._as(name, self.types.get(name, FLOAT))
        outputs = []
        for o in node.output:
            float_out = self.types.get(o) == FLOAT
            if not o or not float_out:
                outputs.append(o)
                if o:
                    self.dtype[o] = self.types.get(o, 0)
                continue
            dtype = want if (shared or node.op_type in RETYPED_BY_ATTRIBUTE) else FLOAT
            # A graph output keeps its name for the float32 Cast appended at the end.
            new = f"{o}/fp16" if (o in out_names and dtype == HALF) else o
            self.dtype[new] = dtype
            if new != o:
                self.renamed[o] = new
            outputs.append(new)
        attrs = [self._retyped(a, half, node.op_type) for a in node.attribute]
        new_node = helper.make_node(node.op_type, inputs, outputs, name=node.name, domain=node.domain)
        new_node.attribute.extend(attrs)
        self.nodes.append(new_node)

    def _retyped(self, a: onnx.AttributeProto, half: bool, op: str) -> onnx.AttributeProto:
        if not half:
            return a
        if op == "Cast" and a.name == "to" and a.i == FLOAT:
            return helper.make_attribute("to", HALF)
        if op == "ConstantOfShape" and a.name == "value" and a.t.data_type == FLOAT:
            t = _to_half(numpy_helper.to_array(a.t), a.t.name)
            return helper.make_attribute("value", t)
        return a

    def _as(self, name: str, dtype: int) -> str:
        """The name of a tensor holding `name` in `dtype`: itself, a converted copy of a
        constant, or the output of a (shared) Cast node."""
        have = self.dtype.get(name)
        if name in self.inits or name in self.consts:
            have = self.types.get(name)
        if have not in (FLOAT, HALF) or have == dtype:
            if name in self.consts:
                self._emit_const(name)
            return name
        if name in self.inits and self.demand.get(name) == {dtype}:
            # Only this dtype is wanted: convert in place (same name, so refit by weight
            # name still works, and the fp32 bytes are freed now, not at the end: the
            # peak memory of a 3.4 GB U-Net stays near its fp32 size).
            t = self.inits[name]
            t.CopyFrom(_to_half(numpy_helper.to_array(t), name) if dtype == HALF
                       else numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), name))
            self.types[name] = dtype
            return name
        key = (name, dtype)
        if key in self.copies:
            return self.copies[key]
        suffix = "fp16" if dtype == HALF else "fp32"
        new = f"{name}/{suffix}"
        if name in self.inits:
            arr = numpy_helper.to_array(self.inits[name])
            self.new_inits.append(_to_half(arr, new) if dtype == HALF else numpy_helper.from_array(arr.astype(np.float32), new))
        elif name in self.consts:
            arr = numpy_helper.to_array(self.consts[name].attribute[0].t)
            t = _to_half(arr, new) if dtype == HALF else numpy_helper.from_array(arr.astype(np.float32), new)
            self.nodes.append(helper.make_node("Constant", [], [new], value=t, name=f"{name}/const_{suffix}"))
        else:
            self.nodes.append(helper.make_node("Cast", [name], [new], to=dtype, name=f"{name}/cast_{suffix}"))
        self.copies[key] = new
        self.dtype[new] = dtype
        return new

    def _emit_const(self, name: str) -> None:
        if name not in self.emitted_consts:
            self.emitted_consts.add(name)
            self.nodes.append(self.consts[name])


def _to_half(arr: np.ndarray, name: str) -> TensorProto:
    # Clip to fp16's finite range: a -3.4e38 attention-mask constant must become
    # -65504, not -inf (-inf - -inf is NaN in a masked softmax row).
    return numpy_helper.from_array(np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16), name)
