"""The gpu target's decisions that need no GPU, so the tests check them on any machine.

- the encoder engine's optimization profile (`--encoder-batch`, `--encoder-tokens`: MIN:OPT:MAX),
  checked against the serving limits it must cover;
- which encoder layers TensorRT must keep in fp32 (`keeps_fp32`), and why;
- the check of a built engine's input and output tensors against the encoder's `config.pbtxt`;
- the CUDA memory one decoder call moves through Triton (`cuda_pool_plan`), for
  `--cuda-memory-pool-byte-size`.

Everything that calls TensorRT is in `tensorrt_engine.py`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from t5_triton.model_repository.t5_runtime import spec

from .configs import TensorConfig
from .errors import BuildError

ENGINE_PRECISIONS = ("bf16", "fp16", "fp32")
DEFAULT_ENGINE_PRECISION = "bf16"  # fp32's exponent range: T5's large activations cannot overflow it

# Profile opt points when the flags do not set them: a typical request (a sentence or a short paragraph,
# a few inputs at once). TensorRT picks its kernels for opt; any shape within min..max still runs.
DEFAULT_OPT_BATCH = 4
DEFAULT_OPT_TOKENS = 128


@dataclass(frozen=True)
class ShapeRange:
    """One dynamic axis of an optimization profile."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str, flag: str) -> ShapeRange:
        parts = text.split(":")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise BuildError(f"{flag} takes MIN:OPT:MAX, three whole numbers (e.g. 1:4:8), got {text!r}")
        low, opt, high = (int(p) for p in parts)
        if not 1 <= low <= opt <= high:
            raise BuildError(f"{flag} {text}: needs 1 <= MIN <= OPT <= MAX")
        return cls(low, opt, high)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


@dataclass(frozen=True)
class EngineOptions:
    """The `build` flags of the TensorRT encoder (gpu target)."""

    precision: str = DEFAULT_ENGINE_PRECISION
    batch: ShapeRange | None = None  # None: 1:opt:max_encoder_inputs(...)
    tokens: ShapeRange | None = None  # None: 1:opt:--max-input-tokens


@dataclass(frozen=True)
class EncoderProfile:
    """Inputs per encoder call (batch) x tokens per input: every encoder input is [batch, tokens]."""

    batch: ShapeRange
    tokens: ShapeRange

    def shapes(self, inputs: Iterable[TensorConfig]) -> dict[str, tuple[tuple[int, int], ...]]:
        """input name -> (min, opt, max) shapes, as `IOptimizationProfile.set_shape` takes them."""
        shapes = {}
        for tensor in inputs:
            if len(tensor.dims) != 2:
                raise BuildError(f"encoder input {tensor.name} has dims {list(tensor.dims)}; the profile expects 2")
            b, t = self.batch, self.tokens
            shapes[tensor.name] = ((b.min, t.min), (b.opt, t.opt), (b.max, t.max))
        return shapes

    def as_dict(self) -> dict:
        return {"batch": str(self.batch), "tokens": str(self.tokens)}


def max_encoder_inputs(max_batch_size: int, max_num_beams: int) -> int:
    """The most inputs `t5_generate` encodes in one call.

    Its in-flight batching starts the requests that arrived together in one encoder call, up to
    max_batch_size x max_num_beams rows in flight; a greedy input is one row, so that many inputs.
    """
    return max_batch_size * max_num_beams


def encoder_profile(
    options: EngineOptions, max_batch_size: int, max_num_beams: int, max_input_tokens: int
) -> EncoderProfile:
    """The profile from the flags, or from the serving limits; it must cover those limits.

    A shape beyond the profile would fail in the encoder at serving time, so the build refuses it.
    """
    inputs = max_encoder_inputs(max_batch_size, max_num_beams)
    batch = options.batch or ShapeRange(1, min(DEFAULT_OPT_BATCH, inputs), inputs)
    tokens = options.tokens or ShapeRange(1, min(DEFAULT_OPT_TOKENS, max_input_tokens), max_input_tokens)
    if batch.max < inputs:
        raise BuildError(
            f"--encoder-batch {batch}: MAX {batch.max} is below {inputs}, the most inputs t5_generate encodes at "
            f"once (--max-batch-size {max_batch_size} x --max-num-beams {max_num_beams}: greedy requests that "
            "arrive together start together); raise MAX or lower those limits"
        )
    if tokens.max < max_input_tokens:
        raise BuildError(
            f"--encoder-tokens {tokens}: MAX {tokens.max} is below --max-input-tokens {max_input_tokens}, so long "
            "inputs would fail in the encoder; raise MAX or lower --max-input-tokens"
        )
    return EncoderProfile(batch, tokens)


