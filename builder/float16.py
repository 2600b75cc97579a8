"""fp16 graphs that cannot overflow: audit the fp32 graph, keep the risky nodes fp32, cast at the seams.

The audit runs the fp32 graph on sample inputs with every float value as an output and keeps a node
in fp32 when a value it reads or writes leaves `AUDIT_LIMIT` (T5's feed-forward output and the
residual stream after it reach ~1e5 in real checkpoints), or when its result is truncated to an
integer (the relative-position buckets). The conversion then stores every other float value in fp16
and inserts a Cast only where an fp16 value meets an fp32 node or the other way round.

Why not `onnxruntime.transformers.float16`: it wraps each blocked node in its own casts, so a value
passed between two fp32 nodes still goes through fp16 on the way and overflows anyway.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

FP16_MAX = 65504.0
# A quarter of the range: inputs the audit did not see (longer, other texts) may reach a few times
# what the sample inputs reach, and values inside a node (sums in a MatMul) a bit more than its output.
AUDIT_LIMIT = FP16_MAX / 4
# Constants past the limit stand for infinity (T5's additive attention mask is float32's min). At half
# the limit they still zero a softmax term (exp(-8188) == 0) and leave the other half for the scores
# added to them, so the mask's nodes pass the audit and need no fp32 copy.
CONSTANT_LIMIT = AUDIT_LIMIT / 2

# Nodes that only read a float input's shape: they take fp16 and fp32 alike, no Cast needed.
_SHAPE_ONLY = {"Shape", "Size"}


@dataclass(frozen=True)
class KeptNode:
    name: str
    op_type: str
    reason: str  # "range": a value it reads or writes leaves AUDIT_LIMIT; "index": truncated to an integer
    max_abs: float  # largest |value| it reads or writes on the audit inputs


def _float_attribute(node: onnx.NodeProto) -> onnx.AttributeProto | None:
    """The tensor attribute of a Constant / ConstantOfShape node, if it is float32."""
    for attribute in node.attribute:
        if attribute.name == "value" and attribute.t.data_type == TensorProto.FLOAT:
            return attribute
    return None


def clamp_constants(model: onnx.ModelProto, limit: float = CONSTANT_LIMIT) -> int:
    """Clamp the float Constant nodes of `model` (in place) to +-`limit`; return how many changed."""
    changed = 0
    for node in model.graph.node:
        attribute = _float_attribute(node) if node.op_type == "Constant" else None
        if attribute is None:
            continue
        value = numpy_helper.to_array(attribute.t)
        clamped = np.clip(value, -limit, limit).astype(value.dtype)  # a 0-d clip returns float64
        if not np.array_equal(clamped, value):
            attribute.t.CopyFrom(numpy_helper.from_array(clamped, attribute.t.name))
            changed += 1
    return changed


def _check_flat(graph: onnx.GraphProto) -> None:
    """Subgraphs (If, Loop) are not handled: convert each decoder graph before the merge."""
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"node {node.name} ({node.op_type}) has a subgraph; convert flat graphs only")


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value, by shape inference on the graph without its weights' bytes."""
    graph = model.graph
    weights = [t for t in graph.initializer if t.data_type == TensorProto.FLOAT]
    skeleton = helper.make_model(
        helper.make_graph(
            graph.node,
            graph.name,
            [*graph.input, *(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in weights)],
            graph.output,
            [t for t in graph.initializer if t.data_type != TensorProto.FLOAT],  # shape inference reads these
        ),
        opset_imports=model.opset_import,
        ir_version=model.ir_version,
    )
    inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.input, *inferred.value_info, *inferred.output]}
    types.update({t.name: t.data_type for t in inferred.initializer})
    untyped = [o for node in graph.node for o in node.output if o and not types.get(o)]
    if untyped:
        raise ValueError(f"shape inference left {len(untyped)} values untyped, e.g. {untyped[:3]}")
    return types


def _max_abs(value: np.ndarray) -> float:
    return float(np.abs(value).max(initial=0.0))


