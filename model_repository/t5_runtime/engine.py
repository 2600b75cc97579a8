"""In-flight batching: every running request decoded together, one decoder call per step.

A request ("job") joins at the next step after it arrives: its inputs are encoded (one call for all
newcomers) and its rows join the shared `BatchCache`. With a cross K/V graph they join with an empty
past and take their first token in the shared step; without one (the gpu target) a first decoder step
of their own (one call for all newcomers) decides it and computes their cross K/V. Every cached step is
one decoder call over the rows of all jobs, whatever their step, parameters or search (greedy next to
beam 4). Each job runs its own `search` coroutine on its slice of the logits, so its output is what it
would be alone; a job that ends or is cancelled leaves at once.

Plain torch and no threads: the caller feeds jobs in and calls `step()` in a loop.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from . import spec
from .batch_cache import BatchCache, ModelCall
from .params import GenerationParams
from .search import GenerationOutput, SpecialTokens, Step, search


class Cancelled(Exception):
    """The job was cancelled by its client before it finished."""


@dataclass(eq=False)
class Job:
    """One request to decode. `stream` asks for `Event.decided` after every step."""

    token_rows: list[list[int]]
    params: GenerationParams
    stream: bool = False

    @property
    def peak_rows(self) -> int:
        return len(self.token_rows) * max(self.params.num_beams, self.params.num_return_sequences)


@dataclass(frozen=True)
class Event:
    """What happened to a job in a step: progress (streaming), its output, or its error (the end)."""

    job: Job
    decided: list[list[int]] | None = None
    output: GenerationOutput | None = None
    error: Exception | None = None

    @property
    def final(self) -> bool:
        return self.output is not None or self.error is not None


@dataclass(eq=False)
class _Running:
    """A job being decoded, and the `RowState` its search moves its rows through.

    `rows` is the job's block of rows in the cache; `self_rows` / `cross_rows` are the moves its search
    made since (indices into that block, None while it made none), which the engine turns into one
    gather over the cache."""

    job: Job
    rows: int
    device: torch.device
    coroutine: object = None
    pending: Step | None = None
    steps: int = 0  # decoder steps whose logits the search has had
    self_rows: torch.Tensor | None = None
    cross_rows: torch.Tensor | None = None

    def reset_rows(self) -> None:
        self.self_rows = self.cross_rows = None

    def select(self, rows: torch.Tensor) -> None:
        self_rows, cross_rows = self.indices()
        self.self_rows, self.cross_rows = self_rows[rows], cross_rows[rows]

    def reorder_beams(self, rows: torch.Tensor) -> None:
        self_rows, self.cross_rows = self.indices()
        self.self_rows = self_rows[rows]

    def leave(self) -> None:
        self.self_rows = self.cross_rows = torch.arange(0, device=self.device)

    @property
    def moved(self) -> bool:
        return self.self_rows is not None

    @property
    def rows_after(self) -> int:
        return self.rows if self.self_rows is None else self.self_rows.shape[0]

    def indices(self, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the job's rows come from after its moves, as rows of a cache where its block starts at
        `offset`."""
        if self.self_rows is None:
            unmoved = torch.arange(offset, offset + self.rows, device=self.device)
            return unmoved, unmoved
        return self.self_rows + offset, self.cross_rows + offset


