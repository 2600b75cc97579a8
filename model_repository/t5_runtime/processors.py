"""Logits processors with the semantics and the order of transformers' `GenerationMixin._get_logits_processor`.

Each processor maps `scores` [rows, vocab] to new scores given `history` [rows, length], the tokens each row
has so far INCLUDING the decoder start token (HF passes the whole decoder `input_ids`, so the start token
counts for the repetition penalty and the n-gram ban). Greedy and sampling feed raw logits; beam search feeds
log-softmaxed logits (HF `_beam_search`): the same processors, different inputs, hence different results
(e.g. the repetition penalty always multiplies negative log-probs).

The arithmetic matches HF's operation for operation, so the outputs are bit-identical at fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .params import GenerationParams

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# The decoder prompt of an encoder-decoder model is the start token alone.
DECODER_PROMPT_LENGTH = 1


@dataclass(frozen=True)
class RepetitionPenalty:
    """HF `RepetitionPenaltyLogitsProcessor`: each token seen once or more is penalized once."""

    penalty: float

    def __call__(self, scores: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        seen = scores.gather(1, history)
        # Dividing a negative score would raise it, so negative scores are multiplied instead.
        penalized = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return scores.scatter(1, history, penalized)


@dataclass(frozen=True)
class NoRepeatNGram:
    """HF `NoRepeatNGramLogitsProcessor`: ban tokens that would complete an n-gram already in the row."""

    size: int

    def __call__(self, scores: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        length = history.shape[1]
        if length < self.size:
            return scores
        windows = history.unfold(1, self.size, 1)  # [rows, length - size + 1, size]
        suffix = history[:, length - self.size + 1 :]  # the n-1 tokens the next n-gram starts with
        repeats = (windows[..., :-1] == suffix[:, None, :]).all(dim=-1)
        # Count matches per token (scatter_add, not scatter: several windows may end on the same token).
        counts = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
        counts.scatter_add_(1, windows[..., -1], repeats.to(torch.int32))
        return scores.masked_fill(counts > 0, -float("inf"))


@dataclass(frozen=True)
class MinNewTokens:
    """HF `MinNewTokensLengthLogitsProcessor` (and `MinLengthLogitsProcessor`, which `generate` adds with
    `min_length = min_new_tokens + 1` for the same effect): no EOS before `min_new_tokens` tokens."""

    min_new_tokens: int
    eos_token_id: int

    def __call__(self, scores: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        if history.shape[1] - DECODER_PROMPT_LENGTH >= self.min_new_tokens:
            return scores
        scores = scores.clone()
        scores[:, self.eos_token_id] = -float("inf")
        return scores


@dataclass(frozen=True)
class Temperature:
    """HF `TemperatureLogitsWarper`."""

    temperature: float

    def __call__(self, scores: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


@dataclass(frozen=True)
class TopK:
    """HF `TopKLogitsWarper`: keep the tokens scoring at least the k-th best score (ties included)."""

    top_k: int

    def __call__(self, scores: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.shape[-1])
        kth_best = torch.topk(scores, k).values[..., -1:]
        return scores.masked_fill(scores < kth_best, -float("inf"))


@dataclass(frozen=True)
class TopP:
    """HF `TopPLogitsWarper`: drop the least likely tokens whose cumulative probability is <= 1 - top_p.

    Sorted ascending and summed from the least likely token, exactly as HF, so the float cumulative sums (and
    hence the cut) are the same; the most likely token is always kept.
    """

    top_p: float

    def __call__(self, scores: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        ascending, order = torch.sort(scores, descending=False)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - self.top_p)
        drop_sorted[..., -1] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        return scores.masked_fill(drop, -float("inf"))


@dataclass(frozen=True)
class ProcessorChain:
    processors: tuple[Processor, ...]

    def __call__(self, scores: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        for processor in self.processors:
            scores = processor(scores, history)
        return scores


def build_processors(params: GenerationParams, eos_token_id: int) -> ProcessorChain:
    """The processors HF's `_get_logits_processor` builds for these parameters, in its order.

    Each is left out under the same condition as in HF (e.g. `top_p == 1.0` is skipped, not applied: applying
    it would still drop zero-probability tokens). The sampling warpers come last and only when sampling.
    """
    chain: list[Processor] = []
    if params.repetition_penalty != 1.0:
        chain.append(RepetitionPenalty(params.repetition_penalty))
    if params.no_repeat_ngram_size > 0:
        chain.append(NoRepeatNGram(params.no_repeat_ngram_size))
    if params.min_new_tokens > 0:
        chain.append(MinNewTokens(params.min_new_tokens, eos_token_id))
    if params.do_sample:
        if params.temperature != 1.0:
            chain.append(Temperature(params.temperature))
        if params.top_k != 0:
            chain.append(TopK(params.top_k))
        if params.top_p < 1.0:
            chain.append(TopP(params.top_p))
    return ProcessorChain(tuple(chain))
