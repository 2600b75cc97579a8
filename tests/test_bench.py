"""`t5-triton bench`'s own parts: memory of a real process tree, token timelines, the per-step split on a real
repository, the int8 agreement read from a build report, and the plot drawn from a small report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from t5_triton import cli
from t5_triton.bench import LoadConfig, ServerMemory, _run_worker, int8_agreement, run_concurrency, split_summary
from t5_triton.bench_worker import BenchConfig, token_timeline
from t5_triton.memory import memory_total, tree_memory

_MB = 1024 * 1024

# Writes to 64 MB (so they are resident), says "ready", and holds them until its stdin closes.
_HOLD = "import sys\nblock = bytearray(64 * 1024 * 1024)\nfor i in range(0, len(block), 4096):\n    block[i] = 1\n"
_WAIT = "print('ready', flush=True)\nsys.stdin.read()\n"
_CHILD = _HOLD + _WAIT
# The same, with a child of its own that does the same (the child's stdin closes when the parent exits).
_PARENT = (
    _HOLD
    + "import subprocess\n"
    + f"child = subprocess.Popen([sys.executable, '-c', {_CHILD!r}], stdin=subprocess.PIPE, stdout=subprocess.PIPE)\n"
    + "child.stdout.readline()\n"
    + _WAIT
)


@pytest.fixture
def holder():
    process = subprocess.Popen(
        [sys.executable, "-c", _PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "ready"
    yield process
    process.stdin.close()
    process.wait(timeout=30)


def test_memory_sums_a_real_process_tree(holder):
    with ServerMemory(holder.pid, interval=0.01) as memory:
        tree = tree_memory(holder.pid)
        assert len(tree) == 2  # the parent and its child
        alone = next(values["rss"] for name, values in tree.items() if name.endswith(f"({holder.pid})"))
        both = memory_total(tree, "rss")
        memory.mark_pass()
    assert 64 * _MB < alone < both
    assert both - alone > 60 * _MB
    assert memory_total(tree, "pss") > 128 * _MB  # nothing shared: each process's 64 MB are its own
    summary = memory.summary()
    assert summary["processes"] == 2
    assert summary["peak_rss_bytes"] >= summary["start"]["rss"] > 128 * _MB
    assert summary["after_pass"] == memory.after_pass and summary["after_pass"][0]["rss"] > 128 * _MB


def test_memory_of_a_process_that_is_gone_is_none():
    assert tree_memory(2**22 + 12345) is None  # above Linux's default pid_max: never a live process


def test_token_timeline_stamps_each_token_from_the_start():
    def generate(mark):
        for _ in range(5):
            mark()

    timelines = token_timeline(generate, runs=3)
    assert len(timelines) == 3  # the warm-up is dropped
    for run in timelines:
        assert len(run) == 5
        assert run == sorted(run) and run[0] >= 0.0


def test_split_summary_takes_medians_per_step():
    runs = [
        {"steps": 10, "total_s": 0.030, "encoder_s": 0.002, "decoder_s": 0.020, "logic_s": 0.008},
        {"steps": 10, "total_s": 0.050, "encoder_s": 0.004, "decoder_s": 0.030, "logic_s": 0.016},
        {"steps": 10, "total_s": 0.040, "encoder_s": 0.003, "decoder_s": 0.025, "logic_s": 0.012},
    ]
    summary = split_summary({"greedy b1": runs, "beam4 b1": []})
    assert list(summary) == ["greedy b1"]  # a cell not measured is left out
    assert summary["greedy b1"] == pytest.approx(
        {"steps": 10, "total_ms": 40.0, "encoder_ms": 3.0, "decoder_ms_per_step": 2.5, "logic_ms_per_step": 1.2}
    )


def test_int8_agreement_comes_from_the_build_report(tmp_path):
    precision = {
        "precision": "int8",
        "method": "dynamic",
        "token_match_rate": {"greedy": 0.9},
        "logits_vs_fp32": {"max_abs_diff": 0.1, "rel_error": 0.02},
        "bytes": {},
        "checks": [],
    }
    (tmp_path / "build_report.json").write_text(json.dumps({"precision": precision}))
    agreement = int8_agreement(tmp_path)
    assert agreement["token_match_rate"] == {"greedy": 0.9}
    assert agreement["logits_vs_fp32"]["rel_error"] == 0.02
    assert "checks" not in agreement
    (tmp_path / "build_report.json").write_text(json.dumps({"precision": {"precision": "fp32"}}))
    with pytest.raises(ValueError, match="not int8"):
        int8_agreement(tmp_path)


def test_per_token_ms_is_the_median_gap_up_to_the_shortest_run():
    from t5_triton.bench_plot import mean_token_ms, per_token_ms

    arrivals = [[0.001, 0.002, 0.004], [0.001, 0.003, 0.004, 0.005], [0.001, 0.001, 0.001, 0.011]]
    assert per_token_ms(arrivals) == pytest.approx([1.0, 1.0, 1.0])
    assert mean_token_ms(arrivals) == pytest.approx(4 / 3)  # the median of 4/3, 5/4 and 11/4


def test_plot_from_a_small_report(tmp_path):
    from t5_triton.bench_plot import plot_report

    step = {"steps": 4, "total_ms": 5.0, "encoder_ms": 1.0, "decoder_ms_per_step": 0.6, "logic_ms_per_step": 0.4}
    report = {
        "config": {"checkpoint": "random-tiny", "new_tokens": 4},
        "timeline": {
            "cell": "greedy b1",
            "input_tokens": 31,
            "arrivals_s": {
                "transformers": [[0.004, 0.005, 0.006, 0.007]] * 2,
                "served-grpc": [[0.002, 0.0025, 0.003, 0.0035]],
                "optimum": [],  # an engine without a timeline is left out
            },
        },
        "split": {"greedy b1": step, "beam4 b8": {**step, "logic_ms_per_step": 1.5}},
    }
    path = plot_report(report, tmp_path / "bench.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_split_and_timeline_workers_on_a_real_repository(tiny_repo, tmp_path):
    """The split worker runs the repository's own t5_runtime; the transformers worker stamps every token."""
    from t5_triton.builder.presets import make_preset

    checkpoint = make_preset("random-tiny", tmp_path / "checkpoint")
    config = BenchConfig(str(checkpoint), str(tiny_repo), new_tokens=6, runs=1, threads=1, cells=("beam4 b1",))
    split = _run_worker("split", config, {"repository": str(tiny_repo)})["split"]["beam4 b1"]
    assert len(split) == 1
    assert split[0]["steps"] == 6  # one decoder call per step, beams together
    assert split[0]["decoder_s"] > 0 and split[0]["logic_s"] > 0
    assert split[0]["total_s"] == pytest.approx(split[0]["encoder_s"] + split[0]["decoder_s"] + split[0]["logic_s"])
    result = _run_worker("transformers", config, {"vocab": 1000, "timeline_ids": [5, 6, 7, 1]})
    assert len(result["times"]["beam4 b1"]) == 1
    assert [len(run) for run in result["timeline"]] == [6]
    assert "transformers" in result["versions"]


