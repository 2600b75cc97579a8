"""The KV cache of one generate call, kept in torch tensors on the model's device between steps.

`T5DecoderState` implements the search's `DecoderState` protocol over any function that runs the
merged decoder (ONNX Runtime in process, or a BLS call to the `t5_decoder` model): it builds the
decoder's inputs for the first or a later step, appends the new self-attention K/V, and moves rows
for beam search. Cross-attention K/V are computed by the first step and never recomputed or
reordered among the beams of one input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import spec

# Runs a model: named input tensors and the names of the outputs wanted -> those outputs.
ModelCall = Callable[[dict[str, torch.Tensor], Sequence[str]], dict[str, torch.Tensor]]
_FIRST_STEP_OUTPUTS = spec.DECODER_OUTPUTS
_CACHED_STEP_OUTPUTS = (spec.LOGITS, spec.NEW_SELF_KV)  # the cross K/V are already here


class T5DecoderState:
    def __init__(
        self,
        call_decoder: ModelCall,
        dims: spec.ModelDims,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
    ):
        self._call = call_decoder
        self._dims = dims
        self._encoder_states: torch.Tensor | None = encoder_hidden_states
        self._mask = encoder_attention_mask.to(torch.int64)
        self._self_kv: torch.Tensor | None = None
        self._cross_kv: torch.Tensor | None = None
        # Inputs that stay the same from step to step are passed as the same objects, so a BLS caller
        # can send them without copying them again.
        self._use_cache = torch.tensor([True], device=encoder_hidden_states.device)
        self._no_states: torch.Tensor | None = None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = tokens.shape[0]
        first = self._self_kv is None
        states = self._encoder_states
        if first:
            empty_kv = states.new_empty(self._dims.kv_shape(rows, 0))
            past, cross = empty_kv, empty_kv
        else:
            if self._no_states is None or self._no_states.shape[0] != rows:
                self._no_states = self._cross_kv.new_empty((rows, 0, self._dims.d_model))
            states = self._no_states
            past, cross = self._self_kv, self._cross_kv
        out = self._call(
            {
                spec.USE_CACHE_BRANCH: ~self._use_cache if first else self._use_cache,
                spec.DECODER_INPUT_IDS: tokens.to(torch.int64).view(rows, 1),
                spec.ENCODER_HIDDEN_STATES: states,
                spec.DECODER_ENCODER_MASK: self._mask,
                spec.PAST_SELF_KV: past,
                spec.CROSS_KV: cross,
            },
            _FIRST_STEP_OUTPUTS if first else _CACHED_STEP_OUTPUTS,
        )
        new_kv = out[spec.NEW_SELF_KV]
        if first:
            self._self_kv = new_kv
            self._cross_kv = out[spec.NEW_CROSS_KV]
            self._encoder_states = None  # the cross K/V now hold all the decoder needs of them
        else:
            self._self_kv = torch.cat([self._self_kv, new_kv], dim=spec.KV_SEQ_AXIS)
        return out[spec.LOGITS]

    def select(self, rows: torch.Tensor) -> None:
        self._mask = self._mask.index_select(0, rows)
        if self._encoder_states is not None:
            self._encoder_states = self._encoder_states.index_select(0, rows)
        if self._self_kv is not None:
            self._self_kv = self._self_kv.index_select(spec.KV_ROW_AXIS, rows)
            self._cross_kv = self._cross_kv.index_select(spec.KV_ROW_AXIS, rows)

    def reorder_beams(self, rows: torch.Tensor) -> None:
        if self._self_kv is not None:
            self._self_kv = self._self_kv.index_select(spec.KV_ROW_AXIS, rows)