def check_shapes(profile: EncoderProfile) -> list[tuple[int, int]]:
    """(inputs, tokens) the built engine is measured at: its opt point and each axis at MIN and MAX.

    Not MAX x MAX: the fp32 reference runs on the CPU, where 64 inputs of 512 tokens of a large
    checkpoint take minutes. At least 3 tokens where the profile allows: the check inputs pad the
    last row by 2 positions, and a row with no real token is not something `t5_generate` ever sends.
    """
    b, t = profile.batch, profile.tokens
    points = [(b.min, t.min), (b.opt, t.opt), (b.max, t.min), (b.min, t.max)]
    return list(dict.fromkeys((rows, max(tokens, min(3, t.max))) for rows, tokens in points))


def check_inputs(vocab_size: int, rows: int, tokens: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Encoder inputs to measure the engine with: random ids, the last row padded (when it has 3+ tokens)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, size=(rows, tokens), dtype=np.int64)
    mask = np.ones((rows, tokens), dtype=np.int64)
    if tokens >= 3:
        mask[-1, -2:] = 0
        ids[-1, -2:] = 0  # pad
    return {spec.ENCODER_INPUT_IDS: ids, spec.ENCODER_ATTENTION_MASK: mask}


# Which layers stay fp32. The patterns match the ONNX node names the export gives T5's encoder
# (`/encoder/block.3/layer.1/DenseReluDense/wo/MatMul`, ...); TensorRT's ONNX parser names its layers
# after them. T5's feed-forward output (`wo`) reaches ~1e5 in t5-large and bigger checkpoints, past
# fp16's 65504: transformers keeps `wo` in fp32 for that reason (`_keep_in_fp32_modules`). Its sum
# enters the residual stream, and the RMS norm squares the stream (fp16 overflows at |x| > 256). So:
# - fp16: `wo`, the residual adds, every RMS norm and the embedding lookup stay fp32; the attention
#   and the first feed-forward projection (most of the FLOPs after `wo`) run fp16.
# - bf16: nothing overflows (fp32's exponent range), so every matmul runs bf16; the residual adds and
#   the norms still stay fp32, because bf16's 8-bit mantissa would round the stream at every layer.
# - both: the additive attention mask, (1 - mask) * fp32's min, stays fp32: that constant is -inf in
#   fp16 and in bf16 (fp32's max rounds up past bf16's), and 0 * -inf is NaN for every real position.
# - fp32: no reduced precision at all (and no TF32).
_ALWAYS_FP32 = (
    re.compile(r"/block\.\d+/layer\.\d+/Add"),  # the residual add after each sub-layer
    re.compile(r"layer_norm/"),  # each block's RMS norms and the final one
    re.compile(r"/embed_tokens/"),
    re.compile(r"^/(Cast|Sub|Mul)"),  # the mask arithmetic: the only Cast/Sub/Mul outside /encoder/
)
_FEED_FORWARD_OUT = re.compile(r"/DenseReluDense/wo/")


def keeps_fp32(layer_name: str, precision: str) -> bool:
    """Whether TensorRT must run this encoder layer (named after its ONNX node) in fp32."""
    if precision == "fp32":
        return False
    if precision not in ENGINE_PRECISIONS:
        raise BuildError(f"--engine-precision {precision}: use one of {', '.join(ENGINE_PRECISIONS)}")
    if any(p.search(layer_name) for p in _ALWAYS_FP32):
        return True
    return precision == "fp16" and _FEED_FORWARD_OUT.search(layer_name) is not None


@dataclass(frozen=True)
class EngineTensor:
    """An input or output of a built engine, as TensorRT describes it."""

    name: str
    is_input: bool
    dtype: str  # TensorRT's DataType name: FLOAT, HALF, BF16, INT64, INT32, BOOL, ...
    shape: tuple[int, ...]  # -1 on dynamic axes

    def as_dict(self) -> dict:
        return {"name": self.name, "input": self.is_input, "dtype": self.dtype, "shape": list(self.shape)}


