"""`t5-triton build`: the repository it writes, its report, and every bad-input error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from t5_triton.builder import configs, verify
from t5_triton.builder.build import BuildOptions, build
from t5_triton.builder.errors import BuildError
from t5_triton.cli import main
from t5_triton.model_repository.t5_runtime import spec

MODELS = ("t5_encoder", "t5_decoder", "t5_generate")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t5_triton.cli", *args], capture_output=True, text=True, timeout=300)


def test_repository_layout(tiny_repo):
    for name in MODELS:
        assert (tiny_repo / name / "config.pbtxt").is_file()
        assert (tiny_repo / name / "1" / "model.py").is_file()
    assert (tiny_repo / "t5_encoder/1/model.onnx").is_file()
    assert (tiny_repo / "t5_decoder/1/model.onnx").is_file()
    assert (tiny_repo / "t5_generate/1/tokenizer/tokenizer.json").is_file()
    assert (tiny_repo / "t5_generate/1/t5_runtime/search.py").is_file()
    assert (tiny_repo / "t5_generate/1" / spec.SPEC_FILE).is_file()
    assert not list(tiny_repo.rglob(".scratch"))
    assert not list(tiny_repo.parent.glob(".tiny.building-*"))  # staging folder removed


@pytest.mark.parametrize("name", MODELS)
def test_configs_parse_and_have_no_placeholder(tiny_repo, name):
    text = (tiny_repo / name / "config.pbtxt").read_text()
    assert "$" not in text
    config = configs.parse_config(text, name)
    assert config.name == name


@pytest.mark.parametrize("name", ["t5_encoder", "t5_decoder"])
def test_config_tensors_match_the_onnx_graph(tiny_repo, name):
    config = configs.parse_config((tiny_repo / name / "config.pbtxt").read_text(), name)
    graph = onnx.load(str(tiny_repo / name / "1/model.onnx"), load_external_data=False).graph

    def onnx_dims(value):
        return [d.dim_value if d.dim_value else -1 for d in value.type.tensor_type.shape.dim]

    def config_dims(tensor):
        return list(tensor.dims)

    assert [i.name for i in config.input] == [i.name for i in graph.input]
    assert [o.name for o in config.output] == [o.name for o in graph.output]
    for tensor, value in zip([*config.input, *config.output], [*graph.input, *graph.output], strict=True):
        assert config_dims(tensor) == onnx_dims(value), tensor.name


def test_generate_config_inputs(tiny_repo):
    config = configs.parse_config((tiny_repo / "t5_generate/config.pbtxt").read_text(), "t5_generate")
    assert config.max_batch_size > 0
    assert config.HasField("dynamic_batching")
    names = {i.name for i in config.input}
    assert {"text_input", "input_ids", "num_beams", "top_p", "seed"} <= names
    assert all(i.optional for i in config.input)
    assert {o.name for o in config.output} == {"text_output", "output_ids", "sequence_scores"}


def test_build_report(tiny_repo):
    report = json.loads((tiny_repo / "build_report.json").read_text())
    assert report["source"] == {"model": "random-tiny", "kind": "preset"}
    assert report["precision"]["precision"] == "fp32"
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(report["versions"])
    assert report["serving"]["dims"]["num_decoder_layers"] == 3
    size = report["decoder_size"]
    assert size["file_bytes"] == (tiny_repo / "t5_decoder/1/model.onnx").stat().st_size
    assert size["ratio"] == round(size["file_bytes"] / size["weights_bytes"], 4)
    checks = report["checks"]
    assert len(checks) >= 8 and all(c["passed"] for c in checks)
    numeric = [c for c in checks if "max_abs_diff" in c["metrics"]]
    assert numeric and all("rel_error" in c["metrics"] for c in numeric)
    assert any(c["name"].startswith("generation beam") for c in checks)


def test_existing_output_is_refused_without_force(tiny_repo):
    with pytest.raises(BuildError, match=r"already exists.*--force"):
        build(BuildOptions(model="random-tiny", output=tiny_repo))
    assert (tiny_repo / "build_report.json").is_file()  # untouched


def test_force_replaces_an_existing_output(tmp_path):
    output = tmp_path / "repo"
    output.mkdir()
    (output / "stale.txt").write_text("old")
    assert main(["build", "--model", "random-tiny", "--output", str(output), "--force"]) == 0
    assert not (output / "stale.txt").exists()
    assert (output / "build_report.json").is_file()


@pytest.mark.parametrize(
    ("make_source", "message"),
    [
        (lambda tmp: tmp / "does-not-exist", "no checkpoint folder"),
        (lambda tmp: tmp, "no config.json"),
        (lambda tmp: _write(tmp / "bert", "config.json", '{"model_type": "bert"}'), "'bert' model"),
        (lambda tmp: _write(tmp / "afile", "x.txt", "") / "x.txt", "not a folder"),
    ],
    ids=["missing", "no-config", "not-t5", "a-file"],
)
def test_bad_checkpoints_fail_clearly(tmp_path, make_source, message):
    source = make_source(tmp_path)
    result = run_cli("build", "--model", f"{source}", "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder


def test_unwritable_output_fails_clearly(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_cli("build", "--model", "random-tiny", "--output", str(blocker / "repo"))
    assert result.returncode == 2
    assert "cannot write to" in result.stderr


def test_failed_check_fails_the_build_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    # A tolerance no real export meets: the build must refuse to write the repository.
    monkeypatch.setitem(verify.TOLERANCES, "float32", verify.Tolerance(max_abs=0.0, rel=0.0))
    output = tmp_path / "repo"
    assert main(["build", "--model", "random-tiny", "--output", str(output)]) == 2
    assert "failed" in capsys.readouterr().err
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []


def test_help_explains_every_flag():
    result = run_cli("build", "--help")
    assert result.returncode == 0
    for flag in (
        "--model",
        "--output",
        "--target",
        "--force",
        "--precision",
        "--max-input-tokens",
        "--max-new-tokens",
        "--max-num-beams",
        "--max-batch-size",
        "--threads",
        "random-tiny",
    ):
        assert flag in result.stdout
