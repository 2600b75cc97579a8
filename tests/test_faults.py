"""Faults on a real tritonserver: killed python-backend stubs, exceptions inside a sub-model, SIGTERM under load.

What Triton 2.51's python backend does when a model's stub process dies (observed here):
- it does not restart the stub: every later request to that model fails after ~1 s with
  "Stub process '<model>_0_0' is not healthy."; the requests waiting on the dead stub fail the same way;
- server and model readiness stay 200: they do not reflect a dead stub;
- with `--model-control-mode=explicit`, unloading and loading the model (repository API) starts a new stub and
  serving resumes. The old instance never finishes unloading, so shutdown then waits for the exit timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio
from rich.console import Console
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from t5_triton.builder.build import BuildOptions, build
from t5_triton.builder.repository import ServingOptions
from t5_triton.client.api import AsyncT5Client, GenerateError, GenerateResult, T5Client
from t5_triton.server import Ports, TritonServer, mapped_shm_regions, process_tree, stub_models

pytestmark = pytest.mark.server

ENCODER, DECODER, GENERATE = "t5_encoder", "t5_decoder", "t5_generate"
EXIT_TIMEOUT_S = 3  # a killed stub's model never finishes unloading: shutdown waits this long, stop() cleans up
CLIENT_TIMEOUT_S = 60.0  # "it did not hang" on a loaded 2-core machine; a dead stub is noticed in ~1-2 s
# Token ids (random-tiny's vocabulary has 1000) that make the patched encoder fail; the good rows hold neither.
POISON_GRAPH, POISON_EXECUTE = 999, 998
GOOD_ROWS = ([5, 6, 7, 1], [8, 9, 10, 1], [11, 12, 13, 1])
SHORT = {"max_new_tokens": 6}
BEAMS = {"num_beams": 2, "max_new_tokens": 8}
LONG = {"num_beams": 4, "min_new_tokens": 256, "max_new_tokens": 256}  # seconds of decoding: still running at a kill

# Appended to the test copy's t5_encoder/1/model.py (onnx_model.py): no input the client can send makes ONNX
# Runtime fail inside the encoder, so the failure is injected for inputs holding a marker token. POISON_GRAPH
# fails the graph run (what the model code handles), POISON_EXECUTE escapes `execute` (what Triton handles).
FAULT_INJECTION = f"""

_run_graph = run_numpy


def run_numpy(session, feeds, outputs):
    if ({POISON_GRAPH} == feeds["input_ids"]).any():
        raise RuntimeError("injected graph fault")
    return _run_graph(session, feeds, outputs)


class TritonPythonModel(TritonPythonModel):
    def execute(self, requests):
        for request in requests:
            if ({POISON_EXECUTE} == pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()).any():
                raise RuntimeError("injected execute fault")
        return super().execute(requests)
"""


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory):
    """random-tiny with the encoder and decoder as models of their own (BLS calls, not in t5_generate's
    process) and a fault-injecting encoder, in explicit model control so that a model can be reloaded. Requests
    sent together share a batch (20 ms queue delay)."""
    work = tmp_path_factory.mktemp("faults")
    serving = ServingOptions(encoder_in_process=False, decoder_in_process=False, queue_delay_us=20_000)
    build(BuildOptions(model="random-tiny", output=work / "repo", serving=serving), Console(quiet=True))
    with open(work / "repo" / ENCODER / "1/model.py", "a") as model:
        model.write(FAULT_INJECTION)
    explicit = ("--model-control-mode=explicit", "--load-model=*", f"--exit-timeout-secs={EXIT_TIMEOUT_S}")
    with TritonServer(work / "repo", Ports.free(), log_file=work / "server.log", extra_args=explicit) as server:
        yield server


def _stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time) from /proc; state Z: exited, not yet reaped. None when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], fields[19]


def _running(processes: dict[int, tuple[str, str] | None]) -> list[int]:
    """Those of `processes` (pid -> `_stat` when recorded) still running. Exited is enough: a zombie waits for
    PID 1 to reap it, which some sandboxes' init never does; a pid a new process reuses is not ours."""
    running = []
    for pid, recorded in processes.items():
        now = _stat(pid)
        if now is not None and recorded is not None and now[0] != "Z" and now[1] == recorded[1]:
            running.append(pid)
    return running


def _live_stub(server: TritonServer, model: str) -> int:
    """The pid of `model`'s running python-backend stub (a killed stub's zombie has no command line left)."""
    stubs = [pid for pid, name in stub_models(process_tree(server.process.pid)[1:]).items() if name == model]
    assert len(stubs) == 1, f"{model}: expected one running stub, found {stubs}"
    return stubs[0]


def _http(server: TritonServer, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=body)
    try:
        with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _executions(server: TritonServer, model: str) -> int:
    status, body = _http(server, f"/v2/models/{model}/stats")
    assert status == 200, body
    return json.loads(body)["model_stats"][0]["execution_count"]


