"""`cnncli summary` and the analysis engine reproduce the lectures' tables, derived from the layers."""

import json
import math

import jax
import jax.numpy as jnp
import pytest
from model_utils import abstract

from cnncli.inspect.summary import activations, layer_names, summarize
from cnncli.models import build_network
from tests.helpers import cli

VGG16_BLOCKS = [(64, 2, 224), (128, 2, 112), (256, 3, 56), (512, 3, 28), (512, 3, 14)]  # width, convs, map size


@pytest.fixture(scope="module")
def vgg16():
    return summarize(abstract("vgg16", (224, 224, 3), 1000))


def test_vgg16_total_parameters_and_macs(vgg16):
    assert vgg16.total_params == 138_357_544
    assert sum(r.params for r in vgg16.layers) == vgg16.total_params
    # Every 3x3 conv costs (map area) * 9 * C_in * C_out; the FCs in * out.
    convs, cin = 0, 3
    for width, n, size in VGG16_BLOCKS:
        for _ in range(n):
            convs += size * size * 9 * cin * width
            cin = width
    assert vgg16.total_macs == convs + 7 * 7 * 512 * 4096 + 4096 * 4096 + 4096 * 1000
    assert vgg16.total_flops == 2 * vgg16.total_macs


def test_vgg16_per_layer_table_matches_the_lecture(vgg16):
    # The lecture's table: weights per conv layer 3*3*C_in*C_out, activations H*W*C.
    cin, expected = 3, []
    for block, (width, n, size) in enumerate(VGG16_BLOCKS, start=1):
        for i in range(1, n + 1):
            expected.append((f"conv{block}_{i}", 9 * cin * width, size * size * width))
            cin = width
        expected.append((f"pool{block}", 0, (size // 2) ** 2 * width))
    expected += [("fc6", 7 * 7 * 512 * 4096, 4096), ("fc7", 4096 * 4096, 4096), ("fc8", 4096 * 1000, 1000)]
    rows = {r.name: r for r in vgg16.layers}
    for name, weights, elements in expected:
        row = rows[name]
        biases = row.output_shape[-1] if weights else 0
        assert row.params == weights + biases, name
        assert row.activation_elements == elements, name
    assert rows["conv1_1"].params == 1_728 + 64 and rows["conv1_2"].params == 36_864 + 64
    assert rows["conv2_1"].params == 73_728 + 128 and rows["fc6"].params == 102_760_448 + 4096
    assert rows["conv1_1"].activation_elements == 224 * 224 * 64 == 3_211_264
    assert rows["pool5"].activation_elements == 7 * 7 * 512 == 25_088


def test_vgg16_activation_total_is_the_sum_of_the_rows_not_the_slides_24m(vgg16):
    table = 224 * 224 * 3 + sum(r.activation_elements for r in vgg16.layers[1:])
    assert vgg16.activation_elements == table == 15_237_608  # about 15.2M (the slide's total says 24M)
    assert vgg16.activation_bytes == 4 * table


def test_receptive_fields(vgg16):
    assert vgg16.row("conv1_1").receptive_field == (3, 3)
    assert vgg16.row("conv1_2").receptive_field == (5, 5)
    assert vgg16.row("pool5").receptive_field == (212, 212)
    assert vgg16.row("pool5").jump == (32, 32)
    resnet = summarize(abstract("resnet18", (224, 224, 3), 1000))
    assert resnet.row("conv1").receptive_field == (7, 7) and resnet.row("maxpool").receptive_field == (11, 11)
    # The residual addition sees as far as its longest branch (the two 3x3 convs), not the shortcut.
    assert resnet.row("layer2.0.add").receptive_field == resnet.row("layer2.0.conv2").receptive_field


def test_resnet_macs_match_torchvision_gflops():
    assert round(summarize(abstract("resnet18", (224, 224, 3), 1000)).total_macs / 1e9, 2) == 1.81
    assert round(summarize(abstract("resnet50", (224, 224, 3), 1000)).total_macs / 1e9, 2) == 4.09


def test_layer_names_and_activations_of_a_built_model():
    net = build_network("lenet5", input_shape=(28, 28, 1), num_classes=10)
    names = layer_names(net)
    assert names == ["input", "conv1", "pool1", "conv2", "pool2", "fc1", "fc2", "fc3"]
    x = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1))
    out = activations(net, x, ["conv1", "pool2", "fc3", "input"])
    assert out["conv1"].shape == (2, 28, 28, 6) and out["pool2"].shape == (2, 5, 5, 16)
    assert jnp.allclose(out["fc3"], net(x), atol=1e-5)
    assert jnp.array_equal(out["input"], x)


def test_activations_unknown_name_is_a_user_error():
    from cnncli.errors import UserError

    net = build_network("lenet5", input_shape=(28, 28, 1), num_classes=10)
    with pytest.raises(UserError, match="no layer named 'conv3'.*did you mean"):
        activations(net, jnp.zeros((1, 28, 28, 1)), ["conv3"])


def test_summary_cli_json_for_a_model_name():
    result = cli("summary", "vgg16", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["total_params"] == 138_357_544 and data["input_shape"] == [224, 224, 3]
    assert data["total_macs"] == sum(r["macs"] for r in data["layers"])
    assert data["activation_elements"] == 15_237_608
    assert [r["name"] for r in data["layers"]][:3] == ["input", "conv1_1", "conv1_2"]


def test_summary_cli_table_for_a_recipe_with_input_and_batch():
    result = cli("summary", "lenet5_fashion_mnist", "--batch-size", "10")
    assert result.exit_code == 0, result.output
    assert "61,706" in result.stdout and "conv2" in result.stdout and "batch of 10" in result.stdout
    result = cli("summary", "lenet5", "--input", "32x32x3", "--classes", "5", "--json")
    data = json.loads(result.stdout)
    assert data["input_shape"] == [32, 32, 3] and data["layers"][-1]["output_shape"] == [5]


@pytest.mark.parametrize("args,message", [
    (["vg16"], "neither a recipe nor a registered model (did you mean: vgg16"),
    (["vgg16", "--input", "22x"], "--input expects HxWxC"),
    (["vgg16", "--set", "classifer=linear"], "no option 'classifer'"),
    (["lenet5", "--input", "4x4x1"], "layer conv2"),
])
def test_summary_cli_user_errors(args, message):
    result = cli("summary", *args)
    assert result.exit_code == 2
    assert message in result.stderr


def _module_rows(s, prefix="inception1."):
    return [r for r in s.layers if r.name.startswith(prefix)]


def test_naive_inception_module_costs_854m_multiplies_and_outputs_672_channels():
    s = summarize(abstract("inception_naive", (28, 28, 256), 10))
    area, cin = 28 * 28, 256
    expected = area * (128 * 1 * 1 * cin + 192 * 3 * 3 * cin + 96 * 5 * 5 * cin)
    assert sum(r.macs for r in _module_rows(s)) == expected == 854_196_224  # the lecture's 854M
    assert s.row("inception1.concat").output_shape == (28, 28, 128 + 192 + 96 + 256) == (28, 28, 672)


def test_bottlenecked_inception_module_cost_is_derived_from_its_layers():
    s = summarize(abstract("inception_naive", (28, 28, 256), 10, reduce=[64, 64, 64]))
    area, cin = 28 * 28, 256
    expected = area * (128 * cin + 64 * cin + 192 * 9 * 64 + 64 * cin + 96 * 25 * 64 + 64 * cin)
    assert sum(r.macs for r in _module_rows(s)) == expected == 271_351_808  # the slide says 358M
    assert s.row("inception1.concat").output_shape == (28, 28, 480)


def test_three_stacked_3x3_convolutions_see_7x7():
    net = abstract("sequential", (32, 32, 3), 10, layers=["conv8k3", "conv8k3", "conv8k3", "gap", "fc"])
    s = summarize(net)
    assert [r.receptive_field for r in s.layers[1:4]] == [(3, 3), (5, 5), (7, 7)]
    # A dilated 3x3 (dilation 2) spans 5 pixels; a stride-2 layer doubles the effective stride.
    s = summarize(abstract("sequential", (32, 32, 3), 10, layers=["conv8k3s2", "conv8k3d2", "gap", "fc"]))
    assert s.layers[2].receptive_field == (3 + 4 * 2, 3 + 4 * 2) and s.layers[2].jump == (2, 2)


def test_receptive_field_start_locates_the_patch_seen_by_a_unit():
    s = summarize(abstract("sequential", (32, 32, 3), 10, layers=["conv8k3p0", "maxpool", "gap", "fc"]))
    conv, pool = s.layers[1], s.layers[2]
    assert conv.rf_start == (1.0, 1.0)  # unpadded 3x3: output 0 is centred on pixel 1
    assert pool.rf_start == (1.5, 1.5) and pool.receptive_field == (4, 4) and pool.jump == (2, 2)


def test_invalid_configuration_is_an_error_naming_the_layer():
    result = cli("summary", "sequential", "--input", "7x7x1", "--set",
                 "layers=[{conv: 8, kernel: 3, stride: 3, padding: 0}, fc]")
    assert result.exit_code == 2
    assert "layers[0] (conv0) (input 7x7x1)" in result.stderr
    assert "(7 - 3 + 2*0)/3 + 1 = 2.33 is not an integer" in result.stderr


def test_googlenet_summary_includes_aux_heads_when_enabled():
    plain = summarize(abstract("googlenet", (224, 224, 3), 1000, variant="torchvision"))
    aux = summarize(abstract("googlenet", (224, 224, 3), 1000, variant="torchvision", aux=True))
    assert sum(r.params for r in aux.layers) == aux.total_params == 13_004_888
    assert plain.total_params == 6_624_904 and not any(r.name.startswith("aux") for r in plain.layers)
    assert aux.row("aux1.head.conv").output_shape == (4, 4, 128)
    assert plain.row("inception5b.concat").output_shape == (7, 7, 1024)


def test_summary_of_a_run_directory_uses_its_recipe_and_data(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: r\nmodel: {name: lenet5}\ndata: {source: digits}\n")
    (run / "data.json").write_text(json.dumps({"image_shape": [32, 32, 3], "class_names": list("abcde")}))
    data = json.loads(cli("summary", run, "--json").stdout)
    assert data["input_shape"] == [32, 32, 3] and data["layers"][-1]["output_shape"] == [5]


def test_locally_connected_layer_has_the_lectures_4m_parameters_against_10k_for_a_convolution():
    # 200x200 input, 40K hidden units, 10x10 windows: 40,000 * 100 unshared weights; 100 shared 10x10
    # filters: 100 * 100. Biases off, as the lecture counts weights only.
    def first_row(kind, width):
        net = abstract("sequential", (200, 200, 1), 10,
                       layers=[{kind: width, "kernel": 10, "bias": False}, "gap", {"fc": "classes"}])
        return summarize(net).layers[1]

    local, conv = first_row("local", 1), first_row("conv", 100)
    assert local.output_shape == (200, 200, 1) and math.prod(local.output_shape) == 40_000
    assert local.params == 40_000 * 10 * 10 == 4_000_000
    assert conv.params == 100 * 10 * 10 == 10_000
    assert local.receptive_field == conv.receptive_field == (10, 10)
    assert local.macs == 40_000 * 100  # each hidden unit still reads its 10x10 window once


def test_summary_cli_reproduces_the_locally_connected_example():
    result = cli("summary", "sequential", "--input", "200x200x1", "--json",
                 "--set", "layers=[{local: 1, kernel: 10, bias: false}, gap, fc]")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["layers"][1]["params"] == 4_000_000
