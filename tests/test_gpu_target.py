"""`build --target gpu`, checked without a GPU wherever a GPU is not needed.

Here: the profile and precision decisions, the check of an engine's tensors against its config, the
CUDA memory plan, the engine-building code on a stand-in `tensorrt` module (our glue only: everything
from `trt.Builder` on needs CUDA in the real one), the whole gpu build with that stand-in (the repository
it writes, its configs parsed by Triton's protobuf, their tensors against the ONNX graphs), the errors of
a machine without TensorRT, and scripts/parity.py against the CPU server.

Marked `gpu`, skipped without CUDA (and TensorRT, and the NGC container's tritonserver where they need
them): every step's tensors stay on the GPU, the BLS calls ask for GPU memory and pass DLPack, a real
engine matches the ONNX encoder, and a served gpu repository equals transformers token for token.
"""

from __future__ import annotations

import copy
import enum
import importlib
import importlib.util
import inspect
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import onnx
import pytest
import torch
from rich.console import Console
from tritonclient.grpc import model_config_pb2

from t5_triton.builder import configs, gpu_target, tensorrt_engine
from t5_triton.builder.build import BuildOptions, build
from t5_triton.builder.errors import BuildError
from t5_triton.builder.gpu_target import EngineOptions, EngineTensor, ShapeRange
from t5_triton.builder.verify import CheckResult
from t5_triton.cli import main
from t5_triton.model_repository.t5_runtime import spec

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; this machine has none")
KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU


def _has_real_tensorrt() -> bool:
    try:
        importlib.import_module("tensorrt")
    except ImportError:
        return False
    return True


# --- A stand-in for TensorRT 10's Python API: records what our code asks of it -----------------------


class _DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    BF16 = 7
    INT64 = 8


class _Flag10(enum.Enum):
    FP16 = 0
    BF16 = 1
    TF32 = 2
    OBEY_PRECISION_CONSTRAINTS = 3


class _Flag11(enum.Enum):  # TensorRT 11 removed the weak-typing flags
    TF32 = 2


class _IOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


_ONNX_TYPES = {
    onnx.TensorProto.FLOAT: _DataType.FLOAT,
    onnx.TensorProto.FLOAT16: _DataType.HALF,
    onnx.TensorProto.INT64: _DataType.INT64,  # TensorRT 10 keeps int64 inputs
    onnx.TensorProto.INT32: _DataType.INT32,
    onnx.TensorProto.BOOL: _DataType.BOOL,
}


class _Tensor:
    def __init__(self, name: str, dtype: _DataType, shape: tuple[int, ...] = ()):
        self.name, self.dtype, self.shape = name, dtype, shape


class _Layer:
    def __init__(self, name: str, outputs: list[_Tensor]):
        self.name, self._outputs = name, outputs
        self.precision = None
        self.output_types: dict[int, _DataType] = {}

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_output(self, index: int) -> _Tensor:
        return self._outputs[index]

    def set_output_type(self, index: int, dtype: _DataType) -> None:
        self.output_types[index] = dtype


class _Network:
    def __init__(self):
        self.inputs: list[_Tensor] = []
        self.outputs: list[_Tensor] = []
        self.layers: list[_Layer] = []

    num_layers = property(lambda self: len(self.layers))
    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_layer(self, index):
        return self.layers[index]

    def get_input(self, index):
        return self.inputs[index]

    def get_output(self, index):
        return self.outputs[index]


def _dims(value) -> tuple[int, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)


class _Parser:
    """Fills the network from the ONNX graph as the real parser names things: one layer per node."""

    def __init__(self, network: _Network, errors: tuple[str, ...]):
        self.network, self.errors = network, errors

    num_errors = property(lambda self: len(self.errors))

    def get_error(self, index):
        return self.errors[index]

    def parse_from_file(self, path: str) -> bool:
        if self.errors:
            return False
        graph = onnx.shape_inference.infer_shapes(onnx.load(path)).graph
        types_ = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
        self.network.inputs = [
            _Tensor(v.name, _ONNX_TYPES[v.type.tensor_type.elem_type], _dims(v)) for v in graph.input
        ]
        self.network.outputs = [
            _Tensor(v.name, _ONNX_TYPES[v.type.tensor_type.elem_type], _dims(v)) for v in graph.output
        ]
        self.network.layers = [
            _Layer(node.name, [_Tensor(o, _ONNX_TYPES.get(types_.get(o), _DataType.FLOAT)) for o in node.output])
            for node in graph.node
        ]
        return True


class _Config:
    def __init__(self):
        self.flags, self.cleared, self.profiles = set(), set(), []

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.cleared.add(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, low, opt, high):
        self.shapes[name] = (tuple(low), tuple(opt), tuple(high))


