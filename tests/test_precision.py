"""--precision int8 / fp16: reduced graphs, measured against fp32, served like the fp32 ones."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from transformers import AutoTokenizer

from t5_triton.builder.build import BuildOptions, build
from t5_triton.builder.errors import BuildError
from t5_triton.builder.export import export_graphs
from t5_triton.builder.float16 import convert_float16, emulate_float16
from t5_triton.builder.precision import convert_fp16, verify_fp16
from t5_triton.builder.presets import PAD_ID, load_preset
from t5_triton.builder.verify import SAMPLE_TEXTS
from t5_triton.client.api import T5Client
from t5_triton.model_repository.t5_runtime import spec
from t5_triton.model_repository.t5_runtime.generator import T5Generator
from t5_triton.model_repository.t5_runtime.onnx_runner import create_session
from t5_triton.model_repository.t5_runtime.params import GenerationParams
from t5_triton.model_repository.t5_runtime.search import trim_sequence
from t5_triton.model_repository.t5_runtime.torch_session import TorchSession
from t5_triton.server import Ports, TritonServer


@pytest.fixture(scope="module")
def int8_repo(tmp_path_factory):
    output = tmp_path_factory.mktemp("int8") / "repo"
    build(BuildOptions(model="random-tiny", output=output, precision="int8"), Console(quiet=True))
    return output


def test_int8_report_has_its_quality_numbers(int8_repo):
    report = json.loads((int8_repo / "build_report.json").read_text())
    section = report["precision"]
    assert section["precision"] == "int8" and "dynamic quantization" in section["method"]
    rates = section["token_match_rate"]
    assert set(rates) == {"greedy", "beam search, 4 beams"}
    assert all(section["min_token_match"] <= r <= 1 for r in rates.values())  # meets the default threshold
    assert 0 < section["logits_vs_fp32"]["rel_error"] < 0.3  # quantized for real, and close
    assert section["bytes"]["int8"]["encoder"] < section["bytes"]["fp32"]["encoder"]
    assert section["bytes"]["int8"]["decoder"] < section["bytes"]["fp32"]["decoder"]
    assert all(c["passed"] for c in section["checks"])
    assert report["files"]["t5_decoder/1/model.onnx"] == section["bytes"]["int8"]["decoder"]
    # The cross K/V graph is fp32 only: int8 requests start with the int8 decoder's own first step.
    assert "t5_decoder/1/cross_kv.onnx" not in report["files"]
    assert '"cross_kv_onnx" value: { string_value: "" }' in (int8_repo / "t5_generate/config.pbtxt").read_text()


def test_a_threshold_above_the_measured_agreement_fails_the_build(int8_repo, tmp_path):
    with pytest.raises(BuildError, match="token match with transformers fp32"):
        build(BuildOptions(model="random-tiny", output=tmp_path / "r", precision="int8", min_token_match=1.01))
    assert not (tmp_path / "r").exists()


def _served_equals_in_process(repo: Path, log_file: Path) -> None:
    """The served repository answers like its own graphs run in process (greedy and beam search)."""
    dims = spec.ServingSpec.load(repo / "t5_generate/1").dims
    generator = T5Generator(
        TorchSession(create_session(repo / "t5_encoder/1/model.onnx")),
        TorchSession(create_session(repo / "t5_decoder/1/model.onnx")),
        dims,
    )
    texts = list(SAMPLE_TEXTS[:4])
    with (
        TritonServer(repo, Ports.free(), log_file=log_file) as server,
        T5Client(server.grpc_url, "grpc") as client,
    ):
        results = client.generate(texts, num_beams=4, max_new_tokens=16)
    tokenizer = AutoTokenizer.from_pretrained(repo / "t5_generate/1/tokenizer")
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = generator.run(batch["input_ids"], batch["attention_mask"], GenerationParams(16, num_beams=4))
    assert [r.output_ids[0] for r in results] == [trim_sequence(row) for row in out.sequences.tolist()]


@pytest.mark.server
def test_served_int8_equals_the_int8_graphs_in_process(int8_repo, tmp_path):
    _served_equals_in_process(int8_repo, tmp_path / "server.log")


@pytest.fixture(scope="module")
def fp16_repo(tmp_path_factory):
    output = tmp_path_factory.mktemp("fp16") / "repo"
    build(BuildOptions(model="random-tiny", output=output, precision="fp16"), Console(quiet=True))
    return output


def test_fp16_report_says_what_stayed_fp32_and_how_close_it_is(fp16_repo):
    report = json.loads((fp16_repo / "build_report.json").read_text())
    section = report["precision"]
    assert section["precision"] == "fp16" and "stay fp32" in section["method"]
    assert all(section["min_token_match"] <= r <= 1 for r in section["token_match_rate"].values())
    assert 0 < section["logits_vs_fp32"]["rel_error"] < 0.02  # rounded for real, and close
    for graph in ("encoder", "decoder"):  # about half, plus the graph itself, a visible share at this size
        assert section["bytes"]["fp16"][graph] < 0.65 * section["bytes"]["fp32"][graph]
    kept = section["kept_fp32"]
    for graph in ("encoder", "decoder first step", "decoder cached step"):
        # random-tiny stays far inside the range: only the position-bucket arithmetic is kept.
        assert kept[graph]["why"]["range"]["count"] == 0
        assert kept[graph]["why"]["index"]["count"] == kept[graph]["kept_fp32"] > 0
        assert kept[graph]["constants_clamped"] >= 1  # the attention mask's float32 min
    assert all(c["passed"] for c in section["checks"])
    assert any(c["name"].startswith("as shipped, CPU EP: generation") for c in section["checks"])
    # The interface stays fp32: the serving code and configs are those of an fp32 build.
    assert report["serving"]["float_dtype"] == "float32"
    decoder = onnx.load(str(fp16_repo / "t5_decoder/1/model.onnx"))
    assert TensorProto.FLOAT16 not in {
        v.type.tensor_type.elem_type for v in [*decoder.graph.input, *decoder.graph.output]
    }
    assert TensorProto.FLOAT16 in {t.data_type for t in decoder.graph.initializer}


@pytest.mark.server
def test_served_fp16_equals_the_fp16_graphs_in_process(fp16_repo, tmp_path):
    _served_equals_in_process(fp16_repo, tmp_path / "server.log")


def _chain_model() -> onnx.ModelProto:
    """x @ w -> * 1e3 -> / 1e3 -> + b: the middle pair's values (up to ~1e5) do not fit in fp16."""
    w = numpy_helper.from_array(np.full((4, 4), 25.0, np.float32), "w")
    big = numpy_helper.from_array(np.array(1e3, np.float32), "big")
    b = numpy_helper.from_array(np.ones(4, np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
        helper.make_node("Mul", ["h", "big"], ["up"], name="up"),
        helper.make_node("Div", ["up", "big"], ["down"], name="down"),
        helper.make_node("Add", ["down", "b"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [w, big, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_kept_neighbours_pass_values_in_fp32_and_casts_sit_only_at_the_seams():
    model = _chain_model()
    x = np.ones((1, 4), np.float32)
    expected = x @ np.full((4, 4), 25.0) + 1  # 101, with 1e5 in between
    for convert in (convert_float16, emulate_float16):
        converted = convert(model, {"up", "down"})
        session = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-3)
    fp16 = convert_float16(model, {"up", "down"})
    # In to fp16 for the MatMul, out to fp32 for the kept pair, back to fp16 for the Add, out to fp32.
    casts = [(n.input[0], n.attribute[0].i) for n in fp16.graph.node if n.op_type == "Cast"]
    assert casts == [
        ("x", TensorProto.FLOAT16),
        ("h", TensorProto.FLOAT),
        ("down", TensorProto.FLOAT16),
        ("y/fp16", TensorProto.FLOAT),
    ]
    types = {t.name: t.data_type for t in fp16.graph.initializer}
    assert types == {"w": TensorProto.FLOAT16, "big": TensorProto.FLOAT, "b": TensorProto.FLOAT16}
    # Without the kept pair the emulated graph overflows, as a GPU would.
    naive = emulate_float16(model, set())
    session = ort.InferenceSession(naive.SerializeToString(), providers=["CPUExecutionProvider"])
    assert not np.isfinite(session.run(None, {"x": x})[0]).all()


@pytest.fixture(scope="module")
def overflowing_tiny(tmp_path_factory):
    """random-tiny with block 0's feed-forward output scaled by 3e4 in encoder and decoder.

    fp32 does not mind (the next RMS norm divides the scale out), but the residual stream then holds
    values past fp16's 65504, as in real T5 checkpoints.
    """
    model, tokenizer = load_preset("random-tiny")
    with torch.no_grad():
        for block in (model.encoder.block[0], model.decoder.block[0]):
            block.layer[-1].DenseReluDense.wo.weight.mul_(3e4)
    return model, tokenizer, export_graphs(model, tmp_path_factory.mktemp("overflowing") / "onnx")


def test_without_the_audit_fp16_overflows(overflowing_tiny, tmp_path):
    model, tokenizer, graphs = overflowing_tiny
    fp16 = convert_fp16(graphs, tokenizer, PAD_ID, tmp_path, audit_limit=math.inf)
    checks = {c.name: c for c in verify_fp16(model, tokenizer, fp16, min_token_match=0.9)}
    chain = checks["encoder + decoder steps vs transformers forward"]
    assert not chain.passed and not chain.metrics["rel_error"] < 0.5  # NaN or far off
    assert not checks["generation greedy: token match with transformers fp32"].passed
    # On the CPU EP the shipped graph hides it: ONNX Runtime runs those nodes in fp32.
    assert checks["as shipped, CPU EP: encoder + decoder steps vs transformers forward"].passed


def test_the_audit_keeps_the_overflowing_nodes_in_fp32(overflowing_tiny, tmp_path):
    model, tokenizer, graphs = overflowing_tiny
    fp16 = convert_fp16(graphs, tokenizer, PAD_ID, tmp_path)
    checks = verify_fp16(model, tokenizer, fp16, min_token_match=0.9)
    assert all(c.passed for c in checks), [c.name for c in checks if not c.passed]
    for graph in ("encoder", "decoder first step", "decoder cached step"):
        ranges = fp16.report[graph]["why"]["range"]
        assert ranges["max_abs_seen"] > 65504
        # The residual adds and the RMS norm's square and mean; the feed-forward's MatMul reads the big weight.
        assert {"Add", "Pow", "ReduceMean", "MatMul"} <= set(ranges["by_op_type"])
