"""The README's main job, offline: build the random-tiny demo, serve it, ask it, print the answers."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from t5_triton.builder.build import BuildOptions, build
from t5_triton.client.api import T5Client
from t5_triton.server import Ports, TritonServer

DEMO_INPUTS = (
    "translate English to German: That is good.",
    "summarize: Rain fell all day, so the match was moved to Sunday and the fans went home early.",
)


def run_demo(output: Path, console: Console) -> None:
    console.rule("1. build a model repository from the offline random-tiny preset")
    build(BuildOptions(model="random-tiny", output=output, force=True), console)
    console.rule("2. start tritonserver")
    log_file = output.parent / "demo-tritonserver.log"
    with TritonServer(output, Ports.free(), log_file=log_file) as server:
        console.print(f"ready: HTTP {server.http_url}, gRPC {server.grpc_url} (log: {log_file})")
        console.rule("3. send real requests (random weights: the words are noise, the serving is real)")
        for protocol, url, params in (
            ("http", server.http_url, {"num_beams": 4, "max_new_tokens": 16}),
            ("grpc", server.grpc_url, {"max_new_tokens": 16}),
        ):
            with T5Client(url, protocol) as client:
                results = client.generate(list(DEMO_INPUTS), **params)
            for text, result in zip(DEMO_INPUTS, results, strict=True):
                console.print(f"[bold]{protocol} {params}[/]\n  > {text}")
                console.print(f"  {result.texts[0]!r}\n  ids {result.output_ids[0]} score {result.scores[0]:.3f}")
    console.rule("server stopped")
