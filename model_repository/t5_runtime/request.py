"""Turn one `t5_generate` request's input arrays into token ids and checked generation parameters.

Pure Python + numpy: `model.py` reads the tensors, this module decides whether the request is valid,
and every refusal is an `InvalidRequest` whose message names the field and the limit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .params import GenerationParams, InvalidParameter, Limits
from .spec import ServingSpec

TEXT_INPUT = "text_input"
INPUT_IDS = "input_ids"
TEXT_OUTPUT = "text_output"
OUTPUT_IDS = "output_ids"
SEQUENCE_SCORES = "sequence_scores"

# Per-request parameters: Hugging Face names, one value each, with their Triton types.
PARAMETER_TYPES = {
    "max_new_tokens": "TYPE_INT32",
    "min_new_tokens": "TYPE_INT32",
    "num_beams": "TYPE_INT32",
    "num_return_sequences": "TYPE_INT32",
    "length_penalty": "TYPE_FP32",
    "early_stopping": "TYPE_BOOL",
    "no_repeat_ngram_size": "TYPE_INT32",
    "repetition_penalty": "TYPE_FP32",
    "do_sample": "TYPE_BOOL",
    "temperature": "TYPE_FP32",
    "top_k": "TYPE_INT32",
    "top_p": "TYPE_FP32",
    "seed": "TYPE_INT64",
}
# Per-request options that are not generation parameters.
TRUNCATE = "truncate"  # BOOL: cut inputs longer than the server's limit instead of refusing them
OPTION_TYPES = {TRUNCATE: "TYPE_BOOL"}
INPUT_NAMES = (TEXT_INPUT, INPUT_IDS, *PARAMETER_TYPES, *OPTION_TYPES)
_PYTHON_TYPE = {"TYPE_INT32": int, "TYPE_INT64": int, "TYPE_FP32": float, "TYPE_BOOL": bool}


class InvalidRequest(ValueError):
    """The request cannot be served as sent; the message says which field and why."""


@dataclass(frozen=True)
class GenerateRequest:
    input_ids: list[list[int]]  # one token list per input of the request
    params: GenerationParams


def _parameter(name: str, value: np.ndarray) -> object:
    flat = np.asarray(value).reshape(-1)
    if flat.size == 0:
        raise InvalidRequest(f"{name} is empty; send one value")
    if not np.array_equal(flat, np.full_like(flat, flat[0]), equal_nan=flat.dtype.kind == "f"):
        raise InvalidRequest(f"{name} must be the same for every input of one request, got {flat.tolist()}")
    item = flat[0].item()
    expected = _PYTHON_TYPE[{**PARAMETER_TYPES, **OPTION_TYPES}[name]]
    if expected is bool and not isinstance(item, bool):
        raise InvalidRequest(f"{name} must be a boolean, got {item!r}")
    if expected is int and not isinstance(item, int):
        raise InvalidRequest(f"{name} must be an integer, got {item!r}")
    return expected(item)


def _texts(value: np.ndarray) -> list[str]:
    if value.dtype != np.object_:
        raise InvalidRequest(f"{TEXT_INPUT} must be BYTES (strings), got {value.dtype}")
    texts = []
    for item in value.reshape(-1):
        raw = item.encode() if isinstance(item, str) else item
        if not isinstance(raw, bytes):
            raise InvalidRequest(f"{TEXT_INPUT} must hold strings, got {type(item).__name__}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InvalidRequest(f"{TEXT_INPUT} is not valid UTF-8 (byte {err.start})") from err
        if not text.strip():
            raise InvalidRequest(f"{TEXT_INPUT} is empty")
        texts.append(text)
    if not texts:
        raise InvalidRequest(f"{TEXT_INPUT} holds no text")
    return texts


def _token_rows(value: np.ndarray, vocab_size: int) -> list[list[int]]:
    if value.dtype not in (np.int32, np.int64):
        raise InvalidRequest(f"{INPUT_IDS} must be INT32, got {value.dtype}")
    rows = value.reshape(1, -1) if value.ndim == 1 else value
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise InvalidRequest(f"{INPUT_IDS} must be [tokens] or [inputs, tokens] with tokens >= 1, got {value.shape}")
    if rows.min() < 0 or rows.max() >= vocab_size:
        raise InvalidRequest(f"{INPUT_IDS} must be token ids in [0, {vocab_size}), got {rows.min()}..{rows.max()}")
    return rows.astype(np.int64).tolist()


def _truncate(row: list[int], limit: int, eos: int) -> list[int]:
    """As the Hugging Face tokenizer truncates T5 inputs: the first tokens, and the closing EOS kept."""
    if len(row) <= limit:
        return row
    return [*row[: limit - 1], eos] if row[-1] == eos else row[:limit]


def parse_request(
    inputs: dict[str, np.ndarray], encode: Callable[[list[str]], list[list[int]]], serving: ServingSpec
) -> GenerateRequest:
    """`inputs` maps input names to the arrays sent; `encode` tokenizes texts (adding EOS as T5 does)."""
    unknown = set(inputs) - set(INPUT_NAMES)
    if unknown:
        raise InvalidRequest(f"unknown inputs {sorted(unknown)}; accepted: {', '.join(INPUT_NAMES)}")
    has_text, has_ids = TEXT_INPUT in inputs, INPUT_IDS in inputs
    if has_text == has_ids:
        raise InvalidRequest(f"send exactly one of {TEXT_INPUT} (BYTES) or {INPUT_IDS} (INT32)")
    if has_text:
        token_rows = encode(_texts(inputs[TEXT_INPUT]))
    else:
        token_rows = _token_rows(inputs[INPUT_IDS], serving.dims.vocab_size)
    if TRUNCATE in inputs and _parameter(TRUNCATE, inputs[TRUNCATE]):
        token_rows = [_truncate(row, serving.max_input_tokens, serving.dims.eos_token_id) for row in token_rows]
    longest = max(len(row) for row in token_rows)
    if longest > serving.max_input_tokens:
        raise InvalidRequest(
            f"input has {longest} tokens; this server accepts at most {serving.max_input_tokens} (max_input_tokens); "
            f"send {TRUNCATE}=true to cut it"
        )
    values = {name: _parameter(name, inputs[name]) for name in PARAMETER_TYPES if name in inputs}
    values.setdefault("max_new_tokens", serving.default_max_new_tokens)
    try:
        params = GenerationParams(**values).validate(Limits(serving.max_new_tokens, serving.max_num_beams))
    except InvalidParameter as err:
        raise InvalidRequest(str(err)) from err
    rows = len(token_rows) * max(params.num_beams, params.num_return_sequences)
    if rows > serving.max_batch_size * serving.max_num_beams:
        raise InvalidRequest(
            f"{len(token_rows)} inputs x {max(params.num_beams, params.num_return_sequences)} sequences "
            f"(num_beams / num_return_sequences) is more than this server decodes at once "
            f"({serving.max_batch_size * serving.max_num_beams})"
        )
    return GenerateRequest(token_rows, params)
