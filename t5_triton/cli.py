"""`t5-triton`: the project's one command. It parses arguments and calls the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from t5_triton.builder.errors import BuildError

_console = Console(stderr=True, soft_wrap=True)  # error messages stay whole lines


def _int_at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


def _add_build(subparsers) -> None:
    from t5_triton.builder.presets import PRESETS

    p = subparsers.add_parser(
        "build",
        help="turn a T5 checkpoint into a verified Triton model repository",
        description="Export a T5-family checkpoint to ONNX (encoder + one merged decoder), verify the graphs "
        "against PyTorch and transformers.generate, and write a Triton model repository "
        "(t5_encoder, t5_decoder, t5_generate, build_report.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help="a local checkpoint folder, a Hugging Face hub id (needs internet), or a built-in offline "
        f"preset: {', '.join(PRESETS)}",
    )
    p.add_argument("--output", required=True, type=Path, help="folder to write the model repository to")
    p.add_argument(
        "--target",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu: encoder and decoder run by ONNX Runtime in python-backend models (any Triton); "
        "gpu: TensorRT encoder + ONNX Runtime CUDA decoder (NGC Triton container)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "int8"),
        default="fp32",
        help="fp32: equal to transformers token for token; int8 (cpu target): weights quantized, smaller and "
        "measured against fp32 before the build succeeds; fp16 (meant for GPUs, verified here on CPU): nodes "
        "whose values leave the fp16 range on sample inputs stay fp32, measured against fp32 likewise",
    )
    p.add_argument(
        "--min-token-match",
        type=float,
        default=0.4,
        help="reduced precision: the build fails when greedy or beam-search output agrees with transformers fp32 "
        "on fewer than this share of tokens (the builder's fixed inputs). The default catches a broken "
        "quantization; raise it for production",
    )
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    limits = p.add_argument_group("limits enforced per request by t5_generate")
    limits.add_argument("--max-input-tokens", type=_positive, default=512, help="longest input, in tokens")
    limits.add_argument("--max-new-tokens", type=_positive, default=512, help="most new tokens a request may ask")
    limits.add_argument(
        "--default-max-new-tokens", type=_positive, default=64, help="new tokens when a request does not say"
    )
    limits.add_argument("--max-num-beams", type=_positive, default=8, help="most beams a request may ask")
    limits.add_argument(
        "--max-batch-size",
        type=_positive,
        default=8,
        help="most inputs per request; max-batch-size x max-num-beams rows decode at once (in-flight batching)",
    )
    serving = p.add_argument_group("serving")
    serving.add_argument("--instances", type=_positive, default=1, help="t5_generate instances")
    serving.add_argument("--encoder-instances", type=_positive, default=1, help="t5_encoder instances")
    serving.add_argument("--decoder-instances", type=_positive, default=1, help="t5_decoder instances")
    serving.add_argument(
        "--threads", type=_non_negative, default=0, help="ONNX Runtime threads per instance (0: one per core)"
    )
    serving.add_argument(
        "--decoder-in-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cpu target: t5_generate runs the decoder graph itself instead of a BLS call to t5_decoder per step "
        "(the KV cache then never crosses processes: 2x faster at beam-search sizes)",
    )
    serving.add_argument(
        "--encoder-in-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cpu target: t5_generate runs the encoder graph itself instead of a BLS call to t5_encoder per "
        "arrival group (a new request's first token comes ~4 ms sooner; each generate model holds a copy of "
        "the encoder weights)",
    )
    serving.add_argument(
        "--queue-delay-us",
        type=_non_negative,
        default=0,
        help="how long t5_generate's dynamic batcher waits for more requests to batch together",
    )
    serving.add_argument(
        "--max-queue-size",
        type=_non_negative,
        default=64,
        help="requests waiting for t5_generate beyond this are refused at once with UNAVAILABLE (0: no limit)",
    )
    gpu = p.add_argument_group("gpu target: the TensorRT encoder (see the README's GPU run book)")
    gpu.add_argument(
        "--engine-precision",
        choices=("bf16", "fp16", "fp32"),
        default=argparse.SUPPRESS,  # the help says the default; unset tells a cpu build it was not given
        help="the encoder engine's precision (default bf16: needs an Ampere or newer GPU; fp16 keeps the layers "
        "that overflow in fp32; fp32 is IEEE fp32, no TF32). Measured against the fp32 ONNX encoder",
    )
    gpu.add_argument(
        "--encoder-batch",
        metavar="MIN:OPT:MAX",
        default=argparse.SUPPRESS,
        help="the engine's optimization profile for inputs per encoder call (default 1:4:N, N = "
        "--max-batch-size x --max-num-beams, the most inputs t5_generate encodes at once; MAX must cover N)",
    )
    gpu.add_argument(
        "--encoder-tokens",
        metavar="MIN:OPT:MAX",
        default=argparse.SUPPRESS,
        help="the profile for tokens per input (default 1:128:--max-input-tokens; MAX must cover it)",
    )
    p.set_defaults(run=_run_build)


def _engine_options(args: argparse.Namespace):
    from t5_triton.builder.gpu_target import DEFAULT_ENGINE_PRECISION, EngineOptions, ShapeRange

    given = {flag: getattr(args, flag, None) for flag in ("engine_precision", "encoder_batch", "encoder_tokens")}
    given = {flag: value for flag, value in given.items() if value is not None}
    if given and args.target != "gpu":
        flags = ", ".join("--" + flag.replace("_", "-") for flag in given)
        raise BuildError(f"{flags}: only for --target gpu")
    batch, tokens = given.get("encoder_batch"), given.get("encoder_tokens")
    return EngineOptions(
        precision=given.get("engine_precision", DEFAULT_ENGINE_PRECISION),
        batch=ShapeRange.parse(batch, "--encoder-batch") if batch else None,
        tokens=ShapeRange.parse(tokens, "--encoder-tokens") if tokens else None,
    )


def _run_build(args: argparse.Namespace) -> int:
    from t5_triton.builder.build import BuildOptions, build
    from t5_triton.builder.repository import ServingOptions

    if args.default_max_new_tokens > args.max_new_tokens:
        raise BuildError("--default-max-new-tokens must not exceed --max-new-tokens")
    options = BuildOptions(
        model=args.model,
        output=args.output,
        target=args.target,
        precision=args.precision,
        force=args.force,
        max_input_tokens=args.max_input_tokens,
        max_new_tokens=args.max_new_tokens,
        default_max_new_tokens=args.default_max_new_tokens,
        max_num_beams=args.max_num_beams,
        max_batch_size=args.max_batch_size,
        min_token_match=args.min_token_match,
        serving=ServingOptions(
            target=args.target,
            generate_instances=args.instances,
            encoder_instances=args.encoder_instances,
            decoder_instances=args.decoder_instances,
            threads=args.threads,
            decoder_in_process=args.decoder_in_process,
            encoder_in_process=args.encoder_in_process,
            queue_delay_us=args.queue_delay_us,
            max_queue_size=args.max_queue_size,
        ),
        engine=_engine_options(args),
    )
    build(options, _console)
    return 0


def _add_serve(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run tritonserver on a built model repository",
        description="Start a real tritonserver (from PATH, else the one bundled in nvidia-pytriton), wait until it "
        "is ready, and keep it up until Ctrl-C or SIGTERM, then shut it down cleanly.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model-repository", required=True, type=Path, help="a folder written by `t5-triton build`")
    p.add_argument("--http-port", type=_positive, default=8000)
    p.add_argument("--grpc-port", type=_positive, default=8001)
    p.add_argument("--metrics-port", type=_positive, default=8002)
    p.add_argument("--log-file", type=Path, default=Path("tritonserver.log"), help="where the server log goes")
    p.add_argument(
        "--exit-timeout-secs",
        type=_non_negative,
        default=30,
        help="on shutdown, how long Triton waits for open connections and in-flight requests",
    )
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    import signal
    import time

    from t5_triton.server import Ports, TritonServer

    repository = args.model_repository
    if not (repository / "t5_generate" / "config.pbtxt").is_file():
        raise BuildError(f"{repository} is not a model repository built by `t5-triton build`")
    server = TritonServer(
        repository,
        Ports(args.http_port, args.grpc_port, args.metrics_port),
        log_file=args.log_file,
        extra_args=(f"--exit-timeout-secs={args.exit_timeout_secs}",),
    )
    # SIGTERM ends the wait like Ctrl-C does, so the server is always stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    _console.print(f"starting tritonserver on {repository} (log: {args.log_file.resolve()})")
    try:
        server.start()
        _console.print(
            f"[bold green]ready[/]: HTTP {server.http_url}  gRPC {server.grpc_url}  "
            f"metrics 127.0.0.1:{server.ports.metrics}/metrics  (Ctrl-C to stop)"
        )
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
            dead = server.dead_stubs()
            if dead:
                # Requests a dead stub had taken would wait forever, and later ones fail: start afresh.
                _console.print(f"[red]model process died[/] ({', '.join(dead)}); restarting tritonserver")
                server.stop(timeout=5)  # a graceful exit would wait for the dead model's requests in vain
                server.start()
                _console.print(f"[bold green]ready[/] again: HTTP {server.http_url}  gRPC {server.grpc_url}")
        _console.print(f"[red]tritonserver exited[/]; last log lines:\n{server.log_tail()}")
        return 1
    except KeyboardInterrupt:
        _console.print("stopping tritonserver...")
        return 0
    finally:
        code = server.stop()
        if code is not None:
            _console.print(f"tritonserver stopped (exit code {code})")


def _add_generate(subparsers) -> None:
    from t5_triton.model_repository.t5_runtime.request import OPTION_TYPES, PARAMETER_TYPES

    p = subparsers.add_parser(
        "generate",
        help="send text to a running server and print what it generates",
        description="Send one or more texts to t5_generate over HTTP or gRPC. Generation parameters take Hugging "
        "Face's names and defaults; unset ones are left to the server.",
    )
    p.add_argument("texts", nargs="*", help="input texts (or use --file)")
    p.add_argument("--file", type=Path, help="read inputs from this file, one per line")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--url", help="server address (default localhost:8000 for http, localhost:8001 for grpc)")
    p.add_argument("--model", help="model name on the server (default t5_generate, with --stream t5_generate_stream)")
    p.add_argument("--batch-size", type=_positive, default=8, help="inputs sent per request")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated, one input at a time")
    p.add_argument("--json", action="store_true", help="print one JSON object per input, for scripts")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds to wait for an answer (with --stream, for each piece) before giving the request up",
    )
    params = p.add_argument_group("generation parameters (as in transformers.generate)")
    python_types = {"TYPE_INT32": int, "TYPE_INT64": int, "TYPE_FP32": float}
    for name, triton_type in PARAMETER_TYPES.items():
        flag = "--" + name.replace("_", "-")
        if triton_type == "TYPE_BOOL":
            params.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            params.add_argument(flag, type=python_types[triton_type], default=None)
    p.add_argument(
        "--truncate", action=argparse.BooleanOptionalAction, default=None, help="cut inputs over the server's limit"
    )
    p.set_defaults(run=_run_generate, parameter_names=(*PARAMETER_TYPES, *OPTION_TYPES))


def _run_generate(args: argparse.Namespace) -> int:
    import json

    from t5_triton.client.api import GenerateError, T5Client

    texts = list(args.texts)
    if args.file:
        texts += [line for line in args.file.read_text().splitlines() if line.strip()]
    if not texts:
        raise BuildError("give input texts as arguments or with --file")
    params = {name: getattr(args, name) for name in args.parameter_names}
    try:
        if args.stream:
            return _stream_texts(texts, args, params)
        with T5Client(args.url, args.protocol, args.model or "t5_generate", timeout=args.timeout) as client:
            for start in range(0, len(texts), args.batch_size):
                chunk = texts[start : start + args.batch_size]
                for text, result in zip(chunk, client.generate(chunk, **params), strict=True):
                    if args.json:
                        print(json.dumps({"input": text, **result.__dict__}), flush=True)
                    else:
                        _print_result(text, result)
    except GenerateError as err:
        _console.print(f"[bold red]server error[/] ({err.status}): {err}")
        return 1
    except (ConnectionError, OSError) as err:
        _console.print(f"[bold red]cannot reach the server[/] at {args.url or args.protocol + ' default'}: {err}")
        return 1
    return 0


def _stream_texts(texts: list[str], args: argparse.Namespace, params: dict) -> int:
    import json

    from rich.markup import escape

    from t5_triton.client.api import DEFAULT_URLS
    from t5_triton.client.stream import STREAM_MODEL, stream_generate

    url = args.url or DEFAULT_URLS[args.protocol]
    out = Console(highlight=False)
    for text in texts:
        if not args.json:
            out.print(f"[bold]>[/] {escape(text)}\n  ", end="")
        model = args.model or STREAM_MODEL
        for piece in stream_generate(url, text, protocol=args.protocol, model=model, timeout=args.timeout, **params):
            if args.json:
                print(json.dumps({"input": text, **piece.__dict__}), flush=True)
            else:
                out.print(escape(piece.text), end="")
                if piece.final:
                    out.print(f" [dim](score {piece.score:.3f})[/]")
    return 0


def _print_result(text: str, result) -> None:
    from rich.markup import escape

    out = Console()
    out.print(f"[bold]>[/] {escape(text)}")
    for rank, (answer, score) in enumerate(zip(result.texts, result.scores, strict=True), 1):
        prefix = f"{rank}. " if len(result.texts) > 1 else ""
        out.print(f"  {prefix}{escape(answer)} [dim](score {score:.3f})[/]")


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="offline end-to-end demo: build random-tiny, serve it, send real requests, print the answers",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output", type=Path, default=Path("build/demo-repo"), help="where to build the repository")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from t5_triton.demo import run_demo

    run_demo(args.output, _console)
    return 0


def _add_bench(subparsers) -> None:
    from t5_triton.bench import CELLS

    p = subparsers.add_parser(
        "bench",
        help="time the served path (fp32 and int8) next to in-process engines",
        description="Build (or reuse) fp32 and int8 repositories, start a server for each, and time generate calls "
        "of every engine (transformers, served over gRPC and HTTP, served int8, CTranslate2 when installed, "
        "Optimum ORT with --optimum-python), each in its own process, alternating engines pass by pass; print a "
        "table of medians and ratios, each server's memory, the int8 build's agreement with fp32, and the "
        "per-step split of the served decoding.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="random-t5-small", help="preset, local checkpoint folder or hub id")
    p.add_argument("--repository", type=Path, help="a repository built from --model (default: build a fresh one)")
    p.add_argument("--input-tokens", type=_positive, default=32)
    p.add_argument("--new-tokens", type=_positive, default=64, help="forced: min = max new tokens")
    p.add_argument("--passes", type=_positive, default=3, help="processes per engine")
    p.add_argument("--runs", type=_positive, default=5, help="timed calls per pass, after one warm-up")
    p.add_argument(
        "--threads", type=_positive, default=2, help="threads of the in-process engines and of the split's sessions"
    )
    p.add_argument("--cells", nargs="+", default=[c.name for c in CELLS], choices=[c.name for c in CELLS])
    p.add_argument("--json", type=Path, help="also write the medians and every sample here")
    p.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure a repository built with --precision int8 from the same checkpoint, on a server of its "
        "own: REPOSITORY-int8 next to the fp32 one, built fresh along with it, or reused when present next to a "
        "given --repository",
    )
    p.add_argument(
        "--plot",
        type=Path,
        help="draw a PNG here (needs matplotlib, the `bench` extra): time per token over the sequence for each "
        "engine (greedy b1) and the per-step split of the served decoding",
    )
    p.add_argument(
        "--optimum-python",
        metavar="PYTHON",
        help="a Python interpreter with optimum[onnxruntime] installed (optimum caps transformers < 4.58, so it "
        "lives in a venv of its own): adds Optimum ORT to the table, exported once next to the repository",
    )
    p.add_argument(
        "--concurrency",
        type=_positive,
        nargs="+",
        help="instead of the engine table: throughput and latency of the served path at these numbers of "
        "concurrent clients (e.g. 1 4 16), and the time to the first streamed token",
    )
    p.add_argument("--duration", type=float, default=20.0, help="seconds per --concurrency level, over all rounds")
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="REPOSITORY",
        help="with --concurrency: also serve this repository (older code, other flags) and measure it in turn "
        "with the main one in every round, on the same machine phases; prints the ratios",
    )
    p.add_argument(
        "--rounds",
        type=_positive,
        default=4,
        help="the --concurrency levels take turns this many times, so that a drift of the machine's speed "
        "lands on every level alike",
    )
    p.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from t5_triton.bench import BenchConfig, LoadConfig, run_bench, run_concurrency
    from t5_triton.builder.build import BuildOptions, build
    from t5_triton.builder.presets import is_preset, make_preset

    _check_bench_extras(args)
    work = Path("build") / f"bench-{Path(args.model).name}"
    checkpoint = args.model
    if is_preset(args.model):
        checkpoint = str(make_preset(args.model, work / "checkpoint"))
    repository, fresh = args.repository, args.repository is None
    if fresh:  # built fresh: a repository left by older code would measure that code
        repository = work / "repo"
        build(BuildOptions(model=checkpoint, output=repository, force=True), _console)
    if args.concurrency:
        baseline = str(args.baseline) if args.baseline else None
        load = LoadConfig(
            str(repository),
            tuple(args.concurrency),
            args.duration,
            args.input_tokens,
            args.new_tokens,
            args.rounds,
            baseline,
        )
        run_concurrency(load, _console, args.json)
        return 0
    int8 = repository.parent / f"{repository.name}-int8" if args.int8 else None
    if int8 and (fresh or not (int8 / "build_report.json").is_file()):
        build(BuildOptions(model=checkpoint, output=int8, precision="int8", force=True), _console)
    config = BenchConfig(
        checkpoint=checkpoint,
        repository=str(repository),
        int8_repository=str(int8) if int8 else None,
        optimum_python=args.optimum_python,
        input_tokens=args.input_tokens,
        new_tokens=args.new_tokens,
        runs=args.runs,
        threads=args.threads,
        cells=tuple(args.cells),
    )
    run_bench(config, args.passes, _console, args.json, args.plot)
    return 0


def _check_bench_extras(args: argparse.Namespace) -> None:
    """Before any build: --plot needs matplotlib here, --optimum-python an interpreter that imports optimum."""
    import importlib.util
    import subprocess

    if args.plot and not importlib.util.find_spec("matplotlib"):
        raise BuildError("--plot needs matplotlib: pip install -c requirements/constraints.txt -e '.[bench]'")
    if args.optimum_python:
        probe = [args.optimum_python, "-I", "-c", "import optimum.onnxruntime"]
        try:
            done = subprocess.run(probe, capture_output=True, text=True, check=False)
        except OSError as err:
            raise BuildError(f"--optimum-python {args.optimum_python}: {err}") from err
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no error text"])[-1]
            raise BuildError(f"--optimum-python {args.optimum_python} cannot import optimum.onnxruntime: {last}")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t5-triton", description="Serve T5-family text generation on NVIDIA Triton Inference Server."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_build(subparsers)
    _add_serve(subparsers)
    _add_generate(subparsers)
    _add_demo(subparsers)
    _add_bench(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.run(args)
    except BuildError as err:
        from rich.markup import escape

        # Escaped: messages hold brackets rich would take for markup (e.g. pip install 't5-triton[gpu]').
        _console.print(f"[bold red]error:[/] {escape(str(err))}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
