"""Python API for `t5_generate` over tritonclient, HTTP or gRPC behind one interface, sync and asyncio.

    client = T5Client("localhost:8000")                      # or protocol="grpc", url="localhost:8001"
    [result] = client.generate("translate English to German: That is good.", num_beams=4)
    result.texts[0]

One call sends one request: its texts travel together (at most the model's max_batch_size) and share
the generation parameters, which take Hugging Face's names. A call that takes longer than the client's
`timeout` (600 s by default) raises `GenerateError`; over gRPC the server then stops decoding it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from tritonclient.utils import InferenceServerException

from t5_triton.model_repository.t5_runtime.request import (
    INPUT_IDS,
    OPTION_TYPES,
    OUTPUT_IDS,
    PARAMETER_TYPES,
    SEQUENCE_SCORES,
    TEXT_INPUT,
    TEXT_OUTPUT,
)
from t5_triton.model_repository.t5_runtime.search import trim_sequence

MODEL_NAME = "t5_generate"
_OPTIONAL_INPUTS = {**PARAMETER_TYPES, **OPTION_TYPES}
DEFAULT_URLS = {"http": "localhost:8000", "grpc": "localhost:8001"}
# Long enough for a long beam search of a large model on CPU (tritonclient's HTTP default, 60 s, is not).
DEFAULT_TIMEOUT_S = 600.0
_NUMPY_TYPES = {"TYPE_INT32": np.int32, "TYPE_INT64": np.int64, "TYPE_FP32": np.float32, "TYPE_BOOL": np.bool_}
_WIRE_TYPES = {"TYPE_INT32": "INT32", "TYPE_INT64": "INT64", "TYPE_FP32": "FP32", "TYPE_BOOL": "BOOL"}
_PROTOCOLS = {"http": (httpclient, httpaio), "grpc": (grpcclient, grpcaio)}


class GenerateError(RuntimeError):
    """The server refused or failed the request; `status` is Triton's code (e.g. 'StatusCode.INVALID_ARGUMENT'
    over gRPC, '400' over HTTP)."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class GenerateResult:
    """One input's answer: one entry per returned sequence, best first."""

    texts: list[str]
    output_ids: list[list[int]]  # transformers.generate's sequences, decoder start first, cut after EOS
    scores: list[float]


def request_inputs(module, texts: Sequence[str] | None, input_ids, params: dict[str, Any]) -> list:
    """The InferInputs of one t5_generate request (`module`: tritonclient.http or tritonclient.grpc)."""
    if (texts is None) == (input_ids is None):
        raise ValueError("give texts or input_ids, not both")
    if texts is not None:
        data = np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)
        first = module.InferInput(TEXT_INPUT, list(data.shape), "BYTES")
    else:
        data = np.asarray(input_ids, dtype=np.int32)
        data = data.reshape(1, -1) if data.ndim == 1 else data
        first = module.InferInput(INPUT_IDS, list(data.shape), "INT32")
    first.set_data_from_numpy(data)
    inputs, rows = [first], data.shape[0]
    for name, value in params.items():
        if value is None:
            continue
        if name not in _OPTIONAL_INPUTS:
            raise ValueError(f"unknown generation parameter {name!r}; known: {', '.join(_OPTIONAL_INPUTS)}")
        triton_type = _OPTIONAL_INPUTS[name]
        array = np.full((rows, 1), value, dtype=_NUMPY_TYPES[triton_type])
        tensor = module.InferInput(name, list(array.shape), _WIRE_TYPES[triton_type])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _outputs(module) -> list:
    return [module.InferRequestedOutput(n) for n in (TEXT_OUTPUT, OUTPUT_IDS, SEQUENCE_SCORES)]


def _results(response, eos_token_id: int, pad_token_id: int) -> list[GenerateResult]:
    texts = response.as_numpy(TEXT_OUTPUT)
    ids = response.as_numpy(OUTPUT_IDS)
    scores = response.as_numpy(SEQUENCE_SCORES)
    results = []
    for row_texts, row_ids, row_scores in zip(texts, ids, scores, strict=True):
        results.append(
            GenerateResult(
                texts=[t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in row_texts],
                output_ids=[trim_sequence(seq.tolist(), eos_token_id, pad_token_id) for seq in row_ids],
                scores=[float(s) for s in row_scores],
            )
        )
    return results


def _error(err: InferenceServerException) -> GenerateError:
    return GenerateError(err.message() or str(err), str(err.status()) if err.status() else None)


class _Client:
    _asyncio = False

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "http",
        model: str = MODEL_NAME,
        eos_token_id: int = 1,
        pad_token_id: int = 0,
        timeout: float = DEFAULT_TIMEOUT_S,
    ):
        if protocol not in _PROTOCOLS:
            raise ValueError(f"protocol must be http or grpc, got {protocol!r}")
        self.module = _PROTOCOLS[protocol][0]  # InferInput & co. are shared by the sync and asyncio clients
        self.model = model
        self.eos_token_id = eos_token_id  # T5-family ids; pass others for a checkpoint that differs
        self.pad_token_id = pad_token_id
        self.url = url or DEFAULT_URLS[protocol]
        self.timeout = timeout
        client_class = _PROTOCOLS[protocol][int(self._asyncio)].InferenceServerClient
        # gRPC takes a deadline per call (`_call_options`); HTTP a read timeout per client.
        if protocol == "grpc":
            self.client = client_class(self.url)
            self._call_options = {"client_timeout": timeout}
        else:
            timeouts = {"conn_timeout": timeout} if self._asyncio else {"network_timeout": timeout}
            self.client = client_class(self.url, **timeouts)
            self._call_options = {}

    def _timed_out(self) -> GenerateError:
        return GenerateError(f"no answer from {self.model} in {self.timeout:g} s", "timeout")


class T5Client(_Client):
    """Blocking client."""

    def generate(
        self, texts: str | Sequence[str] | None = None, *, input_ids=None, **params: Any
    ) -> list[GenerateResult]:
        texts = [texts] if isinstance(texts, str) else texts
        try:
            response = self.client.infer(
                self.model,
                request_inputs(self.module, texts, input_ids, params),
                outputs=_outputs(self.module),
                **self._call_options,
            )
        except InferenceServerException as err:
            raise _error(err) from err
        except TimeoutError as err:  # HTTP's read timeout (gRPC reports its deadline as a server error)
            raise self._timed_out() from err
        return _results(response, self.eos_token_id, self.pad_token_id)

    def is_ready(self) -> bool:
        try:
            return self.client.is_server_ready() and self.client.is_model_ready(self.model)
        except (InferenceServerException, OSError):  # OSError: nothing listens there (yet)
            return False

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> T5Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncT5Client(_Client):
    """asyncio client: many requests in flight from one event loop."""

    _asyncio = True

    async def generate(
        self, texts: str | Sequence[str] | None = None, *, input_ids=None, **params: Any
    ) -> list[GenerateResult]:
        texts = [texts] if isinstance(texts, str) else texts
        try:
            response = await self.client.infer(
                self.model,
                request_inputs(self.module, texts, input_ids, params),
                outputs=_outputs(self.module),
                **self._call_options,
            )
        except InferenceServerException as err:
            raise _error(err) from err
        except TimeoutError as err:  # HTTP's read timeout (gRPC reports its deadline as a server error)
            raise self._timed_out() from err
        return _results(response, self.eos_token_id, self.pad_token_id)

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> AsyncT5Client:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
