"""`t5_generate`: the python-backend BLS model that serves text generation.

A thin adapter: read each request's tensors, let `t5_runtime.request` validate them, run
`t5_runtime.generator` (encoder once, decoder once per step, over BLS), and answer. Every request gets
its own response; a bad one gets INVALID_ARG naming the problem and the others are served.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from bls import BlsModel, SubModelError
from tokenizers import Tokenizer

from t5_runtime.generator import T5Generator
from t5_runtime.request import (
    INPUT_NAMES,
    OUTPUT_IDS,
    SEQUENCE_SCORES,
    TEXT_OUTPUT,
    InvalidRequest,
    parse_request,
)
from t5_runtime.search import GenerationOutput
from t5_runtime.spec import ServingSpec

TOKENIZER_FILE = "tokenizer/tokenizer.json"


def _device(args: dict) -> torch.device:
    if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
        return torch.device("cuda", int(args.get("model_instance_device_id", 0)))
    return torch.device("cpu")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.serving = ServingSpec.load(version_dir)
        self.tokenizer = Tokenizer.from_file(str(version_dir / TOKENIZER_FILE))
        # Padding and truncation are decided here, per request, not by settings saved with the tokenizer.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        device = _device(args)
        # The loop's own tensor ops are small; extra threads would only contend with the encoder and
        # decoder processes, which run between them.
        torch.set_num_threads(1)
        self.generator = T5Generator(
            BlsModel(params["encoder_model"], device),
            BlsModel(params["decoder_model"], device),
            self.serving.dims,
            device,
        )

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts)]

    def execute(self, requests: list) -> list:
        return [self._answer(request) for request in requests]

    def _answer(self, request) -> pb_utils.InferenceResponse:
        inputs = {}
        for name in INPUT_NAMES:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                inputs[name] = tensor.as_numpy()
        try:
            parsed = parse_request(inputs, self._encode, self.serving)
        except InvalidRequest as err:
            return _error(str(err), pb_utils.TritonError.INVALID_ARG)
        try:
            with torch.inference_mode():
                output = self.generator(parsed.input_ids, parsed.params)
            return self._response(output, len(parsed.input_ids), parsed.params.num_return_sequences)
        except SubModelError as err:
            return _error(str(err), pb_utils.TritonError.UNAVAILABLE)
        except Exception:
            pb_utils.Logger.log_error(f"t5_generate: {traceback.format_exc()}")
            return _error(
                "t5_generate: internal error while generating (see the server log)", pb_utils.TritonError.INTERNAL
            )

    def _response(self, output: GenerationOutput, inputs: int, per_input: int) -> pb_utils.InferenceResponse:
        sequences = output.sequences.cpu()
        texts = self.tokenizer.decode_batch(sequences.tolist(), skip_special_tokens=True)
        return pb_utils.InferenceResponse(
            [
                pb_utils.Tensor(TEXT_OUTPUT, np.array(texts, dtype=np.object_).reshape(inputs, per_input)),
                pb_utils.Tensor(OUTPUT_IDS, sequences.numpy().astype(np.int32).reshape(inputs, per_input, -1)),
                pb_utils.Tensor(
                    SEQUENCE_SCORES, output.scores.cpu().numpy().astype(np.float32).reshape(inputs, per_input)
                ),
            ]
        )


def _error(message: str, code: int) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
