"""Locust users for `t5_generate`: gRPC and HTTP, a weighted mix of good and deliberately bad requests.

    locust -f load_tests/locustfile.py --host http://127.0.0.1:8000     # web UI; load_tests/run.py runs it headless

Where the server is: T5_LOAD_HTTP_URL and T5_LOAD_GRPC_URL (host:port), else locust's --host for HTTP and
the same host on port 8001 for gRPC, else 127.0.0.1:8000 / 127.0.0.1:8001.
T5_LOAD_CLIENT_STATS names a JSON file that gets the client-side concurrency when the test stops.

Every request is reported with request_type grpc or http and the case as its name. A bad request that gets
its INVALID_ARG (naming the field) is a success named BAD_REQUEST; any other answer to it is a failure.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc.experimental.gevent
import numpy as np
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from locust import User, between, events
from tritonclient.utils import InferenceServerException

from t5_triton.client.api import request_inputs
from t5_triton.model_repository.t5_runtime.request import (
    OUTPUT_IDS,
    SEQUENCE_SCORES,
    TEXT_INPUT,
    TEXT_OUTPUT,
)

# Without this, a gRPC call blocks gevent's hub: every user (HTTP ones too) waits for it, so requests never
# overlap and the measured latencies hide the queueing. Must run before the first channel is created.
grpc.experimental.gevent.init_gevent()

MODEL = "t5_generate"
BAD_REQUEST = "bad request (expected INVALID_ARG)"
GENERATE_PREFIX = "generate: "  # names of requests sent to the HTTP generate endpoint
TIMEOUT_S = 120.0  # a stuck server shows up as failures, not as a run that never ends
DECODER_START = 0
INVALID_ARG = {"grpc": "StatusCode.INVALID_ARGUMENT", "http": "400"}

SHORT_TEXTS = (
    "translate English to German: That is good.",
    "summarize: The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "question: What is the capital of France? context: Paris is the capital and largest city of France.",
    "cola sentence: The book was written by her.",
)
WORDS = " ".join(SHORT_TEXTS).split()
LONG_WORDS = 250  # 300+ tokens with any T5 tokenizer (about 600 with random-tiny's)


def short_text() -> str:
    return random.choice(SHORT_TEXTS)


def long_text() -> str:
    return "summarize: " + " ".join(random.choices(WORDS, k=LONG_WORDS))


@dataclass(frozen=True)
class Good:
    name: str
    text: Callable[[], str]
    params: dict[str, Any]

    @property
    def sequences(self) -> int:
        return self.params.get("num_return_sequences", 1)


@dataclass(frozen=True)
class Bad:
    label: str
    text: str
    params: dict[str, Any]
    field: str  # the error message must name it


# Weights out of 100: small max_new_tokens keep a request cheap on a 2-core CPU machine.
GOOD_MIX: tuple[tuple[Good, int], ...] = (
    (Good("short greedy", short_text, {"max_new_tokens": 8}), 30),
    (Good("short beam4", short_text, {"num_beams": 4, "max_new_tokens": 8}), 20),
    (Good("short beam4 return2", short_text, {"num_beams": 4, "num_return_sequences": 2, "max_new_tokens": 8}), 5),
    (Good("short sample", short_text, {"do_sample": True, "top_p": 0.9, "seed": 7, "max_new_tokens": 8}), 5),
    # truncate: whatever the tokenizer and the server's max_input_tokens, a long input is served, cut to the limit
    (Good("long greedy", long_text, {"truncate": True, "max_new_tokens": 8}), 20),
    (Good("long beam4", long_text, {"truncate": True, "num_beams": 4, "max_new_tokens": 8}), 10),
)
BAD_WEIGHT = 10
BAD_CASES = (
    Bad("num_beams=0", SHORT_TEXTS[0], {"num_beams": 0}, "num_beams"),
    Bad("top_p=1.5", SHORT_TEXTS[0], {"do_sample": True, "top_p": 1.5}, "top_p"),
    Bad("empty text", "", {}, TEXT_INPUT),
    Bad("max_new_tokens=0", SHORT_TEXTS[0], {"max_new_tokens": 0}, "max_new_tokens"),
    Bad("num_return_sequences>num_beams", SHORT_TEXTS[0], {"num_beams": 2, "num_return_sequences": 3}, "num_return"),
)


class Refused(Exception):
    """The server answered with an error."""

    def __init__(self, status: str, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class MalformedResponse(Exception):
    """A good request's answer is not what t5_generate promises."""


