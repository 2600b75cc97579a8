"""In-flight batching in process (ONNX Runtime, random-tiny): jobs that share decoder calls, join at
different steps and leave early each get exactly the output they get alone."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from t5_triton.builder.verify import SAMPLE_TEXTS
from t5_triton.model_repository.t5_runtime import spec
from t5_triton.model_repository.t5_runtime.batch_cache import ModelCall
from t5_triton.model_repository.t5_runtime.engine import Cancelled, Engine, Job
from t5_triton.model_repository.t5_runtime.generator import T5Generator
from t5_triton.model_repository.t5_runtime.onnx_runner import create_session
from t5_triton.model_repository.t5_runtime.params import GenerationParams
from t5_triton.model_repository.t5_runtime.search import trim_sequence
from t5_triton.model_repository.t5_runtime.torch_session import TorchSession
from t5_triton.model_repository.t5_runtime.worker import QueueFull, Worker

MIXED = [
    GenerationParams(max_new_tokens=20),
    GenerationParams(max_new_tokens=12, num_beams=4),
    GenerationParams(max_new_tokens=30, num_beams=3, num_return_sequences=2, length_penalty=0.5),
    GenerationParams(max_new_tokens=5),
    GenerationParams(max_new_tokens=16, do_sample=True, top_k=20, seed=7, num_return_sequences=2),
    GenerationParams(max_new_tokens=25, no_repeat_ngram_size=2, repetition_penalty=1.3),
    GenerationParams(max_new_tokens=18, num_beams=2, early_stopping=True, min_new_tokens=6),
    GenerationParams(max_new_tokens=1),
]


@dataclass(frozen=True)
class Models:
    encoder: ModelCall
    decoder: ModelCall
    dims: spec.ModelDims
    cross_kv: ModelCall | None

    def engine(self, max_rows: int, decoder: ModelCall | None = None) -> Engine:
        return Engine(self.encoder, decoder or self.decoder, self.dims, max_rows, cross_kv=self.cross_kv)

    def generator(self) -> T5Generator:
        return T5Generator(self.encoder, self.decoder, self.dims, cross_kv=self.cross_kv)


# Newcomers start with a first step of their own (the gpu target), or join the shared step with their
# cross K/V from the cross K/V graph (the cpu target).
@pytest.fixture(scope="module", params=["first step", "cross K/V graph"])
def models(request, tiny, tiny_graphs) -> Models:
    dims = spec.ModelDims.from_hf(tiny.model.config, tiny.model.generation_config)
    encoder = TorchSession(create_session(tiny_graphs["encoder"]))
    decoder = TorchSession(create_session(tiny_graphs["decoder"]))
    cross_kv = TorchSession(create_session(tiny_graphs["cross_kv"])) if request.param == "cross K/V graph" else None
    return Models(encoder, decoder, dims, cross_kv)


def _jobs(tiny) -> list[Job]:
    jobs = []
    for i, params in enumerate(MIXED):
        texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)], SAMPLE_TEXTS[(i + 3) % len(SAMPLE_TEXTS)]][: 1 + i % 2]
        jobs.append(Job([tiny.tokenizer(t).input_ids for t in texts], params, stream=True))
    return jobs


def _alone(models, job: Job) -> list[list[int]]:
    return [trim_sequence(row) for row in models.generator()(job.token_rows, job.params).sequences.tolist()]


def _run(engine: Engine, arrivals: dict[int, list[Job]]) -> tuple[dict, dict, list[int]]:
    """Submit jobs at the steps given, step until all ended; outputs, streamed prefixes, rows per step."""
    outputs, decided, rows_per_step = {}, {}, []
    step = 0
    while engine.busy or any(s >= step for s in arrivals):
        for job in arrivals.get(step, []):
            engine.submit(job)
        for event in engine.step():
            if event.decided is not None:
                decided.setdefault(id(event.job), []).append(event.decided)
            if event.final:
                outputs[id(event.job)] = event
        rows_per_step.append(engine.cache.rows)
        step += 1
    return outputs, decided, rows_per_step


def test_staggered_mixed_jobs_each_equal_their_output_alone(tiny, models):
    jobs = _jobs(tiny)
    engine = models.engine(max_rows=64)
    # Two at once, then one more every few steps: they join running batches at different steps.
    arrivals = {0: jobs[:2], 3: jobs[2:4], 4: [jobs[4]], 9: jobs[5:7], 10: [jobs[7]]}
    outputs, _, rows_per_step = _run(engine, arrivals)
    assert max(rows_per_step) > 8  # really decoded together
    for job in jobs:
        event = outputs[id(job)]
        assert event.error is None
        got = [trim_sequence(row) for row in event.output.sequences.tolist()]
        assert got == _alone(models, job), job.params


def test_streamed_prefixes_only_grow_and_end_at_the_output(tiny, models):
    jobs = _jobs(tiny)
    engine = models.engine(max_rows=64)
    outputs, decided, _ = _run(engine, {0: jobs})
    for job in jobs:
        if job.params.num_return_sequences > 1:
            continue  # streaming serves one sequence per input
        final = [trim_sequence(row)[1:] for row in outputs[id(job)].output.sequences.tolist()]
        for before, after in zip(decided.get(id(job), []), decided.get(id(job), [])[1:], strict=False):
            for b, a in zip(before, after, strict=True):
                assert a[: len(b)] == b  # never retracted
        for prefix, answer in zip(decided.get(id(job), [[[]] * len(final)])[-1], final, strict=True):
            assert answer[: len(prefix)] == prefix


def test_capacity_makes_jobs_wait_and_cancel_frees_rows(tiny, models):
    beam = GenerationParams(max_new_tokens=40, num_beams=4, min_new_tokens=40)
    rows = [tiny.tokenizer(SAMPLE_TEXTS[0]).input_ids]
    first, second, third = Job(rows, beam), Job(rows, beam), Job(rows, GenerationParams(max_new_tokens=3))
    engine = models.engine(max_rows=4)
    for job in (first, second, third):
        engine.submit(job)
    engine.step()
    assert [r.job for r in engine.running] == [first] and list(engine.waiting) == [second, third]
    engine.cancel(first)
    events = engine.step()
    assert any(e.job is first and isinstance(e.error, Cancelled) for e in events)
    assert [r.job for r in engine.running] == [second]  # joined in the freed rows; third still waits
    assert engine.cache.rows == 4


def test_a_failing_decoder_fails_the_jobs_in_that_call_and_the_engine_goes_on(tiny, models):
    calls = {"n": 0}

    def flaky(inputs, outputs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("decoder down")
        return models.decoder(inputs, outputs)

    engine = models.engine(max_rows=64, decoder=flaky)
    job = Job([tiny.tokenizer(SAMPLE_TEXTS[1]).input_ids], GenerationParams(max_new_tokens=10, min_new_tokens=10))
    outputs, _, _ = _run(engine, {0: [job]})
    assert "decoder down" in str(outputs[id(job)].error)
    again = Job(job.token_rows, job.params)
    outputs, _, _ = _run(engine, {0: [again]})
    assert outputs[id(again)].output is not None
    assert engine.cache.rows == 0 and not engine.busy  # nothing left behind


class _Collect:
    """A `Listener` that keeps what it hears."""

    def __init__(self):
        self.done = threading.Event()
        self.output = self.error = None
        self.pieces: list[list[list[int]]] = []

    def progress(self, decided):
        self.pieces.append(decided)

    def finish(self, output):
        self.output = output
        self.done.set()

    def fail(self, error):
        self.error = error
        self.done.set()

    def cancelled(self):
        return False


def test_worker_answers_jobs_submitted_from_many_threads(tiny, models):
    worker = Worker(models.engine(max_rows=64)).start()
    jobs = _jobs(tiny)
    listeners = [_Collect() for _ in jobs]
    threads = [threading.Thread(target=worker.submit, args=pair) for pair in zip(jobs, listeners, strict=True)]
    for thread in threads:
        thread.start()
    for listener in listeners:
        assert listener.done.wait(60)
    worker.stop()
    for job, listener in zip(jobs, listeners, strict=True):
        assert listener.error is None
        assert [trim_sequence(r) for r in listener.output.sequences.tolist()] == _alone(models, job)


def _short_job(tiny) -> Job:
    return Job([tiny.tokenizer(SAMPLE_TEXTS[0]).input_ids], GenerationParams(max_new_tokens=4))


def test_worker_refuses_beyond_its_waiting_room(tiny, models):
    worker = Worker(models.engine(max_rows=1), max_waiting=1)  # not started: submitted jobs wait
    worker.submit(_short_job(tiny), _Collect())
    with pytest.raises(QueueFull, match="max_queue_size 1"):
        worker.submit(_short_job(tiny), _Collect())


def test_a_failing_step_fails_the_open_jobs_and_the_worker_goes_on(tiny, models):
    engine = models.engine(max_rows=64)
    advance, broken = engine.advance, [True]

    def advance_broken_once():
        if broken and broken.pop():
            raise RuntimeError("a bug in a step")
        return advance()

    engine.advance = advance_broken_once
    worker = Worker(engine).start()
    first, later = _Collect(), _Collect()
    worker.submit(_short_job(tiny), first)
    assert first.done.wait(60) and "a bug in a step" in str(first.error)
    worker.submit(_short_job(tiny), later)
    assert later.done.wait(60) and later.output is not None
    worker.stop()
