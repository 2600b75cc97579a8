"""Export a T5 checkpoint to ONNX: the encoder, the two decoder graphs the merge step joins, and the
decoder's cross-attention K/V projections on their own (`CrossKVGraph`).

The wrappers give the graphs the interface of `t5_runtime.spec`: past K/V in as one tensor per layer
and kind (views of the caller's packed cache, read in place), new K/V out packed, cross-attention K/V
computed once by the first-step graph and only read by the cache graph, logits for the new position only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache, T5ForConditionalGeneration

from t5_triton.model_repository.t5_runtime import spec

OPSET = 17


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[rows, len] 1/0 mask -> [rows, 1, 1, len] additive bias (0 keeps, dtype-min drops).

    A ready 4D mask makes transformers skip its own mask building, whose data-dependent shortcuts
    (an all-ones mask returns None) would otherwise be frozen into a traced graph.
    """
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _pack(cache: DynamicCache) -> torch.Tensor:
    """Cache layers -> [layers, 2, rows, heads, len, d_kv]."""
    return torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers])


def _unpack(packed: torch.Tensor) -> DynamicCache:
    return DynamicCache([(packed[i, 0], packed[i, 1]) for i in range(packed.shape[0])])


class EncoderGraph(nn.Module):
    def __init__(self, model: T5ForConditionalGeneration):
        super().__init__()
        self.encoder = model.get_encoder()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        dtype = self.encoder.embed_tokens.weight.dtype
        out = self.encoder(input_ids=input_ids, attention_mask=additive_mask(attention_mask, dtype))
        return out.last_hidden_state


class _DecoderGraph(nn.Module):
    def __init__(self, model: T5ForConditionalGeneration):
        super().__init__()
        self.decoder = model.get_decoder()
        self.lm_head = model.lm_head
        # T5 with a tied head scales the decoder output by d_model**-0.5; MT5Config has no such field
        # because mT5 (untied) never does.
        scaled = getattr(model.config, "scale_decoder_outputs", False)
        self.output_scale = model.config.d_model**-0.5 if scaled else None
        self.register_buffer("zero_bias", model.lm_head.weight.new_zeros(model.lm_head.weight.shape[0]))

    def _run(self, decoder_input_ids, encoder_hidden_states, cross_mask, self_mask, cache):
        # Self-attention sees one new token over the whole past: no causal mask is needed, only which
        # past positions are real. A ready 4D mask keeps transformers' mask builder (and its tracing
        # shortcuts) out.
        out = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=self_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=cross_mask,
            past_key_values=cache,
            use_cache=True,
        )
        return self._logits(out.last_hidden_state[:, -1, :])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.output_scale is not None:
            hidden = hidden * self.output_scale
        # A 2D linear WITH bias exports as Gemm(transB=1) on the weight as stored (without one, as
        # MatMul on a folded transposed copy): a tied embedding then is stored once, not twice.
        logits = nn.functional.linear(hidden, self.lm_head.weight, self.zero_bias)
        return logits.float()


class FirstStepDecoderGraph(_DecoderGraph):
    """No past: reads the encoder states and computes the cross-attention K/V once."""

    def forward(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask):
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        cross_mask = additive_mask(encoder_attention_mask, encoder_hidden_states.dtype)
        no_padding = cross_mask.new_zeros((1, 1, 1, 1))  # the first step has no past
        logits = self._run(decoder_input_ids, encoder_hidden_states, cross_mask, no_padding, cache)
        return logits, _pack(cache.self_attention_cache), _pack(cache.cross_attention_cache)


class CachedStepReference(_DecoderGraph):
    """The cached step as transformers computes it (its cache concatenates the past with the new position):
    what the build checks the exported cached step against. Packed K/V in, K/V of the new position out."""

    def forward(self, decoder_input_ids, encoder_attention_mask, past_self_kv, cross_kv, decoder_attention_mask):
        cache = EncoderDecoderCache(_unpack(past_self_kv), _unpack(cross_kv))
        cross_mask = additive_mask(encoder_attention_mask, cross_kv.dtype)
        self_mask = additive_mask(decoder_attention_mask, cross_kv.dtype)
        # T5 only takes the cross-attention path when encoder states are given; with the cross cache
        # filled it never reads them, so any tensor will do as the placeholder.
        logits = self._run(decoder_input_ids, cross_mask, cross_mask, self_mask, cache)
        new_self_kv = _pack(cache.self_attention_cache)[:, :, :, :, -1:, :]
        return logits, new_self_kv


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[rows, 1, heads * d_kv] -> [rows, heads, 1, d_kv]."""
    return x.view(x.shape[0], 1, heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[rows, heads, 1, d_kv] -> [rows, 1, heads * d_kv] (heads x d_kv need not be d_model)."""
    return x.transpose(1, 2).reshape(x.shape[0], 1, -1)


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    return nn.functional.softmax(scores.float(), dim=-1).type_as(scores)