class _Engine:
    def __init__(self, network: _Network):
        self._io = [(t, _IOMode.INPUT) for t in network.inputs] + [(t, _IOMode.OUTPUT) for t in network.outputs]
        self._by_name = {t.name: (t, mode) for t, mode in self._io}

    num_io_tensors = property(lambda self: len(self._io))

    def get_tensor_name(self, index):
        return self._io[index][0].name

    def get_tensor_mode(self, name):
        return self._by_name[name][1]

    def get_tensor_dtype(self, name):
        return self._by_name[name][0].dtype

    def get_tensor_shape(self, name):
        return self._by_name[name][0].shape


class FakeTensorRT(types.ModuleType):
    def __init__(self, version="10.13.3.9", flags=_Flag10, parse_errors=(), build_fails=False):
        super().__init__("tensorrt")
        self.__version__ = version
        self.DataType, self.BuilderFlag, self.TensorIOMode = _DataType, flags, _IOMode
        self.builds: list[tuple[_Network, _Config, bytes]] = []
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                self.level = level

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                assert flags == 0
                return _Network()

            def create_builder_config(self):
                return _Config()

            def create_optimization_profile(self):
                return _Profile()

            def build_serialized_network(self, network, config):
                if build_fails:
                    return None
                plan = f"plan {len(fake.builds)}".encode()
                fake.builds.append((network, config, plan))
                return plan

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, plan):
                return next(_Engine(network) for network, _, built in fake.builds if built == bytes(plan))

        self.Logger, self.Builder, self.Runtime = Logger, Builder, Runtime
        self.OnnxParser = lambda network, logger: _Parser(network, tuple(parse_errors))


@pytest.fixture
def fake_trt(monkeypatch) -> FakeTensorRT:
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


@pytest.fixture(scope="module")
def dims(tiny) -> spec.ModelDims:
    return spec.ModelDims.from_hf(tiny.model.config, tiny.model.generation_config)


# --- Decisions that need no GPU -------------------------------------------------------------------------


def test_shape_ranges_parse_and_refuse_bad_ones():
    assert ShapeRange.parse("1:4:8", "--encoder-batch") == ShapeRange(1, 4, 8)
    for bad, message in [
        ("1:4", "three whole numbers"),
        ("a:b:c", "three whole numbers"),
        ("1:-2:3", "three whole numbers"),
        ("0:1:2", "1 <= MIN <= OPT <= MAX"),
        ("4:2:8", "1 <= MIN <= OPT <= MAX"),
        ("1:9:8", "1 <= MIN <= OPT <= MAX"),
    ]:
        with pytest.raises(BuildError, match=message):
            ShapeRange.parse(bad, "--encoder-batch")


def test_profile_defaults_cover_the_serving_limits_and_flags_must_too(dims):
    # In-flight batching starts greedy requests that arrive together in one encoder call: up to
    # max_batch_size x max_num_beams inputs.
    profile = gpu_target.encoder_profile(EngineOptions(), max_batch_size=8, max_num_beams=8, max_input_tokens=512)
    assert profile.as_dict() == {"batch": "1:4:64", "tokens": "1:128:512"}
    small = gpu_target.encoder_profile(EngineOptions(), max_batch_size=2, max_num_beams=1, max_input_tokens=64)
    assert small.as_dict() == {"batch": "1:2:2", "tokens": "1:64:64"}
    inputs, _ = configs.encoder_tensors(dims, "float32")
    assert profile.shapes(inputs) == {
        spec.ENCODER_INPUT_IDS: ((1, 1), (4, 128), (64, 512)),
        spec.ENCODER_ATTENTION_MASK: ((1, 1), (4, 128), (64, 512)),
    }
    with pytest.raises(BuildError, match=r"MAX 32 is below 64, .*--max-batch-size 8 x --max-num-beams 8"):
        gpu_target.encoder_profile(EngineOptions(batch=ShapeRange(1, 2, 32)), 8, 8, 512)
    with pytest.raises(BuildError, match="below --max-input-tokens 512"):
        gpu_target.encoder_profile(EngineOptions(tokens=ShapeRange(1, 64, 256)), 8, 8, 512)
    flags = EngineOptions(batch=ShapeRange(2, 8, 128), tokens=ShapeRange(8, 64, 1024))
    assert gpu_target.encoder_profile(flags, 8, 8, 512).as_dict() == {"batch": "2:8:128", "tokens": "8:64:1024"}
    # The engine is measured at opt and at each axis' MIN and MAX, each row keeping a real token.
    assert gpu_target.check_shapes(profile) == [(1, 3), (4, 128), (64, 3), (1, 512)]


