"""Lay out the Triton model repository: one folder per model, configs, code, tokenizer, spec."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib.resources import as_file, files
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from t5_triton.model_repository.t5_runtime import spec

from . import configs

ENCODER_MODEL = "t5_encoder"
DECODER_MODEL = "t5_decoder"
GENERATE_MODEL = "t5_generate"
STREAM_MODEL = "t5_generate_stream"  # the same code, decoupled: tokens are sent as they are decided
VERSION = "1"
TOKENIZER_DIR = "tokenizer"
CROSS_KV_FILE = "cross_kv.onnx"  # cpu target, beside the decoder graph: run in process by the generate models

_SOURCES = files("t5_triton.model_repository")


@dataclass(frozen=True)
class ServingOptions:
    """How the models are served; every field is a `build` flag."""

    target: str = "cpu"
    generate_instances: int = 1
    encoder_instances: int = 1
    decoder_instances: int = 1
    threads: int = 0  # ONNX Runtime intra-op threads per instance; 0 = one per core
    # cpu target: t5_generate runs the decoder graph itself, so the KV cache never crosses processes
    decoder_in_process: bool = True
    # cpu target: t5_generate runs the encoder graph itself, a BLS round trip less per arrival group
    encoder_in_process: bool = True
    queue_delay_us: int = 0
    max_queue_size: int = 64  # requests waiting for t5_generate beyond this are refused (0: no limit)


def _copy_runtime(version_dir: Path) -> None:
    with as_file(_SOURCES / "t5_runtime") as runtime:
        shutil.copytree(runtime, version_dir / "t5_runtime", ignore=shutil.ignore_patterns("__pycache__"))


def _install_model_code(version_dir: Path, source_module: str, *helpers: str) -> None:
    """`source_module` becomes model.py; `helpers` and `t5_runtime` go beside it (the stub imports
    from the version folder)."""
    version_dir.mkdir(parents=True, exist_ok=True)
    for source_name, target_name in ((source_module, "model.py"), *((h, h) for h in helpers)):
        with as_file(_SOURCES / source_name) as source:
            shutil.copyfile(source, version_dir / target_name)
    _copy_runtime(version_dir)


def _move_graph(onnx_file: Path, version_dir: Path, name: str = "model.onnx") -> None:
    """The graph becomes `name`; an external-data file keeps the name the graph refers to it by."""
    for part in onnx_file.parent.glob(onnx_file.name + "*"):
        shutil.move(part, version_dir / (name if part == onnx_file else part.name))


def _write_onnx_model(
    repo: Path, name: str, onnx_file: Path, tensors, options: ServingOptions, instances: int, in_process: bool
):
    """`in_process`: the generate models run this graph themselves, so this model loads it on demand."""
    version_dir = repo / name / VERSION
    _install_model_code(version_dir, "onnx_model.py")
    _move_graph(onnx_file, version_dir)
    inputs, outputs = tensors
    text = configs.render_config(
        "onnx_python",
        inputs,
        outputs,
        name=name,
        instances=instances,
        threads=options.threads,
        load_session="first_request" if in_process else "startup",
    )
    (repo / name / "config.pbtxt").write_text(text)


@dataclass(frozen=True)
class EnginePlan:
    """The gpu target's encoder: a built TensorRT engine, and what its config records about it."""

    path: Path
    precision: str
    tensorrt_version: str
    profile: str


def _write_gpu_models(repo: Path, plan: EnginePlan, decoder_onnx: Path, serving: spec.ServingSpec, options):
    """gpu target: the encoder engine for the tensorrt backend, the decoder for the onnxruntime backend."""
    dims, dtype = serving.dims, serving.float_dtype
    version_dir = repo / ENCODER_MODEL / VERSION
    version_dir.mkdir(parents=True)
    shutil.move(plan.path, version_dir / "model.plan")
    inputs, outputs = configs.encoder_tensors(dims, dtype)
    text = configs.render_config(
        "tensorrt_plan",
        inputs,
        outputs,
        name=ENCODER_MODEL,
        instances=options.encoder_instances,
        precision=plan.precision,
        tensorrt_version=plan.tensorrt_version,
        profile=plan.profile,
    )
    (repo / ENCODER_MODEL / "config.pbtxt").write_text(text)

    version_dir = repo / DECODER_MODEL / VERSION
    version_dir.mkdir(parents=True)
    _move_graph(decoder_onnx, version_dir)
    inputs, outputs = configs.decoder_tensors(dims, dtype)
    text = configs.render_config(
        "onnxruntime_gpu", inputs, outputs, name=DECODER_MODEL, instances=options.decoder_instances
    )
    (repo / DECODER_MODEL / "config.pbtxt").write_text(text)


