"""One generate call: pad the inputs, run the encoder once, then the search over the decoder.

Device-agnostic: the encoder and decoder are callables on torch tensors (ONNX Runtime in process for
the builder's checks, BLS calls in the server), on whatever device `device` names.
"""

from __future__ import annotations

import torch

from . import spec
from .decoder_state import ModelCall, T5DecoderState
from .params import GenerationParams
from .search import GenerationOutput, SpecialTokens, generate


class T5Generator:
    def __init__(
        self, encoder: ModelCall, decoder: ModelCall, dims: spec.ModelDims, device: torch.device | str = "cpu"
    ):
        self.encoder = encoder
        self.decoder = decoder
        self.dims = dims
        self.device = torch.device(device)
        self.special = SpecialTokens(dims.decoder_start_token_id, dims.eos_token_id, dims.pad_token_id)

    def pad(self, token_rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the longest row, as the Hugging Face tokenizer pads T5 inputs."""
        longest = max(len(row) for row in token_rows)
        ids = torch.full((len(token_rows), longest), self.dims.pad_token_id, dtype=torch.int64)
        mask = torch.zeros((len(token_rows), longest), dtype=torch.int64)
        for i, row in enumerate(token_rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
            mask[i, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    def __call__(self, token_rows: list[list[int]], params: GenerationParams) -> GenerationOutput:
        ids, mask = self.pad(token_rows)
        return self.run(ids, mask, params)

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: GenerationParams):
        encoded = self.encoder(
            {spec.ENCODER_INPUT_IDS: input_ids, spec.ENCODER_ATTENTION_MASK: attention_mask},
            (spec.ENCODER_HIDDEN_STATES,),
        )
        state = T5DecoderState(self.decoder, self.dims, encoded[spec.ENCODER_HIDDEN_STATES], attention_mask)
        return generate(state, input_ids.shape[0], params, self.special, self.device)