class WrongAnswerToBadRequest(Exception):
    """A bad request succeeded, or failed otherwise than with its INVALID_ARG."""


@dataclass
class Answer:
    """One request's outputs, as arrays with the batch dimension (one input per request here)."""

    texts: np.ndarray | None
    ids: np.ndarray | None
    scores: np.ndarray | None
    nbytes: int


def check_answer(answer: Answer, case: Good) -> MalformedResponse | None:
    n, longest = case.sequences, case.params["max_new_tokens"] + 1
    if answer.texts is None or answer.ids is None or answer.scores is None:
        return MalformedResponse(f"{case.name}: an output is missing")
    if answer.texts.shape != (1, n) or not all(isinstance(t, (bytes, str)) for t in answer.texts.flat):
        return MalformedResponse(f"{case.name}: text_output is not {n} string(s), shape {answer.texts.shape}")
    if answer.ids.ndim != 3 or answer.ids.shape[:2] != (1, n) or not 1 <= answer.ids.shape[2] <= longest:
        return MalformedResponse(f"{case.name}: output_ids shape {answer.ids.shape}, expected (1, {n}, <= {longest})")
    if (answer.ids[..., 0] != DECODER_START).any():
        return MalformedResponse(f"{case.name}: output_ids do not start with the decoder start {DECODER_START}")
    if answer.scores.shape != (1, n) or not np.isfinite(answer.scores.astype(np.float64)).all():
        return MalformedResponse(f"{case.name}: sequence_scores not {n} finite number(s): {answer.scores.tolist()}")
    return None


def check_refusal(outcome: Answer | Exception, case: Bad, protocol: str) -> Exception | None:
    if isinstance(outcome, Answer):
        return WrongAnswerToBadRequest(f"{case.label}: answered, expected {INVALID_ARG[protocol]}")
    if not isinstance(outcome, Refused):
        return outcome  # transport error: reported as it is
    if outcome.status != INVALID_ARG[protocol]:
        return WrongAnswerToBadRequest(f"{case.label}: expected {INVALID_ARG[protocol]}, got {outcome}")
    if case.field not in outcome.message:
        return WrongAnswerToBadRequest(f"{case.label}: the error does not name {case.field}: {outcome.message}")
    return None


# Requests in flight per protocol in this process: more than one proves gRPC calls do not block gevent's hub.
in_flight: dict[str, int] = {"grpc": 0, "http": 0}
max_in_flight: dict[str, int] = {"grpc": 0, "http": 0}


@events.test_stop.add_listener
def _write_client_stats(**_: Any) -> None:
    path = os.environ.get("T5_LOAD_CLIENT_STATS")
    if path:
        with open(path, "w") as out:
            json.dump({"max_in_flight": max_in_flight}, out)


def _hostport(url: str) -> str:
    return urlsplit(url if "//" in url else f"//{url}").netloc


def server_urls(host: str | None) -> tuple[str, str]:
    """(http, grpc) as host:port."""
    http = os.environ.get("T5_LOAD_HTTP_URL") or (_hostport(host) if host else "127.0.0.1:8000")
    grpc_url = os.environ.get("T5_LOAD_GRPC_URL") or f"{urlsplit(f'//{http}').hostname}:8001"
    return _hostport(http), _hostport(grpc_url)


def _answer_from_result(result) -> Answer:
    arrays = [result.as_numpy(name) for name in (TEXT_OUTPUT, OUTPUT_IDS, SEQUENCE_SCORES)]
    return Answer(*arrays, nbytes=sum(a.nbytes for a in arrays if a is not None))


def _answer_from_json(body: dict[str, Any], nbytes: int) -> Answer:
    """The generate endpoint flattens outputs and unwraps single values: back to the infer shapes."""
    if any(name not in body for name in (TEXT_OUTPUT, OUTPUT_IDS, SEQUENCE_SCORES)):
        return Answer(None, None, None, nbytes)
    texts = np.array(body[TEXT_OUTPUT], dtype=np.object_).reshape(1, -1)
    ids, rows = np.array(body[OUTPUT_IDS]), texts.shape[1] or 1
    # ids that cannot be split into one row per text stay one row: check_answer reports the shape
    ids = ids.reshape(1, rows, -1) if ids.size % rows == 0 else ids.reshape(1, 1, -1)
    return Answer(texts, ids, np.array(body[SEQUENCE_SCORES], dtype=np.float64).reshape(1, -1), nbytes)


