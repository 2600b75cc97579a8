"""Overload: beyond the queue limit, requests are refused at once with UNAVAILABLE, and the server lives."""

from __future__ import annotations

import asyncio
import time

import pytest
from rich.console import Console

from t5_triton.builder.build import BuildOptions, build
from t5_triton.builder.configs import parse_config
from t5_triton.builder.repository import ServingOptions
from t5_triton.client.api import AsyncT5Client, GenerateError, T5Client
from t5_triton.server import Ports, TritonServer

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def small_queue_server(tmp_path_factory):
    """One request decoded at a time, one waiting: the rest must be refused."""
    work = tmp_path_factory.mktemp("overload")
    options = BuildOptions(model="random-tiny", output=work / "repo", max_batch_size=1,
                           serving=ServingOptions(max_queue_size=1))  # fmt: skip
    build(options, Console(quiet=True))
    with TritonServer(work / "repo", Ports.free(), log_file=work / "server.log") as server:
        yield server


def test_queue_limit_is_in_the_config(small_queue_server):
    config = parse_config((small_queue_server.model_repository / "t5_generate/config.pbtxt").read_text(), "gen")
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 1


def test_requests_beyond_the_queue_are_refused_quickly(small_queue_server):
    async def one(client):
        start = time.perf_counter()
        try:
            await client.generate("summarize: a long day of rain and wind", num_beams=4, max_new_tokens=48)
            return "served", time.perf_counter() - start, None
        except GenerateError as err:
            return "refused", time.perf_counter() - start, err

    async def flood():
        async with AsyncT5Client(small_queue_server.grpc_url, "grpc") as client:
            return await asyncio.gather(*(one(client) for _ in range(24)))

    outcomes = asyncio.run(flood())
    served = [o for o in outcomes if o[0] == "served"]
    refused = [o for o in outcomes if o[0] == "refused"]
    assert served and refused, outcomes
    for _, seconds, err in refused:
        assert err.status == "StatusCode.UNAVAILABLE", err.status
        assert "queue" in str(err).lower()
        assert seconds < max(s for _, s, _ in served)  # refused without waiting for the work ahead
    with T5Client(small_queue_server.http_url) as client:  # still serving
        [result] = client.generate("hello", max_new_tokens=4)
        assert result.output_ids[0][0] == 0
