"""`t5_generate` and `t5_generate_stream`: the python-backend BLS models that serve text generation.

A thin adapter. `execute` reads each request's tensors, lets `t5_runtime.request` validate them, hands
the valid ones to the engine's worker thread and returns at once; the worker decodes every running
request together (in-flight batching: one encoder call per arrival group, one decoder call per step)
and answers each through its response sender when it ends, so a request never waits for a longer one.
A bad request gets INVALID_ARG naming the problem and the others are served.

The same code serves both models: with a decoupled transaction policy (`t5_generate_stream`) it sends
the tokens of each step as they are decided and the last response carries the FINAL flag.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from bls import BlsModel, SubModelError
from metrics import ServingMetrics
from tokenizers import Tokenizer

from t5_runtime.batch_cache import ModelCall
from t5_runtime.engine import Cancelled, Engine, Job
from t5_runtime.onnx_runner import create_session
from t5_runtime.request import (
    INPUT_NAMES,
    OUTPUT_IDS,
    SEQUENCE_SCORES,
    TEXT_OUTPUT,
    InvalidRequest,
    parse_request,
)
from t5_runtime.search import GenerationOutput, trim_sequence
from t5_runtime.spec import ServingSpec
from t5_runtime.streaming import TextStream
from t5_runtime.torch_session import TorchSession
from t5_runtime.worker import QueueFull, Worker

TOKENIZER_FILE = "tokenizer/tokenizer.json"
_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _device(args: dict) -> torch.device:
    if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
        return torch.device("cuda", int(args.get("model_instance_device_id", 0)))
    return torch.device("cpu")


def _graph(params: dict[str, str], key: str, repository: Path, device: torch.device) -> ModelCall | None:
    """The ONNX graph at `params[key]` (a path from the repository root) run in this process, on CPU."""
    if params.get(key) and device.type == "cpu":
        return TorchSession(create_session(repository / params[key], int(params["onnx_threads"])))
    return None


def _sub_model(params: dict[str, str], role: str, repository: Path, device: torch.device) -> ModelCall:
    """The encoder or decoder (`role`) as a BLS call, or (CPU, `{role}_onnx` set) its graph run in this
    process: a BLS call copies its inputs and outputs through shared memory (for the decoder, the whole KV
    cache twice per step, which on CPU costs more than the decoder math at beam-search sizes)."""
    return _graph(params, f"{role}_onnx", repository, device) or BlsModel(params[f"{role}_model"], device)


def _error(message: str, code: int) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def _error_response(error: Exception, model: str) -> pb_utils.InferenceResponse:
    if isinstance(error, Cancelled):
        return _error(f"{model}: the request was cancelled", pb_utils.TritonError.CANCELLED)
    if isinstance(error, (SubModelError, QueueFull)):
        return _error(f"{model}: {error}", pb_utils.TritonError.UNAVAILABLE)
    pb_utils.Logger.log_error(f"{model}: {''.join(traceback.format_exception(error))}")
    return _error(f"{model}: internal error while generating (see the server log)", pb_utils.TritonError.INTERNAL)


class _Answer:
    """Sends one request's answer when its job ends (`t5_runtime.worker.Listener`)."""

    def __init__(self, model: TritonPythonModel, request, inputs: int, per_input: int):
        self.model = model
        self.request = request
        self.sender = request.get_response_sender()
        self.inputs, self.per_input = inputs, per_input

    def cancelled(self) -> bool:
        return self.request.is_cancelled()

    def progress(self, decided: list[list[int]]) -> None:
        pass

    def finish(self, output: GenerationOutput) -> None:
        self._send(self.model.full_response(output, self.inputs, self.per_input))

    def fail(self, error: Exception) -> None:
        self._send(_error_response(error, self.model.name))

    def _send(self, response: pb_utils.InferenceResponse) -> None:
        try:
            self.sender.send(response, flags=_FINAL)
        except Exception:
            pb_utils.Logger.log_warn(f"{self.model.name}: could not send a response: {traceback.format_exc()}")


class _Stream(_Answer):
    """Streams one sequence: each response holds the tokens and text decided since the previous one."""

    def __init__(self, model: TritonPythonModel, request):
        super().__init__(model, request, 1, 1)
        self.text = TextStream(lambda ids: model.tokenizer.decode(ids, skip_special_tokens=True))

    def progress(self, decided: list[list[int]]) -> None:
        new_ids, new_text = self.text.advance(decided[0])
        if new_ids or new_text:
            self.sender.send(self._delta(new_ids, new_text))

    def finish(self, output: GenerationOutput) -> None:
        dims = self.model.serving.dims
        generated = trim_sequence(output.sequences[0].tolist(), dims.eos_token_id, dims.pad_token_id)[1:]
        new_ids, new_text = self.text.advance(generated, final=True)
        scores = pb_utils.Tensor(SEQUENCE_SCORES, output.scores.cpu().numpy().astype(np.float32).reshape(1, 1))
        self._send(self._delta(new_ids, new_text, scores))

    def _delta(self, ids: list[int], text: str, *extra: pb_utils.Tensor) -> pb_utils.InferenceResponse:
        return pb_utils.InferenceResponse(
            [
                pb_utils.Tensor(TEXT_OUTPUT, np.array([[text]], dtype=np.object_)),
                pb_utils.Tensor(OUTPUT_IDS, np.array(ids, dtype=np.int32).reshape(1, 1, -1)),
                *extra,
            ]
        )


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.streaming = pb_utils.using_decoupled_model_transaction_policy(config)
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
        dims = self.serving.dims
        repository = Path(args["model_repository"]).parent
        engine = Engine(
            _sub_model(params, "encoder", repository, device),
            _sub_model(params, "decoder", repository, device),
            dims,
            max_rows=self.serving.max_batch_size * self.serving.max_num_beams,
            device=device,
            cross_kv=_graph(params, "cross_kv_onnx", repository, device),
        )
        queue_policy = config.get("dynamic_batching", {}).get("default_queue_policy", {})
        metrics = ServingMetrics(self.name, args["model_version"], dims.eos_token_id, dims.pad_token_id)
        self.worker = Worker(engine, int(queue_policy.get("max_queue_size", 0)), metrics).start()

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts)]

    def execute(self, requests: list) -> None:
        for request in requests:
            self._submit(request)
        return None  # every answer goes through the request's response sender

    def _submit(self, request) -> None:
        inputs = {}
        for name in INPUT_NAMES:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                inputs[name] = tensor.as_numpy()
        try:
            parsed = parse_request(inputs, self._encode, self.serving)
            if self.streaming and (len(parsed.input_ids) > 1 or parsed.params.num_return_sequences > 1):
                raise InvalidRequest(
                    f"{self.name} streams one sequence for one input; send several inputs or "
                    "num_return_sequences > 1 to the non-streaming model"
                )
        except InvalidRequest as err:
            sender = request.get_response_sender()
            sender.send(_error(str(err), pb_utils.TritonError.INVALID_ARG), flags=_FINAL)
            return
        job = Job(parsed.input_ids, parsed.params, stream=self.streaming)
        answer = (
            _Stream(self, request)
            if self.streaming
            else _Answer(self, request, len(parsed.input_ids), parsed.params.num_return_sequences)
        )
        try:
            self.worker.submit(job, answer)
        except QueueFull as err:
            answer.fail(err)

    def full_response(self, output: GenerationOutput, inputs: int, per_input: int) -> pb_utils.InferenceResponse:
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

    def finalize(self) -> None:
        self.worker.stop()
