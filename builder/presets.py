"""Offline "preset" T5 checkpoints: seeded random weights plus an offline tokenizer, no download.

A plain random T5 generates degenerate text, which would let tests pass vacuously, so the random init is
reshaped (architecture unchanged) before saving:

* Self-repetition. The residual stream carries the last token's embedding into the tied LM head, and with
  the final layer-norm weights all 1 that token's logit is ~|e|^2, so it wins every step. The decoder's
  final layer-norm weights are drawn from N(0, 1) instead, shifted to a slightly negative mean so tokens
  already in the residual stream score low.
* Hub tokens. ReLU/GELU activations are mostly positive, so every feed-forward layer adds a roughly
  constant vector, and the few tokens aligned with it win everywhere. Centering each output row of the
  feed-forward ``wo`` removes that constant.
* Short cycles. The init's relative position bias is ~N(0, 1/d_model), so attention is nearly uniform and
  the next token is a function of the last one, which cycles within a few steps. A bias of std
  ``position_bias_std`` makes each head look at particular offsets, so the next token depends on several
  earlier ones.
* Ending. A random EOS row is either never chosen or chosen at a random early step. Two residual channels
  of the decoder are reserved for a length clock instead: every input embedding but the start token (pad)
  carries a constant 1 in channel ``_SOURCE``; head 0 of the first decoder self-attention ignores content
  (zero query) and has a position-bias profile under which the non-start positions hold a share
  ``(t - 1) / (t - 1 + eos_half_life)`` of its attention at step t; it writes that share into channel
  ``_CLOCK``, which nothing else writes and only the EOS output row reads. So the EOS logit is its random
  part plus a term growing with length: most sequences end, at lengths that depend on the input.
* Model rows past the tokenizer's vocab (t5-small has 28, mT5 12) are zeroed: their logit is exactly 0,
  never the top one, so generated ids always decode.

Untied presets (t5 v1.1 / flan-t5 / mT5 style) get their own LM head, drawn with std ``d_model**-0.5`` so
that without the ``d_model**-0.5`` output rescale their logits have a tied head's scale, and with a zero pad
row: a tied head's pad row is the start token's embedding, a free one would let pad win. They save
``tie_word_embeddings: false`` like the real checkpoints, which is what tells ``T5Config`` not to rescale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    MT5Config,
    MT5ForConditionalGeneration,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.models.t5.modeling_t5 import T5Attention

from t5_triton.builder.offline_tokenizer import build_tokenizer

PAD_ID = 0
EOS_ID = 1

# Slightly negative, so the tokens already in the residual stream score low: no immediate repeats.
_FINAL_NORM_MEAN = -0.25

# Reserved decoder residual channels for the length clock (see module docstring).
_SOURCE = -2
_CLOCK = -1

# MT5 is T5's architecture under another model_type; its model class never rescales the decoder output.
Seq2SeqLM = T5ForConditionalGeneration | MT5ForConditionalGeneration
_ARCHITECTURES: dict[str, tuple[type[T5Config | MT5Config], type[Seq2SeqLM]]] = {
    "t5": (T5Config, T5ForConditionalGeneration),
    "mt5": (MT5Config, MT5ForConditionalGeneration),
}


@dataclass(frozen=True)
class Preset:
    """A T5-family architecture, its tokenizer size, the seed, and the knobs that keep generation lively."""

    vocab_size: int
    d_model: int
    d_kv: int
    num_heads: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    feed_forward_proj: str
    tie_word_embeddings: bool
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    tokenizer_vocab_size: int
    num_extra_ids: int
    seed: int
    position_bias_std: float = 4.0
    eos_half_life: float = 8.0
    eos_boost: float = 8.0
    model_type: str = "t5"

    def config(self) -> T5Config | MT5Config:
        config_class, _ = _ARCHITECTURES[self.model_type]
        return config_class(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            d_kv=self.d_kv,
            num_heads=self.num_heads,
            d_ff=self.d_ff,
            num_layers=self.num_layers,
            num_decoder_layers=self.num_decoder_layers,
            feed_forward_proj=self.feed_forward_proj,
            tie_word_embeddings=self.tie_word_embeddings,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance,
            decoder_start_token_id=PAD_ID,
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
        )


PRESETS: dict[str, Preset] = {
    # Encoder and decoder depths differ on purpose: code must not assume num_layers == num_decoder_layers.
    "random-tiny": Preset(
        vocab_size=1000,
        d_model=64,
        d_kv=16,
        num_heads=4,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=3,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        tokenizer_vocab_size=1000,
        num_extra_ids=8,
        seed=3,
    ),
    # t5-small's exact architecture; like the real one, the model vocab (32128) exceeds the tokenizer's (32100).
    "random-t5-small": Preset(
        vocab_size=32128,
        d_model=512,
        d_kv=64,
        num_heads=8,
        d_ff=2048,
        num_layers=6,
        num_decoder_layers=6,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        tokenizer_vocab_size=32100,
        num_extra_ids=100,
        seed=2,
        eos_boost=18.0,
    ),
    # t5 v1.1 / flan-t5 style: gated-gelu, untied head without the output rescale, heads narrower than the
    # model (num_heads * d_kv != d_model), an encoder deeper than the decoder, model vocab past the tokenizer's.
    "random-flan-t5-tiny": Preset(
        vocab_size=1024,
        d_model=64,
        d_kv=8,
        num_heads=6,
        d_ff=128,
        num_layers=3,
        num_decoder_layers=2,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        tokenizer_vocab_size=1000,
        num_extra_ids=8,
        seed=0,
    ),
    # mT5 style at tiny width: model_type "mt5", mT5's vocab sizes (model 250112, tokenizer 250100), gated-gelu,
    # untied head without rescale, heads wider than the model.
    "random-mt5-tiny": Preset(
        vocab_size=250112,
        d_model=64,
        d_kv=16,
        num_heads=6,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        tokenizer_vocab_size=250100,
        num_extra_ids=100,
        seed=0,
        # The EOS logit has to beat the best of 250k random ones, not of 1000.
        eos_boost=10.0,
        model_type="mt5",
    ),
}


def is_preset(name: str) -> bool:
    return name in PRESETS


def make_preset(name: str, directory: Path) -> Path:
    """Save preset ``name`` (model, generation config, tokenizer) into ``directory`` and return it."""
    model, tokenizer = load_preset(name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_preset(name: str) -> tuple[Seq2SeqLM, PreTrainedTokenizerFast]:
    """Build preset ``name`` in memory: eval mode, eager attention."""
    if not is_preset(name):
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    tokenizer = build_tokenizer(preset.tokenizer_vocab_size, preset.num_extra_ids)
    return _build_model(preset), tokenizer


def _build_model(preset: Preset) -> Seq2SeqLM:
    _, model_class = _ARCHITECTURES[preset.model_type]
    # fork_rng: the seed fixes the weights without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.seed)
        model = model_class._from_config(preset.config(), attn_implementation="eager")
        generator = torch.Generator().manual_seed(preset.seed)
        with torch.no_grad():
            if not preset.tie_word_embeddings:
                _untie_lm_head(model, generator)
            _enliven(model, preset, generator)
    model.generation_config = GenerationConfig(decoder_start_token_id=PAD_ID, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    return model.eval()


def _untie_lm_head(model: Seq2SeqLM, generator: torch.Generator) -> None:
    """Give the LM head its own weights (see the module docstring)."""
    # transformers 5 ties lm_head to the embedding even for tie_word_embeddings=False configs.
    shape = model.shared.weight.shape
    model.lm_head.weight = torch.nn.Parameter(torch.randn(shape, generator=generator) * shape[1] ** -0.5)
    model.lm_head.weight[PAD_ID] = 0.0
    # The configs force the flag back to True; saved False, T5Config loads the folder without the rescale.
    model.config.tie_word_embeddings = False


def _enliven(model: Seq2SeqLM, preset: Preset, generator: torch.Generator) -> None:
    """Reshape the random init so generation is not degenerate (see the module docstring)."""
    final_norm = model.decoder.final_layer_norm.weight
    final_norm.copy_(torch.randn(final_norm.shape, generator=generator))
    final_norm.sub_(final_norm.mean() - _FINAL_NORM_MEAN)
    bias = model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    bias.copy_(torch.randn(bias.shape, generator=generator) * preset.position_bias_std)
    for block in (*model.encoder.block, *model.decoder.block):
        feed_forward = block.layer[-1].DenseReluDense.wo.weight
        feed_forward.sub_(feed_forward.mean(dim=1, keepdim=True))
    _install_eos_clock(model, preset)
    _zero_unused_rows(model, preset.tokenizer_vocab_size)


def _zero_unused_rows(model: Seq2SeqLM, tokenizer_vocab_size: int) -> None:
    model.shared.weight[tokenizer_vocab_size:] = 0.0
    model.lm_head.weight[tokenizer_vocab_size:] = 0.0


def _install_eos_clock(model: Seq2SeqLM, preset: Preset) -> None:
    embedding = model.shared.weight
    embedding[:, _SOURCE] = 1.0
    embedding[PAD_ID, _SOURCE] = 0.0
    embedding[:, _CLOCK] = 0.0
    for block in model.decoder.block:
        for layer in block.layer:
            _output_weight(layer)[_CLOCK] = 0.0

    attention = model.decoder.block[0].layer[0].SelfAttention
    head = slice(0, preset.d_kv)
    attention.relative_attention_bias.weight[:, 0] = _ramp_bias(preset)
    attention.q.weight[head] = 0.0
    attention.v.weight[head] = 0.0
    attention.v.weight[0, _SOURCE] = 1.0
    attention.o.weight[:, head] = 0.0
    attention.o.weight[_CLOCK, 0] = 1.0

    # The final norm scales the clock into the EOS logit (the EOS row undoes the tied-head rescale) and
    # hides the source channel, which would shift every live token against pad and the unused rows.
    model.decoder.final_layer_norm.weight[_CLOCK] = preset.eos_boost
    model.decoder.final_layer_norm.weight[_SOURCE] = 0.0
    # MT5Config has no scale_decoder_outputs: MT5 never rescales.
    output_scale = preset.d_model**-0.5 if getattr(model.config, "scale_decoder_outputs", False) else 1.0
    model.lm_head.weight[:, _CLOCK] = 0.0
    model.lm_head.weight[EOS_ID, _CLOCK] = 1.0 / output_scale


def _output_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The matrix through which a decoder sublayer writes into the residual stream."""
    for name in ("SelfAttention", "EncDecAttention"):
        if hasattr(layer, name):
            return getattr(layer, name).o.weight
    return layer.DenseReluDense.wo.weight


def _ramp_bias(preset: Preset) -> torch.Tensor:
    """Position bias under which the start token gets a share h / (h + t - 1) of attention at step t.

    Weights c_k = (h)_k / k! (rising factorial) at distance k have prefix sums S_t = (h + 1)_{t-1} / (t-1)!,
    so the start token, at distance t - 1, gets c_{t-1} / S_t = h / (h + t - 1). Distances that share a
    log-spaced bucket share the bias of the bucket's nearest distance, which only approximates this.
    """
    h = preset.eos_half_life
    distance = torch.arange(preset.relative_attention_max_distance)
    bucket = T5Attention._relative_position_bucket(
        -distance,
        bidirectional=False,
        num_buckets=preset.relative_attention_num_buckets,
        max_distance=preset.relative_attention_max_distance,
    )
    log_weight = torch.lgamma(distance + h) - math.lgamma(h) - torch.lgamma(distance + 1.0)
    bias = torch.zeros(preset.relative_attention_num_buckets)
    # For h > 1 log_weight grows with distance, so amin keeps each bucket's nearest distance.
    return bias.scatter_reduce(0, bucket, log_weight, reduce="amin", include_self=False)
