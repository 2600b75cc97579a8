"""Check what was built against PyTorch before the build says it is done.

Numerics: the encoder, each branch of the merged decoder and the cross K/V graph against the PyTorch
modules they were traced from, and the whole encoder -> first step -> cached steps chain against the
transformers forward pass. Generation: greedy and beam search decoded with the exported graphs (the same search
code the server runs) must equal `transformers.generate` token for token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import (
    DynamicCache,
    EncoderDecoderCache,
    GenerationConfig,
    PreTrainedTokenizerBase,
    T5ForConditionalGeneration,
)

from t5_triton.model_repository.t5_runtime import spec
from t5_triton.model_repository.t5_runtime.batch_cache import BatchCache
from t5_triton.model_repository.t5_runtime.generator import T5Generator
from t5_triton.model_repository.t5_runtime.onnx_runner import create_session, run_numpy
from t5_triton.model_repository.t5_runtime.params import GenerationParams
from t5_triton.model_repository.t5_runtime.search import trim_sequence
from t5_triton.model_repository.t5_runtime.torch_session import TorchSession

from .export import CachedStepReference, EncoderGraph, FirstStepDecoderGraph, sample_inputs


@dataclass(frozen=True)
class Tolerance:
    max_abs: float  # on values scaled to max |reference| = 1
    rel: float  # ||a - b|| / ||b||


TOLERANCES = {
    "float32": Tolerance(max_abs=1e-4, rel=1e-5),
    # Sanity bounds only (a broken graph is off by ~100%); int8 quality is judged by token agreement.
    "int8": Tolerance(max_abs=0.5, rel=0.3),
    # fp16 keeps 11 significant bits (4.9e-4 relative); through the layers that is ~2e-3 (random-t5-small,
    # emulated fp16), 10x under these bounds. An overflow gives inf/NaN or an error near 100%.
    "fp16": Tolerance(max_abs=0.05, rel=0.02),
}

# Varied prompts: different lengths give padded batches and, on a non-degenerate model, varied outputs.
SAMPLE_TEXTS = (
    "translate English to German: That is good.",
    "summarize: The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "question: What is the capital of France? context: Paris is the capital and largest city of France.",
    "translate English to French: I would like a cup of coffee, please.",
    "cola sentence: The book was written by her.",
    "summarize: Rain fell all day, so the match was moved to Sunday and the fans went home early.",
)


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str
    metrics: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def compare_arrays(name: str, actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> CheckResult:
    if actual.shape != expected.shape:
        return CheckResult(name, False, f"shape {actual.shape} != expected {expected.shape}")
    actual64, expected64 = actual.astype(np.float64), expected.astype(np.float64)
    scale = max(float(np.abs(expected64).max(initial=0.0)), 1e-12)
    diff = actual64 - expected64
    max_abs = float(np.abs(diff).max(initial=0.0))
    rel = float(np.linalg.norm(diff) / max(np.linalg.norm(expected64), 1e-12))
    passed = max_abs / scale <= tol.max_abs and rel <= tol.rel
    metrics = {"max_abs_diff": max_abs, "rel_error": rel, "ref_max_abs": scale, **asdict(tol)}
    detail = f"max abs diff {max_abs:.2e} (ref max {scale:.2e}), rel error {rel:.2e}"
    return CheckResult(name, passed, detail, metrics)


def _np(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.contiguous().numpy() for k, v in tensors.items()}


def check_encoder(model, session: ort.InferenceSession, tol: Tolerance) -> list[CheckResult]:
    results = []
    wrapper = EncoderGraph(model).eval()
    for rows, src_len in ((2, 9), (1, 3)):
        x = sample_inputs(model, rows=rows, src_len=src_len)
        feeds = {spec.ENCODER_INPUT_IDS: x["input_ids"], spec.ENCODER_ATTENTION_MASK: x["attention_mask"]}
        with torch.inference_mode():
            expected = wrapper(*feeds.values()).numpy()
        actual = run_numpy(session, _np(feeds))[spec.ENCODER_HIDDEN_STATES]
        results.append(compare_arrays(f"encoder rows={rows} src_len={src_len}", actual, expected, tol))
    return results


def check_decoder_branches(model, session: ort.InferenceSession, tol: Tolerance) -> list[CheckResult]:
    dims = spec.ModelDims.from_hf(model.config, model.generation_config)
    x = sample_inputs(model, rows=3, src_len=7, past_len=4)
    first = FirstStepDecoderGraph(model).eval()
    cached = CachedStepReference(model).eval()
    with torch.inference_mode():
        expected_first = first(x["decoder_input_ids"], x["encoder_hidden_states"], x["attention_mask"])
        expected_cached = cached(
            x["decoder_input_ids"], x["attention_mask"], x["past_self_kv"], x["cross_kv"], x["decoder_attention_mask"]
        )
    common = {spec.DECODER_INPUT_IDS: x["decoder_input_ids"], spec.DECODER_ENCODER_MASK: x["attention_mask"]}
    no_kv = torch.empty(dims.kv_shape(3, 0))
    out_first = run_numpy(
        session,
        _np(
            {
                **common,
                spec.USE_CACHE_BRANCH: torch.tensor([False]),
                spec.ENCODER_HIDDEN_STATES: x["encoder_hidden_states"],
                **spec.layer_kv_feeds(spec.PAST_SELF_KV, no_kv),
                **spec.layer_kv_feeds(spec.CROSS_KV, no_kv),
                spec.DECODER_SELF_MASK: torch.ones((3, 1), dtype=torch.int64),
            }
        ),
    )
    out_cached = run_numpy(
        session,
        _np(
            {
                **common,
                spec.USE_CACHE_BRANCH: torch.tensor([True]),
                spec.ENCODER_HIDDEN_STATES: torch.empty(3, 0, dims.d_model),
                **spec.layer_kv_feeds(spec.PAST_SELF_KV, x["past_self_kv"]),
                **spec.layer_kv_feeds(spec.CROSS_KV, x["cross_kv"]),
                spec.DECODER_SELF_MASK: x["decoder_attention_mask"],
            }
        ),
    )
    results = [
        compare_arrays(f"decoder first-step branch: {name}", out_first[name], ref.numpy(), tol)
        for name, ref in zip(spec.DECODER_OUTPUTS, expected_first, strict=True)
    ]
    results += [
        compare_arrays(f"decoder cache branch: {name}", out_cached[name], ref.numpy(), tol)
        for name, ref in zip((spec.LOGITS, spec.NEW_SELF_KV), expected_cached, strict=True)
    ]
    results.append(_check_left_padding(session, x, out_cached[spec.LOGITS], dims, tol))
    re_emitted = out_cached[spec.NEW_CROSS_KV].size
    results.append(
        CheckResult(
            "decoder cache branch re-emits no cross-attention K/V",
            re_emitted == 0,
            f"{re_emitted} values in {spec.NEW_CROSS_KV}",
            {"values": int(re_emitted)},
        )
    )
    return results


def check_cross_kv(model, session: ort.InferenceSession, tol: Tolerance) -> CheckResult:
    """The cross K/V graph (traced from `CrossKVGraph`) against the cross K/V of the first-step decoder
    (PyTorch), which the rows that join without a first step of their own must get."""
    x = sample_inputs(model, rows=3, src_len=7)
    with torch.inference_mode():
        expected = FirstStepDecoderGraph(model).eval()(
            x["decoder_input_ids"], x["encoder_hidden_states"], x["attention_mask"]
        )[2]
    actual = run_numpy(session, _np({spec.ENCODER_HIDDEN_STATES: x["encoder_hidden_states"]}))[spec.NEW_CROSS_KV]
    return compare_arrays("cross K/V graph == the first step's cross K/V", actual, expected.numpy(), tol)


def _check_left_padding(session, x: dict, padded_logits: np.ndarray, dims: spec.ModelDims, tol) -> CheckResult:
    """Each row of a left-padded cached step alone, its past unpadded: the logits must not change.

    This is what lets requests at different steps share one decoder call (in-flight batching).
    """
    alone = []
    for row, mask in enumerate(x["decoder_attention_mask"]):
        past = int(mask.sum()) - 1
        feeds = {
            spec.USE_CACHE_BRANCH: torch.tensor([True]),
            spec.DECODER_INPUT_IDS: x["decoder_input_ids"][row : row + 1],
            spec.ENCODER_HIDDEN_STATES: torch.empty(1, 0, dims.d_model),
            spec.DECODER_ENCODER_MASK: x["attention_mask"][row : row + 1],
            **spec.layer_kv_feeds(
                spec.PAST_SELF_KV, x["past_self_kv"][:, :, row : row + 1, :, x["past_self_kv"].shape[4] - past :]
            ),
            **spec.layer_kv_feeds(spec.CROSS_KV, x["cross_kv"][:, :, row : row + 1]),
            spec.DECODER_SELF_MASK: torch.ones((1, past + 1), dtype=torch.int64),
        }
        alone.append(run_numpy(session, _np(feeds))[spec.LOGITS])
    return compare_arrays(
        "decoder cache branch: left-padded rows == each row alone", padded_logits, np.concatenate(alone), tol
    )


def check_chain(model, tokenizer, encoder: ort.InferenceSession, decoder: ort.InferenceSession, tol) -> CheckResult:
    """Teacher-forced steps through the exported graphs vs one transformers forward pass."""
    dims = spec.ModelDims.from_hf(model.config, model.generation_config)
    batch = tokenizer(list(SAMPLE_TEXTS[:3]), return_tensors="pt", padding=True)
    gen = torch.Generator().manual_seed(1)
    targets = torch.randint(3, dims.vocab_size, (3, 6), generator=gen)
    targets[:, 0] = dims.decoder_start_token_id
    with torch.inference_mode():
        expected = model(**batch, decoder_input_ids=targets).logits.numpy()
    states = run_numpy(encoder, _np(dict(batch)))[spec.ENCODER_HIDDEN_STATES]
    cache = BatchCache(TorchSession(decoder), dims)
    first = cache.first_step(targets[:, 0], torch.from_numpy(states), batch["attention_mask"])
    cache.add(first[spec.NEW_SELF_KV], first[spec.NEW_CROSS_KV], batch["attention_mask"])
    steps = [first[spec.LOGITS]] + [cache.step(targets[:, t]) for t in range(1, targets.shape[1])]
    actual = torch.stack(steps, dim=1).numpy()
    return compare_arrays("encoder + decoder steps vs transformers forward", actual, expected, tol)


def _variety(sequences: torch.Tensor, eos: int) -> dict:
    ends = [(row == eos).nonzero() for row in sequences]
    return {
        "mean_distinct_tokens": float(np.mean([len(set(row.tolist())) for row in sequences])),
        "share_ending_on_eos": float(np.mean([len(e) > 0 for e in ends])),
        "distinct_sequences": len({tuple(row.tolist()) for row in sequences}),
    }


def reference_generate(model: T5ForConditionalGeneration, batch, generation_config: GenerationConfig) -> torch.Tensor:
    """`model.generate`, with a cache that grows to the decoder's depth.

    transformers 5.23 sizes the default cache from the encoder's layer count, so `generate` raises
    IndexError for T5 checkpoints with num_decoder_layers > num_layers; a lazily grown cache avoids it.
    """
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    return model.generate(**batch, generation_config=generation_config, past_key_values=cache)


def token_match_rate(actual: list[list[int]], expected: list[list[int]]) -> float:
    """Mean share of positions where two generations agree (over the longer of each pair, padding cut)."""
    rates = []
    for a, e in zip(actual, expected, strict=True):
        a, e = trim_sequence(a), trim_sequence(e)
        rates.append(sum(x == y for x, y in zip(a, e, strict=False)) / max(len(a), len(e)))
    return float(np.mean(rates))


def check_generation(
    model: T5ForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    encoder: ort.InferenceSession,
    decoder: ort.InferenceSession,
    max_new_tokens: int = 20,
    min_token_match: float | None = None,
    cross_kv: ort.InferenceSession | None = None,
) -> list[CheckResult]:
    """Greedy and beam 4 through the serving code path (`T5Generator`, with the cross K/V graph when
    given, as the server runs it) vs `transformers.generate` (fp32).

    With `min_token_match` None every sequence must be equal token for token; else the token match
    rate must reach it (reduced precision).
    """
    dims = spec.ModelDims.from_hf(model.config, model.generation_config)
    cross_call = None if cross_kv is None else TorchSession(cross_kv)
    generator = T5Generator(TorchSession(encoder), TorchSession(decoder), dims, cross_kv=cross_call)
    batch = tokenizer(list(SAMPLE_TEXTS), return_tensors="pt", padding=True)
    results = []
    for label, num_beams in (("greedy", 1), ("beam search, 4 beams", 4)):
        # A fresh generation config: a checkpoint's own defaults (num_beams, no_repeat_ngram_size...)
        # must not slip into the reference when our side does not apply them.
        reference = GenerationConfig(
            decoder_start_token_id=dims.decoder_start_token_id,
            eos_token_id=dims.eos_token_id,
            pad_token_id=dims.pad_token_id,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
        )
        with torch.inference_mode():
            expected = reference_generate(model, batch, reference)
            params = GenerationParams(max_new_tokens=max_new_tokens, num_beams=num_beams)
            actual = generator.run(batch["input_ids"], batch["attention_mask"], params).sequences
        rate = token_match_rate(actual.tolist(), expected.tolist())
        mismatched = sum(
            trim_sequence(a) != trim_sequence(e) for a, e in zip(actual.tolist(), expected.tolist(), strict=True)
        )
        equal = f"{len(SAMPLE_TEXTS) - mismatched}/{len(SAMPLE_TEXTS)} sequences equal token for token"
        if min_token_match is None:
            name, passed = f"generation {label} == transformers.generate", mismatched == 0
        else:
            name, passed = f"generation {label}: token match with transformers fp32", rate >= min_token_match
            equal += f", token match rate {rate:.3f} (minimum {min_token_match})"
        metrics = {"inputs": len(SAMPLE_TEXTS), "mismatched": mismatched, "token_match_rate": rate}
        results.append(CheckResult(name, passed, equal, {**metrics, **_variety(expected, dims.eos_token_id)}))
    return results


def verify_build(
    model: T5ForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    encoder_path: Path,
    decoder_path: Path,
    precision: str = "float32",
    min_token_match: float | None = None,
    cross_kv_path: Path | None = None,
) -> list[CheckResult]:
    """Every check of the graphs at `precision` against the PyTorch model (fp32)."""
    tol = TOLERANCES[precision]
    encoder = create_session(encoder_path)
    decoder = create_session(decoder_path)
    cross_kv = None if cross_kv_path is None else create_session(cross_kv_path)
    results = check_encoder(model, encoder, tol)
    results += check_decoder_branches(model, decoder, tol)
    if cross_kv is not None:
        results.append(check_cross_kv(model, cross_kv, tol))
    results.append(check_chain(model, tokenizer, encoder, decoder, tol))
    results += check_generation(model, tokenizer, encoder, decoder, min_token_match=min_token_match, cross_kv=cross_kv)
    return results
