"""A running t5_generate next to transformers.generate: same inputs, same tokens? and how fast?

    python scripts/parity.py --model google-t5/t5-small --url 127.0.0.1:8001 --protocol grpc

The checkpoint must be the one the served repository was built from (a preset name, a folder or a hub
id). transformers runs in this process on --device (cuda when there is one), fp32, no TF32. Both decode
the builder's varied sample texts, greedy and with 4 beams; the table gives the inputs whose tokens are
equal, the token match rate, and the median seconds of one call over all the texts (after a warm-up).
Exit code 1 when the token match rate of a mode is below --min-token-match (default 1.0: every token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import GenerationConfig

from t5_triton.builder.checkpoint import load_checkpoint
from t5_triton.builder.verify import SAMPLE_TEXTS, reference_generate, token_match_rate
from t5_triton.client.api import T5Client
from t5_triton.model_repository.t5_runtime.search import trim_sequence
from t5_triton.model_repository.t5_runtime.spec import ModelDims

MODES = (("greedy", 1), ("beam4", 4))


def _median_seconds(call, runs: int):
    result = call()  # warm-up; its output is the one compared
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def compare(args: argparse.Namespace) -> dict:
    # IEEE fp32 matmuls, as the builder's checks and the gpu target's decoder (use_tf32 0) compute them.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory(prefix="t5-parity-") as scratch:
        checkpoint = load_checkpoint(args.model, Path(scratch))
    model = checkpoint.model.to(args.device)
    dims = ModelDims.from_hf(model.config, model.generation_config)
    texts = list(SAMPLE_TEXTS)
    batch = checkpoint.tokenizer(texts, return_tensors="pt", padding=True).to(args.device)
    modes = {}
    with T5Client(args.url, args.protocol, eos_token_id=dims.eos_token_id, pad_token_id=dims.pad_token_id) as client:
        for name, beams in MODES:
            reference = GenerationConfig(
                decoder_start_token_id=dims.decoder_start_token_id,
                eos_token_id=dims.eos_token_id,
                pad_token_id=dims.pad_token_id,
                max_new_tokens=args.max_new_tokens,
                num_beams=beams,
                do_sample=False,
            )

            def reference_call(reference=reference):
                with torch.inference_mode():
                    sequences = reference_generate(model, batch, reference)
                if sequences.is_cuda:
                    torch.cuda.synchronize()
                return sequences.tolist()

            def served_call(beams=beams):
                results = client.generate(texts, num_beams=beams, max_new_tokens=args.max_new_tokens)
                return [result.output_ids[0] for result in results]

            expected, reference_s = _median_seconds(reference_call, args.runs)
            actual, served_s = _median_seconds(served_call, args.runs)
            eos, pad = dims.eos_token_id, dims.pad_token_id
            equal = sum(
                trim_sequence(a, eos, pad) == trim_sequence(e, eos, pad) for a, e in zip(actual, expected, strict=True)
            )
            modes[name] = {
                "inputs": len(texts),
                "equal_sequences": equal,
                "token_match_rate": token_match_rate(actual, expected),
                "transformers_s": reference_s,
                "served_s": served_s,
            }
    return {"model": args.model, "device": args.device, "max_new_tokens": args.max_new_tokens, "modes": modes}


def print_table(result: dict, console: Console) -> None:
    table = Table(
        title=f"{result['model']}: served t5_generate vs transformers.generate on {result['device']} "
        f"({len(SAMPLE_TEXTS)} texts per call, up to {result['max_new_tokens']} new tokens, median seconds)"
    )
    for column in ("mode", "equal sequences", "token match", "transformers", "served", "speed-up"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for name, m in result["modes"].items():
        table.add_row(
            name,
            f"{m['equal_sequences']}/{m['inputs']}",
            f"{m['token_match_rate']:.3f}",
            f"{m['transformers_s']:.3f} s",
            f"{m['served_s']:.3f} s",
            f"{m['transformers_s'] / m['served_s']:.2f}x",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the checkpoint the repository was built from")
    parser.add_argument("--url", default="127.0.0.1:8001", help="the server (gRPC port by default)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="timed calls per engine and mode, after a warm-up")
    parser.add_argument("--min-token-match", type=float, default=1.0)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    result = compare(args)
    print_table(result, Console())
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    low = {name: m["token_match_rate"] for name, m in result["modes"].items()}
    low = {name: rate for name, rate in low.items() if rate < args.min_token_match}
    if low:
        shown = ", ".join(f"{name} {rate:.3f}" for name, rate in low.items())
        print(f"parity FAILED: token match below {args.min_token_match}: {shown}", file=sys.stderr)
        return 1
    print(f"parity ok: token match >= {args.min_token_match} in every mode", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
