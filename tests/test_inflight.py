"""Many clients at once on a real tritonserver: in-flight batching, streaming, cancellation, metrics."""

from __future__ import annotations

import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from t5_triton.builder.verify import SAMPLE_TEXTS
from t5_triton.client.api import GenerateError, T5Client
from t5_triton.client.stream import stream_generate

pytestmark = pytest.mark.server

MIXED = [
    {"max_new_tokens": 20},
    {"max_new_tokens": 12, "num_beams": 4},
    {"max_new_tokens": 30, "num_beams": 3, "num_return_sequences": 2, "length_penalty": 0.5},
    {"max_new_tokens": 5},
    {"max_new_tokens": 16, "do_sample": True, "top_k": 20, "seed": 7},
    {"max_new_tokens": 25, "no_repeat_ngram_size": 2, "repetition_penalty": 1.3},
    {"max_new_tokens": 18, "num_beams": 2, "early_stopping": True, "min_new_tokens": 6},
    {"max_new_tokens": 40, "min_new_tokens": 40},
]


def _case(i: int) -> tuple[str, list[str], dict]:
    protocol = ("grpc", "http")[i % 2]
    texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)], SAMPLE_TEXTS[(i + 1) % len(SAMPLE_TEXTS)]][: 1 + i % 3 // 2]
    return protocol, texts, MIXED[i % len(MIXED)]


def _url(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


def _generate(server, case) -> list:
    protocol, texts, params = case
    with T5Client(_url(server, protocol), protocol) as client:
        return client.generate(texts, **params)


def test_sixteen_concurrent_mixed_clients_each_get_their_single_request_output(server):
    cases = [_case(i) for i in range(16)]
    alone = [_generate(server, case) for case in cases]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda case: _generate(server, case), cases))
    for case, single, concurrent in zip(cases, alone, together, strict=True):
        assert [r.output_ids for r in concurrent] == [r.output_ids for r in single], case
        assert [r.texts for r in concurrent] == [r.texts for r in single], case


def _metrics(server) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.ports.metrics}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(t5_\w+)\{(.*)\} (\S+)$", line)
        if match:
            values[f"{match[1]}{{{match[2]}}}"] = float(match[3])
    return values


def _metric(values: dict, name: str, model: str = "t5_generate", **labels: str) -> float:
    wanted = {"model": model, **labels}
    total = 0.0
    for key, value in values.items():
        metric, _, rest = key.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if metric == name and all(found.get(k) == v for k, v in wanted.items()):
            total += value
    return total


def test_the_batches_really_share_decoder_calls(server):
    """Eight greedy clients at once: far fewer decoder steps than eight times one client's."""
    case = ("grpc", [SAMPLE_TEXTS[0]], {"max_new_tokens": 32, "min_new_tokens": 32})
    before = _metrics(server)
    _generate(server, case)
    middle = _metrics(server)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: _generate(server, case), range(8)))
    after = _metrics(server)
    alone = _metric(middle, "t5_decoding_steps_total") - _metric(before, "t5_decoding_steps_total")
    together = _metric(after, "t5_decoding_steps_total") - _metric(middle, "t5_decoding_steps_total")
    assert alone == 32
    assert together < 8 * 32 / 2
    rows = _metric(after, "t5_step_rows_total") - _metric(middle, "t5_step_rows_total")
    assert rows == 8 * 32  # every row of every request decoded exactly once per step