def test_engine_check_inputs_run_through_the_onnx_encoder(tiny_graphs, dims):
    import numpy as np

    from t5_triton.model_repository.t5_runtime.onnx_runner import create_session, run_numpy

    feeds = gpu_target.check_inputs(dims.vocab_size, 2, 5)
    assert feeds[spec.ENCODER_ATTENTION_MASK].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert all(a.dtype == np.int64 for a in feeds.values())
    assert gpu_target.check_inputs(dims.vocab_size, 1, 2)[spec.ENCODER_ATTENTION_MASK].tolist() == [[1, 1]]
    session = create_session(tiny_graphs["encoder"])
    profile = gpu_target.encoder_profile(EngineOptions(), max_batch_size=3, max_num_beams=2, max_input_tokens=16)
    for rows, tokens in gpu_target.check_shapes(profile):  # what the build measures the engine at
        states = run_numpy(session, gpu_target.check_inputs(dims.vocab_size, rows, tokens))[spec.ENCODER_HIDDEN_STATES]
        assert states.shape == (rows, tokens, dims.d_model) and np.isfinite(states).all()


def test_fp32_layer_policy_on_the_exported_encoder(tiny_graphs):
    names = [node.name for node in onnx.load(str(tiny_graphs["encoder"])).graph.node]
    blocks = sorted({name.split("/")[2] for name in names if name.startswith("/encoder/block.")})
    assert blocks == ["block.0", "block.1"]

    def kept(precision):
        return {name for name in names if gpu_target.keeps_fp32(name, precision)}

    assert kept("fp32") == set()
    for precision in ("bf16", "fp16"):
        chosen = kept(precision)
        for block in blocks:
            for layer in ("layer.0", "layer.1"):
                assert f"/encoder/{block}/{layer}/Add" in chosen  # residual adds
                assert f"/encoder/{block}/{layer}/layer_norm/Pow" in chosen  # x^2 of the RMS norm
            for projection in ("q", "k", "v", "o"):
                assert f"/encoder/{block}/layer.0/SelfAttention/{projection}/MatMul" not in chosen
            assert f"/encoder/{block}/layer.1/DenseReluDense/wi/MatMul" not in chosen
            assert f"/encoder/{block}/layer.0/SelfAttention/Softmax" not in chosen
            wo = f"/encoder/{block}/layer.1/DenseReluDense/wo/MatMul"
            assert (wo in chosen) == (precision == "fp16")  # overflows fp16 only
        assert "/encoder/final_layer_norm/Mul_1" in chosen
        assert "/Mul" in chosen  # (1 - mask) * fp32 min: -inf in fp16 and bf16
        assert "/encoder/embed_tokens/Gather" in chosen
    # Gated-GELU checkpoints (t5 v1.1, flan-t5) name their feed-forward wi_0 / wi_1 / wo.
    gated = "/encoder/block.5/layer.1/DenseReluDense/"
    assert gpu_target.keeps_fp32(gated + "wo/MatMul", "fp16")
    assert not gpu_target.keeps_fp32(gated + "wi_0/MatMul", "fp16")
    assert not gpu_target.keeps_fp32(gated + "wi_1/MatMul", "bf16")
    with pytest.raises(BuildError, match="--engine-precision int4"):
        gpu_target.keeps_fp32("x", "int4")


def test_engine_io_check_names_every_difference(dims):
    inputs, outputs = configs.encoder_tensors(dims, "float32")
    good = [
        EngineTensor(spec.ENCODER_INPUT_IDS, True, "INT64", (-1, -1)),
        EngineTensor(spec.ENCODER_ATTENTION_MASK, True, "INT64", (-1, -1)),
        EngineTensor(spec.ENCODER_HIDDEN_STATES, False, "FLOAT", (-1, -1, dims.d_model)),
    ]
    gpu_target.check_engine_io(good, inputs, outputs)
    bad = [
        EngineTensor(spec.ENCODER_INPUT_IDS, True, "INT32", (-1, -1)),  # what TensorRT 8 made of int64 inputs
        EngineTensor(spec.ENCODER_HIDDEN_STATES, False, "FLOAT", (-1, -1, dims.d_model + 1)),
        EngineTensor("extra", False, "FLOAT", (-1,)),
    ]
    with pytest.raises(BuildError) as err:
        gpu_target.check_engine_io(bad, inputs, outputs)
    message = str(err.value)
    assert "input 'input_ids': the engine has INT32 (TYPE_INT32), the config TYPE_INT64" in message
    assert "config input 'attention_mask' is not an input of the engine" in message
    assert f"the engine has dims [-1, -1, {dims.d_model + 1}], the config [-1, -1, {dims.d_model}]" in message
    assert "engine output 'extra' is not in the config" in message


