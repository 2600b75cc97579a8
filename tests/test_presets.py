"""Offline preset models: tokenizer behaviour, determinism, save/load, and non-degenerate generation."""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DynamicCache,
    EncoderDecoderCache,
    MT5ForConditionalGeneration,
    PreTrainedTokenizerFast,
    T5ForConditionalGeneration,
)

from t5_triton.builder.offline_tokenizer import build_tokenizer
from t5_triton.builder.presets import EOS_ID, PAD_ID, PRESETS, Seq2SeqLM, is_preset, load_preset, make_preset

PRESET_NAMES = ["random-tiny", "random-t5-small", "random-flan-t5-tiny", "random-mt5-tiny"]
UNTIED_PRESET_NAMES = ["random-flan-t5-tiny", "random-mt5-tiny"]
# (vocab_size, num_extra_ids) of the presets' tokenizers: t5-style tiny, t5 and mT5.
TOKENIZER_SIZES = [(1000, 8), (32100, 100), (250100, 100)]

TEXTS = [
    "Hello!",
    "translate English to German: The house is wonderful.",
    "summarize: The quick brown fox jumps over the lazy dog while the children watch from the school window and laugh.",
    "What is the capital of France?",
    "cola sentence: The course is jumping well.",
    "Numbers like 42, 3.14 and 1999 appear in text too.",
    "A",
    "The government said on Monday that the new law will help students pay for their education, but many "
    "teachers believe it will not change much.",
]
MAX_NEW_TOKENS = 32

ROUND_TRIP_TEXTS = [
    *TEXTS,
    "Edge cases: {x: [1, 2]} ~`@#$%^&*()_+=|\\<>?/'\" -- don't , spaced . out !",
    "UPPER lower MiXeD 0123456789",
    "  leading, trailing and   repeated\twhitespace\n",
]


@functools.cache
def _preset(name: str) -> tuple[Seq2SeqLM, PreTrainedTokenizerFast]:
    return load_preset(name)


