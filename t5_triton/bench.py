"""`t5-triton bench`: the served path next to in-process `transformers.generate`, measured in one run.

Every engine runs in its own process (a fresh interpreter per engine and pass), engines alternate
pass by pass, each timing is one generate call after a warm-up, and the table shows medians. Inputs
are fixed random token ids (`input_tokens` long, EOS last); outputs are forced to exactly
`new_tokens` (min = max new tokens) so every engine does the same work.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class Cell:
    name: str
    batch: int
    num_beams: int


CELLS = (Cell("greedy b1", 1, 1), Cell("beam4 b1", 1, 4), Cell("greedy b8", 8, 1), Cell("beam4 b8", 8, 4))
ENGINES = ("transformers", "served-grpc", "served-http")
CTRANSLATE2 = "ctranslate2"  # measured too when installed (`pip install 't5-triton[bench]'`)


def _engines() -> tuple[str, ...]:
    import importlib.util

    return (*ENGINES, CTRANSLATE2) if importlib.util.find_spec("ctranslate2") else ENGINES


@dataclass(frozen=True)
class BenchConfig:
    checkpoint: str  # folder with the HF checkpoint the repository was built from
    repository: str
    input_tokens: int = 32
    new_tokens: int = 64
    runs: int = 5
    threads: int = 2
    cells: tuple[str, ...] = tuple(c.name for c in CELLS)


def make_inputs(batch: int, length: int, vocab: int, eos: int = 1) -> list[list[int]]:
    """Deterministic token ids in [3, vocab) then EOS: a fixed, realistic-length input per row."""
    import random

    rng = random.Random(batch * 1000 + length)
    return [[rng.randrange(3, vocab) for _ in range(length - 1)] + [eos] for _ in range(batch)]


def _time_calls(call, runs: int) -> list[float]:
    call()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def _worker_transformers(config: BenchConfig) -> dict[str, list[float]]:
    import torch
    from transformers import DynamicCache, EncoderDecoderCache, GenerationConfig, T5ForConditionalGeneration

    torch.set_num_threads(config.threads)
    model = T5ForConditionalGeneration.from_pretrained(config.checkpoint).eval()
    vocab = min(model.config.vocab_size, 32000)
    results = {}
    for cell in (c for c in CELLS if c.name in config.cells):
        ids = torch.tensor(make_inputs(cell.batch, config.input_tokens, vocab))
        generation = GenerationConfig(
            decoder_start_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
            num_beams=cell.num_beams,
            max_new_tokens=config.new_tokens,
            min_new_tokens=config.new_tokens,
        )

        def call(ids=ids, generation=generation):
            with torch.inference_mode():
                cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
                model.generate(input_ids=ids, generation_config=generation, past_key_values=cache)

        results[cell.name] = _time_calls(call, config.runs)
    return results


def _worker_ctranslate2(config: BenchConfig, model_dir: str, vocab: int) -> dict[str, list[float]]:
    """CTranslate2 fp32 on the same checkpoint (converted once by `run_bench`), same ids, same forced length."""
    import ctranslate2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.checkpoint)
    translator = ctranslate2.Translator(model_dir, device="cpu", inter_threads=1, intra_threads=config.threads)
    results = {}
    for cell in (c for c in CELLS if c.name in config.cells):
        source = [tokenizer.convert_ids_to_tokens(row) for row in make_inputs(cell.batch, config.input_tokens, vocab)]

        def call(source=source, beams=cell.num_beams):
            translator.translate_batch(
                source,
                beam_size=beams,
                max_decoding_length=config.new_tokens,
                min_decoding_length=config.new_tokens,
            )

        results[cell.name] = _time_calls(call, config.runs)
    return results


def _convert_ctranslate2(checkpoint: str, directory: Path) -> Path:
    from ctranslate2.converters import TransformersConverter

    if not (directory / "model.bin").is_file():
        TransformersConverter(checkpoint).convert(str(directory), force=True)
    return directory


def _worker_served(config: BenchConfig, protocol: str, url: str, vocab: int) -> dict[str, list[float]]:
    from t5_triton.client.api import T5Client

    results = {}
    with T5Client(url, protocol) as client:
        for cell in (c for c in CELLS if c.name in config.cells):
            ids = make_inputs(cell.batch, config.input_tokens, vocab)
            params = {"num_beams": cell.num_beams, "max_new_tokens": config.new_tokens}
            params["min_new_tokens"] = config.new_tokens

            def call(ids=ids, params=params):
                client.generate(input_ids=ids, **params)

            results[cell.name] = _time_calls(call, config.runs)
    return results


def _run_worker(engine: str, config: BenchConfig, extra: dict) -> dict[str, list[float]]:
    """One engine, one pass, in a fresh interpreter."""
    payload = json.dumps({"engine": engine, "config": asdict(config), **extra})
    env = {**os.environ, "OMP_NUM_THREADS": str(config.threads)}
    done = subprocess.run(
        [sys.executable, "-m", "t5_triton.bench", payload], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{engine} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_bench(config: BenchConfig, passes: int, console: Console, output_json: Path | None = None) -> dict:
    from t5_triton.model_repository.t5_runtime.spec import ServingSpec
    from t5_triton.server import Ports, TritonServer

    serving = ServingSpec.load(Path(config.repository) / "t5_generate" / "1")
    vocab = min(serving.dims.vocab_size, 32000)
    engines = _engines()
    samples: dict[str, dict[str, list[float]]] = {e: {c: [] for c in config.cells} for e in engines}
    ct2_dir = None
    if CTRANSLATE2 in engines:
        ct2_dir = str(_convert_ctranslate2(config.checkpoint, Path(config.repository).parent / "ctranslate2"))
    log_file = Path(tempfile.gettempdir()) / "t5-triton-bench-server.log"
    with TritonServer(Path(config.repository), Ports.free(), log_file=log_file) as server:
        urls = {"served-grpc": ("grpc", server.grpc_url), "served-http": ("http", server.http_url)}
        for number in range(passes):
            for engine in engines:
                console.print(f"pass {number + 1}/{passes}: {engine}")
                extra = {"vocab": vocab}
                if engine in urls:
                    extra.update(protocol=urls[engine][0], url=urls[engine][1])
                elif engine == CTRANSLATE2:
                    extra["model_dir"] = ct2_dir
                for cell, times in _run_worker(engine, config, extra).items():
                    samples[engine][cell].extend(times)
    report = {
        "config": asdict(config),
        "passes": passes,
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "median_s": {e: {c: statistics.median(t) for c, t in cells.items()} for e, cells in samples.items()},
        "samples_s": samples,
    }
    _print_table(report, config, console)
    if output_json:
        output_json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _print_table(report: dict, config: BenchConfig, console: Console) -> None:
    medians = report["median_s"]
    table = Table(title=f"{config.input_tokens} input tokens, {config.new_tokens} forced new tokens; median seconds")
    table.add_column("engine")
    for cell in config.cells:
        table.add_column(cell, justify="right")
    for engine in medians:
        row = []
        for cell in config.cells:
            seconds, base = medians[engine][cell], medians["transformers"][cell]
            batch = next(c.batch for c in CELLS if c.name == cell)
            tokens = batch * config.new_tokens / seconds
            row.append(f"{seconds:.3f} s ({base / seconds:.2f}x) {tokens:.0f} tok/s")
        table.add_row(engine, *row)
    console.print(table)


@dataclass(frozen=True)
class LoadConfig:
    repository: str
    levels: tuple[int, ...] = (1, 4, 16)
    duration_s: float = 20.0
    input_tokens: int = 32
    new_tokens: int = 64


_STREAM_TEXT = "summarize: The quick brown fox jumps over the lazy dog while the farmer watches from the porch."


def _client_loop(url: str, inputs: list[int], new_tokens: int, stop_at: float) -> list[float]:
    """One client: greedy requests back to back until `stop_at`; the latency of each."""
    from t5_triton.client.api import T5Client

    latencies = []
    params = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    with T5Client(url, "grpc") as client:
        client.generate(input_ids=[inputs], **params)  # warm-up, not counted
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            client.generate(input_ids=[inputs], **params)
            latencies.append(time.perf_counter() - start)
    return latencies


def _first_piece_s(url: str, new_tokens: int, runs: int = 5) -> float:
    """Median time from sending a streamed greedy request to its first piece (one client, after a warm-up)."""
    import tritonclient.grpc as grpcclient

    from t5_triton.client.stream import stream_generate

    times = []
    with grpcclient.InferenceServerClient(url) as connection:  # one connection, as a streaming app keeps
        for _ in range(runs + 1):
            start = time.perf_counter()
            pieces = stream_generate(
                url, _STREAM_TEXT, connection=connection, max_new_tokens=new_tokens, min_new_tokens=new_tokens
            )
            next(pieces)
            times.append(time.perf_counter() - start)
            list(pieces)  # to the end: the next run starts on an idle server
    return statistics.median(times[1:])


def run_concurrency(config: LoadConfig, console: Console, output_json: Path | None = None) -> dict:
    """Throughput and latency of the served path (gRPC, greedy) at each number of concurrent clients."""
    from concurrent.futures import ThreadPoolExecutor

    from t5_triton.model_repository.t5_runtime.spec import ServingSpec
    from t5_triton.server import Ports, TritonServer

    serving = ServingSpec.load(Path(config.repository) / "t5_generate" / "1")
    vocab = min(serving.dims.vocab_size, 32000)
    levels = {}
    log_file = Path(tempfile.gettempdir()) / "t5-triton-bench-server.log"
    with TritonServer(Path(config.repository), Ports.free(), log_file=log_file) as server:
        streaming = (Path(config.repository) / "t5_generate_stream").is_dir()
        first_piece = _first_piece_s(server.grpc_url, config.new_tokens) if streaming else None
        for clients in config.levels:
            console.print(f"{clients} concurrent clients for {config.duration_s:.0f} s")
            inputs = make_inputs(clients, config.input_tokens, vocab)
            start = time.perf_counter()
            stop_at = start + config.duration_s
            with ThreadPoolExecutor(clients) as pool:
                futures = [
                    pool.submit(_client_loop, server.grpc_url, row, config.new_tokens, stop_at) for row in inputs
                ]
                runs = [future.result() for future in futures]
            wall = time.perf_counter() - start
            latencies = sorted(t for run in runs for t in run)
            levels[clients] = {
                "requests": len(latencies),
                "tokens_per_s": len(latencies) * config.new_tokens / wall,
                "p50_s": statistics.median(latencies),
                "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            }
    report = {"config": asdict(config), "first_streamed_piece_s": first_piece, "levels": levels}
    _print_concurrency(report, console)
    if output_json:
        output_json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _print_concurrency(report: dict, console: Console) -> None:
    config, levels = report["config"], report["levels"]
    base = levels[min(levels)]
    table = Table(
        title=f"served over gRPC, greedy, {config['input_tokens']} input tokens, {config['new_tokens']} forced new "
        "tokens per request, each client sending back to back"
    )
    for column in ("clients", "requests", "tokens/s", "vs 1 client", "p50 latency", "p95 latency", "p95 vs 1 client"):
        table.add_column(column, justify="right")
    for clients, level in levels.items():
        table.add_row(
            str(clients),
            str(level["requests"]),
            f"{level['tokens_per_s']:.0f}",
            f"{level['tokens_per_s'] / base['tokens_per_s']:.2f}x",
            f"{level['p50_s']:.3f} s",
            f"{level['p95_s']:.3f} s",
            f"{level['p95_s'] / base['p95_s']:.2f}x",
        )
    console.print(table)
    if report["first_streamed_piece_s"] is not None:
        step = base["p50_s"] / config["new_tokens"]
        first = report["first_streamed_piece_s"]
        console.print(
            f"first streamed piece (greedy, 1 client, kept connection): {first * 1000:.1f} ms = "
            f"{first / step:.2f} decoding steps of {step * 1000:.1f} ms (one client's p50 latency / new tokens)"
        )


def _worker_main(payload: str) -> None:
    data = json.loads(payload)
    config = BenchConfig(**{**data["config"], "cells": tuple(data["config"]["cells"])})
    if data["engine"] == CTRANSLATE2:
        result = _worker_ctranslate2(config, data["model_dir"], data["vocab"])
    elif data["engine"] == "transformers":
        result = _worker_transformers(config)
    else:
        result = _worker_served(config, data["protocol"], data["url"], data["vocab"])
    print(json.dumps(result))


if __name__ == "__main__":
    _worker_main(sys.argv[1])
