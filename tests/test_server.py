"""t5_generate on a real tritonserver (random-tiny): parity with transformers, errors, health."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from transformers import GenerationConfig
from tritonclient.utils import InferenceServerException

from t5_triton.builder.verify import SAMPLE_TEXTS, reference_generate
from t5_triton.client.api import GenerateError, T5Client
from t5_triton.model_repository.t5_runtime.search import trim_sequence

pytestmark = pytest.mark.server

PROTOCOLS = ("http", "grpc")


@pytest.fixture(scope="module", params=PROTOCOLS)
def client(request, server):
    url = server.http_url if request.param == "http" else server.grpc_url
    with T5Client(url, request.param) as c:
        yield c


def reference(tiny, texts, **params) -> tuple[list[list[list[int]]], torch.Tensor | None]:
    """transformers.generate on the same checkpoint: token ids per input and per returned sequence."""
    config = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, do_sample=False, **params)
    config.return_dict_in_generate = True
    config.output_scores = params.get("num_beams", 1) > 1
    batch = tiny.tokenizer(list(texts), return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = reference_generate(tiny.model, batch, config)
    per_input = params.get("num_return_sequences", 1)
    rows = [trim_sequence(seq.tolist()) for seq in out.sequences]
    grouped = [rows[i : i + per_input] for i in range(0, len(rows), per_input)]
    return grouped, getattr(out, "sequences_scores", None)


PARITY_CASES = {
    "greedy": {"max_new_tokens": 24},
    "beam4": {"num_beams": 4, "max_new_tokens": 24},
    "beam4-return2": {"num_beams": 4, "num_return_sequences": 2, "max_new_tokens": 24},
    "beam4-early-stopping": {"num_beams": 4, "early_stopping": True, "max_new_tokens": 24},
    "beam4-no-early-stopping-lp2": {
        "num_beams": 4,
        "early_stopping": False,
        "length_penalty": 2.0,
        "max_new_tokens": 24,
    },
    "no-repeat-ngram-greedy": {"no_repeat_ngram_size": 2, "max_new_tokens": 24},
    "no-repeat-ngram-beam": {"num_beams": 4, "no_repeat_ngram_size": 3, "max_new_tokens": 24},
    "min-new-tokens": {"min_new_tokens": 12, "max_new_tokens": 16},
    "repetition-penalty": {"repetition_penalty": 1.3, "max_new_tokens": 24},
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_output_ids_equal_transformers(client, tiny, case):
    params = PARITY_CASES[case]
    expected, expected_scores = reference(tiny, SAMPLE_TEXTS, **params)
    results = client.generate(list(SAMPLE_TEXTS), **params)
    assert [r.output_ids for r in results] == expected
    # the inputs must give varied outputs of varied lengths, or parity proves little
    lengths = {len(ids) for r in results for ids in r.output_ids}
    assert len(lengths) >= 2 or case == "min-new-tokens"
    assert len({tuple(r.output_ids[0]) for r in results}) >= len(SAMPLE_TEXTS) - 1
    if expected_scores is not None:
        scores = [s for r in results for s in r.scores]
        np.testing.assert_allclose(scores, expected_scores.numpy(), rtol=1e-4, atol=1e-5)
    assert all(isinstance(t, str) for r in results for t in r.texts)


def _long_text(tokenizer, tokens: int) -> str:
    words = " ".join(SAMPLE_TEXTS).split()
    text = ""
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += " ".join(words) + " "
    return text


@pytest.mark.parametrize("num_beams", [1, 4])
def test_a_1024_token_input_equals_transformers(client, tiny, num_beams, long_input):
    ids = [*tiny.tokenizer(_long_text(tiny.tokenizer, long_input))["input_ids"][: long_input - 1], 1]
    assert len(ids) == long_input
    config = GenerationConfig(
        decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, num_beams=num_beams, max_new_tokens=24
    )
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, long_input, dtype=torch.int64)}
    with torch.inference_mode():
        expected = trim_sequence(reference_generate(tiny.model, batch, config)[0].tolist())
    [result] = client.generate(input_ids=ids, num_beams=num_beams, max_new_tokens=24)
    assert result.output_ids[0] == expected
    assert len(set(expected)) > 3


def test_truncate_cuts_long_inputs_like_the_tokenizer(client, tiny, long_input):
    text = _long_text(tiny.tokenizer, 1500)
    with pytest.raises(GenerateError, match="send truncate=true"):
        client.generate(text, max_new_tokens=8)
    batch = tiny.tokenizer([text], truncation=True, max_length=long_input, return_tensors="pt")
    config = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, max_new_tokens=16)
    with torch.inference_mode():
        expected = trim_sequence(reference_generate(tiny.model, batch, config)[0].tolist())
    [result] = client.generate(text, truncate=True, max_new_tokens=16)
    assert result.output_ids[0] == expected


def test_texts_are_the_decoded_ids(client, tiny):
    [result] = client.generate(SAMPLE_TEXTS[0], max_new_tokens=12)
    assert result.texts[0] == tiny.tokenizer.decode(result.output_ids[0], skip_special_tokens=True)


def test_token_id_input_equals_text_input(client, tiny):
    ids = tiny.tokenizer(SAMPLE_TEXTS[1])["input_ids"]
    [from_ids] = client.generate(input_ids=ids, max_new_tokens=12)
    [from_text] = client.generate(SAMPLE_TEXTS[1], max_new_tokens=12)
    assert from_ids == from_text


def test_sampling_with_a_seed_is_reproducible(client):
    params = {"do_sample": True, "top_k": 20, "top_p": 0.9, "temperature": 1.5, "max_new_tokens": 16}
    first = client.generate(list(SAMPLE_TEXTS[:3]), seed=7, **params)
    again = client.generate(list(SAMPLE_TEXTS[:3]), seed=7, **params)
    other = client.generate(list(SAMPLE_TEXTS[:3]), seed=8, **params)
    assert first == again
    assert first != other


def test_generate_endpoint_answers(server):
    body = {"text_input": SAMPLE_TEXTS[0], "num_beams": 4, "max_new_tokens": 8}
    answer = _post(f"http://{server.http_url}/v2/models/t5_generate/generate", body)
    assert isinstance(answer["text_output"], str)
    assert answer["output_ids"][0] == 0 and len(answer["output_ids"]) <= 9
    with pytest.raises(urllib.error.HTTPError) as err:
        _post(f"http://{server.http_url}/v2/models/t5_generate/generate", {"text_input": "hi", "top_p": 1.5})
    assert err.value.code == 400
    assert "top_p must be in (0, 1]" in err.value.read().decode()


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _tensor(name: str, array: np.ndarray, wire: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), wire)
    tensor.set_data_from_numpy(array)
    return tensor


def _text(*values: bytes) -> np.ndarray:
    return np.array([[v] for v in values], dtype=np.object_)


def _int(value: int) -> np.ndarray:
    return np.array([[value]], dtype=np.int32)


def _request(text: bytes = b"translate English to German: good.", **overrides) -> list:
    """Every request of the shared batch has the same inputs (Triton batches only those); values vary."""
    values = {"max_new_tokens": 8, "num_beams": 2, "num_return_sequences": 1, "top_p": 1.0, **overrides}
    inputs = [_tensor("text_input", _text(text), "BYTES")]
    for name, value in values.items():
        dtype, wire = (np.float32, "FP32") if name == "top_p" else (np.int32, "INT32")
        inputs.append(_tensor(name, np.array([[value]], dtype), wire))
    return inputs


GOOD = _request()
# Requests the model itself must refuse, each with its own message, batched with good ones.
BAD_REQUESTS = {
    "empty text": (_request(b"  "), "text_input is empty"),
    "non-UTF-8": (_request(b"\xff\xfeoops"), "not valid UTF-8"),
    "too many tokens": (_request(b"word " * 1500), "at most 1024 (max_input_tokens)"),
    "num_beams 0": (_request(num_beams=0), "num_beams must be between 1 and 8, got 0"),
    "num_beams above limit": (_request(num_beams=9), "num_beams must be between 1 and 8, got 9"),
    "num_return_sequences > num_beams": (
        _request(num_return_sequences=3),
        "num_return_sequences must be between 1 and 2",
    ),
    "top_p 0": (_request(top_p=0.0), "top_p must be in (0, 1]"),
    "top_p above 1": (_request(top_p=1.5), "top_p must be in (0, 1]"),
    "max_new_tokens 0": (_request(max_new_tokens=0), "max_new_tokens must be between 1 and 512"),
}
# Refused by the model too, but with other inputs than the batch above.
LONE_BAD_REQUESTS = {
    "missing input": ([_tensor("max_new_tokens", _int(8), "INT32")], "exactly one of text_input"),
    "token id out of range": ([_tensor("input_ids", np.array([[5, 10**6]], np.int32), "INT32")], "token ids in [0,"),
}
# Requests Triton refuses before the model sees them (config types and shapes).
MALFORMED_REQUESTS = {
    "wrong dtype": ([_tensor("input_ids", np.array([[5.0, 6.0]], np.float32), "FP32")], "FP32"),
    "unknown input": ([*GOOD, _tensor("beams", _int(2), "INT32")], "beams"),
    "wrong shape": ([_tensor("text_input", np.array([[b"a", b"b"]], np.object_), "BYTES")], "shape"),
}


def _metric(server, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.ports.metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf'^{name}{{model="t5_generate",version="1"}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1))


async def _send_together(server, requests: list[list]) -> list:
    async with grpcaio.InferenceServerClient(server.grpc_url) as aio:

        async def one(inputs):
            try:
                return await aio.infer("t5_generate", inputs)
            except InferenceServerException as err:
                return err

        return await asyncio.gather(*(one(inputs) for inputs in requests))


def test_each_bad_request_gets_its_error_and_the_good_ones_their_answer(server):
    names = list(BAD_REQUESTS)
    requests = [GOOD, *(BAD_REQUESTS[n][0] for n in names), GOOD]
    executions = _metric(server, "nv_inference_exec_count")
    answers = asyncio.run(_send_together(server, requests))
    # they were decoded in shared `execute` calls, not one each: a bad request must not fail its batch
    assert _metric(server, "nv_inference_exec_count") - executions < len(requests)
    for good in (answers[0], answers[-1]):
        assert not isinstance(good, Exception), good
        assert good.as_numpy("output_ids").shape[:2] == (1, 1)
        assert good.as_numpy("text_output").shape == (1, 1)
    for name, answer in zip(names, answers[1:-1], strict=True):
        assert isinstance(answer, InferenceServerException), name
        assert answer.status() == "StatusCode.INVALID_ARGUMENT", (name, answer.status())
        assert BAD_REQUESTS[name][1] in answer.message(), (name, answer.message())


@pytest.mark.parametrize("name", [*LONE_BAD_REQUESTS, *MALFORMED_REQUESTS])
def test_lone_bad_and_malformed_requests_get_their_error(server, name):
    """Refused by the model (other inputs than the batch above) or by Triton itself (types, shapes)."""
    inputs, fragment = {**LONE_BAD_REQUESTS, **MALFORMED_REQUESTS}[name]
    [answer] = asyncio.run(_send_together(server, [inputs]))
    assert isinstance(answer, InferenceServerException)
    assert answer.status() == "StatusCode.INVALID_ARGUMENT"
    assert fragment in answer.message()


def test_the_encoder_model_answers_a_direct_call(server, tiny, tiny_repo):
    """t5_generate runs the encoder graph itself, so t5_encoder loads its own at its first request."""
    assert '"first_request"' in (tiny_repo / "t5_encoder/config.pbtxt").read_text()
    batch = tiny.tokenizer(list(SAMPLE_TEXTS[:2]), return_tensors="np", padding=True)
    with grpcclient.InferenceServerClient(server.grpc_url) as grpc:
        answer = grpc.infer(
            "t5_encoder",
            [_tensor(name, batch[name].astype(np.int64), "INT64") for name in ("input_ids", "attention_mask")],
        )
    with torch.inference_mode():
        expected = tiny.model.get_encoder()(**tiny.tokenizer(list(SAMPLE_TEXTS[:2]), return_tensors="pt", padding=True))
    np.testing.assert_allclose(answer.as_numpy("encoder_hidden_states"), expected.last_hidden_state, atol=1e-4)


def test_client_raises_the_server_message(client):
    with pytest.raises(GenerateError, match="num_beams must be between 1 and 8, got 0"):
        client.generate("hello", num_beams=0)


def test_server_is_healthy_afterwards(server, client):
    # runs last in this module: everything above must have left the server serving
    assert server.is_ready()
    assert client.is_ready()
    [result] = client.generate(SAMPLE_TEXTS[0], max_new_tokens=4)
    assert 1 < len(result.output_ids[0]) <= 5
