"""--precision int8: quantized graphs, measured against fp32, served like the fp32 ones."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from transformers import AutoTokenizer

from t5_triton.builder.build import BuildOptions, build
from t5_triton.builder.errors import BuildError
from t5_triton.builder.verify import SAMPLE_TEXTS
from t5_triton.client.api import T5Client
from t5_triton.model_repository.t5_runtime import spec
from t5_triton.model_repository.t5_runtime.generator import T5Generator
from t5_triton.model_repository.t5_runtime.onnx_runner import TorchSession, create_session
from t5_triton.model_repository.t5_runtime.params import GenerationParams
from t5_triton.model_repository.t5_runtime.search import trim_sequence
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


def test_a_threshold_above_the_measured_agreement_fails_the_build(int8_repo, tmp_path):
    with pytest.raises(BuildError, match="token match with transformers fp32"):
        build(BuildOptions(model="random-tiny", output=tmp_path / "r", precision="int8", min_token_match=1.01))
    assert not (tmp_path / "r").exists()


@pytest.mark.server
def test_served_int8_equals_the_int8_graphs_in_process(int8_repo, tmp_path):
    dims = spec.ServingSpec.load(int8_repo / "t5_generate/1").dims
    generator = T5Generator(
        TorchSession(create_session(int8_repo / "t5_encoder/1/model.onnx")),
        TorchSession(create_session(int8_repo / "t5_decoder/1/model.onnx")),
        dims,
    )
    texts = list(SAMPLE_TEXTS[:4])
    with (
        TritonServer(int8_repo, Ports.free(), log_file=tmp_path / "server.log") as server,
        T5Client(server.grpc_url, "grpc") as client,
    ):
        results = client.generate(texts, num_beams=4, max_new_tokens=16)
    tokenizer = AutoTokenizer.from_pretrained(int8_repo / "t5_generate/1/tokenizer")
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = generator.run(batch["input_ids"], batch["attention_mask"], GenerationParams(16, num_beams=4))
    assert [r.output_ids[0] for r in results] == [trim_sequence(row) for row in out.sequences.tolist()]
