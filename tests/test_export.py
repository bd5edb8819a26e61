"""`cnncli export`: ONNX models checked in onnxruntime and StableHLO exports checked through jax.export, on
real Fashion-MNIST test images, against the logits cnncli computes itself."""

import json
import sys

import numpy as np
import pytest
from helpers import SMALL_LENET, cli

from cnncli.inspect import interpret
from cnncli.tools import export as export_lib

N = 100  # real test images each export is compared on


@pytest.fixture(scope="module")
def reference(lenet_run):
    """(uint8 test images, cnncli's logits of them, class names) of the shared LeNet-5 run."""
    from cnncli.train.trained_run import eval_data, load_trained

    trained = load_trained(lenet_run)
    x, _, names = eval_data(trained, "test")
    return x[:N], interpret.logits(interpret.load_model(trained), x[:N]), names


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_matches_cnncli_in_onnxruntime(lenet_run, reference, tmp_path):
    import onnx

    x, expected, names = reference
    out = tmp_path / "lenet.onnx"
    result = cli("export", lenet_run, "--format", "onnx", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout and "opset 23" in result.stdout
    session = _session(out)
    assert [i.name for i in session.get_inputs()] == ["pixels"] and session.get_outputs()[0].name == "logits"
    got = session.run(None, {"pixels": x.astype(np.float32) / 255.0})[0]  # [0, 1] pixels: normalization inside
    assert np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    one = session.run(None, {"pixels": x[:1].astype(np.float32) / 255.0})[0]  # any batch size
    assert np.abs(one - expected[:1]).max() <= 1e-4
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["class_names"]) == names and meta["opset"] == "23"
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [23]
    assert "pixels in [0, 1]" in meta["input"] and meta["temperature"] == "1"


@pytest.mark.slow
def test_onnx_nchw_layout(lenet_run, reference, tmp_path):
    x, expected, _ = reference
    out = tmp_path / "nchw.onnx"
    result = cli("export", lenet_run, "--layout", "nchw", "--out", out)
    assert result.exit_code == 0, result.output
    pixels = np.transpose(x.astype(np.float32) / 255.0, (0, 3, 1, 2))
    got = _session(out).run(None, {"pixels": pixels})[0]
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.slow
def test_stablehlo_export_runs_through_jax_export(lenet_run, reference, tmp_path):
    from jax import export as jax_export

    x, expected, names = reference
    out = tmp_path / "lenet.stablehlo"
    result = cli("export", lenet_run, "--format", "stablehlo", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["input_shape"] == ["batch", 28, 28, 1] and info["bytes"] == out.stat().st_size
    exported = jax_export.deserialize(bytearray(out.read_bytes()))
    assert set(exported.platforms) == {"cpu", "cuda", "tpu"}
    got = np.asarray(exported.call(x.astype(np.float32) / 255.0))
    assert np.abs(got - expected).max() <= 1e-4 and (got.argmax(-1) == expected.argmax(-1)).all()
    assert json.loads(json.loads((tmp_path / "lenet.stablehlo.json").read_text())["class_names"]) == names


@pytest.fixture(scope="module")
def run_of(tmp_path_factory, fashion):
    """A few training steps of another architecture, for what export does with it."""

    def train(model: str):
        run = tmp_path_factory.mktemp("runs") / model
        result = cli("train", "lenet5_fashion_mnist", "--run-dir", run, *SMALL_LENET, "--set", f"model.name={model}",
                     "--set", "data.limit=256", "--set", "train.epochs=1")
        assert result.exit_code == 0, result.output
        return run

    return train


@pytest.mark.slow
def test_a_layer_jax2onnx_cannot_convert_is_named(run_of, tmp_path):
    run = run_of("hog_mlp")  # its HoG features need a fixed batch size
    result = cli("export", run, "--out", tmp_path / "hog.onnx")
    assert result.exit_code == 2
    assert "cannot convert layer 'hog' (hog) of hog_mlp" in result.stderr and "--batch-size" in result.stderr
    assert not (tmp_path / "hog.onnx").exists()
    result = cli("export", run, "--out", tmp_path / "hog.onnx", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    x = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    from cnncli.train.trained_run import load_trained

    expected = np.asarray(interpret.load_model(load_trained(run))(x))
    assert np.abs(_session(tmp_path / "hog.onnx").run(None, {"pixels": x})[0] - expected).max() <= 1e-4


@pytest.mark.slow
def test_resnet18_exports_and_a_graph_that_breaks_is_bisected_to_its_layer(run_of, tmp_path, monkeypatch):
    run = run_of("resnet18")
    result = cli("export", run, "--out", tmp_path / "r.onnx", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["max_abs_diff"] <= 1e-4 and info["metadata"]["jax2onnx_passes_skipped"] == export_lib.FRAGILE_PASS
    # without the fallback, every layer converts alone but the model breaks after the first stage
    monkeypatch.setattr(export_lib, "FRAGILE_PASS", "no such pass")
    result = cli("export", run, "--out", tmp_path / "broken.onnx")
    assert result.exit_code == 2
    assert "breaks at layer 'layer2.0.conv1' (conv)" in result.stderr
    assert "up to 'layer1.1.add' it converts" in result.stderr


def test_missing_jax2onnx_says_how_to_install(lenet_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # import jax2onnx raises ImportError
    result = cli("export", lenet_run, "--out", tmp_path / "x.onnx")
    assert result.exit_code == 2 and "pip install --no-deps jax2onnx" in result.stderr


def test_export_names_agree_with_the_library_and_bad_options_are_one_line(lenet_run, tmp_path):
    from cnncli.cli import export as cli_export

    assert cli_export.FORMATS == export_lib.FORMATS and cli_export.LAYOUTS == export_lib.LAYOUTS
    for args, message in ((["--format", "tflite"], "--format must be one of onnx, stablehlo"),
                          (["--layout", "hwcn"], "--layout must be one of nhwc, nchw")):
        result = cli("export", lenet_run, "--out", tmp_path / "x", *args)
        assert result.exit_code == 2 and message in result.stderr