def test_cuda_pool_plan_holds_one_decoder_call_per_generate_instance(dims):
    serving = spec.ServingSpec(
        dims=dims,
        float_dtype="float32",
        max_input_tokens=10,
        max_new_tokens=5,
        default_max_new_tokens=5,
        max_num_beams=2,
        max_batch_size=3,
    )
    plan = gpu_target.cuda_pool_plan(serving, generate_instances=2)
    rows, layers, heads, d_kv = 6, dims.num_decoder_layers, dims.num_heads, dims.d_kv
    call = plan["decoder_call_bytes"]
    assert plan["rows_per_call"] == rows
    assert call[spec.PAST_SELF_KV] == layers * 2 * rows * heads * 4 * d_kv * 4  # 4 past positions at the last step
    assert call[spec.CROSS_KV] == layers * 2 * rows * heads * 10 * d_kv * 4
    assert call[spec.LOGITS] == rows * dims.vocab_size * 4
    assert call["total"] == sum(v for k, v in call.items() if k != "total")
    pool = plan["cuda_memory_pool_byte_size"]
    assert pool % (1 << 20) == 0 and pool >= 2 * call["total"] * gpu_target.POOL_HEADROOM
    assert plan["tritonserver_flag"] == f"--cuda-memory-pool-byte-size=0:{pool}"


# --- The engine-building glue, on the stand-in TensorRT ------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_engine_build_sets_flags_profile_and_fp32_layers(precision, fake_trt, tiny_graphs, dims, tmp_path):
    inputs, outputs = configs.encoder_tensors(dims, "float32")
    profile = gpu_target.encoder_profile(EngineOptions(precision=precision), 8, 8, 512)
    plan = tmp_path / "engine" / "model.plan"
    info = tensorrt_engine.build_encoder_engine(tiny_graphs["encoder"], plan, profile.shapes(inputs), precision)

    network, config, serialized = fake_trt.builds[-1]
    assert plan.read_bytes() == serialized
    assert [p.shapes for p in config.profiles] == [profile.shapes(inputs)]
    constrained = {layer.name for layer in network.layers if layer.precision is not None}
    if precision == "fp32":
        assert config.flags == set() and config.cleared == {_Flag10.TF32}
        assert constrained == set()
    else:
        assert config.flags == {_Flag10[precision.upper()], _Flag10.OBEY_PRECISION_CONSTRAINTS}
        floating = {_DataType.FLOAT, _DataType.HALF}
        expected = {
            layer.name
            for layer in network.layers
            if gpu_target.keeps_fp32(layer.name, precision) and any(t.dtype in floating for t in layer._outputs)
        }
        assert constrained == expected == set(info.fp32_layers)
        for layer in network.layers:
            if layer.name in constrained:
                assert layer.precision is _DataType.FLOAT
                floats = [j for j, t in enumerate(layer._outputs) if t.dtype in floating]
                assert layer.output_types == dict.fromkeys(floats, _DataType.FLOAT)
    gpu_target.check_engine_io(info.io, inputs, outputs)
    assert info.tensorrt_version == "10.13.3.9" and info.network_layers == len(network.layers)


def test_engine_output_comes_in_the_serving_dtype(fake_trt, tiny_graphs, dims, tmp_path):
    inputs, outputs = configs.encoder_tensors(dims, "float16")
    shapes = gpu_target.encoder_profile(EngineOptions(), 8, 8, 512).shapes(inputs)
    info = tensorrt_engine.build_encoder_engine(tiny_graphs["encoder"], tmp_path / "p", shapes, "bf16", "float16")
    assert [t.dtype for t in info.io if not t.is_input] == ["HALF"]
    gpu_target.check_engine_io(info.io, inputs, outputs)
    with pytest.raises(BuildError, match="encoder_hidden_states': the engine has HALF"):
        gpu_target.check_engine_io(info.io, *configs.encoder_tensors(dims, "float32"))


def test_engine_build_failures_are_build_errors(monkeypatch, tiny_graphs, dims, tmp_path):
    shapes = gpu_target.encoder_profile(EngineOptions(), 8, 8, 512).shapes(configs.encoder_tensors(dims, "float32")[0])
    encoder = tiny_graphs["encoder"]

    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(parse_errors=("In node 3: unsupported op",)))
    with pytest.raises(BuildError, match=r"TensorRT cannot parse encoder\.onnx: In node 3: unsupported op"):
        tensorrt_engine.build_encoder_engine(encoder, tmp_path / "p", shapes, "bf16")

    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(build_fails=True))
    with pytest.raises(BuildError, match="could not build the encoder engine"):
        tensorrt_engine.build_encoder_engine(encoder, tmp_path / "p", shapes, "bf16")
    assert not (tmp_path / "p").exists()

    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT())
    with pytest.raises(BuildError, match="the profile names inputs"):
        tensorrt_engine.build_encoder_engine(encoder, tmp_path / "p", {"input_ids": shapes["input_ids"]}, "bf16")


