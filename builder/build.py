"""`t5-triton build`: checkpoint -> exported, merged, verified graphs -> model repository.

The repository is assembled in a staging folder beside the output and moved into place only after
every check passed, so a failed build never leaves a half-written or unverified repository.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version
from pathlib import Path

from rich.console import Console
from rich.table import Table

from t5_triton.model_repository.t5_runtime import spec

from . import tensorrt_engine
from .checkpoint import load_checkpoint
from .errors import BuildError
from .export import export_graphs
from .gpu_target import EngineOptions, encoder_profile
from .merge import merge_decoders
from .precision import FP16_METHOD, INT8_METHOD, convert_fp16, quantize_int8, verify_fp16
from .repository import DECODER_MODEL, ENCODER_MODEL, VERSION, ServingOptions, write_repository
from .verify import CheckResult, verify_build

REPORT_FILE = "build_report.json"


@dataclass(frozen=True)
class BuildOptions:
    model: str
    output: Path
    target: str = "cpu"
    precision: str = "fp32"
    force: bool = False
    max_input_tokens: int = 512
    max_new_tokens: int = 512
    default_max_new_tokens: int = 64
    max_num_beams: int = 8
    max_batch_size: int = 8
    min_token_match: float = 0.4
    serving: ServingOptions = field(default_factory=ServingOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)  # gpu target: the TensorRT encoder


# Precision -> dtype of the tensors between models (int8 quantizes weights; fp16 computes in fp16 inside
# the graphs; both keep fp32 inputs and outputs, so the serving code and configs stay the same).
PRECISION_DTYPES = {"fp32": "float32", "int8": "float32", "fp16": "float32"}


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise BuildError(f"output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise BuildError(f"output {output} already exists and is not empty; pass --force to replace it")
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise BuildError(f"cannot write to {parent}: {err.strerror or err}") from err


class _Progress:
    """One line per step with its time; a spinner while it runs."""

    def __init__(self, console: Console):
        self.console = console
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        start = time.perf_counter()
        with self.console.status(f"{title}..."):
            yield
        elapsed = time.perf_counter() - start
        self.timings[title] = round(elapsed, 2)
        self.console.print(f"[green]✓[/] {title} [dim]({elapsed:.1f} s)[/]")


def _versions() -> dict[str, str]:
    packages = ("torch", "transformers", "onnx", "onnxruntime", "tokenizers", "t5-triton")
    return {"python": platform.python_version(), **{p: version(p) for p in packages}}


def _weights_bytes(*modules) -> int:
    unique = {id(p): p for m in modules for p in m.parameters()}  # a tied embedding counts once
    return sum(p.numel() * p.element_size() for p in unique.values())


def _files(repo: Path) -> dict[str, int]:
    models = [*repo.rglob("*.onnx*"), *repo.rglob("*.plan")]
    return {str(p.relative_to(repo)): p.stat().st_size for p in sorted(models) if p.is_file()}


def build(options: BuildOptions, console: Console | None = None) -> dict:
    """Run the whole build; return the report (also written to the repository)."""
    console = console or Console(stderr=True)
    if options.target not in ("cpu", "gpu"):
        raise BuildError(f"--target {options.target}: use cpu or gpu")
    if options.target == "gpu":
        _check_gpu_options(options)  # before the export: a gpu build that cannot finish fails in seconds
    elif options.engine != EngineOptions():
        raise BuildError("--engine-precision, --encoder-batch and --encoder-tokens are for --target gpu")
    if options.precision not in PRECISION_DTYPES:
        raise BuildError(f"--precision {options.precision} is not available yet; use {' or '.join(PRECISION_DTYPES)}")
    output = options.output.expanduser().resolve()
    _check_output(output, options.force)
    progress = _Progress(console)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.building-", dir=output.parent))
    try:
        report = _build_into(staging, options, progress)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    console.print(f"[bold green]Built[/] {output} [dim]({sum(progress.timings.values()):.1f} s)[/]")
    return report


def _build_into(repo: Path, options: BuildOptions, progress: _Progress) -> dict:
    scratch = repo / ".scratch"
    with progress.step(f"load checkpoint {options.model}"):
        checkpoint = load_checkpoint(options.model, scratch)
    model = checkpoint.model
    dims = spec.ModelDims.from_hf(model.config, model.generation_config)
    with progress.step("export encoder and decoder graphs to ONNX"):
        graphs = export_graphs(model, scratch / "onnx")
    with progress.step("merge the decoder graphs into one (If node, weights stored once)"):
        merged = merge_decoders(graphs.first_step_decoder, graphs.cached_step_decoder, scratch / "decoder.onnx")
    with progress.step("verify against PyTorch and transformers.generate"):
        checks = verify_build(model, checkpoint.tokenizer, graphs.encoder, merged, cross_kv_path=graphs.cross_kv)
    _print_checks(progress.console, checks)
    _raise_on_failed(checks)
    encoder, decoder = graphs.encoder, merged
    precision = {"precision": "fp32"}  # equal to transformers: the checks above
    if options.precision == "int8":
        with progress.step("quantize to int8"):
            encoder, decoder = quantize_int8(graphs.encoder, merged, scratch / "int8")
        with progress.step("measure int8 against PyTorch fp32 and transformers.generate"):
            reduced = verify_build(model, checkpoint.tokenizer, encoder, decoder, "int8", options.min_token_match)
        _print_checks(progress.console, reduced)
        _raise_on_failed(reduced)
        precision = _precision_report(
            "int8", INT8_METHOD, reduced, options.min_token_match, (graphs.encoder, merged), (encoder, decoder)
        )
    elif options.precision == "fp16":
        with progress.step("audit fp32 value ranges, convert to fp16"):
            fp16 = convert_fp16(graphs, checkpoint.tokenizer, dims.decoder_start_token_id, scratch / "fp16")
        encoder, decoder = fp16.encoder, fp16.decoder
        with progress.step("measure fp16 against PyTorch fp32 and transformers.generate"):
            reduced = verify_fp16(model, checkpoint.tokenizer, fp16, options.min_token_match)
        _print_checks(progress.console, reduced)
        _raise_on_failed(reduced)
        precision = _precision_report(
            "fp16", FP16_METHOD, reduced, options.min_token_match, (graphs.encoder, merged), (encoder, decoder)
        )
        precision["kept_fp32"] = fp16.report

    serving = spec.ServingSpec(
        dims=dims,
        float_dtype=PRECISION_DTYPES[options.precision],
        max_input_tokens=options.max_input_tokens,
        max_new_tokens=options.max_new_tokens,
        default_max_new_tokens=options.default_max_new_tokens,
        max_num_beams=options.max_num_beams,
        max_batch_size=options.max_batch_size,
    )
    encoder_plan, gpu = None, None
    if options.target == "gpu":
        encoder_plan, gpu, engine_checks = tensorrt_engine.build_gpu_encoder(
            graphs.encoder,
            scratch / "tensorrt",
            serving,
            options.engine,
            options.serving.generate_instances,
            progress.step,
        )
        _print_checks(progress.console, engine_checks)
        _raise_on_failed(engine_checks)
        checks = [*checks, *engine_checks]
    decoder_bytes = decoder.stat().st_size
    with progress.step("write the model repository"):
        serving_options = replace(options.serving, target=options.target)
        # The cross K/V graph is fp32: the int8 and fp16 decoders start new requests with their own first step.
        cross_kv = graphs.cross_kv if options.precision == "fp32" else None
        write_repository(repo, encoder, decoder, checkpoint.tokenizer, serving, serving_options, encoder_plan, cross_kv)
        shutil.rmtree(scratch)
    decoder_weights = _weights_bytes(model.get_decoder(), model.lm_head)
    report = {
        "source": {"model": options.model, "kind": checkpoint.kind},
        "target": options.target,
        "precision": precision,
        "versions": _versions(),
        "serving": asdict(serving),
        "models": {
            ENCODER_MODEL: f"{ENCODER_MODEL}/{VERSION}/model.{'plan' if encoder_plan else 'onnx'}",
            DECODER_MODEL: f"{DECODER_MODEL}/{VERSION}/model.onnx",
        },
        "files": _files(repo),
        "decoder_size": {
            "file_bytes": decoder_bytes,
            "weights_bytes": decoder_weights,
            "ratio": round(decoder_bytes / decoder_weights, 4),
        },
        "checks": [c.as_dict() for c in checks],
        "timings_s": progress.timings,
    }
    if gpu is not None:
        report["gpu"] = gpu
    (repo / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _check_gpu_options(options: BuildOptions) -> None:
    if options.precision == "int8":
        raise BuildError(
            "--precision int8 is for the cpu target (ONNX Runtime's int8 kernels run on the CPU); "
            "on gpu, --engine-precision sets the encoder's precision"
        )
    encoder_profile(options.engine, options.max_batch_size, options.max_num_beams, options.max_input_tokens)
    tensorrt_engine.require_tensorrt(options.engine.precision)


def _precision_report(
    name: str,
    method: str,
    checks: list[CheckResult],
    minimum: float,
    fp32: tuple[Path, Path],
    reduced: tuple[Path, Path],
) -> dict:
    generation = [c for c in checks if c.name.startswith("generation")]
    return {
        "precision": name,
        "method": method,
        "min_token_match": minimum,
        "token_match_rate": {
            c.name.split(":")[0].removeprefix("generation "): c.metrics["token_match_rate"] for c in generation
        },
        "logits_vs_fp32": next(c.metrics for c in checks if c.name.startswith("encoder + decoder steps")),
        "bytes": {
            "fp32": {"encoder": fp32[0].stat().st_size, "decoder": fp32[1].stat().st_size},
            name: {"encoder": reduced[0].stat().st_size, "decoder": reduced[1].stat().st_size},
        },
        "checks": [c.as_dict() for c in checks],
    }


def _print_checks(console: Console, checks: list[CheckResult]) -> None:
    table = Table(title="checks", title_justify="left", box=None, pad_edge=False)
    for column in ("", "check", "result"):
        table.add_column(column)
    for c in checks:
        table.add_row("[green]pass[/]" if c.passed else "[red]FAIL[/]", c.name, c.detail)
    console.print(table)


def _raise_on_failed(checks: list[CheckResult]) -> None:
    failed = [c for c in checks if not c.passed]
    if failed:
        lines = "\n".join(f"  - {c.name}: {c.detail}" for c in failed)
        raise BuildError(f"the built graphs failed {len(failed)} of {len(checks)} checks:\n{lines}")
