"""Greedy search, sampling and beam search over an abstract decoder, token for token as transformers 5.x.

`generate` reproduces `T5ForConditionalGeneration.generate(...)` (greedy / `_sample` and `_beam_search`) for
encoder-decoder models, given a `DecoderState` that returns the same logits as the PyTorch decoder. It never
computes more than needed: beam search runs its first step on one row per input, and rows whose output can no
longer change (finished greedy/sampled rows, every beam of an input whose beam search is over) are dropped from
the decoder state instead of being decoded until the end. Plain torch; tensors may live on any device, and each
step synchronizes with the host once (to know whether to stop or drop rows).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Protocol

import torch

from .params import GenerationParams
from .processors import ProcessorChain, build_processors

# HF's stand-in for "impossible" in beam search: candidates and empty slots get scores this low (or lower).
_EXCLUDED = -1.0e9


class RowState(Protocol):
    """The per-row decoder state (KV cache, encoder mask) of one search; starts with one row per input."""

    def select(self, rows: torch.Tensor) -> None:
        """Keep/repeat rows of ALL per-row state (self-attention cache, cross-attention cache, encoder mask):
        new row i = old row rows[i]. Used to expand to batch*num_beams after the first step and to drop
        finished rows."""
        ...

    def reorder_beams(self, rows: torch.Tensor) -> None:
        """Like select, but rows[i] always belongs to the same input as row i: only the self-attention cache
        moves (cross-attention state is identical within an input's beams, so it is never copied)."""
        ...


class DecoderState(RowState, Protocol):
    """A `RowState` that runs the decoder itself (one search alone)."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: int64 [rows] (the last token of each row) -> float32 logits [rows, vocab] for the next token."""
        ...


@dataclass(frozen=True)
class SpecialTokens:
    decoder_start_token_id: int
    eos_token_id: int
    pad_token_id: int


@dataclass(frozen=True)
class GenerationOutput:
    """What `generate` returns.

    sequences: int64 [batch_size * num_return_sequences, length], the outputs of an input adjacent, each starting
        with the decoder start token: exactly HF's `generate(...).sequences`, including its padding. Greedy and
        sampling pad finished rows with `pad_token_id`; beam search pads with HF's `output_fill_value`, which is
        `pad_token_id or eos_token_id`, i.e. EOS for T5 (pad id 0).
    scores: float32 [batch_size * num_return_sequences].
        Beam search: HF's `sequences_scores`, the sum of the processed log-probs of the hypothesis divided by
        `generated_length ** length_penalty`.
        Greedy / sampling: the sum over the generated tokens (up to and including EOS) of the chosen token's
        log-probability under the distribution it was picked from (log-softmax of the processed scores, i.e.
        after repetition penalty, temperature, top-k, top-p, ...). This is HF's
        `compute_transition_scores(sequences, scores, normalize_logits=True)` summed over the generated tokens;
        it is not length-normalized.
    """

    sequences: torch.Tensor
    scores: torch.Tensor


def trim_sequence(ids: list[int], eos: int = 1, pad: int = 0) -> list[int]:
    """A generated sequence without its padding: up to its first EOS, else without trailing pad.

    The first token is the decoder start (pad in T5). transformers pads T5 beam-search outputs with
    EOS rather than pad (pad id 0 reads as unset there), so the first EOS is where a sequence ends.
    """
    for position in range(1, len(ids)):
        if ids[position] == eos:
            return ids[: position + 1]
    end = len(ids)
    while end > 1 and ids[end - 1] == pad:
        end -= 1
    return ids[:end]


@dataclass(frozen=True)
class Step:
    """What a search needs next: logits for `tokens` (int64 [rows], the last token of each row).

    `decided()` gives, per output sequence, the generated tokens that can no longer change (start token
    excluded; for greedy/sampling every token so far, up to EOS; for beam search the prefix all live
    hypotheses share). Streaming reads it; nothing else pays for it.
    """

    tokens: torch.Tensor
    decided: Callable[[], list[list[int]]]


# A search as a coroutine: yields a `Step`, is sent the float32 logits [rows, vocab] of those tokens, and
# returns the `GenerationOutput`. Between steps it moves rows through its `RowState`.
Search = Generator[Step, torch.Tensor, GenerationOutput]


def _nothing_decided() -> list[list[int]]:
    return []


def search(
    rows: RowState, batch_size: int, params: GenerationParams, special: SpecialTokens, device: torch.device | str
) -> Search:
    """Decode `batch_size` inputs whose encoder outputs `rows` holds (one row each).

    `params` must have passed `GenerationParams.validate`. `device` is where the first decoder tokens are
    created; all later bookkeeping follows the device of the logits sent in.
    """
    processors = build_processors(params, special.eos_token_id)
    start = torch.full((batch_size,), special.decoder_start_token_id, dtype=torch.long, device=device)
    logits = (yield Step(start, _nothing_decided)).float()
    if params.is_beam_search:
        return (yield from _beam_search(rows, logits, params, special, processors))
    return (yield from _greedy_or_sample(rows, logits, params, special, processors))


def generate(
    state: DecoderState,
    batch_size: int,
    params: GenerationParams,
    special: SpecialTokens,
    device: torch.device | str = "cpu",
) -> GenerationOutput:
    """`search` alone, run to the end on a decoder of its own."""
    running = search(state, batch_size, params, special, device)
    step = next(running)
    while True:
        try:
            step = running.send(state.step(step.tokens))
        except StopIteration as finished:
            return finished.value


# --- greedy and sampling (HF `_sample`) ----------------------------------------------------------------------


def _greedy_or_sample(
    state: RowState,
    logits: torch.Tensor,
    params: GenerationParams,
    special: SpecialTokens,
    processors: ProcessorChain,
) -> Search:
    device = logits.device
    copies = params.num_return_sequences
    if copies > 1:
        # HF repeats each input before decoding; the copies' first logits are the same, so copy them instead.
        repeat = torch.arange(logits.shape[0], device=device).repeat_interleave(copies)
        state.select(repeat)
        logits = logits[repeat]
    rows = logits.shape[0]
    pick = _Sampler.create(params, rows, device) if params.do_sample else _argmax
    live = torch.arange(rows, device=device)  # output row of each decoder row
    # The tokens of each live row so far, start token first; written in place, read as a prefix view.
    history = torch.full((rows, 1 + params.max_new_tokens), special.decoder_start_token_id, device=device)
    generated = torch.full((rows, params.max_new_tokens), special.pad_token_id, dtype=torch.long, device=device)
    scores = torch.zeros(rows, dtype=torch.float32, device=device)
    for step in range(params.max_new_tokens):
        next_scores = processors(logits, history[:, : step + 1])
        tokens = pick(next_scores, live)
        chosen = next_scores.log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1)
        if live.shape[0] == rows:  # no row has ended: plain slices, cheaper than indexing by `live`
            scores += chosen
            generated[:, step] = tokens
        else:
            scores[live] += chosen
            generated[live, step] = tokens
        if step + 1 == params.max_new_tokens:
            break
        running = tokens != special.eos_token_id
        still_running = int(running.sum())  # the one host sync of the step
        if still_running == 0:
            break
        history[:, step + 1] = tokens
        if still_running < live.shape[0]:
            keep = running.nonzero().squeeze(1)
            state.select(keep)
            live, history, tokens = live[keep], history[keep], tokens[keep]
        logits = (yield Step(tokens, _prefix_of(generated, step + 1, special.eos_token_id))).float()
    start = torch.full((rows, 1), special.decoder_start_token_id, dtype=torch.long, device=device)
    return GenerationOutput(torch.cat([start, generated[:, : step + 1]], dim=1), scores)


