"""ONNX Runtime sessions for the encoder and the merged decoder on CPU.

Used in process by the builder's checks and the generate models (through `torch_session`), and inside the
CPU target's `t5_encoder` / `t5_decoder` python-backend models, so all run the graphs with the same session
settings. No torch here: those two models would carry its ~190 MB for nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort


def create_session(path: Path | str, threads: int = 0) -> ort.InferenceSession:
    """A CPU session; `threads` 0 lets ONNX Runtime use one thread per core.

    Its threads spin inside a run (waking a sleeping thread for each of a decoder step's ~400 nodes costs
    ~1 ms of a 6 ms step) and stop spinning when the run returns: the server's encoder, decoder and
    generate processes take turns on the same cores, and a thread spinning after its run would steal the
    CPU from the next.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused If-branch outputs are noise
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_numpy(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    names = list(outputs) if outputs else [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))