def test_fp32_policy_edge_cases_on_the_stand_in(fake_trt, monkeypatch, tiny_graphs, dims, tmp_path):
    shapes = gpu_target.encoder_profile(EngineOptions(), 8, 8, 512).shapes(configs.encoder_tensors(dims, "float32")[0])
    encoder = tiny_graphs["encoder"]
    # Every layer chosen: those with only integer outputs (shape arithmetic) are left unconstrained.
    monkeypatch.setattr(tensorrt_engine, "keeps_fp32", lambda name, precision: True)
    info = tensorrt_engine.build_encoder_engine(encoder, tmp_path / "a", shapes, "fp16")
    network = fake_trt.builds[-1][0]
    integer_only = [
        layer
        for layer in network.layers
        if all(t.dtype not in {_DataType.FLOAT, _DataType.HALF} for t in layer._outputs)
    ]
    assert integer_only and all(layer.precision is None for layer in integer_only)
    assert len(info.fp32_layers) == len(network.layers) - len(integer_only)
    # No layer chosen means the export's node names changed: refuse rather than risk an overflow.
    monkeypatch.setattr(tensorrt_engine, "keeps_fp32", lambda name, precision: False)
    with pytest.raises(BuildError, match="no encoder layer matched the fp32 policy"):
        tensorrt_engine.build_encoder_engine(encoder, tmp_path / "b", shapes, "bf16")
    with pytest.raises(BuildError, match="--engine-precision int8: use one of bf16, fp16, fp32"):
        tensorrt_engine.require_tensorrt("int8")
    monkeypatch.setattr(fake_trt.Runtime, "deserialize_cuda_engine", lambda self, plan: None)
    with pytest.raises(BuildError, match="cannot load back"):
        tensorrt_engine.build_encoder_engine(encoder, tmp_path / "c", shapes, "fp32")


def test_tensorrt_versions_that_cannot_build_are_refused_early(monkeypatch):
    eleven = FakeTensorRT(version="11.4.0.106", flags=_Flag11)
    monkeypatch.setitem(sys.modules, "tensorrt", eleven)
    for precision in ("bf16", "fp16"):
        with pytest.raises(BuildError, match=r"strongly typed networks only\): use --engine-precision fp32"):
            tensorrt_engine.require_tensorrt(precision)
    assert tensorrt_engine.require_tensorrt("fp32") is eleven
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(version="8.6.1"))
    with pytest.raises(BuildError, match=r"TensorRT 8\.6\.1 is too old"):
        tensorrt_engine.require_tensorrt("bf16")


def test_without_tensorrt_a_gpu_build_says_what_to_install_before_exporting(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, as on a machine without it
    with pytest.raises(BuildError, match=r"TensorRT, which is not installed here: .*pip install 't5-triton\[gpu\]'"):
        build(BuildOptions(model="random-tiny", output=tmp_path / "out", target="gpu"), Console(quiet=True))
    assert list(tmp_path.iterdir()) == []  # refused before the output, the staging folder or the export


def test_gpu_only_options_are_refused_where_they_do_not_apply(tmp_path, capsys):
    with pytest.raises(BuildError, match="--precision int8 is for the cpu target"):
        build(BuildOptions(model="random-tiny", output=tmp_path / "a", target="gpu", precision="int8"))
    with pytest.raises(BuildError, match="are for --target gpu"):
        build(BuildOptions(model="random-tiny", output=tmp_path / "b", engine=EngineOptions(precision="fp16")))
    args = ["build", "--model", "random-tiny", "--output", str(tmp_path / "c")]
    assert main([*args, "--encoder-batch", "1:2:8", "--engine-precision", "fp32"]) == 2
    assert "--engine-precision, --encoder-batch: only for --target gpu" in capsys.readouterr().err
    assert main([*args, "--target", "gpu", "--encoder-tokens", "1:64:32"]) == 2
    assert "--encoder-tokens 1:64:32: needs 1 <= MIN <= OPT <= MAX" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# --- The whole gpu build, TensorRT stood in for ----------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_build(tmp_path_factory):
    """random-tiny built with --target gpu; only TensorRT (and the engine's CUDA measurement) stood in for."""
    fake = FakeTensorRT()
    output = tmp_path_factory.mktemp("repos") / "gpu"
    measured = CheckResult("TensorRT encoder vs ONNX fp32 (stand-in: needs CUDA)", True, "not run here")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "tensorrt", fake)
        patch.setattr(tensorrt_engine, "check_encoder_engine", lambda *args: [measured])
        # serving.target left "cpu": the build's --target decides
        report = build(BuildOptions(model="random-tiny", output=output, target="gpu"), Console(quiet=True))
    return output, report, fake


