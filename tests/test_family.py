"""The T5 family beyond t5 v1.0: each preset builds, serves, and equals transformers.generate at fp32.

random-flan-t5-tiny: gated-GELU, untied LM head, no output rescale, d_kv * heads != d_model.
random-mt5-tiny: the same shape of model saved as mT5, with mT5's 250k vocabulary.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from rich.console import Console
from transformers import GenerationConfig

from t5_triton.builder.build import BuildOptions, build
from t5_triton.builder.checkpoint import load_checkpoint
from t5_triton.builder.repository import ServingOptions
from t5_triton.builder.verify import SAMPLE_TEXTS, reference_generate
from t5_triton.client.api import T5Client
from t5_triton.model_repository.t5_runtime.search import trim_sequence
from t5_triton.server import Ports, TritonServer

pytestmark = pytest.mark.server

PRESETS = ("random-flan-t5-tiny", "random-mt5-tiny")


@pytest.fixture(scope="module", params=PRESETS)
def served(request, tmp_path_factory):
    """(checkpoint, repository, running server) for one preset."""
    name = request.param
    work = tmp_path_factory.mktemp(name)
    checkpoint = load_checkpoint(name, work / "checkpoint")
    # One preset calls t5_encoder and t5_decoder over BLS (the gpu target's way), the other runs them inside
    # t5_generate (the cpu default): both paths must equal transformers.
    in_process = name != "random-mt5-tiny"
    serving = ServingOptions(encoder_in_process=in_process, decoder_in_process=in_process)
    build(BuildOptions(model=name, output=work / "repo", serving=serving), Console(quiet=True))
    with TritonServer(work / "repo", Ports.free(), log_file=work / "server.log") as server:
        yield checkpoint, work / "repo", server


def test_encoder_and_decoder_run_where_the_build_put_them(served):
    checkpoint, repo, _ = served
    config = (repo / "t5_generate" / "config.pbtxt").read_text()
    in_process = checkpoint.source != "random-mt5-tiny"
    assert ('"t5_encoder/1/model.onnx"' in config) == in_process
    assert ('"t5_decoder/1/model.onnx"' in config) == in_process
    # fp32 on the cpu target: new requests take their first token in the shared step, whatever runs where
    assert '"t5_decoder/1/cross_kv.onnx"' in config and (repo / "t5_decoder/1/cross_kv.onnx").is_file()


def test_architecture_is_what_the_preset_mirrors(served):
    checkpoint, repo, _ = served
    config = checkpoint.model.config
    assert config.feed_forward_proj == "gated-gelu"
    assert not getattr(config, "scale_decoder_outputs", False)
    assert checkpoint.model.lm_head.weight.data_ptr() != checkpoint.model.get_decoder().embed_tokens.weight.data_ptr()
    # untied: embedding and LM head both stored, each once (the file's ratio is meaningless at tiny size)
    merged = onnx.load(str(repo / "t5_decoder/1/model.onnx"))
    stored = sum(onnx.numpy_helper.to_array(t).nbytes for t in merged.graph.initializer)
    weights = json.loads((repo / "build_report.json").read_text())["decoder_size"]["weights_bytes"]
    assert weights <= stored <= weights + 4 * config.vocab_size + 1024
    if config.model_type == "mt5":
        assert config.vocab_size == 250112


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("num_beams", [1, 4])
def test_served_output_equals_transformers(served, protocol, num_beams):
    checkpoint, _, server = served
    config = GenerationConfig(
        decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, num_beams=num_beams, max_new_tokens=24
    )
    batch = checkpoint.tokenizer(list(SAMPLE_TEXTS), return_tensors="pt", padding=True)
    with torch.inference_mode():
        expected = [trim_sequence(row.tolist()) for row in reference_generate(checkpoint.model, batch, config)]
    url = server.http_url if protocol == "http" else server.grpc_url
    with T5Client(url, protocol) as client:
        results = client.generate(list(SAMPLE_TEXTS), num_beams=num_beams, max_new_tokens=24)
    assert [r.output_ids[0] for r in results] == expected
    assert len({len(ids) for ids in expected}) >= 2  # varied outputs, or parity proves little
