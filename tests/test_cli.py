"""The `t5-triton` command as a user runs it: serve, generate, and the asyncio client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from t5_triton.builder.verify import SAMPLE_TEXTS
from t5_triton.client.api import AsyncT5Client, T5Client
from t5_triton.client.stream import stream_generate
from t5_triton.server import Ports, mapped_shm_regions, process_state, process_tree, stub_models

SHM = Path("/dev/shm")


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "t5_triton.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _shm_regions() -> set[str]:
    return {p.name for p in SHM.glob("triton_python_backend_shm_region_*")}


class _Serve:
    """`t5-triton serve` in a subprocess, its output read as it comes."""

    def __init__(self, repository: Path, ports: Ports, log_file: Path):
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "t5_triton.cli", "serve", "--model-repository", str(repository)),
                *(f"--http-port={ports.http}", f"--grpc-port={ports.grpc}", f"--metrics-port={ports.metrics}"),
                *("--log-file", str(log_file), "--exit-timeout-secs", "3"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.reader = threading.Thread(target=lambda: [self.lines.put(x) for x in self.process.stdout], daemon=True)
        self.reader.start()

    def wait_for(self, text: str, count: int = 1, timeout: float = 120) -> None:
        """Until `text` appeared in `count` lines, as a user sees it."""
        deadline = time.monotonic() + timeout
        while sum(text in line for line in self.output) < count:
            assert self.process.poll() is None, "".join(self.output)
            assert time.monotonic() < deadline, f"serve did not print {text!r} in time: {''.join(self.output)}"
            with contextlib.suppress(queue.Empty):
                self.output.append(self.lines.get(timeout=0.5))

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)
        self.reader.join(timeout=10)
        while not self.lines.empty():
            self.output.append(self.lines.get())
        return "".join(self.output)


@pytest.mark.server
def test_serve_runs_until_sigterm_and_leaves_nothing_behind(tiny_repo, tmp_path):
    ports = Ports.free()
    log_file = tmp_path / "serve.log"
    before = _shm_regions()
    serve = _Serve(tiny_repo, ports, log_file)
    try:
        serve.wait_for("ready")
        client = T5Client(f"127.0.0.1:{ports.http}")
        # The client stays connected: Triton then gives up its graceful exit after the exit timeout and
        # leaves its shared memory behind, which `serve` must clean up.
        [result] = client.generate(SAMPLE_TEXTS[0], max_new_tokens=6)
        assert result.output_ids[0][0] == 0
        server_processes = process_tree(serve.process.pid)[1:]
        assert len(server_processes) >= 4  # tritonserver and one stub per model
        # Only this server's regions: other servers may run on the machine at the same time.
        regions = mapped_shm_regions(server_processes)
        assert regions and regions <= {str(SHM / name) for name in _shm_regions() - before}
    finally:
        output = serve.stop()
    assert serve.process.returncode == 0, output
    assert "ready" in output and f"127.0.0.1:{ports.grpc}" in output and str(log_file) in output
    assert "stopped" in output
    # Exited is enough: a zombie waits for PID 1 to reap it, which some sandboxes' init never does.
    running = [pid for pid in server_processes if process_state(pid) not in (None, "Z")]
    assert not running, f"server processes still running after SIGTERM: {running}"
    assert not any(Path(region).exists() for region in regions), "leftover shared memory"
    assert "Exit timeout expired" in log_file.read_text()  # the path that used to leak


@pytest.mark.server
def test_serve_restarts_when_a_model_process_dies_so_no_request_waits_forever(tiny_repo, tmp_path):
    ports = Ports.free()
    serve = _Serve(tiny_repo, ports, tmp_path / "serve.log")
    outcome: dict[str, object] = {}
    try:
        serve.wait_for("ready")
        [stub] = [
            pid for pid, model in stub_models(process_tree(serve.process.pid)).items() if model == "t5_generate_stream"
        ]
        started = threading.Event()

        def stream() -> None:
            try:
                for _ in stream_generate(
                    f"127.0.0.1:{ports.grpc}", SAMPLE_TEXTS[2], max_new_tokens=512, min_new_tokens=512
                ):
                    started.set()
            except Exception as err:  # what the client sees when the model dies under it
                outcome["error"] = err
            started.set()

        streaming = threading.Thread(target=stream, daemon=True)
        streaming.start()
        assert started.wait(60)
        os.kill(stub, signal.SIGKILL)
        streaming.join(timeout=90)
        assert not streaming.is_alive(), "a request of the dead model still waits"
        assert "error" in outcome  # it ended with an error, not with a made-up answer
        serve.wait_for("restarting tritonserver")
        serve.wait_for("ready", count=2)
        [result] = T5Client(f"127.0.0.1:{ports.http}").generate(SAMPLE_TEXTS[0], max_new_tokens=6)
        assert result.output_ids[0][0] == 0
    finally:
        output = serve.stop()
    assert "model process died (t5_generate_stream)" in output


def test_serve_refuses_a_folder_that_is_not_a_repository(tmp_path):
    result = cli("serve", "--model-repository", str(tmp_path))
    assert result.returncode == 2
    assert "not a model repository" in result.stderr


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_generate_prints_answers(server, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    result = cli("generate", *SAMPLE_TEXTS[:2], "--protocol", protocol, "--url", url, "--num-beams", "2",
                 "--num-return-sequences", "2", "--max-new-tokens", "8")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("> ") == 2
    assert "1. " in result.stdout and "2. " in result.stdout and "score" in result.stdout


@pytest.mark.server
def test_generate_json_from_a_file(server, tmp_path):
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(SAMPLE_TEXTS[:3]) + "\n\n")
    result = cli("generate", "--file", str(inputs), "--url", server.grpc_url, "--protocol", "grpc", "--json",
                 "--max-new-tokens", "8", "--batch-size", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["input"] for line in lines] == list(SAMPLE_TEXTS[:3])
    for line in lines:
        assert set(line) == {"input", "texts", "output_ids", "scores"}
        assert len(line["output_ids"][0]) <= 9


@pytest.mark.server
def test_generate_exits_non_zero_with_the_server_message(server):
    result = cli("generate", "hello", "--url", server.http_url, "--top-p", "0")
    assert result.returncode == 1
    assert "top_p must be in (0, 1], got 0.0" in result.stderr


def test_generate_reports_an_unreachable_server():
    result = cli("generate", "hello", "--url", f"127.0.0.1:{Ports.free().http}")
    assert result.returncode == 1
    assert "cannot reach the server" in result.stderr


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_async_client_runs_requests_concurrently(server, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url

    async def main():
        async with AsyncT5Client(url, protocol) as client:
            return await asyncio.gather(*(client.generate(t, max_new_tokens=10) for t in SAMPLE_TEXTS))

    concurrent = asyncio.run(main())
    with T5Client(url, protocol) as client:
        one_by_one = [client.generate(t, max_new_tokens=10) for t in SAMPLE_TEXTS]
    assert [[r.output_ids for r in rs] for rs in concurrent] == [[r.output_ids for r in rs] for rs in one_by_one]
    assert [[r.texts for r in rs] for rs in concurrent] == [[r.texts for r in rs] for rs in one_by_one]
    # Decoded in one batch or alone, the float sums round differently in the last bits.
    for together, alone in zip(concurrent, one_by_one, strict=True):
        assert together[0].scores == pytest.approx(alone[0].scores, rel=1e-5)


def test_hub_id_without_network_fails_clearly(tmp_path):
    result = cli("build", "--model", "google-t5/t5-small", "--output", str(tmp_path / "o"), env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "neither a local folder" in result.stderr and "Traceback" not in result.stderr
