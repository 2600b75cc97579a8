"""`config.pbtxt` files: tensor lists from the tensor spec, filled into templates, parsed back.

Templates use strict substitution (a missing value is an error, never an empty or leftover
placeholder), and every rendered config is parsed with Triton's own `ModelConfig` protobuf before
it is written, so a typo fails the build instead of the server start.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from string import Template

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from t5_triton.model_repository.t5_runtime import request, spec

from .errors import BuildError

_TEMPLATES = files("t5_triton.model_repository") / "templates"


@dataclass(frozen=True)
class TensorConfig:
    name: str
    data_type: str  # Triton's name: TYPE_FP32, TYPE_INT64, TYPE_STRING, ...
    dims: tuple[int, ...]
    optional: bool = False
    ragged: bool = False

    def render(self) -> str:
        fields = [f'name: "{self.name}"', f"data_type: {self.data_type}", f"dims: {list(self.dims)}"]
        if self.optional:
            fields.append("optional: true")
        if self.ragged:
            fields.append("allow_ragged_batch: true")
        return "{ " + " ".join(fields) + " }"


def tensor_list(key: str, tensors: list[TensorConfig]) -> str:
    body = ",\n".join("  " + t.render() for t in tensors)
    return f"{key} [\n{body}\n]"


TRITON_FLOAT = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}


def encoder_tensors(dims: spec.ModelDims, float_dtype: str) -> tuple[list[TensorConfig], list[TensorConfig]]:
    fp = TRITON_FLOAT[float_dtype]
    inputs = [
        TensorConfig(spec.ENCODER_INPUT_IDS, "TYPE_INT64", (-1, -1)),
        TensorConfig(spec.ENCODER_ATTENTION_MASK, "TYPE_INT64", (-1, -1)),
    ]
    outputs = [TensorConfig(spec.ENCODER_HIDDEN_STATES, fp, (-1, -1, dims.d_model))]
    return inputs, outputs


def decoder_tensors(dims: spec.ModelDims, float_dtype: str) -> tuple[list[TensorConfig], list[TensorConfig]]:
    fp = TRITON_FLOAT[float_dtype]
    layer_kv = (-1, dims.num_heads, -1, dims.d_kv)
    inputs = [
        TensorConfig(spec.USE_CACHE_BRANCH, "TYPE_BOOL", (1,)),
        TensorConfig(spec.DECODER_INPUT_IDS, "TYPE_INT64", (-1, 1)),
        TensorConfig(spec.ENCODER_HIDDEN_STATES, fp, (-1, -1, dims.d_model)),
        TensorConfig(spec.DECODER_ENCODER_MASK, "TYPE_INT64", (-1, -1)),
        *(TensorConfig(name, fp, layer_kv) for name in spec.layer_kv_names(spec.PAST_SELF_KV, dims.num_decoder_layers)),
        *(TensorConfig(name, fp, layer_kv) for name in spec.layer_kv_names(spec.CROSS_KV, dims.num_decoder_layers)),
        TensorConfig(spec.DECODER_SELF_MASK, "TYPE_INT64", (-1, -1)),
    ]
    outputs = [
        TensorConfig(spec.LOGITS, "TYPE_FP32", (-1, dims.vocab_size)),
        TensorConfig(spec.NEW_SELF_KV, fp, dims.kv_shape(-1, 1)),
        TensorConfig(spec.NEW_CROSS_KV, fp, (-1,) * 6),  # full on the first step, empty after
    ]
    return inputs, outputs


def generate_tensors() -> tuple[list[TensorConfig], list[TensorConfig]]:
    inputs = [
        TensorConfig(request.TEXT_INPUT, "TYPE_STRING", (1,), optional=True),
        TensorConfig(request.INPUT_IDS, "TYPE_INT32", (-1,), optional=True, ragged=True),
        *(
            TensorConfig(name, dtype, (1,), optional=True)
            for name, dtype in {**request.PARAMETER_TYPES, **request.OPTION_TYPES}.items()
        ),
    ]
    # Per input of the request: one entry per returned sequence.
    outputs = [
        TensorConfig(request.TEXT_OUTPUT, "TYPE_STRING", (-1,)),
        TensorConfig(request.OUTPUT_IDS, "TYPE_INT32", (-1, -1)),
        TensorConfig(request.SEQUENCE_SCORES, "TYPE_FP32", (-1,)),
    ]
    return inputs, outputs


def render_config(template: str, inputs: list[TensorConfig], outputs: list[TensorConfig], **values: object) -> str:
    """Fill `templates/<template>.pbtxt` and return the text after Triton's parser accepted it."""
    source = (_TEMPLATES / f"{template}.pbtxt").read_text()
    try:
        text = Template(source).substitute(
            inputs=tensor_list("input", inputs), outputs=tensor_list("output", outputs), **values
        )
    except (KeyError, ValueError) as err:
        raise BuildError(f"template {template}.pbtxt: no value for placeholder {err}") from err
    parse_config(text, origin=f"{template}.pbtxt")
    return text


def parse_config(text: str, origin: str) -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as err:
        raise BuildError(f"{origin} renders to an invalid Triton config: {err}") from err
    return config
