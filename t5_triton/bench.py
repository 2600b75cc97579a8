"""`t5-triton bench`: the served path next to in-process engines, measured in one run.

Every engine runs in its own process (a fresh interpreter per engine and pass, `t5_triton.bench_worker`),
engines alternate pass by pass, each timing is one generate call after a warm-up, and the table shows
medians. Inputs are fixed random token ids (`input_tokens` long, EOS last); outputs are forced to exactly
`new_tokens` (min = max new tokens) so every engine does the same work.

Engines: `transformers.generate`; the served path over gRPC and HTTP (fp32 repository) and over gRPC on a
second server with the int8 repository; CTranslate2 when installed; Optimum ORT under an interpreter of its
own. Besides: each server's memory (RSS of tritonserver and its stubs, sampled all along), the arrival time
of each token of one streamed greedy answer per engine, and the per-step split of the served decoding
(decoder compute vs the rest), measured in process on the repository's own serving code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from t5_triton import bench_worker
from t5_triton.bench_worker import CELLS, BenchConfig, make_inputs
from t5_triton.memory import MemorySampler, memory_total, tree_memory

__all__ = ["CELLS", "BenchConfig", "LoadConfig", "run_bench", "run_concurrency"]

ENGINES = ("transformers", "served-grpc", "served-http")
INT8 = "served-grpc-int8"  # the int8 repository, on a server of its own
CTRANSLATE2 = "ctranslate2"  # measured too when installed (`pip install 't5-triton[bench]'`)
OPTIMUM = "optimum"  # measured when `optimum_python` names an interpreter with optimum[onnxruntime]
SPLIT = "split"  # not an engine: the per-step split of the served decoding, in process
TIMELINE_CELL = "greedy b1"
_TOKENIZER_FILE = "t5_generate/1/tokenizer/tokenizer.json"
_MB = 1024 * 1024


def _engines(config: BenchConfig) -> tuple[str, ...]:
    engines = [*ENGINES, INT8] if config.int8_repository else [*ENGINES]
    if importlib.util.find_spec("ctranslate2"):
        engines.append(CTRANSLATE2)
    if config.optimum_python:
        engines.append(OPTIMUM)
    return tuple(engines)


class ServerMemory(MemorySampler):
    """RSS and PSS of a server's tree (tritonserver and its python-backend stubs), sampled all along; a pass's
    end is marked so that growth from pass to pass shows."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(pid, interval)
        self.after_pass: list[dict[str, int | None]] = []
        self.processes = 0

    def mark_pass(self) -> None:
        memory = tree_memory(self.pid) or {}
        self.processes = len(memory)
        self.after_pass.append({field: memory_total(memory, field) for field in ("rss", "pss")})

    def summary(self) -> dict[str, object]:
        return {
            "processes": self.processes,
            "start": self.timeline[0] if self.timeline else None,
            "peak_rss_bytes": self.peak("rss"),
            "peak_pss_bytes": self.peak("pss"),
            "after_pass": self.after_pass,
        }


def int8_agreement(repository: Path | str) -> dict:
    """What the int8 build measured against fp32 (its build_report.json): token match rates and logit error."""
    precision = json.loads((Path(repository) / "build_report.json").read_text())["precision"]
    if precision["precision"] != "int8":
        raise ValueError(f"{repository} was built with --precision {precision['precision']}, not int8")
    return {key: precision[key] for key in ("method", "token_match_rate", "logits_vs_fp32", "bytes")}


