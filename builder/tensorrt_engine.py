"""The gpu target's encoder: a TensorRT engine (`model.plan`) built from the exported fp32 ONNX encoder.

The only module that imports TensorRT, and only when a gpu build runs: the package installs and the
cpu target builds without it. Reduced precision uses TensorRT 10's own controls (the FP16 / BF16 builder
flags, fp32 kept per layer under OBEY_PRECISION_CONSTRAINTS; the policy is `gpu_target.keeps_fp32`).
TensorRT 11 removed those controls (strongly typed networks only): there only fp32 builds.

Everything from `trt.Builder(...)` on needs a CUDA device; the decisions before it are in
`gpu_target.py`, which the tests check on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from t5_triton.model_repository.t5_runtime import spec

from .errors import BuildError
from .gpu_target import ENGINE_PRECISIONS, EncoderProfile, EngineTensor, check_inputs, check_shapes, keeps_fp32

INSTALL_HINT = (
    "install the optional extra: pip install 't5-triton[gpu]' (TensorRT 10.x; its version must equal the "
    "TensorRT of the Triton that will serve the engine), or build inside the NGC Triton container as the "
    "README's GPU run book does (scripts/gpu_check.sh installs the matching TensorRT wheel)"
)

# --engine-precision -> the TensorRT 10 builder flag that allows it (fp32: none).
PRECISION_FLAGS = {"bf16": "BF16", "fp16": "FP16", "fp32": None}
# Serving dtype of the engine's float output -> TensorRT DataType name.
OUTPUT_DTYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16"}
# Sanity bounds for the engine against the fp32 ONNX encoder (normalized max abs, relative L2): a broken
# engine is off by ~100%; token agreement with transformers is what scripts/gpu_check.sh measures.
ENGINE_TOLERANCES = {"fp32": (1e-3, 1e-4), "bf16": (0.25, 0.05), "fp16": (0.25, 0.05)}


@dataclass(frozen=True)
class EngineInfo:
    """What was built, for the report and the I/O check."""

    tensorrt_version: str
    precision: str
    io: list[EngineTensor]
    fp32_layers: list[str] = field(default_factory=list)
    network_layers: int = 0

    def as_dict(self) -> dict:
        return {
            "tensorrt_version": self.tensorrt_version,
            "precision": self.precision,
            "io": [t.as_dict() for t in self.io],
            "network_layers": self.network_layers,
            "fp32_layers": len(self.fp32_layers),
        }


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as err:
        raise BuildError(
            f"--target gpu builds the encoder with TensorRT, which is not installed here: {INSTALL_HINT}"
        ) from err
    return tensorrt


def require_tensorrt(precision: str):
    """The TensorRT module, if it can build `precision`; called before the export so a build fails early."""
    if precision not in ENGINE_PRECISIONS:
        raise BuildError(f"--engine-precision {precision}: use one of {', '.join(ENGINE_PRECISIONS)}")
    trt = import_tensorrt()
    version = str(getattr(trt, "__version__", "0"))
    if int(version.split(".")[0]) < 10:
        raise BuildError(f"TensorRT {version} is too old: the encoder's int64 inputs need TensorRT 10 ({INSTALL_HINT})")
    flag = PRECISION_FLAGS[precision]
    if flag is not None and not hasattr(trt.BuilderFlag, flag):
        raise BuildError(
            f"TensorRT {version} has no {flag} builder flag (TensorRT 11 builds strongly typed networks only): "
            "use --engine-precision fp32 there, or TensorRT 10.x (the NGC Triton containers the README names)"
        )
    return trt


def _enum_name(value) -> str:
    name = getattr(value, "name", None)
    return name if isinstance(name, str) else str(value).rsplit(".", 1)[-1]


def _set_precision(trt, network, config, precision: str) -> list[str]:
    """Builder flags and per-layer fp32 constraints; returns the names of the layers kept in fp32."""
    if precision == "fp32":
        # TensorRT allows TF32 for fp32 by default (10-bit mantissa); fp32 here means IEEE fp32, as
        # transformers computes it, so the engine can be compared token for token.
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        return []
    config.set_flag(getattr(trt.BuilderFlag, PRECISION_FLAGS[precision]))
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    floating = {trt.DataType.FLOAT, trt.DataType.HALF, getattr(trt.DataType, "BF16", trt.DataType.HALF)}
    kept = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if not keeps_fp32(layer.name, precision):
            continue
        outputs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in floating]
        if not outputs:  # shape arithmetic and the like: integer tensors, nothing to constrain
            continue
        layer.precision = trt.DataType.FLOAT
        for j in outputs:
            layer.set_output_type(j, trt.DataType.FLOAT)
        kept.append(layer.name)
    if not kept:
        # The policy matches layers by the export's node names: none matched means they changed, and
        # an fp16 engine without its fp32 layers can overflow. Refuse rather than build it.
        raise BuildError(
            f"no encoder layer matched the fp32 policy for --engine-precision {precision} "
            "(builder/gpu_target.py keeps_fp32): the exported node names changed; update the patterns"
        )
    return kept


def _set_output_dtype(trt, network, float_dtype: str) -> None:
    """The encoder's float output in the dtype the decoder takes (the ONNX graph's is fp32)."""
    wanted = getattr(trt.DataType, OUTPUT_DTYPES[float_dtype])
    for index in range(network.num_outputs):
        tensor = network.get_output(index)
        if tensor.dtype != wanted and tensor.dtype in {trt.DataType.FLOAT, trt.DataType.HALF}:
            tensor.dtype = wanted


def engine_io(trt, engine) -> list[EngineTensor]:
    tensors = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        tensors.append(
            EngineTensor(
                name=name,
                is_input=engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                dtype=_enum_name(engine.get_tensor_dtype(name)),
                shape=tuple(int(d) for d in engine.get_tensor_shape(name)),
            )
        )
    return tensors


def build_encoder_engine(
    onnx_path: Path,
    plan_path: Path,
    shapes: dict[str, tuple[tuple[int, ...], ...]],
    precision: str,
    float_dtype: str = "float32",
) -> EngineInfo:
    """Parse the ONNX encoder, build a serialized engine with one optimization profile, write it.

    `shapes`: input name -> (min, opt, max) shapes (`EncoderProfile.shapes`). Needs a CUDA device.
    """
    trt = require_tensorrt(precision)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: external weights resolve beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT cannot parse {onnx_path.name}: {errors or 'no error reported'}")
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if inputs != set(shapes):
        raise BuildError(f"the profile names inputs {sorted(shapes)}, the encoder graph has {sorted(inputs)}")

    config = builder.create_builder_config()
    kept = _set_precision(trt, network, config, precision)
    _set_output_dtype(trt, network, float_dtype)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError("TensorRT could not build the encoder engine; its log above says why")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    with open(plan_path, "wb") as plan:
        plan.write(serialized)
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    if engine is None:
        raise BuildError("TensorRT built an encoder engine it cannot load back; its log above says why")
    return EngineInfo(
        tensorrt_version=str(trt.__version__),
        precision=precision,
        io=engine_io(trt, engine),
        fp32_layers=kept,
        network_layers=network.num_layers,
    )


def _torch_dtypes():
    import torch

    return {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT64": torch.int64,
        "INT32": torch.int32,
        "BOOL": torch.bool,
    }


def run_engine(trt, engine, context, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One inference on CUDA tensors (torch owns the memory), outputs copied back as fp32/int numpy."""
    import torch

    dtypes = _torch_dtypes()
    keep = []  # the device buffers must outlive the launch
    for name, array in feeds.items():
        tensor = torch.from_numpy(array).to("cuda").to(dtypes[_enum_name(engine.get_tensor_dtype(name))])
        keep.append(tensor.contiguous())
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, keep[-1].data_ptr())
    outputs = {}
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        if engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
            continue
        shape = tuple(int(d) for d in context.get_tensor_shape(name))
        outputs[name] = torch.empty(shape, dtype=dtypes[_enum_name(engine.get_tensor_dtype(name))], device="cuda")
        context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise BuildError("TensorRT failed to run the encoder engine on the check inputs")
    stream.synchronize()
    return {name: (t.float() if t.is_floating_point() else t).cpu().numpy() for name, t in outputs.items()}