@pytest.mark.server
def test_concurrency_levels_and_a_baseline_take_turns_on_real_servers(tiny_repo, tmp_path):
    from rich.console import Console

    # The same repository as its own baseline: two servers, measured in turn.
    config = LoadConfig(
        str(tiny_repo), levels=(1, 3), duration_s=3.0, input_tokens=8, new_tokens=4, rounds=2, baseline=str(tiny_repo)
    )
    console = Console(record=True, width=250)
    report = run_concurrency(config, console, tmp_path / "load.json")
    assert json.loads((tmp_path / "load.json").read_text()) == json.loads(json.dumps(report))
    printed = console.export_text()
    assert printed.count("round ") == 2 and printed.count("3 clients, ") == 1
    for run in (report, report["baseline"]):
        for level in run["levels"].values():
            assert level["requests"] > 0 and level["tokens_per_s"] > 0
            assert 0 < level["p50_s"] <= level["p95_s"]
        assert 0 < run["first_streamed_piece_s"] < run["levels"][1]["p95_s"] * 10


def test_bench_refuses_an_optimum_python_that_cannot_import_optimum(capsys):
    assert cli.main(["bench", "--model", "random-tiny", "--optimum-python", sys.executable]) == 2
    assert "cannot import optimum.onnxruntime" in capsys.readouterr().err
    assert cli.main(["bench", "--optimum-python", str(Path("/nonexistent/python"))]) == 2