TRT_TO_TRITON = {
    "FLOAT": "TYPE_FP32",
    "HALF": "TYPE_FP16",
    "BF16": "TYPE_BF16",
    "INT64": "TYPE_INT64",
    "INT32": "TYPE_INT32",
    "INT8": "TYPE_INT8",
    "UINT8": "TYPE_UINT8",
    "BOOL": "TYPE_BOOL",
}


def check_engine_io(engine: list[EngineTensor], inputs: list[TensorConfig], outputs: list[TensorConfig]) -> None:
    """Raise `BuildError` listing every difference between the engine's tensors and the config's.

    Triton's TensorRT backend refuses to load a model whose config disagrees with its engine (e.g. an
    INT32 input where the config says TYPE_INT64, which TensorRT before 10 made of int64 ONNX inputs);
    the build finds out first and says which tensor.
    """
    problems = []
    for kind, expected, actual in (
        ("input", inputs, [t for t in engine if t.is_input]),
        ("output", outputs, [t for t in engine if not t.is_input]),
    ):
        found = {t.name: t for t in actual}
        for config in expected:
            tensor = found.pop(config.name, None)
            if tensor is None:
                problems.append(f"config {kind} '{config.name}' is not an {kind} of the engine")
                continue
            triton_type = TRT_TO_TRITON.get(tensor.dtype, f"(no Triton type for {tensor.dtype})")
            if triton_type != config.data_type:
                engine_type = f"{tensor.dtype} ({triton_type})"
                problems.append(f"{kind} '{config.name}': the engine has {engine_type}, the config {config.data_type}")
            if tuple(tensor.shape) != tuple(config.dims):
                problems.append(
                    f"{kind} '{config.name}': the engine has dims {list(tensor.shape)}, the config {list(config.dims)}"
                )
        problems += [f"engine {kind} '{name}' is not in the config" for name in found]
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise BuildError(f"the TensorRT encoder engine does not match its config.pbtxt:\n{listed}")


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_MIB = 1 << 20
# Room above one decoder call: the encoder call, the allocator's alignment, the small tensors.
POOL_HEADROOM = 1.25


def decoder_call_bytes(serving: spec.ServingSpec, rows: int) -> dict[str, int]:
    """Bytes of one decoder call's inputs and outputs at its largest: the longest inputs, the last step.

    At the last of `max_new_tokens` steps the self-attention past holds max_new_tokens - 1 positions.
    """
    dims, width = serving.dims, DTYPE_BYTES[serving.float_dtype]
    src, past = serving.max_input_tokens, serving.max_new_tokens - 1
    parts = {
        spec.PAST_SELF_KV: math.prod(dims.kv_shape(rows, past)) * width,
        spec.CROSS_KV: math.prod(dims.kv_shape(rows, src)) * width,
        spec.NEW_SELF_KV: math.prod(dims.kv_shape(rows, 1)) * width,
        spec.LOGITS: rows * dims.vocab_size * 4,  # always fp32
        "masks and token ids (int64)": rows * (src + past + 1 + 1) * 8,
    }
    return {**parts, "total": sum(parts.values())}


def cuda_pool_plan(serving: spec.ServingSpec, generate_instances: int) -> dict:
    """What `--cuda-memory-pool-byte-size` must hold so the KV cache crosses BLS in GPU memory.

    The python backend passes GPU tensors between `t5_generate` and Triton through that pool; a call
    whose tensors do not fit falls back to slower transfers. Every `t5_generate` instance may have a
    decoder call in flight at once; a call carries up to max_batch_size inputs x max_num_beams rows.
    """
    rows = serving.max_batch_size * serving.max_num_beams
    call = decoder_call_bytes(serving, rows)
    pool = math.ceil(call["total"] * generate_instances * POOL_HEADROOM / _MIB) * _MIB
    return {
        "rows_per_call": rows,
        "decoder_call_bytes": call,
        "generate_instances": generate_instances,
        "cuda_memory_pool_byte_size": pool,
        "tritonserver_flag": f"--cuda-memory-pool-byte-size=0:{pool}",
    }