def check_encoder_engine(plan_path: Path, onnx_path: Path, vocab_size: int, profile: EncoderProfile, precision: str):
    """The engine against the fp32 ONNX encoder (ONNX Runtime, CPU) at the profile's corners. Needs CUDA."""
    from t5_triton.model_repository.t5_runtime.onnx_runner import create_session, run_numpy

    from .verify import Tolerance, compare_arrays

    trt = import_tensorrt()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan_path.read_bytes())
    context = engine.create_execution_context()
    session = create_session(onnx_path)
    max_abs, rel = ENGINE_TOLERANCES[precision]
    results = []
    for rows, tokens in check_shapes(profile):
        feeds = check_inputs(vocab_size, rows, tokens)
        expected = run_numpy(session, feeds)[spec.ENCODER_HIDDEN_STATES]
        actual = run_engine(trt, engine, context, feeds)[spec.ENCODER_HIDDEN_STATES]
        name = f"TensorRT encoder ({precision}) vs ONNX fp32, inputs={rows} tokens={tokens}"
        results.append(compare_arrays(name, actual, expected, Tolerance(max_abs=max_abs, rel=rel)))
    return results


def build_gpu_encoder(onnx_encoder: Path, directory: Path, serving, engine_options, generate_instances, step):
    """The gpu target's encoder, built, checked against its config and measured; and its report section.

    `step(title)` is the build's progress context manager. Returns (EnginePlan, report section, checks).
    """
    from .configs import encoder_tensors
    from .gpu_target import check_engine_io, cuda_pool_plan, encoder_profile
    from .repository import EnginePlan

    profile = encoder_profile(engine_options, serving.max_batch_size, serving.max_num_beams, serving.max_input_tokens)
    inputs, outputs = encoder_tensors(serving.dims, serving.float_dtype)
    precision, plan = engine_options.precision, directory / "model.plan"
    with step(f"build the TensorRT encoder ({precision}; inputs {profile.batch}, tokens {profile.tokens})"):
        info = build_encoder_engine(onnx_encoder, plan, profile.shapes(inputs), precision, serving.float_dtype)
    check_engine_io(info.io, inputs, outputs)
    with step("measure the TensorRT encoder against the fp32 ONNX encoder"):
        checks = check_encoder_engine(plan, onnx_encoder, serving.dims.vocab_size, profile, precision)
    report = {
        "encoder": {"backend": "tensorrt", **info.as_dict(), "profile": profile.as_dict()},
        "decoder": {"backend": "onnxruntime", "execution_accelerator": "cuda", "use_tf32": 0},
        "cuda_memory": cuda_pool_plan(serving, generate_instances),
    }
    described = f"inputs {profile.batch}, tokens {profile.tokens} (MIN:OPT:MAX)"
    return EnginePlan(plan, precision, info.tensorrt_version, described), report, checks