@dataclass
class Sender:
    """One way to send a request: its locust name prefix and the call."""

    prefix: str
    send: Callable[[str, dict[str, Any]], Answer]


def _good_task(case: Good) -> Callable[[T5User], None]:
    def task(user: T5User) -> None:
        user.good(case)

    return task


def _bad_task(user: T5User) -> None:
    user.bad(random.choice(BAD_CASES))


class T5User(User):
    """The request mix and its checks; subclasses say how a request travels."""

    abstract = True
    protocol = ""
    wait_time = between(0.0, 0.2)
    tasks = {_good_task(case): weight for case, weight in GOOD_MIX} | {_bad_task: BAD_WEIGHT}

    def senders(self) -> list[Sender]:
        raise NotImplementedError

    def good(self, case: Good) -> None:
        sender = random.choice(self.senders())
        outcome, elapsed_ms = self._send(sender, case.text(), case.params)
        exception = check_answer(outcome, case) if isinstance(outcome, Answer) else outcome
        self._report(sender.prefix + case.name, elapsed_ms, outcome, exception)

    def bad(self, case: Bad) -> None:
        sender = random.choice(self.senders())
        outcome, elapsed_ms = self._send(sender, case.text, case.params)
        self._report(sender.prefix + BAD_REQUEST, elapsed_ms, outcome, check_refusal(outcome, case, self.protocol))

    def _send(self, sender: Sender, text: str, params: dict[str, Any]) -> tuple[Answer | Exception, float]:
        in_flight[self.protocol] += 1
        max_in_flight[self.protocol] = max(max_in_flight[self.protocol], in_flight[self.protocol])
        start = time.perf_counter()
        try:
            outcome: Answer | Exception = sender.send(text, params)
        except InferenceServerException as err:
            outcome = Refused(str(err.status()), err.message() or str(err))
        except Exception as err:  # connection errors and the like: a failure to report, not a crashed user
            outcome = err
        finally:
            in_flight[self.protocol] -= 1
        return outcome, (time.perf_counter() - start) * 1000

    def _report(self, name: str, elapsed_ms: float, outcome: Answer | Exception, exception: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type=self.protocol,
            name=name,
            response_time=elapsed_ms,
            response_length=outcome.nbytes if isinstance(outcome, Answer) else 0,
            exception=exception,
            context={},
        )


class GrpcT5User(T5User):
    protocol = "grpc"

    def on_start(self) -> None:
        self.client = grpcclient.InferenceServerClient(server_urls(self.host)[1])

    def on_stop(self) -> None:
        self.client.close()

    def senders(self) -> list[Sender]:
        return [Sender("", self._infer)]

    def _infer(self, text: str, params: dict[str, Any]) -> Answer:
        result = self.client.infer(MODEL, request_inputs(grpcclient, [text], None, params), client_timeout=TIMEOUT_S)
        return _answer_from_result(result)


class HttpT5User(T5User):
    """Half its requests through tritonclient.http's infer, half through the generate endpoint (JSON)."""

    protocol = "http"

    def on_start(self) -> None:
        self.url = server_urls(self.host)[0]
        self.client = httpclient.InferenceServerClient(self.url, network_timeout=TIMEOUT_S)
        self.session = requests.Session()

    def on_stop(self) -> None:
        self.client.close()
        self.session.close()

    def senders(self) -> list[Sender]:
        return [Sender("", self._infer), Sender(GENERATE_PREFIX, self._generate)]

    def _infer(self, text: str, params: dict[str, Any]) -> Answer:
        return _answer_from_result(self.client.infer(MODEL, request_inputs(httpclient, [text], None, params)))

    def _generate(self, text: str, params: dict[str, Any]) -> Answer:
        url = f"http://{self.url}/v2/models/{MODEL}/generate"
        response = self.session.post(url, json={TEXT_INPUT: text, **params}, timeout=TIMEOUT_S)
        if response.status_code != 200:
            raise Refused(str(response.status_code), _error_message(response))
        return _answer_from_json(response.json(), len(response.content))


def _error_message(response: requests.Response) -> str:
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
