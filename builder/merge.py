"""Join the first-step and cached-step decoder graphs into one ONNX model with an `If` node.

`use_cache_branch` (bool[1]) selects the branch: False runs the first-step graph (reads the encoder
states, emits cross-attention K/V), True runs the cached graph (reads past K/V). Every initializer
moves to the outer graph, stored once per distinct content, so the weights the two graphs share
are stored once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from t5_triton.model_repository.t5_runtime import spec

# protobuf cannot serialize a model of 2 GiB or more in one piece.
_MAX_SINGLE_FILE_BYTES = 1_900_000_000


def _content_key(tensor: TensorProto) -> tuple:
    data = numpy_helper.to_array(tensor)
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(np.ascontiguousarray(data).data).hexdigest()


def _copy(tensor: TensorProto) -> TensorProto:
    copy = TensorProto()
    copy.CopyFrom(tensor)
    return copy


class _InitializerPool:
    """Initializers of several graphs, one per distinct (dtype, shape, bytes)."""

    def __init__(self) -> None:
        self.by_key: dict[tuple, TensorProto] = {}
        self.names: set[str] = set()

    def add(self, tensor: TensorProto) -> str:
        """Return the outer name holding this content, adding the tensor if it is new."""
        key = _content_key(tensor)
        kept = self.by_key.get(key)
        if kept is not None:
            return kept.name
        name = tensor.name
        suffix = 1
        while name in self.names:  # same name, other content (e.g. onnx::MatMul_12 in both graphs)
            name = f"{tensor.name}__{suffix}"
            suffix += 1
        copy = _copy(tensor)
        copy.name = name
        self.by_key[key] = copy
        self.names.add(name)
        return name

    def tensors(self) -> list[TensorProto]:
        return list(self.by_key.values())


def _rename_values(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    for info in [*graph.output, *graph.value_info]:
        info.name = mapping.get(info.name, info.name)


def _branches(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    return [a.g for node in graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]


def hoist_initializers(model: onnx.ModelProto) -> None:
    """Move the initializers of the top-level subgraphs (the `If` branches) into the outer graph,
    one per distinct content, so weights that both branches use are stored once.

    The outer graph's own initializers keep their names (subgraphs may read them by name); a branch's
    are renamed where their name is taken, and the branch's nodes follow.
    """
    pool = _InitializerPool()
    outer = [_copy(t) for t in model.graph.initializer]  # detached: the field is cleared below
    for tensor in outer:
        pool.by_key.setdefault(_content_key(tensor), tensor)
        pool.names.add(tensor.name)
    kept_outer = {id(t) for t in pool.by_key.values()}
    extra = [t for t in outer if id(t) not in kept_outer]  # outer duplicates, if any, stay as they are
    for branch in _branches(model.graph):
        mapping = {t.name: pool.add(t) for t in branch.initializer}
        del branch.initializer[:]
        _rename_values(branch, mapping)
    del model.graph.initializer[:]
    model.graph.initializer.extend([*pool.tensors(), *extra])


def _to_branch(graph: onnx.GraphProto, prefix: str, outer_inputs: Iterable[str]) -> onnx.GraphProto:
    """Make `graph` a subgraph: no inputs (it reads outer inputs by name), every internal value
    prefixed so the two branches never share a name; its initializers stay for `hoist_initializers`."""
    keep = set(outer_inputs) | {t.name for t in graph.initializer}
    mapping = {}
    for node in graph.node:
        for name in [*node.input, *node.output]:
            if name and name not in keep and name not in mapping:
                mapping[name] = prefix + name
        node.name = prefix + node.name
    branch = onnx.GraphProto()
    branch.CopyFrom(graph)
    del branch.input[:]
    _rename_values(branch, mapping)
    branch.name = prefix.rstrip("/")
    return branch


def _empty_output(branch: onnx.GraphProto, like: onnx.ValueInfoProto, name: str) -> None:
    """Add an output the branch does not compute: an empty tensor of the same dtype and rank."""
    rank = len(like.type.tensor_type.shape.dim)
    elem = like.type.tensor_type.elem_type
    empty = numpy_helper.from_array(np.zeros((0,) * rank, dtype=helper.tensor_dtype_to_np_dtype(elem)))
    branch.node.append(helper.make_node("Constant", [], [name], name=name + "_empty", value=empty))
    branch.output.append(helper.make_tensor_value_info(name, elem, [0] * rank))


def _any_shape(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """The same output with every dim symbolic: the cross K/V output is full on one branch and
    empty on the other, and ONNX Runtime warns on each call where a fixed dim does not hold."""
    elem = value.type.tensor_type.elem_type
    rank = len(value.type.tensor_type.shape.dim)
    return helper.make_tensor_value_info(value.name, elem, [f"{value.name}_{i}" for i in range(rank)])


def merge_decoders(first_step: Path, cached_step: Path, output: Path) -> Path:
    """Write the merged decoder to `output` and return it."""
    first = onnx.load(str(first_step))
    cached = onnx.load(str(cached_step))

    outer_inputs: dict[str, onnx.ValueInfoProto] = {}
    for graph in (first.graph, cached.graph):
        for value in graph.input:
            outer_inputs.setdefault(value.name, value)
    layers = sum(1 for name in outer_inputs if name.startswith(spec.PAST_SELF_KV + "_")) // 2
    input_names = spec.decoder_input_names(layers)
    missing = set(input_names) - {spec.USE_CACHE_BRANCH} - set(outer_inputs)
    if missing:
        raise ValueError(f"decoder graphs lack inputs {sorted(missing)}")

    else_branch = _to_branch(first.graph, "first/", outer_inputs)
    then_branch = _to_branch(cached.graph, "cached/", outer_inputs)
    by_name = {o.name: o for o in first.graph.output}
    _empty_output(then_branch, by_name[spec.NEW_CROSS_KV], "cached/" + spec.NEW_CROSS_KV + "_none")

    if_node = helper.make_node(
        "If",
        [spec.USE_CACHE_BRANCH],
        list(spec.DECODER_OUTPUTS),
        name="use_cache_branch_if",
        then_branch=then_branch,
        else_branch=else_branch,
    )
    condition = helper.make_tensor_value_info(spec.USE_CACHE_BRANCH, TensorProto.BOOL, [1])
    graph = helper.make_graph(
        [if_node],
        "t5_merged_decoder",
        [condition, *(outer_inputs[name] for name in input_names[1:])],
        [by_name[spec.LOGITS], by_name[spec.NEW_SELF_KV], _any_shape(by_name[spec.NEW_CROSS_KV])],
    )
    model = helper.make_model(graph, opset_imports=first.opset_import, producer_name="t5-triton")
    model.ir_version = first.ir_version
    hoist_initializers(model)
    save_checked(model, output)
    return output


def save_checked(model: onnx.ModelProto, output: Path) -> None:
    """Check and save; past protobuf's 2 GiB limit the weights go to an external-data file."""
    output.parent.mkdir(parents=True, exist_ok=True)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size < _MAX_SINGLE_FILE_BYTES:
        onnx.checker.check_model(model)
        onnx.save(model, str(output))
    else:
        onnx.save(model, str(output), save_as_external_data=True, location=output.name + ".data")
        onnx.checker.check_model(str(output))
