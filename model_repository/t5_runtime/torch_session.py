"""An ONNX Runtime session called with torch tensors, as the engine calls its encoder and decoder."""

from __future__ import annotations

from collections.abc import Sequence

import onnxruntime as ort
import torch

from .onnx_runner import run_numpy


class TorchSession:
    """Calls a session with torch CPU tensors, as `BatchCache` expects of a decoder."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session

    def __call__(self, inputs: dict[str, torch.Tensor], outputs: Sequence[str]) -> dict[str, torch.Tensor]:
        feeds = {name: tensor.numpy() for name, tensor in inputs.items()}
        return {name: torch.from_numpy(value) for name, value in run_numpy(self.session, feeds, outputs).items()}