async def _outcome(
    client: AsyncT5Client, row: list[int] = GOOD_ROWS[0], **params
) -> list[GenerateResult] | GenerateError:
    try:
        return await asyncio.wait_for(client.generate(input_ids=row, **params), CLIENT_TIMEOUT_S)
    except GenerateError as err:
        return err
    except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
        pytest.fail(f"a request got no answer within {CLIENT_TIMEOUT_S:.0f} s")


def _generate(server: TritonServer, **params) -> list[GenerateResult] | GenerateError:
    async def one():
        async with AsyncT5Client(server.grpc_url, "grpc") as client:
            return await _outcome(client, **params)

    return asyncio.run(one())


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + CLIENT_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)


# The decoder is killed while requests decode; the encoder (called once per arrival) when they no longer need
# it, so they are served and the next request meets the dead stub. Not t5_generate: its in-flight requests were
# handed to response senders, and when its stub dies Triton 2.51 never ends them (they wait for the client's
# timeout); that gap is open (issue 7).
@pytest.mark.parametrize("model", [DECODER, ENCODER])
def test_a_killed_stub_fails_its_requests_clearly_and_a_reload_recovers(fault_server, model):
    expected = _generate(fault_server, **SHORT)
    assert not isinstance(expected, GenerateError), expected
    stub = _live_stub(fault_server, model)

    async def kill_while_decoding() -> tuple[list, list[GenerateResult] | GenerateError]:
        async with AsyncT5Client(fault_server.grpc_url, "grpc") as client:
            steps = _executions(fault_server, DECODER)
            running = [asyncio.create_task(_outcome(client, **LONG)) for _ in range(3)]
            await _until(lambda: _executions(fault_server, DECODER) > steps + 3, "the requests decode")
            os.kill(stub, signal.SIGKILL)
            during = await asyncio.gather(*running)
            return during, await _outcome(client, **SHORT)

    try:
        during, after = asyncio.run(kill_while_decoding())
        # Triton 2.51 neither restarts the stub nor reports it: readiness stays 200 (update the module docstring
        # and the README when a Triton upgrade changes this).
        assert fault_server.is_ready()
        assert _http(fault_server, f"/v2/models/{model}/ready")[0] == 200
    finally:  # the recovery: a new stub for the next tests, whatever failed here (checked below)
        reloaded = [
            _http(fault_server, f"/v2/repository/models/{model}/{action}", b"{}") for action in ("unload", "load")
        ]
    # A sub-model's failure is t5_generate's UNAVAILABLE naming it; t5_generate's own is Triton's INTERNAL.
    status = "StatusCode.INTERNAL" if model == GENERATE else "StatusCode.UNAVAILABLE"
    failures = [outcome for outcome in [*during, after] if isinstance(outcome, GenerateError)]
    assert isinstance(after, GenerateError), f"served by a dead {model}: {after}"
    if model != ENCODER:
        assert any(isinstance(outcome, GenerateError) for outcome in during), during
    for failure in failures:
        assert failure.status == status, (failure.status, str(failure))
        assert f"'{model}_0_0' is not healthy" in str(failure), str(failure)
    assert [code for code, _ in reloaded] == [200, 200], reloaded
    assert _live_stub(fault_server, model) != stub
    assert _generate(fault_server, **SHORT) == expected


async def _served_alone_then_together(server: TritonServer, rows: list[list[int]]) -> tuple[list, list, int]:
    async with AsyncT5Client(server.grpc_url, "grpc") as client:
        alone = [await _outcome(client, row, **BEAMS) for row in rows]
        executions = _executions(server, GENERATE)
        together = await asyncio.gather(*(_outcome(client, row, **BEAMS) for row in rows))
        return alone, together, _executions(server, GENERATE) - executions


@pytest.mark.parametrize("poison", [POISON_GRAPH, POISON_EXECUTE], ids=["graph run raises", "execute raises"])
def test_an_exception_in_the_encoder_fails_only_its_request(fault_server, poison):
    stub = _live_stub(fault_server, ENCODER)
    rows = [GOOD_ROWS[0], GOOD_ROWS[1], [5, poison, 7, 1], GOOD_ROWS[2]]
    alone, together, executions = asyncio.run(_served_alone_then_together(fault_server, rows))
    assert executions < len(rows), "the requests did not share a batch"
    poisoned = together.pop(2)
    assert isinstance(alone.pop(2), GenerateError), "the fault injection did not take effect"
    assert isinstance(poisoned, GenerateError)
    assert poisoned.status == "StatusCode.UNAVAILABLE", poisoned.status
    assert ENCODER in str(poisoned)
    # The requests batched with it are served, as when they came alone (scores to the last float bits differ
    # between a batch and a request alone; tokens and texts do not).
    assert [(r.output_ids, r.texts) for rs in together for r in rs] == [
        (r.output_ids, r.texts) for rs in alone for r in rs
    ]
    for batched, single in zip(together, alone, strict=True):
        assert [x for r in batched for x in r.scores] == pytest.approx([x for r in single for x in r.scores], rel=1e-5)
    assert _live_stub(fault_server, ENCODER) == stub
    assert fault_server.is_ready()