def write_repository(
    repo: Path,
    encoder_onnx: Path,
    decoder_onnx: Path,
    tokenizer: PreTrainedTokenizerBase,
    serving: spec.ServingSpec,
    options: ServingOptions,
    encoder_plan: EnginePlan | None = None,
    cross_kv_onnx: Path | None = None,
) -> None:
    """Populate `repo` (an empty folder); the model files are moved into it.

    gpu target: `encoder_plan` is the encoder (`encoder_onnx`, what it was built from, is not served).
    cpu target: `cross_kv_onnx`, when given, goes beside the decoder graph and the generate models run it
    in process, so that new requests join the shared step without a first step of their own (the gpu target
    does not serve it).
    """
    dims, dtype = serving.dims, serving.float_dtype
    cross_kv = ""  # the generate models' `cross_kv_onnx`: none unless written below
    if options.target == "gpu":
        if encoder_plan is None:
            raise ValueError("the gpu target serves the encoder as a TensorRT engine: pass encoder_plan")
        _write_gpu_models(repo, encoder_plan, decoder_onnx, serving, options)
    else:
        _write_onnx_model(
            repo,
            ENCODER_MODEL,
            encoder_onnx,
            configs.encoder_tensors(dims, dtype),
            options,
            options.encoder_instances,
            options.encoder_in_process,
        )
        _write_onnx_model(
            repo,
            DECODER_MODEL,
            decoder_onnx,
            configs.decoder_tensors(dims, dtype),
            options,
            options.decoder_instances,
            options.decoder_in_process,
        )
        if cross_kv_onnx is not None:
            _move_graph(cross_kv_onnx, repo / DECODER_MODEL / VERSION, CROSS_KV_FILE)
            cross_kv = f"{DECODER_MODEL}/{VERSION}/{CROSS_KV_FILE}"
    for name, decoupled in ((GENERATE_MODEL, False), (STREAM_MODEL, True)):
        _write_generate_model(repo, name, decoupled, tokenizer, serving, options, cross_kv)


def _write_generate_model(
    repo: Path,
    name: str,
    decoupled: bool,
    tokenizer: PreTrainedTokenizerBase,
    serving: spec.ServingSpec,
    options: ServingOptions,
    cross_kv_onnx: str,
) -> None:
    version_dir = repo / name / VERSION
    _install_model_code(version_dir, "generate_model.py", "bls.py", "metrics.py")
    tokenizer.save_pretrained(version_dir / TOKENIZER_DIR)
    serving.save(version_dir)
    inputs, outputs = configs.generate_tensors()
    gpu = options.target == "gpu"
    text = configs.render_config(
        "t5_generate",
        inputs,
        outputs,
        name=name,
        decoupled="true" if decoupled else "false",
        max_batch_size=serving.max_batch_size,
        queue_delay_us=options.queue_delay_us,
        max_queue_size=options.max_queue_size,
        instances=options.generate_instances,
        instance_kind="KIND_GPU" if gpu else "KIND_CPU",
        encoder_model=ENCODER_MODEL,
        decoder_model=DECODER_MODEL,
        force_cpu_only_inputs="no" if gpu else "yes",
        encoder_onnx=f"{ENCODER_MODEL}/{VERSION}/model.onnx" if options.encoder_in_process and not gpu else "",
        decoder_onnx=f"{DECODER_MODEL}/{VERSION}/model.onnx" if options.decoder_in_process and not gpu else "",
        cross_kv_onnx=cross_kv_onnx,
        onnx_threads=options.threads,
    )
    (repo / name / "config.pbtxt").write_text(text)