class CachedStepDecoderGraph(_DecoderGraph):
    """The cached step, exported: T5's decoder layers with attention that reads the past K/V where they are.

    transformers' cache concatenates the past with the new position in every layer (a copy of the whole
    cache per step); here the new key's score and value are added next to the past's instead, which is the
    same arithmetic. Past K/V come in per layer (`spec.layer_kv_names`) so the graph never slices them.
    The build checks this graph against `CachedStepReference`.
    """

    def __init__(self, model: T5ForConditionalGeneration):
        super().__init__(model)
        self.blocks = self.decoder.block
        self.heads = model.config.num_heads
        self.layers = len(self.blocks)

    def forward(self, decoder_input_ids, encoder_attention_mask, decoder_attention_mask, *layer_kv):
        past, cross = layer_kv[: 2 * self.layers], layer_kv[2 * self.layers :]
        dtype = past[0].dtype
        hidden = self.decoder.embed_tokens(decoder_input_ids)
        self_bias = self._self_position_bias(decoder_attention_mask.shape[1]) + additive_mask(
            decoder_attention_mask, dtype
        )
        cross_bias = additive_mask(encoder_attention_mask, dtype)
        new_kv = []
        for layer, block in enumerate(self.blocks):
            self_attention, cross_attention, feed_forward = block.layer
            attention = self_attention.SelfAttention
            normed = self_attention.layer_norm(hidden)
            q, k, v = (_heads(projection(normed), self.heads) for projection in (attention.q, attention.k, attention.v))
            past_k, past_v = past[2 * layer], past[2 * layer + 1]
            # T5 does not scale scores (its initialisation absorbs 1/sqrt(d_kv)).
            scores = torch.cat([q @ past_k.transpose(2, 3), (q * k).sum(-1, keepdim=True)], dim=-1) + self_bias
            weights = _softmax(scores)
            out = weights[..., :-1] @ past_v + weights[..., -1:] * v
            hidden = hidden + attention.o(_merge_heads(out))
            new_kv.append(torch.stack([k, v]))

            attention = cross_attention.EncDecAttention
            q = _heads(attention.q(cross_attention.layer_norm(hidden)), self.heads)
            weights = _softmax(q @ cross[2 * layer].transpose(2, 3) + cross_bias)
            out = weights @ cross[2 * layer + 1]
            hidden = hidden + attention.o(_merge_heads(out))
            hidden = feed_forward(hidden)
        hidden = self.decoder.final_layer_norm(hidden)
        return self._logits(hidden[:, -1, :]), torch.stack(new_kv)

    def _self_position_bias(self, length: int) -> torch.Tensor:
        """[1, heads, 1, length]: the bias of the new token (the last position) over every position."""
        attention = self.blocks[0].layer[0].SelfAttention
        return attention.compute_bias(1, length, past_seen_tokens=length - 1)


class CrossKVGraph(nn.Module):
    """The decoder's cross-attention K/V of every layer from the encoder states, packed
    [layers, 2, rows, heads, src_len, d_kv]: what the first-step graph computes as `new_cross_kv`.

    With it, a new request's rows join the running ones with an empty past and take their first token in
    the shared cached step, instead of a first step of their own that reads every decoder weight.
    """

    def __init__(self, model: T5ForConditionalGeneration):
        super().__init__()
        self.blocks = model.get_decoder().block
        self.heads = model.config.num_heads

    def forward(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        rows, length = encoder_hidden_states.shape[:2]
        layers = []
        for block in self.blocks:
            attention = block.layer[1].EncDecAttention
            k, v = (
                projection(encoder_hidden_states).view(rows, length, self.heads, -1).transpose(1, 2)
                for projection in (attention.k, attention.v)
            )
            layers.append(torch.stack([k, v]))
        return torch.stack(layers)


@dataclass(frozen=True)
class ExportedGraphs:
    encoder: Path
    first_step_decoder: Path
    cached_step_decoder: Path
    cross_kv: Path


def sample_inputs(model: T5ForConditionalGeneration, rows: int = 2, src_len: int = 5, past_len: int = 3):
    """Example tensors for tracing: sizes >= 2 and distinct so no dynamic axis gets frozen,
    and a padded row so the masks are traced as real data."""
    cfg = model.config
    dims = spec.ModelDims.from_hf(cfg)
    dtype = model.dtype
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, cfg.vocab_size, (rows, src_len), generator=gen)
    mask = torch.ones(rows, src_len, dtype=torch.int64)
    mask[-1, -2:] = 0
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "decoder_input_ids": torch.randint(3, cfg.vocab_size, (rows, 1), generator=gen),
        "encoder_hidden_states": torch.randn(rows, src_len, cfg.d_model, generator=gen).to(dtype),
        "past_self_kv": torch.randn(dims.kv_shape(rows, past_len), generator=gen).to(dtype),
        "cross_kv": torch.randn(dims.kv_shape(rows, src_len), generator=gen).to(dtype),
        "decoder_attention_mask": left_padded_mask(torch.arange(past_len + 1, past_len + 1 - rows, -1)),
    }


