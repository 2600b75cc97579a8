"""Reduced precision: int8 weights (CPU target) and fp16 with an overflow audit (meant for GPUs).

int8: only the MatMuls (attention projections, feed-forward) are quantized, per output channel; the
embedding and the LM head stay fp32. Measured on the random presets, where near-flat logits make
every error visible: quantizing the LM head too halves the beam-search token agreement with fp32
(random-t5-small: 0.49 vs 0.80) for 33 MB less on disk.

fp16: each exported graph is audited on the builder's sample inputs and converted (`float16.py`),
then the two decoder graphs are merged like the fp32 ones.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from transformers import PreTrainedTokenizerBase, T5ForConditionalGeneration

from t5_triton.model_repository.t5_runtime import spec

from .export import ExportedGraphs
from .float16 import (
    AUDIT_LIMIT,
    CONSTANT_LIMIT,
    KeptNode,
    RangeAudit,
    clamp_constants,
    convert_float16,
    emulate_float16,
)
from .merge import hoist_initializers, merge_decoders, save_checked
from .verify import SAMPLE_TEXTS, CheckResult, verify_build

INT8_METHOD = (
    "ONNX Runtime dynamic quantization: MatMul weights int8 per channel, activations uint8 per call; "
    "embedding and LM head fp32"
)


def _quantize(source: Path, target: Path) -> None:
    quantize_dynamic(
        source,
        target,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        extra_options={"EnableSubgraph": True},  # the merged decoder's weights live in If branches' nodes
    )


def quantize_int8(encoder: Path, decoder: Path, directory: Path) -> tuple[Path, Path]:
    """Write int8 copies of both graphs into `directory`; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    encoder_int8 = directory / "encoder.onnx"
    _quantize(encoder, encoder_int8)
    staged = directory / "decoder.quantized.onnx"
    _quantize(decoder, staged)
    # The quantizer gives each branch its own copy of the weights both branches use: store them once.
    model = onnx.load(str(staged))
    hoist_initializers(model)
    decoder_int8 = directory / "decoder.onnx"
    save_checked(model, decoder_int8)
    staged.unlink()
    return encoder_int8, decoder_int8


FP16_METHOD = (
    "fp16 weights and activations; nodes that read or write a value beyond 1/4 of the fp16 range on the "
    "builder's sample inputs, and the position-bucket arithmetic, stay fp32; inputs and outputs fp32"
)

# Cached decoder steps the audit runs after the first step (greedy tokens, the sample texts).
AUDIT_STEPS = 8


@dataclass(frozen=True)
class Fp16Graphs:
    encoder: Path
    decoder: Path
    # fp32 graphs that round every value the fp16 ones store in fp16: what a GPU computes, on CPU.
    emulated_encoder: Path
    emulated_decoder: Path
    report: dict  # what stayed fp32 and why, per graph


def _audit_runs(graphs: dict[str, onnx.ModelProto], tokenizer: PreTrainedTokenizerBase, start_token: int):
    """Run the fp32 graphs as the server does: encoder, first step, `AUDIT_STEPS` greedy cached steps."""
    audits = {name: RangeAudit(model) for name, model in graphs.items()}
    batch = tokenizer(list(SAMPLE_TEXTS), return_tensors="np", padding=True)
    mask = batch["attention_mask"].astype(np.int64)
    encoded = audits["encoder"].run(
        {spec.ENCODER_INPUT_IDS: batch["input_ids"].astype(np.int64), spec.ENCODER_ATTENTION_MASK: mask}
    )
    tokens = np.full((len(SAMPLE_TEXTS), 1), start_token, dtype=np.int64)
    out = audits["decoder first step"].run(
        {
            spec.DECODER_INPUT_IDS: tokens,
            spec.ENCODER_HIDDEN_STATES: encoded[spec.ENCODER_HIDDEN_STATES],
            spec.DECODER_ENCODER_MASK: mask,
        }
    )
    past, cross = out[spec.NEW_SELF_KV], out[spec.NEW_CROSS_KV]
    for _ in range(AUDIT_STEPS):
        tokens = out[spec.LOGITS].argmax(-1)[:, None].astype(np.int64)
        out = audits["decoder cached step"].run(
            {
                spec.DECODER_INPUT_IDS: tokens,
                spec.DECODER_ENCODER_MASK: mask,
                **spec.layer_kv_feeds(spec.PAST_SELF_KV, past),
                **spec.layer_kv_feeds(spec.CROSS_KV, cross),
                spec.DECODER_SELF_MASK: np.ones((len(tokens), past.shape[spec.KV_SEQ_AXIS] + 1), dtype=np.int64),
            }
        )
        past = np.concatenate([past, out[spec.NEW_SELF_KV]], axis=spec.KV_SEQ_AXIS)
    return audits


