"""The one place that names the tensors crossing model boundaries and describes their shapes.

The builder exports graphs with these names and writes configs from them; the serving code calls
the models with them. Sizes come from the Hugging Face config (`ModelDims.from_hf_config`), never
from constants. This module is copied into the model repository, so it imports only the standard
library.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# Encoder graph.
ENCODER_INPUT_IDS = "input_ids"  # int64 [batch, src_len]
ENCODER_ATTENTION_MASK = "attention_mask"  # int64 [batch, src_len], 1 = real token
ENCODER_HIDDEN_STATES = "encoder_hidden_states"  # float [batch, src_len, d_model]

# Merged decoder graph: one new token per call for every row.
USE_CACHE_BRANCH = "use_cache_branch"  # bool [1]; False on the first step
DECODER_INPUT_IDS = "decoder_input_ids"  # int64 [rows, 1]
# ENCODER_HIDDEN_STATES is a decoder input too: real on the first step, [rows, 0, d_model] after.
DECODER_ENCODER_MASK = "encoder_attention_mask"  # int64 [rows, src_len], every step
# Past K/V go in as one input per layer and kind, [rows, heads, len, d_kv] each: the caller keeps them packed
# ([layers, 2, rows, heads, len, d_kv]) and passes views, which ONNX Runtime reads in place, where slicing one
# packed input inside the graph would copy all of it on every step. Past length 0 on the first step.
PAST_SELF_KV = "past_self"  # names: past_self_{layer}_key, past_self_{layer}_value
CROSS_KV = "cross"  # cross_{layer}_key, cross_{layer}_value: [rows, heads, src_len, d_kv]; empty on step 1
# int64 [rows, past_len + 1], 1 = a real position (the last is the new token). Rows whose pasts differ
# in length share one call with their pasts left-padded: T5's relative position bias depends only on
# key - query, which left padding keeps. Read by the cached branch only.
DECODER_SELF_MASK = "decoder_attention_mask"
LOGITS = "logits"  # float32 [rows, vocab] for the new position only
NEW_SELF_KV = "new_self_kv"  # float [layers, 2, rows, heads, 1, d_kv]: only the new position
NEW_CROSS_KV = "new_cross_kv"  # float [layers, 2, rows, heads, src_len, d_kv] on step 1, empty after
DECODER_OUTPUTS = (LOGITS, NEW_SELF_KV, NEW_CROSS_KV)


def layer_kv_names(prefix: str, layers: int) -> tuple[str, ...]:
    """The per-layer inputs of one packed K/V tensor, in packed order (layer, then key/value)."""
    return tuple(f"{prefix}_{layer}_{kind}" for layer in range(layers) for kind in ("key", "value"))


def layer_kv_feeds(prefix: str, packed):
    """Packed [layers, 2, ...] K/V (torch or numpy) -> {input name: view of one layer's K or V}."""
    names = layer_kv_names(prefix, packed.shape[0])
    return {name: packed[index // 2, index % 2] for index, name in enumerate(names)}


def decoder_input_names(layers: int) -> tuple[str, ...]:
    return (
        USE_CACHE_BRANCH,
        DECODER_INPUT_IDS,
        ENCODER_HIDDEN_STATES,
        DECODER_ENCODER_MASK,
        *layer_kv_names(PAST_SELF_KV, layers),
        *layer_kv_names(CROSS_KV, layers),
        DECODER_SELF_MASK,
    )


# Axis of the sequence inside packed K/V tensors, and of the rows (batch x beams).
KV_ROW_AXIS = 2
KV_SEQ_AXIS = 4

SPEC_FILE = "t5_spec.json"


@dataclass(frozen=True)
class ModelDims:
    """Sizes and special tokens of one T5 checkpoint, as the serving code needs them."""

    d_model: int
    d_kv: int
    num_heads: int
    num_encoder_layers: int
    num_decoder_layers: int
    vocab_size: int
    decoder_start_token_id: int
    eos_token_id: int
    pad_token_id: int

    @classmethod
    def from_hf(cls, config, generation_config=None) -> ModelDims:
        """From a transformers `T5Config` and, where it has them, its `GenerationConfig`.

        transformers 5 keeps the decoder start token in the generation config; T5 starts with pad.
        """

        def token(name: str) -> int | None:
            value = getattr(generation_config, name, None)
            if value is None:
                value = getattr(config, name, None)
            return value[0] if isinstance(value, list) else value

        start = token("decoder_start_token_id")
        return cls(
            d_model=config.d_model,
            d_kv=config.d_kv,
            num_heads=config.num_heads,
            num_encoder_layers=config.num_layers,
            num_decoder_layers=config.num_decoder_layers,
            vocab_size=config.vocab_size,
            decoder_start_token_id=config.pad_token_id if start is None else start,
            eos_token_id=token("eos_token_id"),
            pad_token_id=token("pad_token_id"),
        )

    def kv_shape(self, rows: int, length: int) -> tuple[int, ...]:
        return (self.num_decoder_layers, 2, rows, self.num_heads, length, self.d_kv)


@dataclass(frozen=True)
class ServingSpec:
    """What the builder fixed and the serving code enforces: sizes, limits, tensor dtype."""

    dims: ModelDims
    float_dtype: str  # "float32" | "float16" | "bfloat16": dtype of hidden states and K/V
    max_input_tokens: int
    max_new_tokens: int  # the largest a request may ask for
    default_max_new_tokens: int
    max_num_beams: int
    max_batch_size: int

    def save(self, directory: Path) -> Path:
        path = Path(directory) / SPEC_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> ServingSpec:
        raw = json.loads((Path(directory) / SPEC_FILE).read_text())
        return cls(dims=ModelDims(**raw.pop("dims")), **raw)
