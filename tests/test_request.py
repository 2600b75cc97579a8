"""Request validation of t5_generate, without a server: every refusal names the field and the limit."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest

from t5_triton.model_repository.t5_runtime import request
from t5_triton.model_repository.t5_runtime.params import GenerationParams
from t5_triton.model_repository.t5_runtime.request import InvalidRequest, parse_request
from t5_triton.model_repository.t5_runtime.spec import ModelDims, ServingSpec

SERVING = ServingSpec(
    dims=ModelDims(64, 16, 4, 2, 3, vocab_size=100, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0),
    float_dtype="float32",
    max_input_tokens=12,
    max_new_tokens=50,
    default_max_new_tokens=20,
    max_num_beams=4,
    max_batch_size=4,
)


def encode(texts: list[str]) -> list[list[int]]:
    """A stand-in tokenizer: one token per word, then EOS, like T5's."""
    return [[2 + len(word) for word in text.split()] + [1] for text in texts]


def text(*values: str | bytes) -> np.ndarray:
    return np.array([[v.encode() if isinstance(v, str) else v] for v in values], dtype=np.object_)


def scalar(value, dtype) -> np.ndarray:
    return np.array([[value]], dtype=dtype)


def parse(**inputs):
    return parse_request(inputs, encode, SERVING)


def test_every_generation_parameter_is_a_request_input():
    assert set(request.PARAMETER_TYPES) == {f.name for f in fields(GenerationParams)}


def test_text_request_uses_defaults():
    parsed = parse(text_input=text("hello big world"))
    assert parsed.input_ids == [[7, 5, 7, 1]]
    assert parsed.params == GenerationParams(max_new_tokens=SERVING.default_max_new_tokens)


def test_batched_request_with_parameters():
    parsed = parse(
        text_input=text("a b", "c d e"),
        num_beams=np.array([[4], [4]], dtype=np.int32),
        length_penalty=np.array([[0.5], [0.5]], dtype=np.float32),
        early_stopping=np.array([[True], [True]]),
    )
    assert len(parsed.input_ids) == 2
    assert (parsed.params.num_beams, parsed.params.length_penalty, parsed.params.early_stopping) == (4, 0.5, True)


def test_truncate_keeps_the_first_tokens_and_eos():
    parsed = parse(text_input=text("w " * 20), truncate=np.array([[True]]))
    assert parsed.input_ids == [[3] * 11 + [1]]  # 12 = max_input_tokens, EOS kept last
    parsed = parse(input_ids=np.arange(5, 25, dtype=np.int32)[None, :], truncate=np.array([[True]]))
    assert parsed.input_ids == [list(range(5, 17))]  # no EOS to keep: the first 12
    short = parse(text_input=text("a b"), truncate=np.array([[True]]))
    assert short.input_ids == [[3, 3, 1]]


def test_token_ids_request():
    parsed = parse(input_ids=np.array([[5, 6, 7, 1]], dtype=np.int32))
    assert parsed.input_ids == [[5, 6, 7, 1]]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "exactly one of text_input"),
        ({"text_input": text("a"), "input_ids": np.array([[5]], np.int32)}, "exactly one of text_input"),
        ({"text_input": text("   ")}, "text_input is empty"),
        ({"text_input": text(b"\xff\xfe bad")}, "not valid UTF-8"),
        ({"text_input": text("w " * 20)}, "at most 12 (max_input_tokens); send truncate=true"),
        ({"input_ids": np.array([[5, 500]], np.int32)}, "token ids in [0, 100)"),
        ({"input_ids": np.array([[-1]], np.int32)}, "token ids in [0, 100)"),
        ({"input_ids": np.zeros((1, 0), np.int32)}, "tokens >= 1"),
        ({"input_ids": np.array([[1.5]], np.float32)}, "must be INT32"),
        ({"text_input": text("a"), "num_beams": scalar(0, np.int32)}, "num_beams must be between 1 and 4, got 0"),
        ({"text_input": text("a"), "num_beams": scalar(9, np.int32)}, "num_beams must be between 1 and 4, got 9"),
        (
            {"text_input": text("a"), "num_beams": scalar(2, np.int32), "num_return_sequences": scalar(3, np.int32)},
            "num_return_sequences must be between 1 and 2",
        ),
        ({"text_input": text("a"), "top_p": scalar(0.0, np.float32)}, "top_p must be in (0, 1]"),
        ({"text_input": text("a"), "top_p": scalar(1.5, np.float32)}, "top_p must be in (0, 1]"),
        ({"text_input": text("a"), "max_new_tokens": scalar(51, np.int32)}, "max_new_tokens must be between 1 and 50"),
        ({"text_input": text("a"), "temperature": scalar(np.nan, np.float32)}, "temperature must be a finite"),
        ({"text_input": text("a"), "num_beams": scalar(2.0, np.float32)}, "num_beams must be an integer"),
        ({"text_input": text("a"), "do_sample": scalar(1, np.int32)}, "do_sample must be a boolean"),
        ({"text_input": text("a", "b"), "num_beams": np.array([[1], [2]], np.int32)}, "same for every input"),
        ({"text_input": text("a"), "beams": scalar(2, np.int32)}, "unknown inputs ['beams']"),
        ({"text_input": text("a", "b", "c", "d", "e"), "num_beams": scalar(4, np.int32)}, "decodes at once (16)"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_requests_name_the_problem(inputs, message):
    with pytest.raises(InvalidRequest) as err:
        parse(**inputs)
    assert message in str(err.value)