def _kept_summary(model: onnx.ModelProto, kept: list[KeptNode]) -> dict:
    ranges = [k for k in kept if k.reason == "range"]
    index = [k for k in kept if k.reason == "index"]
    largest = max((k.max_abs for k in ranges), default=0.0)
    return {
        "nodes": len(model.graph.node),
        "kept_fp32": len(kept),
        "why": {
            "range": {
                "count": len(ranges),
                "by_op_type": dict(Counter(k.op_type for k in ranges).most_common()),
                "max_abs_seen": largest if math.isfinite(largest) else str(largest),  # JSON has no inf
            },
            "index": {"count": len(index), "by_op_type": dict(Counter(k.op_type for k in index).most_common())},
        },
    }


def convert_fp16(
    graphs: ExportedGraphs,
    tokenizer: PreTrainedTokenizerBase,
    start_token: int,
    directory: Path,
    audit_limit: float = AUDIT_LIMIT,
) -> Fp16Graphs:
    """Audit the three fp32 graphs, write their fp16 and emulated versions under `directory`, and
    merge each pair of decoder graphs. `audit_limit` math.inf turns the range audit off."""
    paths = {
        "encoder": graphs.encoder,
        "decoder first step": graphs.first_step_decoder,
        "decoder cached step": graphs.cached_step_decoder,
    }
    models = {name: onnx.load(str(path)) for name, path in paths.items()}
    clamped = {name: clamp_constants(model) for name, model in models.items()}  # audit what is converted
    audits = _audit_runs(models, tokenizer, start_token)
    report: dict = {
        "audit_limit": audit_limit,
        "constant_limit": CONSTANT_LIMIT,
        "audit_decoder_steps": 1 + AUDIT_STEPS,
    }
    written: dict[str, tuple[Path, Path]] = {}
    kept = {name: audits[name].fp32_nodes(audit_limit) for name in models}
    for variant, convert in (("fp16", convert_float16), ("emulated", emulate_float16)):
        out = {name: directory / variant / paths[name].name for name in models}
        for name, model in models.items():
            save_checked(convert(model, {k.name for k in kept[name]}), out[name])
        decoder = merge_decoders(
            out["decoder first step"], out["decoder cached step"], directory / variant / "decoder.onnx"
        )
        written[variant] = out["encoder"], decoder
    for name, model in models.items():
        report[name] = {**_kept_summary(model, kept[name]), "constants_clamped": clamped[name]}
    return Fp16Graphs(*written["fp16"], *written["emulated"], report)


def verify_fp16(
    model: T5ForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, fp16: Fp16Graphs, min_token_match: float
) -> list[CheckResult]:
    """Every check on the emulated graphs (the quality numbers: fp16 rounding and overflow as on a
    GPU), then on the graphs as shipped, which the CPU EP runs mostly in fp32 (conversion mistakes)."""
    emulated = verify_build(model, tokenizer, fp16.emulated_encoder, fp16.emulated_decoder, "fp16", min_token_match)
    shipped = verify_build(model, tokenizer, fp16.encoder, fp16.decoder, "fp16", min_token_match)
    for check in shipped:
        check.name = f"as shipped, CPU EP: {check.name}"
    return emulated + shipped