@functools.cache
def _tokenizer(vocab_size: int, num_extra_ids: int) -> PreTrainedTokenizerFast:
    return build_tokenizer(vocab_size, num_extra_ids)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Each preset saved once per module: the mT5 one is 135 MB."""

    @functools.cache
    def save(name: str) -> Path:
        return make_preset(name, tmp_path_factory.mktemp(name))

    return save


def _generate(model: Seq2SeqLM, tokenizer: PreTrainedTokenizerFast, num_beams: int) -> list[list[int]]:
    """Generated ids per input, without the start token and cut after the first EOS."""
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model.generate(
            **batch,
            max_new_tokens=MAX_NEW_TOKENS,
            num_beams=num_beams,
            do_sample=False,
            # transformers 5.23 sizes generate's default cache by the ENCODER depth, which crashes when the
            # decoder is deeper (random-tiny); a config-less cache grows per layer instead.
            past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()),
        )
    return [row[: row.index(EOS_ID) + 1] if EOS_ID in row else row for row in output[:, 1:].tolist()]


@functools.cache
def _outputs(name: str, num_beams: int) -> list[list[int]]:
    return _generate(*_preset(name), num_beams)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- tokenizer -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("vocab_size", "num_extra_ids"), TOKENIZER_SIZES)
def test_tokenizer_layout(vocab_size: int, num_extra_ids: int) -> None:
    tokenizer = _tokenizer(vocab_size, num_extra_ids)
    assert len(tokenizer) == vocab_size
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    # Like T5: the sentinels fill the end of the vocab, <extra_id_0> last.
    sentinel_ids = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(num_extra_ids)])
    assert sentinel_ids == list(range(vocab_size - 1, vocab_size - num_extra_ids - 1, -1))


@pytest.mark.parametrize(("vocab_size", "num_extra_ids"), TOKENIZER_SIZES)
def test_tokenizer_round_trips_ascii_and_appends_eos(vocab_size: int, num_extra_ids: int) -> None:
    tokenizer = _tokenizer(vocab_size, num_extra_ids)
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer(text).input_ids
        assert ids[-1] == EOS_ID
        assert EOS_ID not in ids[:-1]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == " ".join(text.split())


def test_tokenizer_prefers_whole_words() -> None:
    tokenizer = build_tokenizer(1000, 8)
    pieces = ["▁the", "▁student", "s", "▁understand", "▁the", "▁question"]
    assert tokenizer.tokenize("the students understand the question") == pieces


def test_bigger_tokenizers_extend_smaller_ones() -> None:
    # Growing the candidate list for mT5 must not renumber the pieces of the smaller presets' vocabs.
    sizes = sorted(TOKENIZER_SIZES)
    for (small_size, small_extra), (big_size, big_extra) in itertools.pairwise(sizes):
        shared = range(3, small_size - small_extra)
        small, big = _tokenizer(small_size, small_extra), _tokenizer(big_size, big_extra)
        assert small.convert_ids_to_tokens(shared) == big.convert_ids_to_tokens(shared)


def test_tokenizer_is_deterministic() -> None:
    first, second = build_tokenizer(1000, 8), build_tokenizer(1000, 8)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


def test_tokenizer_needs_room_for_ascii() -> None:
    with pytest.raises(ValueError, match="ASCII"):
        build_tokenizer(100, 8)


def test_tokenizer_saves_and_loads_offline(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(1000, 8)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tokenizer)
    for text in ROUND_TRIP_TEXTS:
        assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded("<extra_id_0> x").input_ids[0] == 999


# --- presets: configuration ------------------------------------------------------------------------------


def test_is_preset() -> None:
    assert all(is_preset(name) for name in PRESET_NAMES)
    assert not is_preset("t5-small")
    with pytest.raises(ValueError, match="unknown preset"):
        load_preset("t5-small")


def test_random_t5_small_has_t5_small_architecture() -> None:
    model, tokenizer = _preset("random-t5-small")
    config = model.config
    architecture = {
        "d_model": 512,
        "d_kv": 64,
        "num_heads": 8,
        "d_ff": 2048,
        "num_layers": 6,
        "num_decoder_layers": 6,
        "feed_forward_proj": "relu",
        "vocab_size": 32128,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }
    assert {key: getattr(config, key) for key in architecture} == architecture
    assert config.scale_decoder_outputs  # tied head with the d_model**-0.5 rescale
    assert model.lm_head.weight is model.shared.weight
    assert len(model.encoder.block) == len(model.decoder.block) == 6
    assert len(tokenizer) == 32100
    assert tokenizer.convert_ids_to_tokens(32099) == "<extra_id_0>"


def test_random_flan_t5_tiny_has_flan_t5_features() -> None:
    model, tokenizer = _preset("random-flan-t5-tiny")
    config = model.config
    assert isinstance(model, T5ForConditionalGeneration)
    assert config.model_type == "t5"
    assert (config.feed_forward_proj, config.is_gated_act, config.dense_act_fn) == ("gated-gelu", True, "gelu_new")
    assert config.num_heads * config.d_kv != config.d_model
    assert (len(model.encoder.block), len(model.decoder.block)) == (3, 2)
    assert not config.scale_decoder_outputs
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert len(tokenizer) < config.vocab_size


def test_random_mt5_tiny_has_mt5_features() -> None:
    model, tokenizer = _preset("random-mt5-tiny")
    config = model.config
    assert isinstance(model, MT5ForConditionalGeneration)
    assert config.model_type == "mt5"
    assert (config.vocab_size, len(tokenizer)) == (250112, 250100)
    assert tokenizer.convert_ids_to_tokens(250099) == "<extra_id_0>"
    assert (config.feed_forward_proj, config.is_gated_act) == ("gated-gelu", True)
    assert config.d_model <= 64  # tiny width keeps the 250k-row embedding and head cheap
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()


def test_random_tiny_has_a_deeper_decoder() -> None:
    model, _ = _preset("random-tiny")
    assert (len(model.encoder.block), len(model.decoder.block)) == (2, 3)
    assert model.config.num_layers != model.config.num_decoder_layers


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_tokenizer_fits_model_vocab(name: str) -> None:
    model, tokenizer = _preset(name)
    assert len(tokenizer) == PRESETS[name].tokenizer_vocab_size <= model.config.vocab_size


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_loaded_preset_is_ready_for_inference(name: str) -> None:
    model, _ = _preset(name)
    assert not model.training
    assert model.config._attn_implementation == "eager"
    generation = model.generation_config
    assert (generation.decoder_start_token_id, generation.eos_token_id, generation.pad_token_id) == (0, 1, 0)


def test_load_preset_leaves_global_rng_alone() -> None:
    before = torch.random.get_rng_state()
    load_preset("random-tiny")
    assert torch.equal(before, torch.random.get_rng_state())


# --- presets: determinism and save/load ------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_make_preset_is_deterministic(name: str, saved: Callable[[str], Path], tmp_path: Path) -> None:
    first = saved(name)
    second = make_preset(name, tmp_path)
    files = sorted(path.name for path in first.iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert files == sorted(path.name for path in second.iterdir())
    for file in files:
        assert _sha256(first / file) == _sha256(second / file), file


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_saved_preset_generates_like_in_memory(name: str, saved: Callable[[str], Path]) -> None:
    directory = saved(name)
    model = AutoModelForSeq2SeqLM.from_pretrained(directory, attn_implementation="eager").eval()
    assert type(model) is type(_preset(name)[0])
    tokenizer = AutoTokenizer.from_pretrained(directory)
    _, in_memory_tokenizer = _preset(name)
    assert tokenizer(TEXTS).input_ids == in_memory_tokenizer(TEXTS).input_ids
    assert _generate(model, tokenizer, num_beams=1) == _outputs(name, 1)


def test_untied_lm_head_survives_save_and_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    untied = dataclasses.replace(PRESETS["random-tiny"], tie_word_embeddings=False)
    monkeypatch.setitem(PRESETS, "untied-tiny", untied)
    model, _ = load_preset("untied-tiny")
    assert model.lm_head.weight is not model.shared.weight
    assert not model.config.scale_decoder_outputs

    loaded = T5ForConditionalGeneration.from_pretrained(make_preset("untied-tiny", tmp_path))
    assert loaded.lm_head.weight.data_ptr() != loaded.shared.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(loaded.lm_head.weight, loaded.shared.weight)


@pytest.mark.parametrize("name", UNTIED_PRESET_NAMES)
def test_untied_preset_survives_save_and_load(name: str, saved: Callable[[str], Path]) -> None:
    directory = saved(name)
    model, tokenizer = _preset(name)
    config = json.loads((directory / "config.json").read_text())
    # Like the real t5 v1.1 / flan-t5 / mT5 checkpoints: T5Config reads this False as "no output rescale".
    assert (config["model_type"], config["tie_word_embeddings"]) == (PRESETS[name].model_type, False)
    assert AutoConfig.from_pretrained(directory).model_type == PRESETS[name].model_type

    batch = tokenizer(TEXTS[:3], return_tensors="pt", padding=True)
    decoder_input_ids = torch.tensor([[PAD_ID, 5, 9, 4]] * 3)
    with torch.no_grad():
        expected = model(**batch, decoder_input_ids=decoder_input_ids).logits
    # AutoModel picks the family's class; the builder loads every T5-family folder with the T5 class.
    for model_class in (AutoModelForSeq2SeqLM, T5ForConditionalGeneration):
        loaded = model_class.from_pretrained(directory, attn_implementation="eager").eval()
        assert loaded.lm_head.weight.data_ptr() != loaded.shared.weight.data_ptr()
        assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
        assert not getattr(loaded.config, "scale_decoder_outputs", False)
        with torch.no_grad():
            assert torch.equal(loaded(**batch, decoder_input_ids=decoder_input_ids).logits, expected)


# --- presets: generation is not degenerate ---------------------------------------------------------------


@pytest.mark.parametrize("num_beams", [1, 4])
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_generation_is_not_degenerate(name: str, num_beams: int) -> None:
    outputs = _outputs(name, num_beams)
    bodies = [[token for token in row if token != EOS_ID] for row in outputs]
    ended = [row for row in outputs if row[-1] == EOS_ID]

    distinct_tokens = [len(set(body)) for body in bodies]
    assert sum(distinct_tokens) / len(bodies) >= 4, distinct_tokens
    assert len(ended) >= len(outputs) / 2, [len(row) for row in outputs]
    assert len({len(row) for row in ended}) >= 3, [len(row) for row in ended]
    assert all(len(row) > 1 for row in outputs)  # never an immediate EOS
    assert len({tuple(row) for row in outputs}) >= 6
    # No hub token that every input drifts into.
    counts = collections.Counter(token for body in bodies for token in body)
    assert counts.most_common(1)[0][1] < 0.2 * counts.total()
    # Every generated id is a real token (model rows past the tokenizer are never chosen) and not padding.
    _, tokenizer = _preset(name)
    assert all(PAD_ID < token < len(tokenizer) for body in bodies for token in body)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_beam_search_differs_from_greedy(name: str) -> None:
    greedy, beam = _outputs(name, 1), _outputs(name, 4)
    assert any(g != b for g, b in zip(greedy, beam, strict=True))