def _config(repo: Path, name: str) -> model_config_pb2.ModelConfig:
    text = (repo / name / "config.pbtxt").read_text()
    assert "$" not in text
    return configs.parse_config(text, name)


def test_gpu_repository_layout(gpu_build):
    repo, _, fake = gpu_build
    assert (repo / "t5_encoder/1/model.plan").read_bytes() == fake.builds[-1][2]
    assert sorted(p.name for p in (repo / "t5_encoder/1").iterdir()) == ["model.plan"]
    assert sorted(p.name for p in (repo / "t5_decoder/1").iterdir()) == ["model.onnx"]
    assert (repo / "t5_generate/1/model.py").is_file()
    assert (repo / "t5_generate/1/tokenizer/tokenizer.json").is_file()
    assert not list(repo.rglob(".scratch"))


def test_gpu_configs_parse_and_put_every_model_on_the_gpu(gpu_build):
    repo = gpu_build[0]
    encoder = _config(repo, "t5_encoder")
    assert encoder.platform == "tensorrt_plan" and encoder.default_model_filename == "model.plan"
    assert encoder.max_batch_size == 0
    assert [g.kind for g in encoder.instance_group] == [KIND_GPU]

    decoder = _config(repo, "t5_decoder")
    assert decoder.backend == "onnxruntime" and decoder.default_model_filename == "model.onnx"
    assert [g.kind for g in decoder.instance_group] == [KIND_GPU]
    [accelerator] = decoder.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "cuda" and dict(accelerator.parameters) == {"use_tf32": "0"}

    python_models = [_config(repo, d.name) for d in repo.iterdir() if d.name.startswith("t5_generate")]
    assert python_models
    for config in python_models:
        assert config.backend == "python"
        assert [g.kind for g in config.instance_group] == [KIND_GPU]
        assert config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"


_ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}


def _graph_tensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        v.name: (_ONNX_TO_TRITON[v.type.tensor_type.elem_type], list(_dims(v))) for v in [*graph.input, *graph.output]
    }


