"""Python-backend model that runs one ONNX graph with ONNX Runtime (CPU target).

Installed as `t5_encoder/1/model.py` and `t5_decoder/1/model.py`; `t5_runtime` is copied beside it.
Each request is answered on its own: a bad request gets its own error and the others their outputs.

When the generate models run this graph in their own process (the cpu target's default), nothing calls
this model but a client's direct request, so the build has it load its session at the first request
(`load_session: first_request`) instead of holding a third copy of the weights from startup.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import triton_python_backend_utils as pb_utils
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

from t5_runtime.onnx_runner import create_session, run_numpy


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self._path = version_dir / params["onnx_file"]
        self._threads = int(params["intra_op_threads"])
        self._session = None
        if params.get("load_session", "startup") == "startup":
            self._loaded()

    def _loaded(self):
        if self._session is None:
            self._session = create_session(self._path, self._threads)
        return self._session

    def execute(self, requests: list) -> list:
        session = self._loaded()
        return [self._answer(session, request) for request in requests]

    def _answer(self, session, request) -> pb_utils.InferenceResponse:
        feeds = {}
        for name in (i.name for i in session.get_inputs()):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return _error(f"{self.name}: missing input '{name}'", pb_utils.TritonError.INVALID_ARG)
            feeds[name] = tensor.as_numpy()
        try:
            outputs = run_numpy(session, feeds, request.requested_output_names())
        except (InvalidArgument, Fail) as err:  # shapes or dtypes the graph does not accept
            return _error(f"{self.name}: {err}", pb_utils.TritonError.INVALID_ARG)
        except Exception:
            pb_utils.Logger.log_error(f"{self.name}: {traceback.format_exc()}")
            return _error(f"{self.name}: internal error running the graph", pb_utils.TritonError.INTERNAL)
        return pb_utils.InferenceResponse([pb_utils.Tensor(name, value) for name, value in outputs.items()])


def _error(message: str, code: int) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
