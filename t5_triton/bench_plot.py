"""The PNG of `t5-triton bench --plot`: time per token over the sequence, and the served step's split.

Drawn from the report `run_bench` returns (or its JSON), so a saved run can be drawn again. Needs matplotlib
(`pip install 't5-triton[bench]'`).
"""

from __future__ import annotations

import statistics
from pathlib import Path


def per_token_ms(arrivals: list[list[float]]) -> list[float]:
    """Median over runs of the time each token took (its arrival minus the previous one's; the first one's from
    the call's start, so it holds the encoder), in milliseconds, up to the shortest run."""
    length = min(len(run) for run in arrivals)
    gaps = [[(run[i] - (run[i - 1] if i else 0.0)) * 1000 for i in range(length)] for run in arrivals]
    return [statistics.median(run[i] for run in gaps) for i in range(length)]


def mean_token_ms(arrivals: list[list[float]]) -> float:
    """Median over runs of the last token's arrival over the number of tokens, in milliseconds: the rate, which
    bursts of arrivals (a stream's pieces held up on the way, then delivered together) leave intact."""
    return statistics.median(run[-1] * 1000 / len(run) for run in arrivals if run)


def plot_report(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, timeline = report["config"], report["timeline"]
    figure, (tokens_axis, split_axis) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    for engine, arrivals in timeline["arrivals_s"].items():
        if arrivals:
            ms = per_token_ms(arrivals)
            label = f"{engine} (mean {mean_token_ms(arrivals):.2f} ms per token)"
            tokens_axis.plot(range(1, len(ms) + 1), ms, marker=".", linewidth=1, label=label)
    tokens_axis.set_yscale("log")
    tokens_axis.set_xlabel("new token")
    tokens_axis.set_ylabel("ms for this token (median over runs)")
    tokens_axis.set_title(
        f"time per token, {timeline['cell']}, {timeline['input_tokens']} input tokens; served: streamed over gRPC, "
        "arrival at the client\n(streamed tokens can arrive in bursts, CTranslate2's generate_tokens too: "
        "the legend's mean, last arrival / tokens, is the rate)",
        fontsize=9,
    )
    tokens_axis.grid(True, which="both", alpha=0.3)
    tokens_axis.legend(fontsize=8)

    cells = list(report["split"])
    decoder = [report["split"][c]["decoder_ms_per_step"] for c in cells]
    logic = [report["split"][c]["logic_ms_per_step"] for c in cells]
    split_axis.bar(cells, decoder, label="decoder compute (ONNX Runtime)")
    split_axis.bar(cells, logic, bottom=decoder, label="decoding logic (search, cache, bookkeeping)")
    for x, (d, g) in enumerate(zip(decoder, logic, strict=True)):
        split_axis.text(x, d + g, f"{g / (d + g):.0%} logic", ha="center", va="bottom", fontsize=8)
    split_axis.set_ylabel("ms per decoding step (median)")
    split_axis.set_title("served decoding step, in process (fp32 repository)", fontsize=10)
    split_axis.legend(fontsize=8)
    figure.suptitle(f"{config['checkpoint']}: {config['new_tokens']} forced new tokens, fp32 unless named")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
