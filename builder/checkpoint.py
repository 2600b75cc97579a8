"""Find and load the checkpoint a build starts from: a preset, a local folder, or a hub id."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    T5ForConditionalGeneration,
)

from .errors import BuildError
from .presets import PRESETS, is_preset, make_preset

# Same architecture as T5ForConditionalGeneration (MT5 differs only by class name and vocabulary).
SUPPORTED_MODEL_TYPES = ("t5", "mt5")


@dataclass
class Checkpoint:
    model: T5ForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    source: str
    kind: str  # "preset" | "local" | "hub"
    directory: Path | None  # where the files are, when they are on disk


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def _check_local_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise BuildError(f"checkpoint {folder} is not a folder")
    config = folder / "config.json"
    if not config.is_file():
        raise BuildError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BuildError(
            f"{folder} holds a '{model_type}' model; supported: {', '.join(SUPPORTED_MODEL_TYPES)} (T5 family)"
        )


def _load(location: str | Path) -> tuple[T5ForConditionalGeneration, PreTrainedTokenizerBase]:
    # Eager attention: the default (sdpa) can be traced with its causal flag frozen at length 1.
    # The auto class picks MT5ForConditionalGeneration for mT5: same graph, its own class and config.
    model = AutoModelForSeq2SeqLM.from_pretrained(location, attn_implementation="eager", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(location)
    return model.eval(), tokenizer


def load_checkpoint(source: str, scratch: Path) -> Checkpoint:
    """Load `source`; a preset is first written to `scratch`, like any checkpoint folder."""
    if is_preset(source):
        folder = make_preset(source, scratch / source)
        model, tokenizer = _load(folder)
        return Checkpoint(model, tokenizer, source, "preset", folder)

    folder = Path(source).expanduser()
    if folder.exists():
        _check_local_folder(folder)
        try:
            model, tokenizer = _load(folder)
        except (OSError, ValueError) as err:
            raise BuildError(f"cannot load the checkpoint in {folder}: {err}") from err
        return Checkpoint(model, tokenizer, source, "local", folder)
    if _looks_like_path(source):
        raise BuildError(f"no checkpoint folder at {folder}")

    try:
        model_type = AutoConfig.from_pretrained(source).model_type
    except (OSError, ValueError) as err:
        presets = ", ".join(PRESETS)
        raise BuildError(
            f"'{source}' is neither a local folder, a preset ({presets}), nor a model the Hugging Face hub "
            f"gave us (no network here?): {err}"
        ) from err
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BuildError(f"'{source}' is a '{model_type}' model, not a T5-family model")
    model, tokenizer = _load(source)
    return Checkpoint(model, tokenizer, source, "hub", None)
