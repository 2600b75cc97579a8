"""Per-request generation parameters: Hugging Face names, Hugging Face defaults, and their checks.

The defaults are `GenerationConfig._get_default_generation_params()` of transformers 5.x, so a request that
sets nothing decodes like `model.generate(input_ids, max_new_tokens=...)`. `max_new_tokens` has no default
here: HF's default (`max_length=20`) counts the prompt, and the server picks its own default from its spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

EarlyStopping = bool | Literal["never"]


class InvalidParameter(ValueError):
    """A request parameter is outside what the server accepts; the message names the field and the range."""


@dataclass(frozen=True)
class Limits:
    """Server-side bounds, fixed when the model repository is built."""

    max_new_tokens: int
    max_num_beams: int


@dataclass(frozen=True)
class GenerationParams:
    """How to decode one request.

    Mode: `num_beams > 1` is beam search, else `do_sample` picks sampling or greedy (as HF's
    `GenerationConfig.get_generation_mode`). Sampling-only fields (`temperature`, `top_k`, `top_p`, `seed`) are
    ignored by greedy and beam search; beam-only fields (`length_penalty`, `early_stopping`) by the others, as HF
    ignores them.

    `num_return_sequences` > 1 is allowed for beam search (<= num_beams) and for sampling (independent samples
    per input, as HF); greedy would return identical copies, so it is rejected (as HF does). Beam sampling
    (`num_beams > 1` with `do_sample`) is not implemented and rejected.
    """

    max_new_tokens: int
    min_new_tokens: int = 0
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int | None = None

    @property
    def is_beam_search(self) -> bool:
        return self.num_beams > 1

    def validate(self, limits: Limits) -> GenerationParams:
        """Raise `InvalidParameter` on the first bad field; return self so calls can be chained."""
        _check_int("max_new_tokens", self.max_new_tokens, 1, limits.max_new_tokens)
        _check_int("min_new_tokens", self.min_new_tokens, 0, self.max_new_tokens)
        _check_int("num_beams", self.num_beams, 1, limits.max_num_beams)
        self._check_return_sequences()
        # generated_length ** length_penalty must stay finite in float32 up to 512+ tokens
        _check_between("length_penalty", self.length_penalty, -10.0, 10.0)
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise InvalidParameter(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, None)
        _check_between("repetition_penalty", self.repetition_penalty, _SCALE_MIN, _SCALE_MAX)
        if not isinstance(self.do_sample, bool):
            raise InvalidParameter(f"do_sample must be a boolean, got {self.do_sample!r}")
        if self.do_sample and self.is_beam_search:
            raise InvalidParameter(
                f"do_sample=true with num_beams={self.num_beams} (beam sampling) is not supported; "
                "use num_beams=1 to sample or do_sample=false for beam search"
            )
        _check_between("temperature", self.temperature, _SCALE_MIN, _SCALE_MAX)
        _check_int("top_k", self.top_k, 0, None)
        _check_finite("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParameter(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**63 - 1)
        return self

    def _check_return_sequences(self) -> None:
        if self.is_beam_search:
            _check_int("num_return_sequences", self.num_return_sequences, 1, self.num_beams)
        elif self.do_sample:
            _check_int("num_return_sequences", self.num_return_sequences, 1, None)
        elif self.num_return_sequences != 1:
            raise InvalidParameter(
                f"num_return_sequences must be 1 for greedy decoding (set do_sample=true or num_beams > 1), "
                f"got {self.num_return_sequences!r}"
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    if not _is_int(value):
        raise InvalidParameter(f"{name} must be an integer, got {value!r}")
    if high is None:
        if value < low:
            raise InvalidParameter(f"{name} must be >= {low}, got {value}")
    elif not low <= value <= high:
        raise InvalidParameter(f"{name} must be between {low} and {high}, got {value}")


def _check_finite(name: str, value: object) -> None:
    if not _is_real(value) or not math.isfinite(value):
        raise InvalidParameter(f"{name} must be a finite number, got {value!r}")


# Logits are divided (or multiplied) by temperature and repetition_penalty in float32: beyond these bounds
# they overflow to inf and the scores turn to NaN.
_SCALE_MIN, _SCALE_MAX = 1e-4, 1e4


def _check_between(name: str, value: object, low: float, high: float) -> None:
    _check_finite(name, value)
    if not low <= value <= high:
        raise InvalidParameter(f"{name} must be between {low:g} and {high:g}, got {value}")
