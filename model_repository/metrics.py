"""Custom Prometheus metrics of `t5_generate`, on Triton's metrics port (`pb_utils.MetricFamily`).

Installed beside `model.py`; the worker reports to it after every step (`t5_runtime.worker.Stats`).
Each metric update is a round trip to the Triton process (~0.1 ms), so per-step counts are summed here and
sent every few steps and whenever a request ends (before its client is answered, so a client that got its
answer reads counts that include it).
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from t5_runtime.engine import Cancelled, Job
from t5_runtime.search import GenerationOutput, trim_sequence

# Steps counted here before they are sent: a scrape lags the decoder by fewer than this many steps.
FLUSH_STEPS = 8
_SECONDS_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class ServingMetrics:
    def __init__(self, model: str, version: str, eos_token_id: int, pad_token_id: int):
        labels = {"model": model, "version": version}
        self._eos, self._pad = eos_token_id, pad_token_id
        self._pending_steps = self._pending_rows = 0

        def family(name: str, description: str, kind):
            return pb_utils.MetricFamily(name=name, description=description, kind=kind)

        counter, gauge, histogram = (
            pb_utils.MetricFamily.COUNTER,
            pb_utils.MetricFamily.GAUGE,
            pb_utils.MetricFamily.HISTOGRAM,
        )
        self._families = [
            family("t5_generated_tokens_total", "Tokens generated in answered sequences", counter),
            family("t5_requests_in_flight", "Requests decoding or waiting for rows", gauge),
            family(
                "t5_decoding_steps_total",
                "Decoder calls of the decoding loop (one per step for all running requests)",
                counter,
            ),
            family(
                "t5_step_rows_total",
                "Rows (sequences x beams) summed over decoder calls; / t5_decoding_steps_total = mean rows per call",
                counter,
            ),
            family("t5_time_to_first_token_seconds", "From arrival to the first generated token", histogram),
            family("t5_requests_total", "Requests ended, by outcome", counter),
        ]
        tokens, in_flight, steps, rows, first_token, ended = self._families
        self.tokens = tokens.Metric(labels=labels)
        self.requests_in_flight = in_flight.Metric(labels=labels)
        self.steps = steps.Metric(labels=labels)
        self.rows = rows.Metric(labels=labels)
        self.first_token_seconds = first_token.Metric(labels=labels, buckets=_SECONDS_BUCKETS)
        self.outcomes = {
            outcome: ended.Metric(labels={**labels, "outcome": outcome})
            for outcome in ("success", "error", "cancelled")
        }

    def step(self, decoder_calls: list[int]) -> None:
        self._pending_steps += len(decoder_calls)
        self._pending_rows += sum(decoder_calls)
        if self._pending_steps >= FLUSH_STEPS:
            self._flush()

    def _flush(self) -> None:
        if self._pending_steps:
            self.steps.increment(self._pending_steps)
            self.rows.increment(self._pending_rows)
            self._pending_steps = self._pending_rows = 0

    def in_flight(self, requests: int) -> None:
        self.requests_in_flight.set(requests)

    def first_token(self, seconds: float) -> None:
        self.first_token_seconds.observe(seconds)

    def ended(self, job: Job, output: GenerationOutput | None, error: Exception | None) -> None:
        self._flush()
        if output is not None:
            rows = output.sequences.tolist()
            self.tokens.increment(sum(len(trim_sequence(row, self._eos, self._pad)) - 1 for row in rows))
            self.outcomes["success"].increment(1)
        else:
            self.outcomes["cancelled" if isinstance(error, Cancelled) else "error"].increment(1)