def _config_tensors(config) -> dict[str, tuple[str, list[int]]]:
    return {
        t.name: (model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in [*config.input, *config.output]
    }


def test_gpu_config_tensors_match_the_onnx_graphs(gpu_build, tiny_graphs):
    repo = gpu_build[0]
    assert _config_tensors(_config(repo, "t5_decoder")) == _graph_tensors(repo / "t5_decoder/1/model.onnx")
    # The engine is built from the exported encoder; its tensors were checked against this config at build.
    assert _config_tensors(_config(repo, "t5_encoder")) == _graph_tensors(tiny_graphs["encoder"])


def test_gpu_build_report(gpu_build):
    repo, report, _ = gpu_build
    assert json.loads((repo / "build_report.json").read_text()) == report
    assert report["target"] == "gpu"
    assert report["models"]["t5_encoder"] == "t5_encoder/1/model.plan"
    assert "t5_encoder/1/model.plan" in report["files"]
    gpu = report["gpu"]
    assert gpu["encoder"]["backend"] == "tensorrt" and gpu["encoder"]["precision"] == "bf16"
    assert gpu["encoder"]["profile"] == {"batch": "1:4:64", "tokens": "1:128:512"}
    assert gpu["encoder"]["fp32_layers"] > 0
    assert {t["name"] for t in gpu["encoder"]["io"]} == {"input_ids", "attention_mask", "encoder_hidden_states"}
    serving = spec.ServingSpec.load(repo / "t5_generate/1")
    assert gpu["cuda_memory"] == json.loads(json.dumps(gpu_target.cuda_pool_plan(serving, 1)))
    assert any(c["name"].startswith("TensorRT encoder") for c in report["checks"])
    assert all(c["passed"] for c in report["checks"])
    header = (repo / "t5_encoder/config.pbtxt").read_text()
    assert "(bf16)" in header and "TensorRT 10.13.3.9" in header and "inputs 1:4:64, tokens 1:128:512" in header


# --- scripts/parity.py, against the CPU server ------------------------------------------------------------


def _load_script(name: str, path: Path) -> types.ModuleType:
    """A file as a module, without putting its folder on sys.path (model_repository/ has module names
    that shadow ONNX Runtime's own)."""
    loaded = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def test_parity_script_fails_below_the_minimum(monkeypatch, capsys):
    script = _load_script("parity_script", ROOT / "scripts/parity.py")
    modes = {
        "greedy": {"inputs": 6, "equal_sequences": 5, "token_match_rate": 0.95, "transformers_s": 1.0, "served_s": 0.5}
    }
    monkeypatch.setattr(
        script, "compare", lambda args: {"model": "m", "device": "cuda", "max_new_tokens": 32, "modes": modes}
    )
    assert script.main(["--model", "m", "--min-token-match", "0.9"]) == 0
    assert script.main(["--model", "m"]) == 1
    captured = capsys.readouterr()
    assert "parity FAILED: token match below 1.0: greedy 0.950" in captured.err
    assert "5/6" in captured.out and "2.00x" in captured.out


@pytest.mark.server
def test_parity_script_finds_the_served_tokens_equal(server, tmp_path, capsys):
    # In process (the script's own imports cost seconds); the GPU run book runs it as a script.
    report = tmp_path / "parity.json"
    argv = ["--model", "random-tiny", "--url", server.grpc_url, "--device", "cpu", "--max-new-tokens", "12"]
    assert (
        _load_script("parity_script", ROOT / "scripts/parity.py").main([*argv, "--runs", "1", "--json", str(report)])
        == 0
    )
    captured = capsys.readouterr()
    assert "parity ok" in captured.err and "equal sequences" in captured.out
    parity = json.loads(report.read_text())
    for mode in ("greedy", "beam4"):
        assert parity["modes"][mode]["equal_sequences"] == parity["modes"][mode]["inputs"] == 6
        assert parity["modes"][mode]["token_match_rate"] == 1.0


# --- Needs CUDA ----------------------------------------------------------------------------------------


class _OnDevice:
    """A model call (encoder or merged decoder) computed by the export wrappers in torch, on the GPU.

    Records the inputs of every call that were not CUDA tensors: a host round trip between steps shows
    up as a CPU input on the next call.
    """

    def __init__(self, model, encoder: bool):
        from t5_triton.builder.export import CachedStepDecoderGraph, EncoderGraph, FirstStepDecoderGraph

        self.encoder = EncoderGraph(model).eval() if encoder else None
        self.first = FirstStepDecoderGraph(model).eval()
        self.cached = CachedStepDecoderGraph(model).eval()
        self.calls, self.off_device = 0, []

    def __call__(self, inputs: dict[str, torch.Tensor], outputs) -> dict[str, torch.Tensor]:
        self.calls += 1
        self.off_device += [f"call {self.calls}: {name}" for name, t in inputs.items() if not t.is_cuda]
        if self.encoder is not None:
            graph, names = self.encoder, (spec.ENCODER_HIDDEN_STATES,)
        elif bool(inputs[spec.USE_CACHE_BRANCH].item()):
            graph, names = self.cached, (spec.LOGITS, spec.NEW_SELF_KV)
        else:
            graph, names = self.first, spec.DECODER_OUTPUTS
        with torch.inference_mode():
            values = graph(**{name: inputs[name] for name in inspect.signature(graph.forward).parameters})
        values = values if isinstance(values, tuple) else (values,)
        result = dict(zip(names, values, strict=True))
        return {name: result[name] for name in outputs}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("num_beams", [1, 4])
def test_generate_keeps_every_step_on_the_gpu(tiny, num_beams):
    from t5_triton.model_repository.t5_runtime.generator import T5Generator
    from t5_triton.model_repository.t5_runtime.params import GenerationParams

    model = copy.deepcopy(tiny.model).to("cuda")
    dims = spec.ModelDims.from_hf(model.config, model.generation_config)
    encoder, decoder = _OnDevice(model, encoder=True), _OnDevice(model, encoder=False)
    texts = ["translate English to German: hi.", "summarize: a b c d e"]
    rows = [tiny.tokenizer(text).input_ids for text in texts]
    params = GenerationParams(max_new_tokens=10, num_beams=num_beams)
    output = T5Generator(encoder, decoder, dims, device="cuda")(rows, params)
    assert decoder.calls >= 2
    assert encoder.off_device == [] and decoder.off_device == [], "tensors came back to the host between steps"
    assert output.sequences.is_cuda and output.scores.is_cuda
    # The same tokens as transformers on the same GPU (the same modules compute both).
    from transformers import GenerationConfig

    from t5_triton.builder.verify import reference_generate

    batch = tiny.tokenizer(texts, return_tensors="pt", padding=True).to("cuda")
    config = GenerationConfig(
        decoder_start_token_id=dims.decoder_start_token_id,
        eos_token_id=dims.eos_token_id,
        pad_token_id=dims.pad_token_id,
        max_new_tokens=10,
        num_beams=num_beams,
        do_sample=False,
    )
    with torch.inference_mode():
        expected = reference_generate(model, batch, config)
    assert output.sequences.tolist() == expected.tolist()


def _fake_pb_utils(requests: list) -> types.ModuleType:
    """The parts of triton_python_backend_utils that bls.py uses, recording each request."""
    from torch.utils.dlpack import from_dlpack, to_dlpack

    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_MEMORY_GPU, pb.TRITONSERVER_MEMORY_CPU = 2, 0

    class Tensor:
        def __init__(self, name, array):
            self._name, self.value, self.via = name, torch.from_numpy(array), "numpy"

        @classmethod
        def from_dlpack(cls, name, capsule):
            tensor = cls.__new__(cls)
            tensor._name, tensor.value, tensor.via = name, from_dlpack(capsule), "dlpack"
            return tensor

        def name(self):
            return self._name

        def to_dlpack(self):
            return to_dlpack(self.value)

    class Response:
        def __init__(self, tensors):
            self.tensors = tensors

        def has_error(self):
            return False

        def output_tensors(self):
            return self.tensors

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs, **kwargs):
            self.inputs, self.outputs, self.kwargs = inputs, requested_output_names, kwargs
            requests.append(self)

        def exec(self):
            # The callee answers on the GPU, where preferred_memory asked for it.
            return Response([Tensor.from_dlpack(n, to_dlpack(torch.ones(2, device="cuda"))) for n in self.outputs])

    pb.Tensor, pb.InferenceRequest = Tensor, InferenceRequest
    pb.PreferredMemory = lambda kind, device: ("PreferredMemory", kind, device)
    return pb