def test_metrics_count_requests_tokens_and_first_tokens(server):
    before = _metrics(server)
    results = [_generate(server, _case(i)) for i in range(4)]
    after = _metrics(server)

    def delta(name, **labels):
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    generated = sum(len(ids) - 1 for result in results for r in result for ids in r.output_ids)
    assert delta("t5_requests_total", outcome="success") == 4
    assert delta("t5_generated_tokens_total") == generated
    assert delta("t5_time_to_first_token_seconds_count") == 4
    assert _metric(after, "t5_requests_in_flight") == 0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize(
    "params",
    [
        {"max_new_tokens": 24},
        {"max_new_tokens": 24, "num_beams": 4},
        {"max_new_tokens": 20, "do_sample": True, "seed": 3, "top_p": 0.9},
    ],
    ids=["greedy", "beam4", "sampling"],
)
def test_streamed_pieces_concatenate_to_the_non_streaming_answer(server, protocol, params):
    text = SAMPLE_TEXTS[1]
    with T5Client(server.grpc_url, "grpc") as client:
        [answer] = client.generate(text, **params)
    pieces = list(stream_generate(_url(server, protocol), text, protocol=protocol, **params))
    assert pieces[-1].final and not any(p.final for p in pieces[:-1])
    assert [token for p in pieces for token in p.token_ids] == answer.output_ids[0][1:]
    assert "".join(p.text for p in pieces) == answer.texts[0]
    assert pieces[-1].score == pytest.approx(answer.scores[0], rel=1e-5)
    if not params.get("num_beams"):
        assert len(pieces) == len(answer.output_ids[0]) - 1  # token by token


def test_a_stream_refuses_what_it_cannot_stream(server):
    with pytest.raises(GenerateError, match="one sequence"):
        list(stream_generate(server.grpc_url, SAMPLE_TEXTS[0], num_beams=4, num_return_sequences=2))


def test_a_cancelled_stream_stops_within_a_few_steps_and_the_server_keeps_serving(server):
    model = "t5_generate_stream"
    before = _metrics(server)
    pieces = stream_generate(server.grpc_url, SAMPLE_TEXTS[2], max_new_tokens=512, min_new_tokens=512)
    for count, _ in enumerate(pieces, 1):
        if count == 3:
            break
    pieces.close()  # leaves the stream: the request is cancelled
    at_cancel = _metric(_metrics(server), "t5_decoding_steps_total", model)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = _metrics(server)
        if _metric(now, "t5_requests_total", model, outcome="cancelled") > _metric(
            before, "t5_requests_total", model, outcome="cancelled"
        ):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the cancelled request never ended")
    # The server ran ahead of the client's reading before the cancel; after it, it stops within a few steps
    # (cancellation is checked every 4; the step count it read at the cancel lags by < FLUSH_STEPS = 8).
    assert _metric(now, "t5_decoding_steps_total", model) - at_cancel <= 16
    assert _metric(now, "t5_decoding_steps_total", model) - _metric(before, "t5_decoding_steps_total", model) < 512
    time.sleep(0.3)
    assert _metric(_metrics(server), "t5_decoding_steps_total", model) == _metric(now, "t5_decoding_steps_total", model)
    assert _metric(_metrics(server), "t5_requests_in_flight", model) == 0
    final = list(stream_generate(server.grpc_url, SAMPLE_TEXTS[0], max_new_tokens=5))
    assert final[-1].final


def _wait_for(server, condition, seconds: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        values = _metrics(server)
        if condition(values):
            return values
        time.sleep(0.05)
    pytest.fail("the server's metrics never showed it")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_call_past_the_client_timeout_raises_and_the_server_keeps_serving(server, protocol):
    before = _metrics(server)
    long = {"num_beams": 4, "max_new_tokens": 512, "min_new_tokens": 512}
    with T5Client(_url(server, protocol), protocol, timeout=0.5) as client:
        started = time.monotonic()
        with pytest.raises(GenerateError):
            client.generate(SAMPLE_TEXTS[1], **long)
        assert time.monotonic() - started < 10
    if protocol == "grpc":  # the deadline cancels the request on the server
        cancelled = _metric(before, "t5_requests_total", outcome="cancelled")
        _wait_for(server, lambda now: _metric(now, "t5_requests_total", outcome="cancelled") > cancelled)
    # (HTTP cannot cancel: the server finishes the abandoned request, then is idle again.)
    _wait_for(server, lambda now: _metric(now, "t5_requests_in_flight") == 0)
    with T5Client(_url(server, protocol), protocol) as client:
        assert client.generate(SAMPLE_TEXTS[0], max_new_tokens=4)[0].output_ids
