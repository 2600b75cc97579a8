"""The measuring side of `t5-triton bench`: one engine, one pass, in a fresh interpreter.

`t5_triton.bench` starts this module once per engine and pass (`python -m t5_triton.bench_worker PAYLOAD`)
and reads one JSON line back. Optimum ORT runs under another interpreter (it caps transformers below
the version this project pins), which starts this file as a script: so only the standard library is
imported at the top, each engine imports its own libraries, and nothing here imports rich.

Every worker answers `{"times": {cell: [s, ...]}, "timeline": [[s, ...], ...], "versions": {...}}`:
seconds per generate call after one warm-up, and for greedy batch 1 the arrival time of each new token
(seconds since the call started), one list per run. The split worker answers `{"split": ...}` instead.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from importlib import metadata
from pathlib import Path


@dataclass(frozen=True)
class Cell:
    name: str
    batch: int
    num_beams: int


CELLS = (Cell("greedy b1", 1, 1), Cell("beam4 b1", 1, 4), Cell("greedy b8", 8, 1), Cell("beam4 b8", 8, 4))


@dataclass(frozen=True)
class BenchConfig:
    checkpoint: str  # folder with the HF checkpoint the repositories were built from
    repository: str  # fp32
    int8_repository: str | None = None  # built with --precision int8 from the same checkpoint
    optimum_python: str | None = None  # an interpreter with optimum[onnxruntime]
    input_tokens: int = 32
    new_tokens: int = 64
    runs: int = 5
    threads: int = 2
    cells: tuple[str, ...] = tuple(c.name for c in CELLS)

    @classmethod
    def from_dict(cls, raw: dict) -> BenchConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in raw.items() if k in known}, "cells": tuple(raw["cells"])})

    def selected(self) -> list[Cell]:
        return [c for c in CELLS if c.name in self.cells]


Mark = Callable[[], None]  # called once per new token as it arrives


def make_inputs(batch: int, length: int, vocab: int, eos: int = 1) -> list[list[int]]:
    """Deterministic token ids in [3, vocab) then EOS: a fixed, realistic-length input per row."""
    rng = random.Random(batch * 1000 + length)
    return [[rng.randrange(3, vocab) for _ in range(length - 1)] + [eos] for _ in range(batch)]


def time_calls(call: Callable[[], object], runs: int) -> list[float]:
    call()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def token_timeline(generate: Callable[[Mark], object], runs: int) -> list[list[float]]:
    """Arrival time of each new token (seconds since the call started), one list per run after a warm-up."""
    timelines = []
    for _ in range(runs + 1):
        stamps = [time.perf_counter()]  # the call's start, then one per token
        generate(lambda stamps=stamps: stamps.append(time.perf_counter()))
        timelines.append([stamp - stamps[0] for stamp in stamps[1:]])
    return timelines[1:]


def _versions(*distributions: str) -> dict[str, str]:
    return {name: metadata.version(name) for name in distributions}


def _hf_generate(
    generate: Callable[..., object], config: BenchConfig, vocab: int, timeline_ids: list[int]
) -> dict[str, object]:
    """Cells and timeline of a `transformers`-style `generate(input_ids, generation_config, **kwargs)`."""
    import torch
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    def generation(num_beams: int) -> GenerationConfig:
        n = config.new_tokens
        return GenerationConfig(
            decoder_start_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
            num_beams=num_beams,
            max_new_tokens=n,
            min_new_tokens=n,
        )

    times = {}
    for cell in config.selected():
        ids, cell_generation = (
            torch.tensor(make_inputs(cell.batch, config.input_tokens, vocab)),
            generation(cell.num_beams),
        )
        times[cell.name] = time_calls(lambda ids=ids, g=cell_generation: generate(ids, g), config.runs)

    class Stamp(LogitsProcessor):  # called once per step, right after the decoder call
        def __init__(self, mark: Mark):
            self.mark = mark

        def __call__(self, input_ids, scores):
            self.mark()
            return scores

    ids, greedy = torch.tensor([timeline_ids]), generation(1)
    timeline = token_timeline(
        lambda mark: generate(ids, greedy, logits_processor=LogitsProcessorList([Stamp(mark)])), config.runs
    )
    return {"times": times, "timeline": timeline}


def worker_transformers(config: BenchConfig, vocab: int, timeline_ids: list[int]) -> dict:
    import torch
    from transformers import DynamicCache, EncoderDecoderCache, T5ForConditionalGeneration

    torch.set_num_threads(config.threads)
    model = T5ForConditionalGeneration.from_pretrained(config.checkpoint).eval()

    def generate(ids, generation, **kwargs):
        with torch.inference_mode():
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            model.generate(input_ids=ids, generation_config=generation, past_key_values=cache, **kwargs)

    return {**_hf_generate(generate, config, vocab, timeline_ids), "versions": _versions("transformers", "torch")}


def worker_optimum(config: BenchConfig, vocab: int, timeline_ids: list[int], model_dir: str) -> dict:
    """Optimum ORT on the same checkpoint: exported once into `model_dir` (first pass), then loaded from it. The
    decoder is merged (first step and cached steps in one graph, as this project's), as in DESIGN.md's anchors."""
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    torch.set_num_threads(config.threads)
    if not (Path(model_dir) / "decoder_model_merged.onnx").is_file():
        exported = ORTModelForSeq2SeqLM.from_pretrained(config.checkpoint, export=True, use_cache=True, use_merged=True)
        exported.save_pretrained(model_dir)
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.threads
    options.inter_op_num_threads = 1
    model = ORTModelForSeq2SeqLM.from_pretrained(
        model_dir, use_cache=True, provider="CPUExecutionProvider", session_options=options
    )

    def generate(ids, generation, **kwargs):
        with torch.inference_mode():
            model.generate(input_ids=ids, generation_config=generation, **kwargs)

    versions = _versions("optimum", "optimum-onnx", "onnxruntime", "transformers", "torch")
    return {**_hf_generate(generate, config, vocab, timeline_ids), "versions": versions}


def worker_ctranslate2(config: BenchConfig, vocab: int, timeline_ids: list[int], model_dir: str) -> dict:
    """CTranslate2 fp32 on the same checkpoint (converted once by `run_bench`), same ids, same forced length."""
    import ctranslate2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.checkpoint)
    translator = ctranslate2.Translator(model_dir, device="cpu", inter_threads=1, intra_threads=config.threads)
    n = config.new_tokens
    times = {}
    for cell in config.selected():
        source = [tokenizer.convert_ids_to_tokens(row) for row in make_inputs(cell.batch, config.input_tokens, vocab)]

        def call(source=source, beams=cell.num_beams):
            translator.translate_batch(source, beam_size=beams, max_decoding_length=n, min_decoding_length=n)

        times[cell.name] = time_calls(call, config.runs)
    source_tokens = tokenizer.convert_ids_to_tokens(timeline_ids)

    def stream(mark: Mark) -> None:
        for _ in translator.generate_tokens(source_tokens, max_decoding_length=n, min_decoding_length=n):
            mark()

    return {"times": times, "timeline": token_timeline(stream, config.runs), "versions": _versions("ctranslate2")}


def worker_served(config: BenchConfig, vocab: int, protocol: str, url: str, timeline_text: str | None) -> dict:
    """Client calls to a running server; over gRPC also the token timeline, streamed from `t5_generate_stream`."""
    from t5_triton.client.api import T5Client

    n = config.new_tokens
    times = {}
    with T5Client(url, protocol) as client:
        for cell in config.selected():
            ids = make_inputs(cell.batch, config.input_tokens, vocab)
            params = {"num_beams": cell.num_beams, "max_new_tokens": n, "min_new_tokens": n}

            def call(ids=ids, params=params):
                client.generate(input_ids=ids, **params)

            times[cell.name] = time_calls(call, config.runs)
    result: dict[str, object] = {"times": times, "versions": _versions("tritonclient")}
    if protocol == "grpc" and timeline_text is not None:
        import tritonclient.grpc as grpcclient

        from t5_triton.client.stream import stream_generate

        with grpcclient.InferenceServerClient(url) as connection:  # kept, as a streaming app keeps it

            def stream(mark: Mark) -> None:
                pieces = stream_generate(url, timeline_text, connection=connection, max_new_tokens=n, min_new_tokens=n)
                for piece in pieces:
                    for _ in piece.token_ids:
                        mark()

            result["timeline"] = token_timeline(stream, config.runs)
    return result


class _Timed:
    """A model callable that adds up the seconds spent in it."""

    def __init__(self, call: Callable):
        self.call, self.seconds, self.calls = call, 0.0, 0

    def __call__(self, inputs, outputs):
        start = time.perf_counter()
        try:
            return self.call(inputs, outputs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def worker_split(config: BenchConfig, repository: str) -> dict:
    """Where a served decoding step goes: the repository's own `t5_runtime` (the code `t5_generate` runs) in
    this process, its decoder and encoder wrapped with timers. Sessions as the server makes them (`create_session`,
    `threads` intra-op threads) and one torch thread, as in `t5_generate`. Per call: the decoder calls (steps),
    seconds in the decoder, in the encoder, and the rest ("logic": search, cache updates, bookkeeping)."""
    import torch

    generate_dir = Path(repository) / "t5_generate" / "1"
    sys.path.insert(0, str(generate_dir))
    from t5_runtime.generator import T5Generator
    from t5_runtime.onnx_runner import create_session
    from t5_runtime.params import GenerationParams
    from t5_runtime.spec import ServingSpec
    from t5_runtime.torch_session import TorchSession

    torch.set_num_threads(1)
    serving = ServingSpec.load(generate_dir)
    sessions = [
        TorchSession(create_session(Path(repository) / model / "1" / "model.onnx", config.threads))
        for model in ("t5_encoder", "t5_decoder")
    ]
    encoder, decoder = _Timed(sessions[0]), _Timed(sessions[1])
    generator = T5Generator(encoder, decoder, serving.dims)
    vocab = min(serving.dims.vocab_size, 32000)
    split: dict[str, list[dict[str, float]]] = {}
    for cell in config.selected():
        rows = make_inputs(cell.batch, config.input_tokens, vocab)
        params = GenerationParams(
            max_new_tokens=config.new_tokens, min_new_tokens=config.new_tokens, num_beams=cell.num_beams
        )
        split[cell.name] = []
        for run in range(config.runs + 1):  # the first is the warm-up
            for timed in (encoder, decoder):
                timed.seconds, timed.calls = 0.0, 0
            start = time.perf_counter()
            generator(rows, params)
            total = time.perf_counter() - start
            if run:
                split[cell.name].append(
                    {
                        "steps": decoder.calls,
                        "total_s": total,
                        "encoder_s": encoder.seconds,
                        "decoder_s": decoder.seconds,
                        "logic_s": total - encoder.seconds - decoder.seconds,
                    }
                )
    return {"split": split}


def main(payload: str) -> None:
    data = json.loads(payload)
    config = BenchConfig.from_dict(data.pop("config"))
    engine = data.pop("engine")
    if engine == "split":
        result = worker_split(config, data["repository"])
    elif engine == "transformers":
        result = worker_transformers(config, data["vocab"], data["timeline_ids"])
    elif engine == "optimum":
        result = worker_optimum(config, data["vocab"], data["timeline_ids"], data["model_dir"])
    elif engine == "ctranslate2":
        result = worker_ctranslate2(config, data["vocab"], data["timeline_ids"], data["model_dir"])
    else:
        result = worker_served(config, data["vocab"], data["protocol"], data["url"], data["timeline_text"])
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
