"""Export + merge of random-tiny: graph structure, deduplication, numerics, token parity."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import torch

from t5_triton.builder import verify
from t5_triton.builder.export import EncoderGraph
from t5_triton.model_repository.t5_runtime import spec
from t5_triton.model_repository.t5_runtime.onnx_runner import create_session


@pytest.fixture(scope="module")
def merged(tiny_graphs) -> onnx.ModelProto:
    return onnx.load(str(tiny_graphs["decoder"]))


@pytest.fixture(scope="module")
def sessions(tiny_graphs):
    return create_session(tiny_graphs["encoder"]), create_session(tiny_graphs["decoder"])


def _subgraphs(node: onnx.NodeProto) -> dict[str, onnx.GraphProto]:
    return {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}


def test_merged_decoder_is_one_if_node_with_both_branches(tiny, merged):
    nodes = merged.graph.node
    assert [n.op_type for n in nodes] == ["If"]
    assert list(nodes[0].input) == [spec.USE_CACHE_BRANCH]
    branches = _subgraphs(nodes[0])
    assert set(branches) == {"then_branch", "else_branch"}
    for branch in branches.values():
        assert len(branch.input) == 0  # branches read the outer inputs
        assert len(branch.initializer) == 0  # every weight lives in the outer graph
        assert len(branch.output) == len(spec.DECODER_OUTPUTS)
    condition = merged.graph.input[0]
    assert condition.name == spec.USE_CACHE_BRANCH
    assert condition.type.tensor_type.elem_type == onnx.TensorProto.BOOL
    assert [d.dim_value for d in condition.type.tensor_type.shape.dim] == [1]
    layers = spec.ModelDims.from_hf(tiny.model.config).num_decoder_layers
    assert [i.name for i in merged.graph.input] == list(spec.decoder_input_names(layers))
    assert [o.name for o in merged.graph.output] == list(spec.DECODER_OUTPUTS)


def test_no_two_initializers_hold_the_same_bytes(merged):
    digests = [
        (t.data_type, tuple(t.dims), hashlib.sha256(onnx.numpy_helper.to_array(t).tobytes()).hexdigest())
        for t in merged.graph.initializer
    ]
    assert len(digests) == len(set(digests))
    names = [t.name for t in merged.graph.initializer]
    assert len(names) == len(set(names))


def test_merged_decoder_stores_each_weight_once(tiny, tiny_graphs, merged):
    params = {id(p): p for m in (tiny.model.get_decoder(), tiny.model.lm_head) for p in m.parameters()}
    weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
    stored = sum(onnx.numpy_helper.to_array(t).nbytes for t in merged.graph.initializer)
    zero_bias = tiny.model.config.vocab_size * 4  # the LM head's Gemm bias (see export.py)
    assert weight_bytes <= stored <= weight_bytes + zero_bias + 1024, (stored, weight_bytes)
    # The rest of the file is graph structure: small and independent of the model's width.
    assert tiny_graphs["decoder"].stat().st_size - merged.ByteSize() == 0
    assert merged.ByteSize() - stored < 512 * 1024


def test_kv_shapes_come_from_the_config(tiny, merged):
    dims = spec.ModelDims.from_hf(tiny.model.config, tiny.model.generation_config)
    by_name = {i.name: i for i in merged.graph.input}
    for prefix, length in ((spec.PAST_SELF_KV, "past_len"), (spec.CROSS_KV, "src_len")):
        names = spec.layer_kv_names(prefix, dims.num_decoder_layers)
        assert len(names) == 2 * dims.num_decoder_layers
        for name in names:
            shape = [d.dim_value or d.dim_param for d in by_name[name].type.tensor_type.shape.dim]
            assert shape == ["rows", dims.num_heads, length, dims.d_kv]
    # random-tiny has more decoder than encoder layers on purpose: the two counts must not be mixed up
    assert dims.num_decoder_layers != dims.num_encoder_layers


def test_encoder_matches_pytorch(tiny, sessions):
    results = verify.check_encoder(tiny.model, sessions[0], verify.TOLERANCES["float32"])
    for r in results:
        assert r.passed, r.detail
        assert r.metrics["max_abs_diff"] < 1e-5


def test_both_decoder_branches_match_pytorch(tiny, sessions):
    results = verify.check_decoder_branches(tiny.model, sessions[1], verify.TOLERANCES["float32"])
    names = [r.name for r in results]
    assert any("first-step branch: new_cross_kv" in n for n in names)
    assert any("cache branch: logits" in n for n in names)
    for r in results:
        assert r.passed, f"{r.name}: {r.detail}"


def test_cache_branch_does_not_re_emit_cross_kv(tiny, sessions):
    results = verify.check_decoder_branches(tiny.model, sessions[1], verify.TOLERANCES["float32"])
    (check,) = [r for r in results if "re-emits" in r.name]
    assert check.passed and check.metrics["values"] == 0


def test_step_chain_matches_transformers_forward(tiny, sessions):
    result = verify.check_chain(tiny.model, tiny.tokenizer, *sessions, verify.TOLERANCES["float32"])
    assert result.passed, result.detail
    assert result.metrics["max_abs_diff"] < 1e-4


def test_generation_equals_transformers_on_varied_outputs(tiny, sessions):
    results = verify.check_generation(tiny.model, tiny.tokenizer, *sessions)
    assert len(results) == 2  # greedy and beam 4
    for r in results:
        assert r.passed, f"{r.name}: {r.detail}"
        # parity on degenerate outputs would prove nothing
        assert r.metrics["distinct_sequences"] >= r.metrics["inputs"] - 1
        assert r.metrics["mean_distinct_tokens"] >= 4
        assert r.metrics["share_ending_on_eos"] >= 0.3


def test_compare_arrays_flags_a_real_difference():
    expected = np.linspace(-1, 1, 100, dtype=np.float32)
    tol = verify.TOLERANCES["float32"]
    assert verify.compare_arrays("same", expected.copy(), expected, tol).passed
    off = expected.copy()
    off[3] += 1e-2
    result = verify.compare_arrays("off", off, expected, tol)
    assert not result.passed and result.metrics["max_abs_diff"] == pytest.approx(1e-2, rel=1e-3)
    assert not verify.compare_arrays("shape", expected[:5], expected, tol).passed


def test_encoder_matches_pytorch_on_a_2048_token_input(tiny, sessions):
    """Dynamic axes stay dynamic after tracing at 2 x 5, and relative attention is right far past
    relative_attention_max_distance (128): batch 1, 2048 tokens."""
    batch = tiny.tokenizer(["summarize: " + "word " * 4000], return_tensors="pt", truncation=True, max_length=2048)
    assert batch["input_ids"].shape[1] == 2048
    with torch.inference_mode():
        expected = EncoderGraph(tiny.model).eval()(**batch).numpy()
    actual = sessions[0].run(None, {k: v.numpy() for k, v in batch.items()})[0]
    result = verify.compare_arrays("long input", actual, expected, verify.TOLERANCES["float32"])
    assert result.passed, result.detail