class Engine:
    """Decodes jobs together. `max_rows` bounds the rows in flight; jobs beyond it wait their turn."""

    def __init__(
        self,
        encoder: ModelCall,
        decoder: ModelCall,
        dims: spec.ModelDims,
        max_rows: int,
        device: torch.device | str = "cpu",
        cross_kv: ModelCall | None = None,
    ):
        self.encoder = encoder
        # Encoder states -> every layer's cross K/V. When given, newcomers skip a first step of their own
        # (which reads every decoder weight) and take their first token in the next shared step.
        self.cross_kv = cross_kv
        self.dims = dims
        self.max_rows = max_rows
        self.device = torch.device(device)
        self.special = SpecialTokens(dims.decoder_start_token_id, dims.eos_token_id, dims.pad_token_id)
        self.cache = BatchCache(decoder, dims, self.device)
        self.waiting: deque[Job] = deque()
        self.running: list[_Running] = []
        self._cancelled: set[Job] = set()
        self.last_calls: list[int] = []  # rows of each decoder call made by the latest `admit` or `advance`

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.running)

    def submit(self, job: Job) -> None:
        self.waiting.append(job)

    def reset(self) -> None:
        """Forget every job and the cache (after a failure the state cannot be trusted)."""
        self.waiting.clear()
        self.running = []
        self._cancelled.clear()
        self.cache.clear()

    def cancel(self, job: Job) -> None:
        """The job ends with `Cancelled` at the next step (its rows are freed then)."""
        self._cancelled.add(job)

    def step(self) -> list[Event]:
        """Admit the waiting jobs that fit, then run one decoding step of every running job."""
        return self.admit() + self.advance()

    def admit(self) -> list[Event]:
        """Drop cancelled jobs; encode the waiting jobs that fit and decide their first tokens.

        Separate from `advance` so a caller can send those first tokens before the next step runs."""
        events: list[Event] = []
        self.last_calls = []
        self._drop_cancelled(events)
        newcomers = self._take_waiting()
        if newcomers:
            self._start(newcomers, events)
        return events

    def advance(self) -> list[Event]:
        """One cached decoder call for every running job (the ones just admitted included)."""
        events: list[Event] = []
        self.last_calls = []
        if self.running:
            self._continue(events)
        return events

    def _drop_cancelled(self, events: list[Event]) -> None:
        if not self._cancelled:
            return
        for job in [j for j in self.waiting if j in self._cancelled]:
            self.waiting.remove(job)
            events.append(Event(job, error=Cancelled("cancelled")))
        cancelled = [r for r in self.running if r.job in self._cancelled]
        self._cancelled.clear()
        if cancelled:
            for running in self.running:
                running.reset_rows()
            for running in cancelled:
                running.leave()
                events.append(Event(running.job, error=Cancelled("cancelled")))
            self._regather()

    def _take_waiting(self) -> list[Job]:
        taken: list[Job] = []
        rows = self.rows
        while self.waiting:
            job = self.waiting[0]
            # Alone, a job always fits: requests larger than max_rows are refused before they get here.
            if (self.running or taken) and rows + job.peak_rows > self.max_rows:
                break
            taken.append(self.waiting.popleft())
            rows += job.peak_rows
        return taken

    def _pad(self, token_rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the longest row, as the Hugging Face tokenizer pads T5 inputs."""
        longest = max(len(row) for row in token_rows)
        ids = torch.full((len(token_rows), longest), self.dims.pad_token_id, dtype=torch.int64)
        mask = torch.zeros((len(token_rows), longest), dtype=torch.int64)
        for i, row in enumerate(token_rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
            mask[i, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _start(self, jobs: list[Job], events: list[Event]) -> None:
        """Encode the newcomers together; their rows join the cache with their cross K/V and an empty past
        (cross K/V graph), or after a first step of their own, run together (the ones still going)."""
        started = []
        for job in jobs:
            running = _Running(job, rows=len(job.token_rows), device=self.device)
            running.coroutine = search(running, running.rows, job.params, self.special, self.device)
            running.pending = next(running.coroutine)
            started.append(running)
        ids, mask = self._pad([row for job in jobs for row in job.token_rows])
        try:
            states = self.encoder(
                {spec.ENCODER_INPUT_IDS: ids, spec.ENCODER_ATTENTION_MASK: mask}, (spec.ENCODER_HIDDEN_STATES,)
            )[spec.ENCODER_HIDDEN_STATES]
            if self.cross_kv is not None:
                cross = self.cross_kv({spec.ENCODER_HIDDEN_STATES: states}, (spec.NEW_CROSS_KV,))[spec.NEW_CROSS_KV]
            else:
                tokens = torch.cat([r.pending.tokens for r in started])
                self.last_calls.append(tokens.shape[0])
                first = self.cache.first_step(tokens, states, mask)
        except Exception as err:
            if len(jobs) == 1:
                events.append(Event(jobs[0], error=err))
                return
            # One job may be the cause: each alone again, so only the culprit gets the error.
            for job in jobs:
                self._start([job], events)
            return
        if self.cross_kv is not None:
            # Each search still waits for its first logits: its rows join with an empty past.
            self.cache.add(cross.new_empty(self.dims.kv_shape(cross.shape[spec.KV_ROW_AXIS], 0)), cross, mask)
            self.running.extend(started)
            return
        logits = first[spec.LOGITS]
        kept_self, kept_cross = [], []
        offset = 0
        for running in started:
            rows = running.rows
            if self._advance(running, logits[offset : offset + rows], events):
                self_rows, cross_rows = running.indices(offset)
                kept_self.append(self_rows)
                kept_cross.append(cross_rows)
                running.rows = self_rows.shape[0]
                self.running.append(running)
            offset += rows
        if kept_self:
            self_rows, cross_rows = torch.cat(kept_self), torch.cat(kept_cross)
            self.cache.add(
                first[spec.NEW_SELF_KV].index_select(spec.KV_ROW_AXIS, self_rows),
                first[spec.NEW_CROSS_KV].index_select(spec.KV_ROW_AXIS, cross_rows),
                mask.index_select(0, cross_rows),
            )

    def _continue(self, events: list[Event]) -> None:
        """One cached decoder call for every running row; each job takes its slice of the logits."""
        tokens = torch.cat([r.pending.tokens for r in self.running])
        self.last_calls.append(tokens.shape[0])
        try:
            logits = self.cache.step(tokens)
        except Exception as err:
            events.extend(Event(r.job, error=err) for r in self.running)
            self.running = []
            self.cache.clear()
            return
        offset = 0
        for running in self.running:
            rows = running.rows
            if not self._advance(running, logits[offset : offset + rows], events):
                running.leave()
            offset += rows
        self._regather()

    def _advance(self, running: _Running, logits: torch.Tensor, events: list[Event]) -> bool:
        """Send a job its logits; False when it is over (its output or error is in `events`)."""
        running.reset_rows()
        running.steps += 1
        try:
            running.pending = running.coroutine.send(logits.float())
        except StopIteration as finished:
            events.append(Event(running.job, output=finished.value))
            return False
        except Exception as err:  # one job's failure must not end the others
            events.append(Event(running.job, error=err))
            return False
        if running.job.stream:
            events.append(Event(running.job, decided=running.pending.decided()))
        return True

    def _regather(self) -> None:
        """Apply every job's row moves to the cache in one gather, and forget the jobs that left."""
        if not any(running.moved for running in self.running):
            self.cache.take_all()  # the usual greedy step: no index to build
            return
        self_rows, cross_rows = [], []
        offset = 0
        for running in self.running:
            moved_self, moved_cross = running.indices(offset)
            self_rows.append(moved_self)
            cross_rows.append(moved_cross)
            offset += running.rows
            running.rows = running.rows_after
        self.cache.take(torch.cat(self_rows), torch.cat(cross_rows))
        self.running = [r for r in self.running if r.rows]
