"""Shared fixtures: the random-tiny preset, its exported graphs, and a built repository."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from rich.console import Console

from t5_triton.builder.build import BuildOptions, build
from t5_triton.builder.checkpoint import load_checkpoint
from t5_triton.builder.export import export_graphs
from t5_triton.builder.merge import merge_decoders
from t5_triton.builder.repository import ServingOptions
from t5_triton.server import Ports, TritonServer

# The references run tiny models next to a server's processes on 2 cores: one thread avoids the
# OpenMP spin contention that made a 0.05 s generate take 10 s.
torch.set_num_threads(1)

LONG_INPUT = 1024  # tokens: the longest input the test repository accepts


@pytest.fixture(scope="session")
def long_input() -> int:
    return LONG_INPUT


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The random-tiny checkpoint, loaded as a build loads it."""
    return load_checkpoint("random-tiny", tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def tiny_graphs(tiny, tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("graphs")
    graphs = export_graphs(tiny.model, directory)
    merged = merge_decoders(graphs.first_step_decoder, graphs.cached_step_decoder, directory / "decoder.onnx")
    return {
        "encoder": graphs.encoder,
        "decoder": merged,
        "first": graphs.first_step_decoder,
        "cross_kv": graphs.cross_kv,
    }


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """A model repository built from random-tiny by the real build.

    The batcher waits 20 ms so that requests sent together share one `execute` (tests rely on it), and
    inputs may be 1024 tokens long.
    """
    output = tmp_path_factory.mktemp("repos") / "tiny"
    options = BuildOptions(
        model="random-tiny", output=output, max_input_tokens=LONG_INPUT, serving=ServingOptions(queue_delay_us=20_000)
    )
    build(options, Console(quiet=True))
    return output


@pytest.fixture(scope="session")
def server(tiny_repo, tmp_path_factory) -> Iterator[TritonServer]:
    """A real tritonserver on free ports serving `tiny_repo`."""
    log_file = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    with TritonServer(tiny_repo, Ports.free(), log_file=log_file) as running:
        yield running