def _prefix_of(generated: torch.Tensor, length: int, eos: int) -> Callable[[], list[list[int]]]:
    def decided() -> list[list[int]]:
        return [_up_to_eos(row, eos) for row in generated[:, :length].tolist()]

    return decided


def _up_to_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def _argmax(scores: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    if scores.device.type == "cpu":
        # numpy's argmax is vectorized and ~8x faster than torch's on CPU; both return the first maximum.
        return torch.from_numpy(scores.numpy().argmax(axis=-1))
    return torch.argmax(scores, dim=-1)


@dataclass(frozen=True)
class _Sampler:
    """`torch.multinomial` as HF `_sample` calls it, on a private generator when a seed is given.

    HF keeps sampling finished rows (and discards the tokens), while we drop them. `torch.multinomial` draws
    its random numbers per element of the probability matrix whatever the values, so sampling a full-size
    matrix (placeholder rows for dropped sequences) keeps the random stream, hence every running row's token,
    equal to HF's: with `seed=s` the output equals HF's after `torch.manual_seed(s)` on the same device.
    Without a seed it uses the global generator, as HF does.
    """

    rows: int
    generator: torch.Generator | None

    @classmethod
    def create(cls, params: GenerationParams, rows: int, device: torch.device) -> _Sampler:
        if params.seed is None:
            return cls(rows, None)
        return cls(rows, torch.Generator(device=device).manual_seed(params.seed))

    def __call__(self, scores: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        if probs.shape[0] == self.rows:
            return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        full = probs.new_ones((self.rows, probs.shape[1]))
        full[live] = probs
        return torch.multinomial(full, 1, generator=self.generator).squeeze(1)[live]


# --- beam search (HF `_beam_search`) -------------------------------------------------------------------------


@dataclass
class _Beams:
    """Beam search state of the inputs still searching ("active"), A of them, `width` beams each.

    `width` is 1 before the first step: all of HF's initial beams hold the start token and HF scores all but
    the first at -1e9, so its first top-k only ever picks from the first beam; one row gives the same result.
    Finished hypotheses ("final") are kept sorted by score like HF's `sequences` / `beam_scores`.
    """

    inputs: torch.Tensor  # [A] batch index of each active input
    history: torch.Tensor  # [A, width, length] tokens of the running beams, start token included
    running_scores: torch.Tensor  # [A, width] summed processed log-probs
    final_tokens: torch.Tensor  # [A, num_beams, length]
    final_scores: torch.Tensor  # [A, num_beams] length-penalized; _EXCLUDED-ish for empty slots
    final_lengths: torch.Tensor  # [A, num_beams] generated tokens of each hypothesis
    final_filled: torch.Tensor  # [A, num_beams] bool, HF `is_sent_finished`
    improvable: torch.Tensor  # [A] bool, HF `is_early_stop_heuristic_unsatisfied`

    @classmethod
    def start(cls, batch_size: int, num_beams: int, start_token: int, fill: int, device) -> _Beams:
        return cls(
            inputs=torch.arange(batch_size, device=device),
            history=torch.full((batch_size, 1, 1), start_token, dtype=torch.long, device=device),
            running_scores=torch.zeros((batch_size, 1), dtype=torch.float32, device=device),
            final_tokens=torch.full((batch_size, num_beams, 1), fill, dtype=torch.long, device=device),
            final_scores=torch.full((batch_size, num_beams), _EXCLUDED, dtype=torch.float32, device=device),
            final_lengths=torch.zeros((batch_size, num_beams), dtype=torch.long, device=device),
            final_filled=torch.zeros((batch_size, num_beams), dtype=torch.bool, device=device),
            improvable=torch.ones(batch_size, dtype=torch.bool, device=device),
        )

    def subset(self, keep: torch.Tensor) -> _Beams:
        return _Beams(*(getattr(self, name)[keep] for name in self.__dataclass_fields__))


@dataclass(frozen=True)
class _Candidates:
    """The 2 * num_beams best continuations of an input's beams, best first (HF `_get_top_k_continuations`).

    Two per beam, because with one EOS id at most one per beam ends: `num_beams` of them always keep running.
    """

    scores: torch.Tensor  # [A, 2 * num_beams] summed processed log-probs
    parents: torch.Tensor  # [A, 2 * num_beams] beam (0 <= parent < width) each continues
    tokens: torch.Tensor  # [A, 2 * num_beams, length + 1] whole sequences
    ends: torch.Tensor  # [A, 2 * num_beams] bool: ends with EOS or reaches max_new_tokens


def _beam_search(
    state: RowState,
    logits: torch.Tensor,
    params: GenerationParams,
    special: SpecialTokens,
    processors: ProcessorChain,
) -> Search:
    device = logits.device
    batch_size, num_beams = logits.shape[0], params.num_beams
    # HF `_beam_search` `output_fill_value = pad_token_id or eos_token_id[0]`: a pad id of 0 is falsy, so
    # T5 beam outputs are padded with EOS.
    fill = special.pad_token_id or special.eos_token_id
    beams = _Beams.start(batch_size, num_beams, special.decoder_start_token_id, fill, device)
    out_tokens = torch.full((batch_size, num_beams, 1 + params.max_new_tokens), fill, dtype=torch.long, device=device)
    out_scores = torch.empty((batch_size, num_beams), dtype=torch.float32, device=device)
    out_lengths = torch.zeros((batch_size, num_beams), dtype=torch.long, device=device)
    for generated in range(1, params.max_new_tokens + 1):
        if generated > 1:
            decided = _beam_prefixes(beams, out_tokens, out_lengths, special.eos_token_id)
            logits = (yield Step(beams.history[:, :, -1].reshape(-1), decided)).float()
        last = generated == params.max_new_tokens
        candidates = _top_continuations(beams, logits, processors, num_beams, special.eos_token_id, last)
        width = beams.history.shape[1]
        beams, parents = _advance(beams, candidates, params, generated, fill)
        done = ~beams.improvable
        if params.early_stopping is True:
            # HF `_beam_search_has_unfinished_sequences` / `_update_finished_beams`: once every slot holds a
            # finished hypothesis, nothing can enter, so the input is over.
            done |= beams.final_filled.all(dim=-1)
        if last:
            done = torch.ones_like(done)
        finished = int(done.sum())  # the one host sync of the step
        if finished:
            _store(beams, done.nonzero().squeeze(1), out_tokens, out_scores, out_lengths)
        if finished == done.shape[0]:
            break
        # Row r of the next step continues row `parent` of the same input.
        rows = torch.arange(done.shape[0], device=device)[:, None] * width + parents
        if finished or width == 1:
            keep = (~done).nonzero().squeeze(1)
            beams = beams.subset(keep)
            state.select(rows[keep].reshape(-1))
        else:
            state.reorder_beams(rows.reshape(-1))
    return _beam_output(out_tokens, out_scores, out_lengths, params.num_return_sequences)


def _beam_prefixes(
    beams: _Beams, out_tokens: torch.Tensor, out_lengths: torch.Tensor, eos: int
) -> Callable[[], list[list[int]]]:
    """Per input, the generated tokens its best hypothesis has whatever happens next: all of a finished
    input's best one, else the prefix every running beam and every kept finished hypothesis share (the
    answer is one of those or a continuation of a running beam)."""

    def decided() -> list[list[int]]:
        prefixes = [
            _up_to_eos(row[1 : 1 + length], eos)
            for row, length in zip(out_tokens[:, 0].tolist(), out_lengths[:, 0].tolist(), strict=True)
        ]
        history = beams.history[:, :, 1:]
        finals = beams.final_tokens[:, :, 1:]  # as long as the history: both grow by one per step
        same = (history == history[:, :1]).all(dim=1)
        same &= ((finals == history[:, :1]) | ~beams.final_filled[:, :, None]).all(dim=1)
        shared = same.to(torch.int64).cumprod(dim=1).sum(dim=1)
        for index, prefix_length, tokens in zip(
            beams.inputs.tolist(), shared.tolist(), history[:, 0].tolist(), strict=True
        ):
            prefixes[index] = tokens[:prefix_length]
        return prefixes

    return decided


def _top_continuations(
    beams: _Beams,
    logits: torch.Tensor,
    processors: ProcessorChain,
    num_beams: int,
    eos_token_id: int,
    last: bool,
) -> _Candidates:
    active, width, length = beams.history.shape
    # HF beam search processes log-probs, not logits.
    log_probs = processors(logits.log_softmax(dim=-1), beams.history.reshape(active * width, length))
    vocab = log_probs.shape[-1]
    totals = log_probs.reshape(active, width, vocab) + beams.running_scores[:, :, None]
    scores, flat = torch.topk(totals.reshape(active, width * vocab), k=2 * num_beams)
    parents, tokens = flat // vocab, flat % vocab
    prefix = beams.history.gather(1, parents[:, :, None].expand(-1, -1, length))
    sequences = torch.cat([prefix, tokens[:, :, None]], dim=2)
    # HF's stopping criteria on the candidates: EosTokenCriteria, MaxLengthCriteria.
    ends = torch.full_like(tokens, True, dtype=torch.bool) if last else tokens == eos_token_id
    return _Candidates(scores, parents, sequences, ends)


def _advance(
    beams: _Beams, candidates: _Candidates, params: GenerationParams, generated: int, fill: int
) -> tuple[_Beams, torch.Tensor]:
    """One step of bookkeeping; returns the new beams and, per new running beam, the old beam it continues."""
    num_beams = params.num_beams
    # HF `_get_running_beams_for_next_iteration`: the best candidates that did not end keep running.
    running_scores, pick = torch.topk(candidates.scores + candidates.ends.to(torch.float32) * _EXCLUDED, num_beams)
    history = candidates.tokens.gather(1, pick[:, :, None].expand(-1, -1, candidates.tokens.shape[2]))
    parents = candidates.parents.gather(1, pick)

    # HF `_update_finished_beams`: only the best `num_beams` candidates may become final, scored with the
    # generated length INCLUDING the EOS token. Inputs that can't improve or are full never get here (dropped).
    enters = candidates.ends.clone()
    enters[:, num_beams:] = False
    entry_scores = candidates.scores / (generated**params.length_penalty)
    entry_scores = entry_scores + (~enters).to(torch.float32) * _EXCLUDED
    padded = torch.nn.functional.pad(beams.final_tokens, (0, 1), value=fill)
    final_scores, best = torch.topk(torch.cat([beams.final_scores, entry_scores], dim=1), num_beams)

    def merge(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        merged = torch.cat([old, new], dim=1)
        index = best if merged.dim() == 2 else best[:, :, None].expand(-1, -1, merged.shape[2])
        return merged.gather(1, index)

    entry_lengths = torch.full_like(candidates.parents, generated)
    final_filled = merge(beams.final_filled, enters)
    improvable = beams.improvable & _can_improve(running_scores, final_scores, final_filled, params, generated)
    new_beams = _Beams(
        inputs=beams.inputs,
        history=history,
        running_scores=running_scores,
        final_tokens=merge(padded, candidates.tokens),
        final_scores=final_scores,
        final_lengths=merge(beams.final_lengths, entry_lengths),
        final_filled=final_filled,
        improvable=improvable,
    )
    return new_beams, parents


def _can_improve(
    running_scores: torch.Tensor,
    final_scores: torch.Tensor,
    final_filled: torch.Tensor,
    params: GenerationParams,
    generated: int,
) -> torch.Tensor:
    """HF `_check_early_stop_heuristic`: can the best running beam still beat the worst final hypothesis?

    The running beam is scored as if it ended now (`early_stopping` False or True), or, with "never" and a
    positive length penalty, as if it ended at max_new_tokens (the most a longer hypothesis could gain).
    While a slot is empty its "worst score" is -1e9, so any running beam can improve on it.
    """
    length = generated
    if params.early_stopping == "never" and params.length_penalty > 0.0:
        length = params.max_new_tokens
    best_running = running_scores[:, :1] / (length**params.length_penalty)
    worst_final = torch.where(final_filled, final_scores.min(dim=1, keepdim=True).values, _EXCLUDED)
    return (best_running > worst_final).any(dim=1)


def _store(
    beams: _Beams, done: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor, lengths: torch.Tensor
) -> None:
    """Copy the final hypotheses of the inputs at positions `done` into the output buffers."""
    inputs = beams.inputs[done]
    tokens[inputs, :, : beams.final_tokens.shape[2]] = beams.final_tokens[done]
    scores[inputs] = beams.final_scores[done]
    lengths[inputs] = beams.final_lengths[done]


def _beam_output(
    tokens: torch.Tensor, scores: torch.Tensor, lengths: torch.Tensor, num_return_sequences: int
) -> GenerationOutput:
    # The best `num_return_sequences` per input, cut to the longest of them (HF crops with `beam_indices`).
    tokens = tokens[:, :num_return_sequences].flatten(0, 1)
    lengths = lengths[:, :num_return_sequences]
    width = 1 + int(lengths.max())
    return GenerationOutput(tokens[:, :width], scores[:, :num_return_sequences].flatten())
