"""`t5_runtime.search.generate` against the real `transformers` `generate`, token for token, on a small T5.

The decoder state used here is the PyTorch T5 decoder itself with an HF `EncoderDecoderCache`, so any difference
comes from the search code. The test model is random but built so that its outputs are varied (many distinct
tokens, several lengths, EOS reached at different steps): `test_test_model_is_varied` checks that before the
parity tests are worth anything.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from t5_triton.model_repository.t5_runtime.params import GenerationParams, InvalidParameter, Limits
from t5_triton.model_repository.t5_runtime.search import GenerationOutput, SpecialTokens, generate

VOCAB = 2048  # large enough that a random decoder does not fall into a short loop at once
EOS = 1
SPECIAL = SpecialTokens(decoder_start_token_id=0, eos_token_id=EOS, pad_token_id=0)
MAX_NEW = 24
INPUT_LENGTHS = (11, 5, 8, 3, 9, 1, 6, 10)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The model is tiny: threads only add overhead, and they spin badly when other processes share the CPUs.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model() -> T5ForConditionalGeneration:
    torch.manual_seed(2)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        num_heads=4,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        decoder_start_token_id=SPECIAL.decoder_start_token_id,
        pad_token_id=SPECIAL.pad_token_id,
        eos_token_id=EOS,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    t5 = T5ForConditionalGeneration(config).eval()
    # transformers 5 ties the lm_head to the embedding whatever the config says, and a tied random T5 repeats
    # one token: a fresh head gives varied tokens. Feature 0 of every embedding is made constant so that it
    # survives to the decoder output, which turns column 0 of the head into a bias: zero, except a positive
    # one for EOS, so that EOS wins now and then and sequences end at different lengths.
    with torch.no_grad():
        t5.shared.weight[:, 0] = 4.0
    head = torch.randn(VOCAB, config.d_model)
    head[:, 0] = 0.0
    head[EOS, 0] = 9.0
    t5.lm_head.weight = nn.Parameter(head)
    assert t5.lm_head.weight.data_ptr() != t5.shared.weight.data_ptr()
    return t5


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (len(INPUT_LENGTHS), max(INPUT_LENGTHS)), generator=generator)
    mask = (torch.arange(ids.shape[1])[None, :] < torch.tensor(INPUT_LENGTHS)[:, None]).long()
    return ids * mask, mask  # right-padded with the pad id 0


class TorchT5State:
    """`DecoderState` over the PyTorch T5 decoder; records the rows of each step."""

    def __init__(self, model: T5ForConditionalGeneration, ids: torch.Tensor, mask: torch.Tensor):
        self.model = model
        with torch.no_grad():
            self.encoded = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        self.mask = mask
        self.cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
        self.rows_per_step: list[int] = []
        self.selects = 0

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.rows_per_step.append(tokens.shape[0])
        with torch.no_grad():
            hidden = self.model.decoder(
                input_ids=tokens[:, None],
                encoder_hidden_states=self.encoded,
                encoder_attention_mask=self.mask,
                past_key_values=self.cache,
                use_cache=True,
            ).last_hidden_state
            if self.model.config.scale_decoder_outputs:
                hidden = hidden * (self.model.config.d_model**-0.5)
            return self.model.lm_head(hidden)[:, -1].float()

    def select(self, rows: torch.Tensor) -> None:
        self.selects += 1
        self.encoded, self.mask = self.encoded[rows], self.mask[rows]
        self.cache.batch_select_indices(rows)

    def reorder_beams(self, rows: torch.Tensor) -> None:
        self.cache.self_attention_cache.reorder_cache(rows)


def ours(model, ids, mask, params: GenerationParams) -> tuple[GenerationOutput, TorchT5State]:
    state = TorchT5State(model, ids, mask)
    return generate(state, ids.shape[0], params, SPECIAL), state


def hf(model, ids, mask, params: GenerationParams) -> GenerationOutput:
    kwargs = {field.name: getattr(params, field.name) for field in dataclasses.fields(params)}
    seed = kwargs.pop("seed")
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **kwargs
        )
    if params.num_beams > 1:
        return GenerationOutput(out.sequences, out.sequences_scores)
    return GenerationOutput(out.sequences, _summed_log_probs(out.sequences, out.scores))


def _summed_log_probs(sequences: torch.Tensor, step_scores: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Log-probs of the chosen tokens under the processed distributions, summed up to the first EOS."""
    generated = sequences[:, 1:]
    log_probs = torch.stack([s.log_softmax(-1) for s in step_scores], dim=1)
    chosen = log_probs.gather(2, generated[:, :, None]).squeeze(2)
    after_eos = (generated == EOS).long().cumsum(1) - (generated == EOS).long() > 0
    return chosen.masked_fill(after_eos, 0.0).sum(1)


