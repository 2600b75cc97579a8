"""The thread that drives an `Engine`: takes jobs from any thread, steps, and tells each job's listener.

`t5_generate` hands every valid request to `submit` and returns from `execute` at once, so requests
that arrive while others decode join them at the next step (in-flight batching) instead of waiting
for the batch to end. No Triton imports: listeners are plain callbacks.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from .engine import Engine, Event, Job
from .search import GenerationOutput


class Listener(Protocol):
    """Where one job's results go (a Triton response sender, in the server)."""

    def progress(self, decided: list[list[int]]) -> None: ...

    def finish(self, output: GenerationOutput) -> None: ...

    def fail(self, error: Exception) -> None: ...

    def cancelled(self) -> bool: ...


class Stats(Protocol):
    """What the worker reports after each step (Prometheus metrics, in the server)."""

    def step(self, decoder_calls: list[int]) -> None:
        """The rows of each decoder call just made."""
        ...

    def in_flight(self, requests: int) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def ended(self, job: Job, output: GenerationOutput | None, error: Exception | None) -> None: ...


class _NoStats:
    def step(self, decoder_calls: list[int]) -> None:
        pass

    def in_flight(self, requests: int) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def ended(self, job: Job, output: GenerationOutput | None, error: Exception | None) -> None:
        pass


class QueueFull(RuntimeError):
    """More jobs wait than the server allows; the client should retry later."""


@dataclass(eq=False)
class _Entry:
    listener: Listener
    submitted: float = field(default_factory=time.perf_counter)
    started: bool = False


class Worker:
    """Runs `engine` on a daemon thread. `max_waiting` jobs may wait for rows (0: no limit);
    cancellation is checked every `cancel_check_steps` steps (a check is a call into Triton)."""

    def __init__(self, engine: Engine, max_waiting: int = 0, stats: Stats | None = None, cancel_check_steps: int = 4):
        self.engine = engine
        self.max_waiting = max_waiting
        self.stats = stats or _NoStats()
        self.cancel_check_steps = cancel_check_steps
        self._inbox: queue.SimpleQueue[tuple[Job, Listener] | None] = queue.SimpleQueue()
        self._entries: dict[Job, _Entry] = {}
        self._lock = threading.Lock()  # guards the count of jobs not yet ended, read by `submit`
        self._open = 0
        self._thread = threading.Thread(target=self._run, name="t5-engine", daemon=True)
        self._stopping = False

    def start(self) -> Worker:
        self._thread.start()
        return self

    def submit(self, job: Job, listener: Listener) -> None:
        """Queue a job; raises `QueueFull` when the waiting room is full."""
        with self._lock:
            # Read across threads: an estimate, which is all a queue limit needs.
            waiting = self._open - len(self.engine.running)
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self.max_waiting and waiting >= self.max_waiting:
                raise QueueFull(f"{waiting} requests are already waiting (max_queue_size {self.max_waiting})")
            self._open += 1
        self._inbox.put((job, listener))

    def stop(self, timeout: float = 10.0) -> None:
        """Fail what is still open and end the thread."""
        with self._lock:
            self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        steps = 0
        while self._receive(block=not self.engine.busy):
            try:
                if steps % self.cancel_check_steps == 0:
                    self._check_cancelled()
                # The first tokens of new requests go out before the step of all requests runs.
                for phase in (self.engine.admit, self.engine.advance):
                    events = phase()
                    self.stats.step(self.engine.last_calls)  # counted before any client hears of the step
                    self._started()
                    for event in events:
                        self._deliver(event)
            except Exception as err:  # a bug must not leave every open request hanging: fail them, go on
                self.engine.reset()
                self._fail_all(err)
            steps += 1
        self._fail_all(QueueFull("the server is shutting down"))

    def _fail_all(self, error: Exception) -> None:
        for job, entry in list(self._entries.items()):
            self._end(job, entry, error=error)

    def _receive(self, block: bool) -> bool:
        """Move submitted jobs into the engine; False once `stop` was called."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if item is None:
                return False
            job, listener = item
            self._entries[job] = _Entry(listener)
            self.stats.in_flight(len(self._entries))
            self.engine.submit(job)
            block = False

    def _check_cancelled(self) -> None:
        for job, entry in self._entries.items():
            if _safely(entry.listener.cancelled, default=False):
                self.engine.cancel(job)

    def _started(self) -> None:
        now = time.perf_counter()
        for running in self.engine.running:
            entry = self._entries.get(running.job)
            if running.steps and entry is not None and not entry.started:
                entry.started = True
                self.stats.first_token(now - entry.submitted)

    def _deliver(self, event: Event) -> None:
        entry = self._entries.get(event.job)
        if entry is None:
            return
        if event.final:
            if event.output is not None and not entry.started:  # ended in its first step
                self.stats.first_token(time.perf_counter() - entry.submitted)
            self._end(event.job, entry, event.output, event.error)
        else:
            _safely(lambda: entry.listener.progress(event.decided))

    def _end(
        self, job: Job, entry: _Entry, output: GenerationOutput | None = None, error: Exception | None = None
    ) -> None:
        del self._entries[job]
        with self._lock:
            self._open -= 1
        # Counted before the client hears: a client that reads the metrics after its answer sees it.
        self.stats.ended(job, output, error)
        self.stats.in_flight(len(self._entries))
        if output is not None:
            _safely(lambda: entry.listener.finish(output))
        else:
            _safely(lambda: entry.listener.fail(error))


def _safely(call, default=None):
    """A listener that raises (a client gone, a response that cannot be sent) must not stop the loop."""
    try:
        return call()
    except Exception:  # the listener logs its own failures; the loop goes on
        return default
