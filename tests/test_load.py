"""A CI-sized locust load test against a real tritonserver: 4 users (2 gRPC, 2 HTTP) for 30 s."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from t5_triton.client.api import T5Client

pytestmark = pytest.mark.server

LOAD_TESTS = Path(__file__).resolve().parent.parent / "load_tests"
RUN_TIME_S = 30
BAD_REQUEST = "bad request (expected INVALID_ARG)"


@dataclass(frozen=True)
class LoadRun:
    done: subprocess.CompletedProcess
    summary: dict[str, Any]
    output: Path


@pytest.fixture(scope="module")
def load_run(server, tmp_path_factory) -> LoadRun:
    output = tmp_path_factory.mktemp("load")
    command = [
        sys.executable, str(LOAD_TESTS / "run.py"),
        "--http-url", server.http_url, "--grpc-url", server.grpc_url, "--server-pid", str(server.process.pid),
        "--users", "4", "--spawn-rate", "4", "--run-time", f"{RUN_TIME_S}s", "--output", str(output),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIME_S + 150)
    summary_file = output / "summary.json"
    assert summary_file.exists(), f"no summary:\n{done.stdout}\n{done.stderr}\n{(output / 'locust.log').read_text()}"
    return LoadRun(done, json.loads(summary_file.read_text()), output)


def test_no_unexpected_errors(load_run):
    assert load_run.summary["unexpected_errors"] == 0, load_run.done.stdout
    assert load_run.summary["errors"] == []
    assert load_run.done.returncode == 0, load_run.done.stdout + load_run.done.stderr
    assert (load_run.output / "report.html").exists()
    assert (load_run.output / "locust_stats.csv").exists()


def test_every_bad_request_got_its_invalid_arg(load_run):
    summary = load_run.summary
    assert summary["expected_invalid_arg"] > 0
    assert summary["expected_invalid_arg"] == summary["bad_requests"]
    bad = {kind["name"]: kind for kind in summary["kinds"] if BAD_REQUEST in kind["name"]}
    assert all(kind["failures"] == 0 for kind in bad.values())


def test_both_protocols_and_the_whole_mix_ran(load_run):
    summary = load_run.summary
    assert summary["requests_by_protocol"]["grpc"] > 0
    assert summary["requests_by_protocol"]["http"] > 0
    ran = {(kind["protocol"], kind["name"]) for kind in summary["kinds"] if kind["requests"] > 0}
    for protocol, prefix in (("grpc", ""), ("http", ""), ("http", "generate: ")):
        assert {(protocol, prefix + name) for name in ("short greedy", "long greedy", BAD_REQUEST)} <= ran
    # good requests are checked for well-formedness in the locustfile: a malformed one would be a failure
    assert all(kind["failures"] == 0 for kind in summary["kinds"])


def test_grpc_calls_overlap_under_gevent(load_run):
    """With a blocking gRPC call, gevent's hub stops and no second request can start meanwhile."""
    summary = load_run.summary
    assert summary["client_max_in_flight"]["grpc"] >= 2


def test_server_is_healthy_after_the_load(load_run, server):
    summary = load_run.summary
    assert summary["server_ready_after"]
    assert summary["server_rss"]["before"] > 0
    assert summary["server_rss"]["after"] > 0
    assert server.is_ready()
    for url, protocol in ((server.grpc_url, "grpc"), (server.http_url, "http")):
        with T5Client(url, protocol) as client:
            [result] = client.generate("translate English to German: That is good.", max_new_tokens=4)
        assert result.output_ids[0][0] == 0


# Importing the locustfile gevent-patches the process and switches gRPC to gevent mode, which would break
# the other tests' clients: its checks are exercised in a child process.
_CHECKS = """
import locust  # first, as the locust command does: it gevent-patches the process before anything else loads
import numpy as np
import locustfile as lf

case = next(good for good, _ in lf.GOOD_MIX if good.sequences == 1)

def answer(ids=((0, 5, 1),), scores=(-1.5,), texts=(b"x",)):
    return lf.Answer(np.array([texts], dtype=object), np.array([ids]), np.array([scores]), 0)

assert lf.check_answer(answer(), case) is None
assert "decoder start" in str(lf.check_answer(answer(ids=((3, 5, 1),)), case))
assert "finite" in str(lf.check_answer(answer(scores=(float("nan"),)), case))
assert "text_output" in str(lf.check_answer(answer(texts=(b"x", b"y")), case))
assert "output_ids shape" in str(lf.check_answer(answer(ids=((0,) * 50,)), case))
assert "missing" in str(lf.check_answer(lf.Answer(None, None, None, 0), case))
generated = lf._answer_from_json({"text_output": "x", "output_ids": [0, 5, 1], "sequence_scores": -1.5}, 0)
assert lf.check_answer(generated, case) is None

bad = lf.BAD_CASES[0]
assert "answered" in str(lf.check_refusal(answer(), bad, "grpc"))
assert lf.check_refusal(lf.Refused("StatusCode.INVALID_ARGUMENT", f"{bad.field} out of range"), bad, "grpc") is None
assert "expected 400" in str(lf.check_refusal(lf.Refused("500", bad.field), bad, "http"))
assert "does not name" in str(lf.check_refusal(lf.Refused("400", "something else"), bad, "http"))
"""


def test_checks_reject_wrong_answers():
    done = subprocess.run([sys.executable, "-c", _CHECKS], cwd=LOAD_TESTS, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
