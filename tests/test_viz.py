"""`cnncli predict`, `plot` and `visualize`: PNGs of the expected size, and the numbers behind them checked."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cnncli.inspect import figures, interpret
from cnncli.train.steps import to_pixels
from tests.helpers import cli

SAMPLE = 300  # images of the test split used by the passes below: three batches of 128, the last one padded


@pytest.fixture(scope="module")
def lenet(lenet_run):
    """(model, uint8 test images, labels) of the shared LeNet-5 run."""
    from cnncli.train.trained_run import eval_data, load_trained

    trained = load_trained(lenet_run)
    x, y, _ = eval_data(trained, "test")
    return interpret.load_model(trained), x[:SAMPLE], y[:SAMPLE]


def lenet_maps(model, x: np.ndarray) -> dict[str, np.ndarray]:
    """LeNet-5's conv2 and pool2 outputs for uint8 images, from its weights with lax and NumPy: independent of
    cnncli's layers, its convolution and the recorders that `activations`, `top_units` and `gradcam` use."""
    net = model.net

    def conv_relu(h, layer, pad):
        y = jax.lax.conv_general_dilated(h, np.asarray(layer.kernel[...]), (1, 1), [(pad, pad)] * 2,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return np.maximum(np.asarray(y) + np.asarray(layer.bias[...]), 0.0)

    def pool(h):
        n, hh, ww, c = h.shape
        return h.reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))

    mean, std = np.asarray(model.normalize.mean[...]), np.asarray(model.normalize.std[...])
    pixels = (x.astype(np.float32) / 255.0 - mean) / std
    conv2 = conv_relu(pool(conv_relu(pixels, net.conv1, 2)), net.conv2, 0)
    return {"conv2": conv2, "pool2": pool(conv2)}