def assert_same(got: GenerationOutput, want: GenerationOutput) -> None:
    assert got.sequences.shape == want.sequences.shape, (got.sequences, want.sequences)
    assert torch.equal(got.sequences, want.sequences), (got.sequences, want.sequences)
    torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=1e-5)


def eos_positions(sequences: torch.Tensor) -> list[int | None]:
    return [row.tolist().index(EOS) if EOS in row.tolist() else None for row in sequences]


def test_test_model_is_varied(model, batch):
    for params in (GenerationParams(MAX_NEW), GenerationParams(MAX_NEW, num_beams=4)):
        sequences = hf(model, *batch, params).sequences
        ends = eos_positions(sequences)
        assert len({e for e in ends if e is not None}) >= 3, ends  # several lengths ending on EOS
        assert None in ends  # and some running to max_new_tokens
        distinct = [len(set(row.tolist())) for row in sequences]
        assert sum(d >= 5 for d in distinct) >= 4, distinct
    greedy = hf(model, *batch, GenerationParams(MAX_NEW)).sequences
    beam = hf(model, *batch, GenerationParams(MAX_NEW, num_beams=4)).sequences
    assert greedy.shape != beam.shape or not torch.equal(greedy, beam)  # beam search matters


GREEDY = {
    "greedy": {},
    "max_new_tokens_1": {"max_new_tokens": 1},
    "max_new_tokens_5": {"max_new_tokens": 5},
    "min_new_tokens": {"min_new_tokens": 12},
    "min_equals_max": {"min_new_tokens": MAX_NEW},
    "no_repeat_ngram_2": {"no_repeat_ngram_size": 2},
    "no_repeat_ngram_3": {"no_repeat_ngram_size": 3},
    "no_repeat_ngram_1": {"no_repeat_ngram_size": 1},
    "repetition_penalty_1.3": {"repetition_penalty": 1.3},
    "repetition_penalty_0.8": {"repetition_penalty": 0.8},
    "all_processors": {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_new_tokens": 4},
    "sampling_fields_ignored": {"temperature": 0.3, "top_k": 3, "top_p": 0.5},
}

BEAM = {
    "beam_4": {"num_beams": 4},
    "beam_2": {"num_beams": 2},
    "beam_5": {"num_beams": 5},
    "beam_4_return_2": {"num_beams": 4, "num_return_sequences": 2},
    "beam_4_return_4": {"num_beams": 4, "num_return_sequences": 4},
    "length_penalty_0.5": {"num_beams": 4, "length_penalty": 0.5},
    "length_penalty_2.0": {"num_beams": 4, "length_penalty": 2.0, "num_return_sequences": 3},
    "length_penalty_0": {"num_beams": 4, "length_penalty": 0.0},
    "length_penalty_negative": {"num_beams": 4, "length_penalty": -1.0},
    "early_stopping_true": {"num_beams": 4, "early_stopping": True, "num_return_sequences": 2},
    "early_stopping_false": {"num_beams": 4, "early_stopping": False},
    "early_stopping_never": {"num_beams": 4, "early_stopping": "never", "num_return_sequences": 2},
    "never_length_penalty_2.0": {"num_beams": 3, "early_stopping": "never", "length_penalty": 2.0},
    "never_length_penalty_negative": {"num_beams": 3, "early_stopping": "never", "length_penalty": -0.5},
    "true_length_penalty_0.5": {"num_beams": 3, "early_stopping": True, "length_penalty": 0.5},
    "min_new_tokens": {"num_beams": 4, "min_new_tokens": 10},
    "no_repeat_ngram_2": {"num_beams": 4, "no_repeat_ngram_size": 2},
    "no_repeat_ngram_3": {"num_beams": 4, "no_repeat_ngram_size": 3, "num_return_sequences": 2},
    "repetition_penalty_1.3": {"num_beams": 4, "repetition_penalty": 1.3},
    "max_new_tokens_1": {"num_beams": 4, "num_return_sequences": 4, "max_new_tokens": 1},
    "max_new_tokens_3": {"num_beams": 3, "max_new_tokens": 3},
}

SAMPLING = {
    "default_top_k_50": {"seed": 0},
    "seed_7": {"seed": 7},
    "top_k_0_temperature": {"seed": 1, "top_k": 0, "temperature": 0.7},
    "top_k_5": {"seed": 2, "top_k": 5},
    "top_p_0.9": {"seed": 3, "top_k": 0, "top_p": 0.9},
    "top_k_top_p_temperature": {"seed": 4, "top_k": 20, "top_p": 0.8, "temperature": 1.5},
    "high_temperature": {"seed": 5, "top_k": 0, "temperature": 3.0},
    "return_3": {"seed": 6, "num_return_sequences": 3},
    "processors": {"seed": 8, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_new_tokens": 3},
    "max_new_tokens_1": {"seed": 9, "max_new_tokens": 1, "num_return_sequences": 2},
}

CASES = {
    **{f"greedy-{name}": kw for name, kw in GREEDY.items()},
    **{f"beam-{name}": kw for name, kw in BEAM.items()},
    **{f"sample-{name}": {"do_sample": True, **kw} for name, kw in SAMPLING.items()},
}


@pytest.mark.parametrize("overrides", list(CASES.values()), ids=list(CASES))
def test_matches_transformers(model, batch, overrides):
    params = GenerationParams(**{"max_new_tokens": MAX_NEW, **overrides})
    got, _ = ours(model, *batch, params)
    assert_same(got, hf(model, *batch, params))


SINGLE = {
    "greedy": {},
    "beam_4_return_2": {"num_beams": 4, "num_return_sequences": 2},
    "beam_3_never": {"num_beams": 3, "early_stopping": "never", "length_penalty": 1.5},
    "sample": {"do_sample": True, "seed": 3, "top_p": 0.9},
}


@pytest.mark.parametrize("row", [0, 3, 5])
@pytest.mark.parametrize("overrides", list(SINGLE.values()), ids=list(SINGLE))
def test_batch_of_one_matches_transformers(model, batch, row, overrides):
    ids, mask = batch
    length = INPUT_LENGTHS[row]
    one = ids[row : row + 1, :length], mask[row : row + 1, :length]
    params = GenerationParams(**{"max_new_tokens": MAX_NEW, **overrides})
    got, _ = ours(model, *one, params)
    assert_same(got, hf(model, *one, params))


def test_finished_greedy_rows_are_dropped(model, batch):
    got, state = ours(model, *batch, GenerationParams(MAX_NEW))
    ends = eos_positions(got.sequences)
    assert state.rows_per_step[0] == len(INPUT_LENGTHS)
    assert state.rows_per_step == sorted(state.rows_per_step, reverse=True)
    # Each step decodes only the rows without EOS so far.
    for step, rows in enumerate(state.rows_per_step, start=1):
        assert rows == sum(end is None or end >= step for end in ends)


def test_beam_search_starts_with_one_row_per_input_and_drops_done_inputs(model, batch):
    params = GenerationParams(MAX_NEW, num_beams=4, early_stopping=True)
    _, state = ours(model, *batch, params)
    rows = state.rows_per_step
    assert rows[0] == len(INPUT_LENGTHS)
    assert rows[1] == 4 * len(INPUT_LENGTHS)
    assert rows[-1] < rows[1]  # some inputs were done early and left the batch
    assert all(r % 4 == 0 for r in rows[1:])
    # `select` (which copies the cross-attention state) only expands and drops; beams move by `reorder_beams`.
    assert state.selects == 1 + len(set(rows[1:])) - 1


def test_seeded_sampling_matches_transformers_after_rows_finish(model, batch):
    params = GenerationParams(MAX_NEW, do_sample=True, seed=3, num_return_sequences=2)
    got, state = ours(model, *batch, params)
    assert state.rows_per_step[1] == 2 * len(INPUT_LENGTHS)
    assert len(set(state.rows_per_step[1:])) >= 3  # rows finished at different steps and were dropped
    assert_same(got, hf(model, *batch, params))


def test_sampling_is_reproducible_and_depends_on_the_seed(model, batch):
    def sample(seed: int) -> torch.Tensor:
        return ours(model, *batch, GenerationParams(MAX_NEW, do_sample=True, top_k=0, seed=seed))[0].sequences

    first = sample(11)
    assert torch.equal(first, sample(11))
    assert not (first.shape == sample(12).shape and torch.equal(first, sample(12)))


def test_seeded_sampling_ignores_the_global_generator(model, batch):
    params = GenerationParams(MAX_NEW, do_sample=True, seed=5)
    torch.manual_seed(100)
    first = ours(model, *batch, params)[0].sequences
    torch.manual_seed(200)
    assert torch.equal(first, ours(model, *batch, params)[0].sequences)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("overrides", [{}, {"num_beams": 4, "num_return_sequences": 2}], ids=["greedy", "beam"])
def test_matches_transformers_on_cuda(model, batch, overrides):
    cuda = T5ForConditionalGeneration(model.config).eval()
    cuda.load_state_dict(model.state_dict())
    cuda.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    cuda = cuda.to("cuda")
    ids, mask = (t.to("cuda") for t in batch)
    params = GenerationParams(MAX_NEW, **overrides)
    got = generate(TorchT5State(cuda, ids, mask), ids.shape[0], params, SPECIAL, device="cuda")
    assert got.sequences.device.type == "cuda"
    assert_same(got, hf(cuda, ids, mask, params))


# --- parameter validation ----------------------------------------------------------------------------------

LIMITS = Limits(max_new_tokens=64, max_num_beams=8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be between 1 and 64, got 0"),
        ({"max_new_tokens": 65}, "max_new_tokens must be between 1 and 64, got 65"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer, got 2.5"),
        ({"min_new_tokens": 11}, "min_new_tokens must be between 0 and 10, got 11"),
        ({"min_new_tokens": -1}, "min_new_tokens must be between 0 and 10, got -1"),
        ({"num_beams": 0}, "num_beams must be between 1 and 8, got 0"),
        ({"num_beams": 9}, "num_beams must be between 1 and 8, got 9"),
        ({"num_beams": True}, "num_beams must be an integer, got True"),
        ({"num_beams": 4, "num_return_sequences": 5}, "num_return_sequences must be between 1 and 4, got 5"),
        ({"num_return_sequences": 2}, "num_return_sequences must be 1 for greedy decoding"),
        ({"do_sample": True, "num_return_sequences": 0}, "num_return_sequences must be >= 1, got 0"),
        ({"length_penalty": float("nan")}, "length_penalty must be a finite number, got nan"),
        ({"early_stopping": "sometimes"}, "early_stopping must be true, false or 'never', got 'sometimes'"),
        ({"no_repeat_ngram_size": -2}, "no_repeat_ngram_size must be >= 0, got -2"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be between 0.0001 and 10000, got 0.0"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty must be a finite number, got inf"),
        ({"do_sample": "yes"}, "do_sample must be a boolean, got 'yes'"),
        ({"do_sample": True, "num_beams": 2}, "do_sample=true with num_beams=2 (beam sampling) is not supported"),
        ({"temperature": 0.0}, "temperature must be between 0.0001 and 10000, got 0.0"),
        ({"top_k": -1}, "top_k must be >= 0, got -1"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"seed": -1}, "seed must be between 0 and 9223372036854775807, got -1"),
    ],
)
def test_validate_rejects(overrides, message):
    params = GenerationParams(**{"max_new_tokens": 10, **overrides})
    with pytest.raises(InvalidParameter) as error:
        params.validate(LIMITS)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_beams": 8, "num_return_sequences": 8, "early_stopping": "never", "length_penalty": -2.0},
        {"do_sample": True, "num_return_sequences": 3, "top_k": 0, "top_p": 1.0, "temperature": 0.1, "seed": 0},
        {"min_new_tokens": 64, "max_new_tokens": 64, "no_repeat_ngram_size": 3, "repetition_penalty": 0.5},
    ],
)
def test_validate_accepts(overrides):
    params = GenerationParams(**{"max_new_tokens": 10, **overrides})
    assert params.validate(LIMITS) is params


def test_defaults_are_transformers_defaults():
    from transformers import GenerationConfig

    hf_defaults = GenerationConfig._get_default_generation_params()
    for field in dataclasses.fields(GenerationParams):
        if field.name not in ("max_new_tokens", "min_new_tokens", "seed"):
            assert field.default == hf_defaults[field.name], field.name
    assert GenerationParams(1).min_new_tokens == 0
