"""Streaming from `t5_generate_stream`: the generated text arrives in pieces as it is decided.

    for piece in stream_generate("localhost:8001", "summarize: ...", protocol="grpc", max_new_tokens=64):
        print(piece.text, end="", flush=True)

gRPC uses Triton's bidirectional stream; HTTP uses the `generate_stream` endpoint (server-sent events).
The pieces' `text` and `token_ids` concatenate to the answer `t5_generate` gives (its `output_ids`
without the decoder start token); the last piece has `final` set and the sequence score. Greedy and
sampling send every token; beam search sends the tokens all remaining hypotheses agree on.
"""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from t5_triton.model_repository.t5_runtime.request import OUTPUT_IDS, SEQUENCE_SCORES, TEXT_INPUT, TEXT_OUTPUT

from .api import DEFAULT_TIMEOUT_S, GenerateError, _error, request_inputs

STREAM_MODEL = "t5_generate_stream"
_FINAL_PARAMETER = "triton_final_response"


@dataclass(frozen=True)
class StreamPiece:
    text: str
    token_ids: list[int]
    final: bool = False
    score: float | None = None


def stream_generate(
    url: str,
    text: str,
    *,
    protocol: str = "grpc",
    model: str = STREAM_MODEL,
    timeout: float = DEFAULT_TIMEOUT_S,
    connection: grpcclient.InferenceServerClient | None = None,
    **params: Any,
) -> Iterator[StreamPiece]:
    """Yield the pieces of one input's answer; raises `GenerateError` when the server refuses or fails it.

    Leaving the loop early cancels the request (gRPC), so the server stops decoding it. `connection`: an
    open `tritonclient.grpc` client to reuse, saving a connection set-up per request."""
    if protocol == "grpc":
        return _grpc_stream(
            connection or grpcclient.InferenceServerClient(url), connection is None, text, model, timeout, params
        )
    if protocol == "http":
        return _http_stream(url, text, model, timeout, params)
    raise ValueError(f"protocol must be http or grpc, got {protocol!r}")


def _grpc_stream(
    client, own_client: bool, text: str, model: str, timeout: float, params: dict
) -> Iterator[StreamPiece]:
    results: queue.SimpleQueue = queue.SimpleQueue()
    finished = False
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer(
            model, request_inputs(grpcclient, [text], None, params), enable_empty_final_response=True
        )
        while not finished:
            try:
                result, error = results.get(timeout=timeout)
            except queue.Empty:
                raise GenerateError(f"no response from {model} in {timeout:g} s", "timeout") from None
            if error is not None:
                finished = True
                raise _error(error) if isinstance(error, InferenceServerException) else GenerateError(str(error))
            finished = result.get_response().parameters[_FINAL_PARAMETER].bool_param
            piece = _grpc_piece(result, finished)
            if piece.text or piece.token_ids or finished:
                yield piece
    finally:
        client.stop_stream(cancel_requests=not finished)
        if own_client:
            client.close()


def _grpc_piece(result, final: bool) -> StreamPiece:
    texts, ids, scores = (result.as_numpy(name) for name in (TEXT_OUTPUT, OUTPUT_IDS, SEQUENCE_SCORES))
    text = texts.reshape(-1)[0].decode("utf-8") if texts is not None and texts.size else ""
    return StreamPiece(
        text=text,
        token_ids=ids.reshape(-1).tolist() if ids is not None else [],
        final=final,
        score=float(scores.reshape(-1)[0]) if scores is not None and scores.size else None,
    )


def _http_stream(url: str, text: str, model: str, timeout: float, params: dict) -> Iterator[StreamPiece]:
    body = {TEXT_INPUT: text, **{name: value for name, value in params.items() if value is not None}}
    request = urllib.request.Request(
        f"http://{url}/v2/models/{model}/generate_stream",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        raise GenerateError(json.loads(err.read() or b"{}").get("error", str(err)), str(err.code)) from err
    events = []
    with response:
        for raw in response:
            line = raw.decode("utf-8").strip()
            if line.startswith("data:"):
                events.append(json.loads(line[len("data:") :]))
                if "error" in events[-1]:
                    raise GenerateError(events[-1]["error"], "400")
                if len(events) > 1:
                    yield _http_piece(events[-2], final=False)
    if events:  # the last event is the last piece: SSE does not flag it
        yield _http_piece(events[-1], final=True)


def _http_piece(event: dict, final: bool) -> StreamPiece:
    ids = event.get(OUTPUT_IDS, [])
    score = event.get(SEQUENCE_SCORES)
    return StreamPiece(
        text=event.get(TEXT_OUTPUT, ""),
        token_ids=list(ids) if isinstance(ids, list) else [ids],
        final=final,
        score=float(score) if score is not None else None,
    )