def left_padded_mask(lengths: torch.Tensor) -> torch.Tensor:
    """[rows] real lengths -> int64 [rows, longest] mask, 1 on each row's last `length` positions."""
    longest = int(lengths.max())
    return (torch.arange(longest)[None, :] >= (longest - lengths)[:, None]).to(torch.int64)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict):
    # A new wrapper is in training mode, and the exporter restores that mode after tracing: which
    # would switch the shared checkpoint modules to training (dropout on) for everything after.
    module.eval()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # tracer warnings about Python values are expected here
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            # TorchScript: ~2.5x faster than dynamo; the Gemm above avoids its duplicate LM head.
            dynamo=False,
        )


def export_graphs(model: T5ForConditionalGeneration, directory: Path) -> ExportedGraphs:
    """Trace the four graphs into `directory` (fp32 or the model's dtype)."""
    directory.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    x = sample_inputs(model)
    rows, src, past = "rows", "src_len", "past_len"
    cross_axes = {2: rows, 4: src}
    paths = ExportedGraphs(
        directory / "encoder.onnx",
        directory / "decoder_first.onnx",
        directory / "decoder_cached.onnx",
        directory / "cross_kv.onnx",
    )
    _export(
        EncoderGraph(model),
        (x["input_ids"], x["attention_mask"]),
        paths.encoder,
        [spec.ENCODER_INPUT_IDS, spec.ENCODER_ATTENTION_MASK],
        [spec.ENCODER_HIDDEN_STATES],
        {
            spec.ENCODER_INPUT_IDS: {0: rows, 1: src},
            spec.ENCODER_ATTENTION_MASK: {0: rows, 1: src},
            spec.ENCODER_HIDDEN_STATES: {0: rows, 1: src},
        },
    )
    _export(
        FirstStepDecoderGraph(model),
        (x["decoder_input_ids"], x["encoder_hidden_states"], x["attention_mask"]),
        paths.first_step_decoder,
        [spec.DECODER_INPUT_IDS, spec.ENCODER_HIDDEN_STATES, spec.DECODER_ENCODER_MASK],
        [spec.LOGITS, spec.NEW_SELF_KV, spec.NEW_CROSS_KV],
        {
            spec.DECODER_INPUT_IDS: {0: rows},
            spec.ENCODER_HIDDEN_STATES: {0: rows, 1: src},
            spec.DECODER_ENCODER_MASK: {0: rows, 1: src},
            spec.LOGITS: {0: rows},
            spec.NEW_SELF_KV: {2: rows},
            spec.NEW_CROSS_KV: cross_axes,
        },
    )
    _export(
        CrossKVGraph(model),
        (x["encoder_hidden_states"],),
        paths.cross_kv,
        [spec.ENCODER_HIDDEN_STATES],
        [spec.NEW_CROSS_KV],
        {spec.ENCODER_HIDDEN_STATES: {0: rows, 1: src}, spec.NEW_CROSS_KV: cross_axes},
    )
    past_feeds = spec.layer_kv_feeds(spec.PAST_SELF_KV, x["past_self_kv"])
    cross_feeds = spec.layer_kv_feeds(spec.CROSS_KV, x["cross_kv"])
    _export(
        CachedStepDecoderGraph(model),
        (
            x["decoder_input_ids"],
            x["attention_mask"],
            x["decoder_attention_mask"],
            *(t.contiguous() for t in past_feeds.values()),
            *(t.contiguous() for t in cross_feeds.values()),
        ),
        paths.cached_step_decoder,
        [spec.DECODER_INPUT_IDS, spec.DECODER_ENCODER_MASK, spec.DECODER_SELF_MASK, *past_feeds, *cross_feeds],
        [spec.LOGITS, spec.NEW_SELF_KV],
        {
            spec.DECODER_INPUT_IDS: {0: rows},
            spec.DECODER_ENCODER_MASK: {0: rows, 1: src},
            spec.DECODER_SELF_MASK: {0: rows, 1: "past_len_plus_1"},
            **{name: {0: rows, 2: past} for name in past_feeds},
            **{name: {0: rows, 2: src} for name in cross_feeds},
            spec.LOGITS: {0: rows},
            spec.NEW_SELF_KV: {2: rows},
        },
    )
    return paths