class RangeAudit:
    """Runs an fp32 graph with every float value as an output and keeps the largest |x| of each."""

    def __init__(self, model: onnx.ModelProto):
        _check_flat(model.graph)
        self.model = model
        self.types = _elem_types(model)
        self.outputs = [o.name for o in model.graph.output]
        audited = _copy(model)
        listed = set(self.outputs)
        for node in model.graph.node:
            for name in node.output:
                if name and name not in listed and self.types[name] == TensorProto.FLOAT:
                    audited.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # audit the graph as written
        options.log_severity_level = 3
        self.session = ort.InferenceSession(audited.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        self.runs = 0
        self.maxima: dict[str, float] = {
            t.name: _max_abs(numpy_helper.to_array(t))
            for t in model.graph.initializer
            if t.data_type == TensorProto.FLOAT
        }

    def _see(self, name: str, value: np.ndarray) -> None:
        if value.dtype == np.float32:
            self.maxima[name] = max(self.maxima.get(name, 0.0), _max_abs(value))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once, record the ranges; return the graph's own outputs."""
        values = dict(zip(self.names, self.session.run(self.names, feeds), strict=True))
        self.runs += 1
        for name, value in [*feeds.items(), *values.items()]:
            self._see(name, value)
        return {name: values[name] for name in self.outputs}

    def fp32_nodes(self, limit: float = AUDIT_LIMIT) -> list[KeptNode]:
        """The nodes to keep in fp32, by what the runs so far have seen."""
        if not self.runs:
            raise ValueError("the audit has not run the graph yet")
        index = _index_nodes(self.model.graph, self.types)
        kept = []
        for node in self.model.graph.node:
            if node.op_type == "Constant":  # clamped instead (clamp_constants), never blocked
                continue
            largest = max((self.maxima[n] for n in [*node.input, *node.output] if n in self.maxima), default=0.0)
            if node.name in index:  # first: the bucket arithmetic takes log(0) = -inf by design
                kept.append(KeptNode(node.name, node.op_type, "index", largest))
            elif largest > limit:
                kept.append(KeptNode(node.name, node.op_type, "range", largest))
        return kept


def _index_nodes(graph: onnx.GraphProto, types: dict[str, int]) -> set[str]:
    """Float nodes whose result is cast to an integer, and the float nodes feeding them.

    T5's relative-position buckets are `int(log(distance / e) / log(m / e) * n)`: fp16 rounding moves
    values across integer boundaries and changes buckets, which no range audit sees.
    """
    producer = {o: node for node in graph.node for o in node.output}
    marked: set[str] = set()
    stack = [
        node
        for node in graph.node
        if node.op_type == "Cast"
        and types[node.input[0]] == TensorProto.FLOAT
        and _cast_to(node) not in (TensorProto.FLOAT, TensorProto.FLOAT16)
    ]
    while stack:
        node = stack.pop()
        if node.name in marked or node.op_type == "Constant":
            continue
        marked.add(node.name)
        stack += [producer[n] for n in node.input if types.get(n) == TensorProto.FLOAT and n in producer]
    return marked


def _in_fp16(node: onnx.NodeProto, keep: set[str]) -> bool:
    return node.op_type != "Constant" and node.name not in keep


def _fp16_values(graph: onnx.GraphProto, types: dict[str, int], keep: set[str]) -> set[str]:
    """The float values stored in fp16: outputs of fp16 nodes, and constants an fp16 node reads.

    A constant read by fp16 and fp32 nodes alike is stored once, in fp16; fp32 readers get a Cast,
    which ONNX Runtime folds at load time.
    """
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    constants = {t.name for t in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    fp16 = {o for node in graph.node if _in_fp16(node, keep) for o in node.output if types[o] == TensorProto.FLOAT}
    fp16 |= {c for c in constants if types[c] == TensorProto.FLOAT and any(_in_fp16(r, keep) for r in readers[c])}
    return fp16


def _plan(model: onnx.ModelProto, keep: Collection[str]) -> tuple[onnx.ModelProto, dict[str, int], set[str], set[str]]:
    """A copy of flat `model` to rewrite, the element type of each value, the kept nodes, the fp16 values."""
    _check_flat(model.graph)
    types = _elem_types(model)
    copy = _copy(model)
    keep = set(keep)
    return copy, types, keep, _fp16_values(copy.graph, types, keep)


def convert_float16(model: onnx.ModelProto, keep: Collection[str]) -> onnx.ModelProto:
    """A copy of `model` computing in fp16 except the nodes named in `keep`.

    Graph inputs and outputs stay fp32, so the served interface does not change.
    """
    model, types, keep, fp16 = _plan(model, keep)
    graph = model.graph

    # An output computed in fp16 is renamed; a Cast back to fp32 takes its name.
    final_casts = []
    for output in graph.output:
        if output.name in fp16:
            inner = output.name + "/fp16"
            for node in graph.node:
                node.input[:] = [inner if n == output.name else n for n in node.input]
                node.output[:] = [inner if n == output.name else n for n in node.output]
            fp16 = (fp16 - {output.name}) | {inner}
            final_casts.append(_cast(inner, output.name, TensorProto.FLOAT))
            types[inner] = TensorProto.FLOAT

    casts: dict[tuple[str, int], str] = {}
    nodes = []
    for node in graph.node:
        wants_fp16 = _in_fp16(node, keep)
        for i, name in enumerate(node.input):
            if not name or types.get(name) != TensorProto.FLOAT or node.op_type in _SHAPE_ONLY:
                continue
            if (name in fp16) != wants_fp16:
                to = TensorProto.FLOAT16 if wants_fp16 else TensorProto.FLOAT
                if (name, to) not in casts:  # one Cast per value and direction, before its first reader
                    casts[name, to] = f"{name}/{'fp16' if wants_fp16 else 'fp32'}"
                    nodes.append(_cast(name, casts[name, to], to))
                node.input[i] = casts[name, to]
        if any(o in fp16 for o in node.output):
            _retype(node)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend([*nodes, *final_casts])

    for tensor in graph.initializer:
        if tensor.name in fp16:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    del graph.value_info[:]  # stale float32 types; ONNX Runtime infers them again
    return model


def emulate_float16(model: onnx.ModelProto, keep: Collection[str]) -> onnx.ModelProto:
    """An fp32 copy of `model` that rounds each value `convert_float16` stores in fp16 to fp16 (to
    +-inf past its range) and computes in fp32 in between, as a GPU's fp16 kernels do.

    Why: ONNX Runtime's CPU EP has few fp16 kernels. It runs the other nodes in fp32 and passes values
    between them in fp32, so on CPU the converted graph never overflows and checking it there says
    nothing about fp16 ranges. Explicit Cast pairs are kept (ONNX Runtime >= 1.17 drops no lossy Cast).
    """
    model, types, keep, fp16 = _plan(model, keep)
    graph = model.graph
    rounded: set[str] = set()  # fp32 values an fp16 node reads: the fp16 graph casts them, here they are rounded
    nodes = []
    for node in graph.node:
        if node.op_type == "Constant":
            attribute = _float_attribute(node)
            if attribute is not None and node.output[0] in fp16:
                attribute.t.CopyFrom(
                    numpy_helper.from_array(_round(numpy_helper.to_array(attribute.t)), attribute.t.name)
                )
            nodes.append(node)
            continue
        if _in_fp16(node, keep) and node.op_type not in _SHAPE_ONLY:
            for i, name in enumerate(node.input):
                if name and types.get(name) == TensorProto.FLOAT and name not in fp16:
                    if name not in rounded:
                        rounded.add(name)
                        nodes += _rounding(name, name + "/rounded")
                    node.input[i] = name + "/rounded"
        nodes.append(node)
        for i, name in enumerate(node.output):
            if name in fp16:
                node.output[i] = name + "/fp32"
                nodes += _rounding(name + "/fp32", name)
    del graph.node[:]
    graph.node.extend(nodes)
    for tensor in graph.initializer:
        if tensor.name in fp16:
            tensor.CopyFrom(numpy_helper.from_array(_round(numpy_helper.to_array(tensor)), tensor.name))
    return model


def _rounding(source: str, target: str) -> list[onnx.NodeProto]:
    """`target` = `source` rounded to fp16 (to +-inf past the range), as fp32."""
    return [_cast(source, target + "/fp16", TensorProto.FLOAT16), _cast(target + "/fp16", target, TensorProto.FLOAT)]


def _round(value: np.ndarray) -> np.ndarray:
    return value.astype(np.float16).astype(np.float32)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _cast(source: str, target: str, to: int) -> onnx.NodeProto:
    return helper.make_node("Cast", [source], [target], name=target + "/cast", to=to)


def _cast_to(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def _retype(node: onnx.NodeProto) -> None:
    """Make a node whose float output is fp16 produce fp16 where an attribute fixes the type."""
    if node.op_type == "Cast":
        for attribute in node.attribute:
            if attribute.name == "to":
                attribute.i = TensorProto.FLOAT16
    elif node.op_type in ("Constant", "ConstantOfShape"):
        attribute = _float_attribute(node)
        if attribute is None:  # ConstantOfShape's default value is a float32 zero
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
        else:
            value = numpy_helper.to_array(attribute.t).astype(np.float16)
            attribute.t.CopyFrom(numpy_helper.from_array(value, attribute.t.name))
