"""Shared fixtures: the random-tiny preset, its exported graphs, and a built repository."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from t5_triton.builder.build import BuildOptions, build
from t5_triton.builder.checkpoint import load_checkpoint
from t5_triton.builder.export import export_graphs
from t5_triton.builder.merge import merge_decoders


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The random-tiny checkpoint, loaded as a build loads it."""
    return load_checkpoint("random-tiny", tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def tiny_graphs(tiny, tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("graphs")
    graphs = export_graphs(tiny.model, directory)
    merged = merge_decoders(graphs.first_step_decoder, graphs.cached_step_decoder, directory / "decoder.onnx")
    return {"encoder": graphs.encoder, "decoder": merged, "first": graphs.first_step_decoder}


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """A model repository built from random-tiny by the real build."""
    output = tmp_path_factory.mktemp("repos") / "tiny"
    build(BuildOptions(model="random-tiny", output=output), Console(quiet=True))
    return output
