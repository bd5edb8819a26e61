"""The bag-of-visual-words baseline: its codebook, its histograms, and its classifier against scikit-learn's."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cnncli.data.pipeline import load_splits
from cnncli.models import build_model
from cnncli.models.bovw import BagOfWords, pyramid_regions
from cnncli.models.fitting import fit_to_data
from cnncli.recipe import DataConfig, ModelConfig

WORDS = 32


@pytest.fixture(scope="module")
def fitted(fashion):
    splits = load_splits(DataConfig(source="fashion_mnist", train_per_class=100, val_fraction=0.0), seed=0)
    model = build_model(ModelConfig(name="bovw", args={"words": WORDS}), input_shape=splits.image_shape,
                        num_classes=10, mean=splits.mean, std=splits.std, seed=0)
    model.eval()
    lines = []
    fit_to_data(model, splits.train_x, seed=0, report=lines.append)
    return model, splits, lines


def test_pyramid_regions_split_the_positions():
    r = pyramid_regions((11, 11), (1, 2))
    assert r.shape == (5, 121)
    np.testing.assert_allclose(r.sum(1), 1.0, rtol=1e-6)
    assert ((r[1:] > 0).sum(0) == 1).all()  # each position belongs to exactly one quadrant
    assert (r[1:] > 0).sum(1).tolist() == [36, 30, 30, 25]  # 6 + 5 rows and columns


@pytest.mark.slow
def test_codebook_is_k_means_of_the_descriptors(fitted):
    from sklearn.cluster import KMeans

    model, splits, lines = fitted
    layer = model.net.bovw
    assert "codebook of 32 words" in lines[0]
    px = (jnp.asarray(splits.train_x[:300], jnp.float32) / 255.0 - jnp.asarray(splits.mean)) / jnp.asarray(splits.std)
    d = np.asarray(layer.descriptors(px)).reshape(-1, 36)
    ours = np.asarray(layer.codebook[...])
    # every word is used, and the codebook quantizes about as well as scikit-learn's full k-means
    words = ((d[:, None] - ours[None]) ** 2).sum(-1).argmin(1)
    assert len(np.unique(words)) > 0.9 * WORDS
    inertia = ((d - ours[words]) ** 2).sum()
    reference = KMeans(WORDS, n_init=1, random_state=0).fit(d).inertia_
    assert inertia < 1.3 * reference


@pytest.mark.slow
def test_features_are_standardized_histograms_and_a_linear_head_classifies_like_sklearn(fitted):
    from sklearn.linear_model import LogisticRegression

    model, splits, _ = fitted
    layer = model.net.bovw

    def feats(x):
        px = (jnp.asarray(x, jnp.float32) / 255.0 - jnp.asarray(splits.mean)) / jnp.asarray(splits.std)
        return np.asarray(layer(px)), np.asarray(layer.histograms(px))

    train, hist = feats(splits.train_x)
    # each pyramid cell's histogram (squared back) sums to one, weighted 1/2 per level
    squares = (hist.reshape(len(hist), 5, WORDS) * 2) ** 2
    np.testing.assert_allclose(squares.sum(-1), 1.0, rtol=1e-4)
    np.testing.assert_allclose(train.mean(0), 0.0, atol=1e-3)
    test, _ = feats(splits.test_x[:2000])
    clf = LogisticRegression(max_iter=2000).fit(train, splits.train_y)
    accuracy = clf.score(test, splits.test_y[:2000])
    assert accuracy > 0.6  # far above chance (10%) on 100 images per class and 32 words
    nnx.update(model, nnx.state(model))  # the fitted values are plain state: they survive a split/merge
    graphdef, state = nnx.split(model)
    again = nnx.merge(graphdef, state)
    np.testing.assert_array_equal(np.asarray(again.net.bovw.codebook[...]), np.asarray(layer.codebook[...]))


def test_an_image_too_small_for_the_pyramid_is_a_user_error():
    from cnncli.errors import UserError

    with pytest.raises(UserError, match="too few"):
        BagOfWords((8, 8), cell=4, stride=4, pyramid=(1, 4))


@pytest.mark.slow
def test_bovw_trains_evaluates_predicts_and_summarizes_through_the_cli(fashion, tmp_path):
    import json

    from conftest import cli

    run = tmp_path / "bovw"
    result = cli("train", "bovw_fashion_mnist", "--run-dir", run, "--set", "data.limit=1500", "--set", "train.epochs=3",
                 "--set", "model.args.words=32", "--set", "train.batch_size=100", "--set", "optim.lr=0.01")
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["params"] == 32 * 5 * 10 + 10 and summary["test"]["top1"] > 0.5
    evaluated = json.loads(cli("eval", run, "--json").stdout)
    assert evaluated["top1"] == pytest.approx(summary["test"]["top1"])  # the codebook came back from the checkpoint
    assert cli("summary", run).exit_code == 0
    from PIL import Image

    image = tmp_path / "x.png"
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(image)
    assert cli("predict", run, image).exit_code == 0