@pytest.mark.gpu
@requires_cuda
def test_bls_calls_ask_for_gpu_memory_and_pass_dlpack(monkeypatch):
    requests = []
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils(requests))
    bls = _load_script("bls_under_test", ROOT / "model_repository/bls.py")
    model = bls.BlsModel("t5_decoder", torch.device("cuda", 0))
    past = torch.zeros(3, device="cuda")
    for _ in range(2):
        out = model({"past": past, "ids": torch.ones(1, dtype=torch.int64, device="cuda")}, ["logits"])
        assert out["logits"].is_cuda
    assert len(requests) == 2
    for request in requests:
        assert request.kwargs == {"preferred_memory": ("PreferredMemory", 2, 0)}
        assert [t.via for t in request.inputs] == ["dlpack", "dlpack"]
        assert all(t.value.is_cuda for t in request.inputs)
    assert requests[0].inputs[0] is requests[1].inputs[0]  # an unchanged input is sent once


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_real_tensorrt_engine_matches_the_onnx_encoder(precision, tiny, tiny_graphs, dims, tmp_path):
    if not _has_real_tensorrt():
        pytest.skip(f"needs TensorRT: {tensorrt_engine.INSTALL_HINT}")
    inputs, outputs = configs.encoder_tensors(dims, "float32")
    profile = gpu_target.encoder_profile(EngineOptions(precision=precision), 4, 2, 64)
    plan = tmp_path / "model.plan"
    info = tensorrt_engine.build_encoder_engine(tiny_graphs["encoder"], plan, profile.shapes(inputs), precision)
    gpu_target.check_engine_io(info.io, inputs, outputs)
    checks = tensorrt_engine.check_encoder_engine(plan, tiny_graphs["encoder"], dims.vocab_size, profile, precision)
    assert checks and all(c.passed for c in checks), [c.detail for c in checks]


def _ngc_container_missing() -> str | None:
    if not HAS_CUDA:
        return "needs a CUDA GPU; this machine has none"
    if not _has_real_tensorrt():
        return "needs TensorRT (the NGC container + scripts/gpu_check.sh install it)"
    native = shutil.which("tritonserver")
    backends = Path("/opt/tritonserver/backends")
    if native is None or not (backends / "tensorrt").is_dir() or not (backends / "onnxruntime").is_dir():
        return "needs tritonserver with the tensorrt and onnxruntime backends (the NGC Triton container)"
    return None


@pytest.mark.gpu
@pytest.mark.server
@pytest.mark.slow
def test_served_gpu_repository_equals_transformers(tmp_path):
    missing = _ngc_container_missing()
    if missing:
        pytest.skip(missing)
    from t5_triton.server import Ports, TritonServer

    repo = tmp_path / "repo"
    options = BuildOptions(model="random-tiny", output=repo, target="gpu", engine=EngineOptions(precision="fp32"))
    report = build(options, Console(quiet=True))
    pool = report["gpu"]["cuda_memory"]["tritonserver_flag"]
    with TritonServer(repo, Ports.free(), log_file=tmp_path / "server.log", extra_args=(pool,)) as server:
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts/parity.py"), "--model", "random-tiny", "--url", server.grpc_url],
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