def split_summary(samples: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per cell, medians of the split worker's runs: decoder calls, and milliseconds per call or per step."""
    summary = {}
    for cell, runs in samples.items():
        if not runs:
            continue
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        steps = median["steps"]
        summary[cell] = {
            "steps": steps,
            "total_ms": median["total_s"] * 1000,
            "encoder_ms": median["encoder_s"] * 1000,
            "decoder_ms_per_step": median["decoder_s"] * 1000 / steps,
            "logic_ms_per_step": median["logic_s"] * 1000 / steps,
        }
    return summary


def _timeline_input(repository: str, input_tokens: int, vocab: int) -> tuple[str, list[int]]:
    """The streamed request's text (the stream model takes text) and its ids as the server tokenizes it, which
    the in-process engines get: the fixed ids decoded, so about `input_tokens` long."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(repository) / _TOKENIZER_FILE))
    text = tokenizer.decode(make_inputs(1, input_tokens, vocab)[0], skip_special_tokens=True)
    return text, tokenizer.encode(text).ids


def _convert_ctranslate2(checkpoint: str, directory: Path) -> Path:
    from ctranslate2.converters import TransformersConverter

    if not (directory / "model.bin").is_file():
        TransformersConverter(checkpoint).convert(str(directory), force=True)
    return directory


def _run_worker(engine: str, config: BenchConfig, extra: dict, python: str | None = None) -> dict:
    """One engine, one pass, in a fresh interpreter: ours, or `python` running the worker file in isolated mode
    (neither our site-packages nor the worker's folder on its path)."""
    payload = json.dumps({"engine": engine, "config": asdict(config), **extra})
    if python:
        command = [python, "-I", bench_worker.__file__, payload]
    else:
        command = [sys.executable, "-m", "t5_triton.bench_worker", payload]
    env = {**os.environ, "OMP_NUM_THREADS": str(config.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{engine} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _input_vocab(repository: Path) -> int:
    """Input ids are drawn below this: the repository's vocabulary, capped at 32000."""
    from t5_triton.model_repository.t5_runtime.spec import ServingSpec

    return min(ServingSpec.load(repository / "t5_generate" / "1").dims.vocab_size, 32000)


def run_bench(
    config: BenchConfig, passes: int, console: Console, output_json: Path | None = None, plot: Path | None = None
) -> dict:
    from t5_triton.server import Ports, TritonServer

    repository = Path(config.repository)
    vocab = _input_vocab(repository)
    engines = _engines(config)
    text, timeline_ids = _timeline_input(config.repository, config.input_tokens, vocab)
    streaming = (repository / "t5_generate_stream").is_dir()
    model_dirs = {OPTIMUM: str(repository.parent / "optimum")}
    if CTRANSLATE2 in engines:
        model_dirs[CTRANSLATE2] = str(_convert_ctranslate2(config.checkpoint, repository.parent / "ctranslate2"))
    samples: dict[str, dict[str, list[float]]] = {e: {c: [] for c in config.cells} for e in engines}
    timelines: dict[str, list[list[float]]] = {}
    split_samples: dict[str, list[dict[str, float]]] = {c: [] for c in config.cells}
    versions: dict[str, dict[str, str]] = {}
    repositories = {"fp32": config.repository, "int8": config.int8_repository}
    with contextlib.ExitStack() as stack:
        servers, memory = {}, {}
        for name, path in repositories.items():
            if path:
                log_file = Path(tempfile.gettempdir()) / f"t5-triton-bench-server-{name}.log"
                servers[name] = stack.enter_context(TritonServer(Path(path), Ports.free(), log_file=log_file))
                memory[name] = stack.enter_context(ServerMemory(servers[name].process.pid))
        urls = {"served-grpc": ("grpc", servers["fp32"].grpc_url), "served-http": ("http", servers["fp32"].http_url)}
        if "int8" in servers:
            urls[INT8] = ("grpc", servers["int8"].grpc_url)
        for number in range(passes):
            for engine in (*engines, SPLIT):
                console.print(f"pass {number + 1}/{passes}: {engine}")
                extra: dict[str, object] = {"vocab": vocab, "timeline_ids": timeline_ids}
                if engine in urls:
                    protocol, url = urls[engine]
                    extra.update(protocol=protocol, url=url, timeline_text=text if streaming else None)
                elif engine == SPLIT:
                    extra = {"repository": config.repository}
                elif engine in model_dirs:
                    extra["model_dir"] = model_dirs[engine]
                result = _run_worker(engine, config, extra, config.optimum_python if engine == OPTIMUM else None)
                for cell, times in result.get("times", {}).items():
                    samples[engine][cell].extend(times)
                for cell, runs in result.get("split", {}).items():
                    split_samples[cell].extend(runs)
                if "timeline" in result:
                    timelines.setdefault(engine, []).extend(result["timeline"])
                if "versions" in result:
                    versions[engine] = result["versions"]
            for sampler in memory.values():
                sampler.mark_pass()
    report = {
        "config": asdict(config),
        "passes": passes,
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "versions": versions,
        "median_s": {e: {c: statistics.median(t) for c, t in cells.items()} for e, cells in samples.items()},
        "samples_s": samples,
        "memory": {name: {"repository": repositories[name], **m.summary()} for name, m in memory.items()},
        "int8": int8_agreement(config.int8_repository) if config.int8_repository else None,
        "split": split_summary(split_samples),
        "split_samples": split_samples,
        "timeline": {"cell": TIMELINE_CELL, "input_tokens": len(timeline_ids), "arrivals_s": timelines},
    }
    _print_report(report, config, console)
    if output_json:
        output_json.write_text(json.dumps(report, indent=2) + "\n")
    if plot:
        from t5_triton.bench_plot import plot_report

        plot_report(report, plot)
        console.print(f"plot: {plot}")
    return report


def _print_report(report: dict, config: BenchConfig, console: Console) -> None:
    medians = report["median_s"]
    table = Table(title=f"{config.input_tokens} input tokens, {config.new_tokens} forced new tokens; median seconds")
    table.add_column("engine", no_wrap=True)
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
    for name, memory in report["memory"].items():
        after = ", ".join(f"{point['rss'] / _MB:.0f}/{point['pss'] / _MB:.0f}" for point in memory["after_pass"])
        console.print(
            f"server memory, {name} repository, RSS/PSS summed over tritonserver and {memory['processes'] - 1} "
            f"stubs (RSS counts shared memory in every process mapping it; PSS shares it out): "
            f"{memory['start']['rss'] / _MB:.0f}/{memory['start']['pss'] / _MB:.0f} MB when ready, peak "
            f"{memory['peak_rss_bytes'] / _MB:.0f}/{memory['peak_pss_bytes'] / _MB:.0f} MB, after each pass {after} MB"
        )
    if report["int8"]:
        agreement = report["int8"]
        matches = ", ".join(f"{name} {rate:.3f}" for name, rate in agreement["token_match_rate"].items())
        logits = agreement["logits_vs_fp32"]
        console.print(
            f"int8 repository vs fp32 (its build_report.json): token match with transformers fp32: {matches}; "
            f"logits max abs diff {logits['max_abs_diff']:.3g} (rel error {logits['rel_error']:.3g})"
        )
    _print_split(report, console)
    for engine, versions in report["versions"].items():
        console.print(f"{engine}: " + ", ".join(f"{name} {version}" for name, version in versions.items()))


def _print_split(report: dict, console: Console) -> None:
    table = Table(
        title="served decoding per step, in process on the repository's t5_runtime (decoder compute vs the rest); "
        "served extra: gRPC median minus the in-process call"
    )
    for column in ("cell", "steps", "encoder", "decoder / step", "logic / step", "logic share", "served extra / step"):
        table.add_column(column, justify="right")
    for cell, split in report["split"].items():
        decoder, logic, steps = split["decoder_ms_per_step"], split["logic_ms_per_step"], split["steps"]
        served = report["median_s"]["served-grpc"][cell] * 1000
        table.add_row(
            cell,
            f"{steps:.0f}",
            f"{split['encoder_ms']:.2f} ms",
            f"{decoder:.2f} ms",
            f"{logic:.2f} ms",
            f"{logic / (decoder + logic):.0%}",
            f"{(served - split['total_ms']) / steps:.2f} ms",
        )
    console.print(table)


@dataclass(frozen=True)
class LoadConfig:
    repository: str
    levels: tuple[int, ...] = (1, 4, 16)
    duration_s: float = 20.0  # per level, over all rounds
    input_tokens: int = 32
    new_tokens: int = 64
    # The levels take turns this many times (and the first streamed piece is timed in each round), so a
    # drift of the machine's speed lands on every level alike instead of on the ratios between them.
    rounds: int = 4
    # Another repository (older code, other build flags), served at the same time and measured in turn with
    # `repository` in every round, so that the two are compared on the same machine phases.
    baseline: str | None = None


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


def _first_pieces_s(url: str, new_tokens: int, runs: int) -> list[float]:
    """Times from sending a streamed greedy request to its first piece (one client, after a warm-up)."""
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
    return times[1:]


def _clients_for(url: str, inputs: list[list[int]], new_tokens: int, seconds: float) -> tuple[list[float], float]:
    """`len(inputs)` clients sending back to back for `seconds`: every latency, and the wall time."""
    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    with ThreadPoolExecutor(len(inputs)) as pool:
        futures = [pool.submit(_client_loop, url, row, new_tokens, start + seconds) for row in inputs]
        latencies = [t for future in futures for t in future.result()]
    return latencies, time.perf_counter() - start


@dataclass
class _LoadSamples:
    """What one repository's server measured over the rounds."""

    latencies: dict[int, list[float]]
    wall: dict[int, float]
    first_pieces: list[float] = field(default_factory=list)

    def report(self, new_tokens: int) -> dict:
        levels = {}
        for clients, measured in self.latencies.items():
            measured = sorted(measured)
            levels[clients] = {
                "requests": len(measured),
                "tokens_per_s": len(measured) * new_tokens / self.wall[clients],
                "p50_s": statistics.median(measured),
                "p95_s": measured[min(len(measured) - 1, int(0.95 * len(measured)))],
            }
        first_piece = statistics.median(self.first_pieces) if self.first_pieces else None
        return {"first_streamed_piece_s": first_piece, "levels": levels}


def run_concurrency(config: LoadConfig, console: Console, output_json: Path | None = None) -> dict:
    """Throughput and latency of the served path (gRPC, greedy) at each number of concurrent clients, for the
    repository and, when given, a baseline served beside it and measured in turn."""
    from t5_triton.server import Ports, TritonServer

    repositories = [config.repository] + ([config.baseline] if config.baseline else [])
    samples = {
        repository: _LoadSamples({clients: [] for clients in config.levels}, dict.fromkeys(config.levels, 0.0))
        for repository in repositories
    }
    inputs = {
        repository: {
            clients: make_inputs(clients, config.input_tokens, _input_vocab(Path(repository)))
            for clients in config.levels
        }
        for repository in repositories
    }
    seconds = config.duration_s / config.rounds
    with contextlib.ExitStack() as stack:
        servers = {}
        for index, repository in enumerate(repositories):
            log_file = Path(tempfile.gettempdir()) / f"t5-triton-bench-server-{index}.log"
            servers[repository] = stack.enter_context(TritonServer(Path(repository), Ports.free(), log_file=log_file))
        for round_number in range(1, config.rounds + 1):
            console.print(
                f"round {round_number}/{config.rounds}: {', '.join(map(str, config.levels))} concurrent clients, "
                f"{seconds:.0f} s each"
            )
            # Each repository goes first in every other round.
            for repository in repositories[:: 1 if round_number % 2 else -1]:
                _measure_round(servers[repository], inputs[repository], config, seconds, samples[repository])
    report = {"config": asdict(config), **samples[config.repository].report(config.new_tokens)}
    if config.baseline:
        report["baseline"] = samples[config.baseline].report(config.new_tokens)
    _print_concurrency(report, console)
    if output_json:
        output_json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _measure_round(
    server, inputs: dict[int, list[list[int]]], config: LoadConfig, seconds: float, samples: _LoadSamples
) -> None:
    """One round on one server: the first streamed piece (when it streams), then each level in turn."""
    if (server.model_repository / "t5_generate_stream").is_dir():
        samples.first_pieces += _first_pieces_s(server.grpc_url, config.new_tokens, runs=3)
    for clients in config.levels:
        measured, elapsed = _clients_for(server.grpc_url, inputs[clients], config.new_tokens, seconds)
        samples.latencies[clients] += measured
        samples.wall[clients] += elapsed


def _print_concurrency(report: dict, console: Console) -> None:
    config = report["config"]
    runs = {config["repository"]: report}
    if "baseline" in report:
        runs[config["baseline"]] = report["baseline"]
    for repository, run in runs.items():
        _print_load_run(repository, run, config, console)
    if "baseline" in report:
        now, before = report["levels"], report["baseline"]["levels"]
        for clients in now:
            console.print(
                f"{clients} clients, {config['repository']} vs {config['baseline']}: tokens/s "
                f"{now[clients]['tokens_per_s'] / before[clients]['tokens_per_s']:.2f}x, p95 latency "
                f"{now[clients]['p95_s'] / before[clients]['p95_s']:.2f}x"
            )


def _print_load_run(repository: str, run: dict, config: dict, console: Console) -> None:
    levels = run["levels"]
    base = levels[min(levels)]
    table = Table(
        title=f"{repository}: served over gRPC, greedy, {config['input_tokens']} input tokens, "
        f"{config['new_tokens']} forced new tokens per request, each client sending back to back; levels in "
        f"turn, {config['rounds']} rounds"
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
    if run["first_streamed_piece_s"] is not None:
        step = base["p50_s"] / config["new_tokens"]
        first = run["first_streamed_piece_s"]
        console.print(
            f"first streamed piece (greedy, 1 client, kept connection): {first * 1000:.1f} ms = "
            f"{first / step:.2f} decoding steps of {step * 1000:.1f} ms (one client's p50 latency / new tokens)"
        )
