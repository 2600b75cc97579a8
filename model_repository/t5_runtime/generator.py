"""One generate call on an `Engine` of its own: the builder's checks run the serving code this way.

Device-agnostic: the encoder and decoder are callables on torch tensors (ONNX Runtime in process for
the builder's checks, BLS calls in the server), on whatever device `device` names.
"""

from __future__ import annotations

import torch

from . import spec
from .batch_cache import ModelCall
from .engine import Engine, Job
from .params import GenerationParams
from .search import GenerationOutput


class T5Generator:
    def __init__(
        self,
        encoder: ModelCall,
        decoder: ModelCall,
        dims: spec.ModelDims,
        device: torch.device | str = "cpu",
        cross_kv: ModelCall | None = None,
    ):
        self.encoder = encoder
        self.decoder = decoder
        self.cross_kv = cross_kv
        self.dims = dims
        self.device = torch.device(device)

    def __call__(self, token_rows: list[list[int]], params: GenerationParams) -> GenerationOutput:
        job = Job(token_rows, params)
        engine = Engine(self.encoder, self.decoder, self.dims, job.peak_rows, self.device, self.cross_kv)
        engine.submit(job)
        while True:
            for event in engine.step():
                if event.error is not None:
                    raise event.error
                if event.output is not None:
                    return event.output

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: GenerationParams) -> GenerationOutput:
        """From a padded batch (as a Hugging Face tokenizer returns it)."""
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]
        return self(rows, params)