def _inconsistent_decoder_inputs(server: TritonServer) -> list[grpcaio.InferInput]:
    """Inputs the decoder's config accepts but its graph cannot run: each input gets its own size for every
    variable dimension, so the rows (and lengths) of different inputs disagree."""
    status, body = _http(server, f"/v2/models/{DECODER}/config")
    assert status == 200, body
    inputs = []
    for size, spec in enumerate(json.loads(body)["input"], start=2):
        shape = [size if dim == -1 else dim for dim in spec["dims"]]
        dtype = triton_to_np_dtype(spec["data_type"].removeprefix("TYPE_"))
        tensor = grpcaio.InferInput(spec["name"], shape, np_to_triton_dtype(dtype))
        tensor.set_data_from_numpy(np.zeros(shape, dtype))
        inputs.append(tensor)
    return inputs


def test_a_request_the_decoder_graph_rejects_fails_alone(fault_server):
    """A real failure inside ONNX Runtime: a direct decoder request with shapes that disagree, while t5_generate
    keeps the same decoder instance busy."""
    stub = _live_stub(fault_server, DECODER)
    bad = _inconsistent_decoder_inputs(fault_server)

    async def together() -> tuple[object, list]:
        async with (
            grpcaio.InferenceServerClient(fault_server.grpc_url) as raw,
            AsyncT5Client(fault_server.grpc_url, "grpc") as client,
        ):

            async def direct():
                try:
                    return await raw.infer(DECODER, bad, client_timeout=CLIENT_TIMEOUT_S)
                except InferenceServerException as err:
                    return err

            return await asyncio.gather(direct(), asyncio.gather(*(_outcome(client, **SHORT) for _ in range(3))))

    refused, served = asyncio.run(together())
    assert isinstance(refused, InferenceServerException), "the decoder ran inputs that disagree"
    # onnx_model.py answers ONNX Runtime's refusal of the shapes as the request's INVALID_ARG, naming the model
    assert refused.status() == "StatusCode.INVALID_ARGUMENT", (refused.status(), refused.message())
    assert DECODER in refused.message() and "ONNXRuntimeError" in refused.message(), refused.message()
    assert not any(isinstance(outcome, GenerateError) for outcome in served), served
    assert _live_stub(fault_server, DECODER) == stub
    assert fault_server.is_ready()


def test_sigterm_under_load_stops_in_time_and_a_new_server_serves(tiny_repo, tmp_path):
    server = TritonServer(
        tiny_repo, Ports.free(), log_file=tmp_path / "server.log", extra_args=(f"--exit-timeout-secs={EXIT_TIMEOUT_S}",)
    ).start()
    members = {pid: _stat(pid) for pid in process_tree(server.process.pid)}
    regions = mapped_shm_regions(list(members))
    served: list[float] = []  # when each request was answered
    failed: list[tuple[float, str]] = []
    stopping = threading.Event()

    def user(url: str, protocol: str) -> None:
        with T5Client(url, protocol) as client:
            while not stopping.is_set():
                try:
                    client.generate("summarize: a long day of rain", num_beams=4, max_new_tokens=32)
                    served.append(time.monotonic())
                except Exception as err:  # after SIGTERM: refused, reset or closed, by either protocol
                    failed.append((time.monotonic(), repr(err)))
                    time.sleep(0.1)

    users = [
        threading.Thread(target=user, args=(url, protocol), daemon=True)
        for url, protocol in [(server.grpc_url, "grpc"), (server.http_url, "http")] * 2
    ]
    try:
        for thread in users:
            thread.start()
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        while len(served) < 8:
            assert time.monotonic() < deadline and not failed, f"load did not run: {failed}"
            time.sleep(0.05)
        sigterm = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        # Draining: a load balancer's new probe must see it as not ready.
        while server.is_ready():
            assert time.monotonic() < sigterm + 10, "still ready 10 s after SIGTERM"
            time.sleep(0.1)
        server.stop(timeout=CLIENT_TIMEOUT_S)
        stopped = time.monotonic()
    finally:
        stopping.set()
        server.stop()
    for thread in users:
        thread.join(timeout=CLIENT_TIMEOUT_S)
    assert not any(thread.is_alive() for thread in users), "a request hung after the server stopped"
    assert stopped - sigterm < CLIENT_TIMEOUT_S
    assert all(at >= sigterm for at, _ in failed), f"failures before SIGTERM: {failed}"
    # stop() waits for tritonserver; the stubs it SIGKILLs with it may take a moment to exit.
    deadline = time.monotonic() + 10
    while _running(members) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running(members) == [], "server processes still running after stop"
    assert regions and not [region for region in regions if Path(region).exists()], "leftover shared memory"

    with TritonServer(tiny_repo, Ports.free(), log_file=tmp_path / "again.log") as again, T5Client(again.http_url) as c:
        [result] = c.generate("hello", **SHORT)
        assert result.output_ids[0][0] == 0