def png_size(path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


# ----------------------------------------------------------------------------- PNGs from every command


@pytest.mark.slow
@pytest.mark.parametrize("what,args,name,size", [
    ("filters", [], "filters_conv1", figures.grid_pixels(6, 3)),  # 6 filters of 5x5x1
    ("filters", ["--layer", "conv2", "--n", "4"], "filters_conv2", figures.grid_pixels(4, 2)),
    ("activations", [], "activations_conv1", figures.grid_pixels(7, 3)),  # the input + 6 maps
    ("top-patches", ["--n", "4"], "top_patches_pool2", figures.grid_pixels(4, 2, 2 * figures.TILE)),
    ("saliency", ["--n", "3"], "saliency", figures.grid_pixels(6, 4)),  # 3 (image, map) pairs, 2 pairs a row
    ("gradcam", ["--n", "3", "--layer", "conv2"], "gradcam_conv2", figures.grid_pixels(6, 4)),
    ("deconv", ["--n", "4"], "deconv_pool2", figures.grid_pixels(8, 4, 2 * figures.TILE)),  # (projections, patches)
    ("smoothgrad", ["--n", "3"], "smoothgrad", figures.grid_pixels(6, 4)),
    ("guided-backprop", ["--n", "3"], "guided_backprop", figures.grid_pixels(6, 4)),
    ("confusion", [], "confusion_test", (round(figures.confusion_size(10) * figures.DPI),) * 2),
    ("errors", ["--n", "4"], "errors_test", figures.grid_pixels(4, 2, 1.5 * figures.TILE)),
    ("tsne", [], "tsne_test", tuple(round(s * figures.DPI) for s in figures.TSNE_SIZE)),
])
def test_visualize_writes_a_png_of_the_expected_size(lenet_run, tmp_path, what, args, name, size):
    result = cli("visualize", lenet_run, "--what", what, "--limit", SAMPLE, "--out", tmp_path, *args)
    assert result.exit_code == 0, result.output
    path = tmp_path / f"{name}.png"
    assert f"wrote {path}" in result.stdout
    assert png_size(path) == size


def test_grid_pixels_follow_the_tile_size():
    assert figures.grid_pixels(6, 3) == (360, 300)  # 3 x 1.2 in by 2 x 1.2 in + 0.6 in title, at 100 dpi


@pytest.mark.slow
def test_visualize_defaults_to_the_run_plots_folder(lenet_run):
    result = cli("visualize", lenet_run, "--what", "filters")
    assert result.exit_code == 0, result.output
    assert png_size(lenet_run / "plots" / "filters_conv1.png") == figures.grid_pixels(6, 3)


@pytest.mark.slow
def test_activations_and_gradcam_of_an_image_file(lenet_run, lenet, tmp_path):
    _, x, _ = lenet
    image = tmp_path / "shoe.png"
    Image.fromarray(x[0, ..., 0]).save(image)
    for what, name in (("activations", "activations_conv2"), ("gradcam", "gradcam_conv2")):
        result = cli("visualize", lenet_run, "--what", what, "--layer", "conv2", "--image", image, "--out", tmp_path)
        assert result.exit_code == 0, result.output
        assert png_size(tmp_path / f"{name}.png")[0] > 0


def test_plot_writes_curves_and_a_diagnosis(lenet_run, tmp_path):
    result = cli("plot", lenet_run, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    width, height = figures.CURVES_SIZE
    assert png_size(tmp_path / "curves.png") == (round(width * figures.CURVE_DPI), round(height * figures.CURVE_DPI))
    rows = [json.loads(line) for line in (lenet_run / "metrics.jsonl").read_text().splitlines()]
    best = max(range(len(rows)), key=lambda i: (rows[i]["val_acc"], -i))  # the first of the highest
    assert figures.best_epoch(rows) == rows[best]["epoch"] == json.loads((lenet_run / "summary.json").read_text())[
        "best_epoch"]
    assert result.stdout.startswith("epoch 2: train ")


@pytest.mark.slow
def test_plot_a_run_in_progress(lenet_run, tmp_path):
    # What a run looks like during its second epoch: one finished row, a line cut short, no checkpoint yet.
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(lenet_run / "recipe.yaml", run)
    first = (lenet_run / "metrics.jsonl").read_text().splitlines()[0]
    (run / "metrics.jsonl").write_text(first + "\n" + first[:20])
    result = cli("plot", run)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("epoch 1: ") and png_size(run / "plots" / "curves.png")[0] > 0


def test_plot_before_the_first_epoch_is_a_user_error(lenet_run, tmp_path):
    shutil.copy(lenet_run / "recipe.yaml", tmp_path)
    result = cli("plot", tmp_path)
    assert result.exit_code == 2 and "no finished epoch yet" in result.stderr


@pytest.mark.parametrize("train,val,verdict", [
    (0.99, 0.88, "over-fitting: more regularization"),
    (0.70, 0.69, "under-fitting: more capacity"),
    (0.93, 0.92, "a good fit"),
])
def test_diagnosis_reads_the_gap(train, val, verdict):
    rows = [{"epoch": 1, "train_acc": 0.5, "val_acc": 0.5}, {"epoch": 2, "train_acc": train, "val_acc": val}]
    assert verdict in interpret.diagnose(rows)


# ----------------------------------------------------------------------------- the numbers behind the pictures


def test_top_units_match_a_brute_force_ranking(lenet):
    model, x, _ = lenet
    top = interpret.top_units(model, x, "conv2", batch_size=128)
    maps = lenet_maps(model, x)["conv2"]  # (N, 10, 10, 16)
    per_image = maps.reshape(len(x), -1, maps.shape[-1]).max(axis=1)  # (N, units)
    for unit in range(maps.shape[-1]):
        expected = np.sort(per_image[:, unit])[::-1][: interpret.TOP]
        np.testing.assert_allclose(top.value[unit], expected, rtol=1e-5, atol=1e-6)
        for value, i, (r, c) in zip(top.value[unit], top.index[unit], top.position[unit]):
            assert maps[i, r, c, unit] == pytest.approx(value, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_top_patch_crop_is_the_receptive_field_of_summary(lenet, tmp_path):
    model, x, _ = lenet
    summary = json.loads(cli("summary", "lenet5", "--input", "28x28x1", "--json").stdout)
    rf = {r["name"]: tuple(r["receptive_field"]) for r in summary["layers"]}
    assert rf["conv2"] == (14, 14)
    rows = interpret.rows_by_name(model)
    top = interpret.top_units(model, x, "conv2")
    unit = top.strongest(1)[0]
    noise = np.random.default_rng(0).integers(0, 256, x.shape[1:], np.uint8)
    for i, position in zip(top.index[unit], top.position[unit]):
        top_, left, h, w = box = interpret.patch_box(rows["conv2"], position)
        patch = interpret.unit_patch(x[i], rows["conv2"], position)
        np.testing.assert_array_equal(patch, interpret.crop_box(x[i], box))
        assert patch.shape[:2] == rf["conv2"]
        inside = (slice(max(top_, 0), top_ + h), slice(max(left, 0), left + w))  # the box within the image
        np.testing.assert_array_equal(patch[max(-top_, 0):, max(-left, 0):][: 28 - inside[0].start,
                                                                              : 28 - inside[1].start],
                                      x[i][inside])
        # The unit sees nothing outside the crop: noise everywhere else leaves its activation as it is.
        noisy = noise.copy()
        noisy[inside] = x[i][inside]
        a = lenet_maps(model, np.stack([x[i], noisy]))["conv2"][:, position[0], position[1], unit]
        assert a[1] == pytest.approx(a[0], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_a_receptive_field_larger_than_the_image_shows_the_whole_image(lenet):
    model, x, _ = lenet
    rows = interpret.rows_by_name(model)
    assert rows["fc2"].receptive_field == (32, 32)  # > 28: the crop would be mostly padding
    np.testing.assert_array_equal(interpret.unit_patch(x[0], rows["fc2"], (0, 0)), x[0])
    assert interpret.unit_patch(x[0], rows["conv2"], (3, 4)).shape == (14, 14, 1)


def test_crop_pads_outside_the_image():
    image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
    patch = interpret.crop_box(image, (-1, 2, 3, 3))
    assert patch[..., 0].tolist() == [[0, 0, 0], [2, 3, 0], [6, 7, 0]]


@pytest.mark.slow
def test_tsne_gives_one_point_per_example(lenet):
    model, x, y = lenet
    layer = interpret.penultimate_layer(model)
    assert layer == "fc2"
    feats = interpret.features(model, x[:150], layer)
    assert feats.shape == (150, 84)
    points = interpret.embed_tsne(feats)
    assert points.shape == (150, 2) and np.isfinite(points).all()
    fig = figures.tsne(points, y[:150], [f"class {k}" for k in range(10)], "t-SNE")
    ax = fig.axes[0]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 150
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [f"class {k}" for k in range(10)]


def _folder_of_test_images(x, y, names, root):
    """Two images per class as PNG files in class folders named after the classes (eval matches them by name)."""
    files = []
    for k, name in enumerate(names):
        folder = root / name.replace("/", "-")
        folder.mkdir(parents=True)
        for j in np.flatnonzero(y == k)[:2]:
            Image.fromarray(x[j, ..., 0]).save(folder / f"{j}.png")
            files.append((folder / f"{j}.png", k))
    return files


@pytest.mark.slow
def test_predict_probabilities_sum_to_one_and_agree_with_eval(lenet_run, lenet, tmp_path):
    from cnncli.train.trained_run import load_trained

    _, x, y = lenet
    names = load_trained(lenet_run).class_names
    files = _folder_of_test_images(x, y, names, tmp_path / "images")
    result = cli("predict", lenet_run, *[f for f, _ in files], "--top", "10", "--json")
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.stdout)
    assert [p["image"] for p in predictions] == [str(f) for f, _ in files]
    probs = np.zeros((len(files), 10))
    for row, p in zip(probs, predictions):
        assert len(p["top"]) == 10 and [t["class"] for t in p["top"]] == [names[t["index"]] for t in p["top"]]
        assert [t["probability"] for t in p["top"]] == sorted((t["probability"] for t in p["top"]), reverse=True)
        for t in p["top"]:
            row[t["index"]] = t["probability"]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    labels = np.array([k for _, k in files])
    result = cli("eval", lenet_run, "--data", f"folder:{tmp_path / 'images'}", "--split", "train", "--json")
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.stdout)
    assert evaluated["n"] == len(files)
    assert evaluated["top1"] == pytest.approx(np.mean(probs.argmax(1) == labels), abs=1e-9)
    assert evaluated["loss"] == pytest.approx(-np.log(probs[np.arange(len(files)), labels]).mean(), rel=1e-4)


@pytest.mark.slow
def test_predict_table_and_a_missing_image(lenet_run, lenet, tmp_path):
    _, x, _ = lenet
    image = tmp_path / "a.jpg"
    Image.fromarray(x[0, ..., 0]).convert("RGB").resize((56, 40)).save(image)  # color, other size: converted
    result = cli("predict", lenet_run, image, "--top", "3")
    assert result.exit_code == 0, result.output
    best = json.loads(cli("predict", lenet_run, image, "--top", "1", "--json").stdout)[0]["top"][0]
    assert result.stdout.count("%") == 3 and f"{best['class']}" in result.stdout
    assert f"{best['probability']:.2%}" in result.stdout
    result = cli("predict", lenet_run, tmp_path / "missing.png")
    assert result.exit_code == 2 and "missing.png" in result.stderr


def test_saliency_of_a_linear_model_is_the_weight_map_of_the_predicted_class():
    from cnncli.models import build_model
    from cnncli.recipe import ModelConfig

    std = 0.5  # the model normalizes (x - mean) / std first: d score / d pixel = w / std
    model = build_model(ModelConfig(name="linear"), input_shape=(8, 6, 1), num_classes=4, mean=0.3, std=std, seed=1)
    model.eval()
    x = jax.random.uniform(jax.random.key(0), (5, 8, 6, 1))
    classes = np.asarray(model(x).argmax(-1))
    maps = interpret.saliency(model, x, classes)
    weights = np.asarray(model.net.fc1.kernel[...])  # (8 * 6 * 1, 4), pixels in NHWC order
    expected = np.abs(weights[:, classes].T).reshape(5, 8, 6) / std
    np.testing.assert_allclose(maps, expected, rtol=1e-5)
    # the same model's "filters" are those weight maps, one per class
    rows = interpret.rows_by_name(model)
    np.testing.assert_array_equal(interpret.kernels(model, "fc1", rows)[..., 0], weights.T.reshape(4, 8, 6))


@pytest.mark.slow
def test_gradcam_matches_the_gradient_of_the_layers_above(lenet):
    model, x, _ = lenet
    pixels = to_pixels(x[:4])
    classes = np.array([0, 3, 5, 9])
    cam = interpret.gradcam(model, pixels, "pool2", classes)
    # LeNet's head after pool2 is fc1 -> fc2 -> fc3: differentiate it directly, at pool2 computed from the weights.
    maps = jnp.asarray(lenet_maps(model, x[:4])["pool2"])
    net = model.net

    def score(a):
        return jnp.take_along_axis(net.fc3(net.fc2(net.fc1(a))), jnp.asarray(classes)[:, None], axis=1).sum()

    weights = jax.grad(score)(maps).mean(axis=(1, 2), keepdims=True)
    heat = jax.nn.relu((weights * maps).sum(-1))
    heat = jax.image.resize(heat, (4, 28, 28), "bilinear")
    expected = heat / jnp.maximum(heat.max(axis=(1, 2), keepdims=True), 1e-12)
    np.testing.assert_allclose(cam, expected, atol=1e-5)
    assert cam.shape == (4, 28, 28) and cam.max() == pytest.approx(1.0)


def test_confident_errors_are_wrong_and_sorted():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([1, 1, 1, 0])
    assert interpret.confident_errors(probs, labels, 5).tolist() == [0, 3, 2]


# ----------------------------------------------------------------------------- user errors


@pytest.mark.parametrize("args,message", [
    (["--what", "activations", "--layer", "conv9"], "'conv9' is not a layer of this model (did you mean: conv2, "
                                                    "conv1?); choose one of: input, conv1, pool1, conv2"),
    (["--what", "activations", "--layer", "fc1"], "'fc1' has no feature map"),
    (["--what", "filters", "--layer", "pool1"], "no weights that are pictures; choose one of: conv1, conv2"),
    (["--what", "top-patch"], "(did you mean: top-patches?)"),
    (["--what", "tsne", "--image", "x.png"], "--image applies to activations, saliency, smoothgrad"),
])
def test_visualize_user_errors(lenet_run, args, message):
    result = cli("visualize", lenet_run, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_curves_of_single_step_adversarial_training_show_pgd_accuracy_and_its_best_epoch():
    # a run that overfits catastrophically: clean and single-step accuracy rise while PGD-10 accuracy collapses
    val_acc, single, pgd = [0.70, 0.74, 0.78, 0.80], [0.55, 0.60, 0.70, 0.79], [0.40, 0.45, 0.30, 0.02]
    rows = [{"epoch": i + 1, "train_loss": 1.0 / (i + 1), "train_acc": a - 0.05, "val_loss": 1.0 / (i + 2),
             "val_acc": a, "val_robust_acc": s, "val_pgd_acc": p, "lr": 1e-3}
            for i, (a, s, p) in enumerate(zip(val_acc, single, pgd))]
    assert figures.best_epoch(rows) == 2  # the most PGD-robust epoch, not the cleanest (4)
    acc_ax = figures.curves_figure([("run", rows)]).axes[0]
    drawn = {line.get_gid(): list(line.get_ydata()) for line in acc_ax.get_lines() if line.get_gid()}
    assert drawn == {"val_robust_acc": single, "val_pgd_acc": pgd}
    (star,) = [line for line in acc_ax.get_lines() if line.get_marker() == "*"]
    assert list(star.get_xdata()) == [2] and list(star.get_ydata()) == [0.45]
    assert {"validation, training attack", "validation, PGD-10", "best epoch 2"} <= {
        t.get_text() for t in acc_ax.get_legend().get_texts()}
    # a run without adversarial training draws neither robust curve and keeps its cleanest epoch
    clean = [{k: v for k, v in r.items() if k not in ("val_robust_acc", "val_pgd_acc")} for r in rows]
    assert figures.best_epoch(clean) == 4
    assert not [line for line in figures.curves_figure([("run", clean)]).axes[0].get_lines() if line.get_gid()]
