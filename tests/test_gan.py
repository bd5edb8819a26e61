"""The class-conditional GAN: sample shapes, label conditioning after training, the CLI and its errors."""

import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cli
from PIL import Image

from cnncli.data.pipeline import load_splits
from cnncli.generative import acgan
from cnncli.generative.recipe import GanRecipe
from cnncli.generative.run import load_gan, sample_pool, train
from cnncli.run.rundir import RunDir
from tests.helpers import metric_rows

SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def dark_and_bright(tmp_path_factory):
    """Two classes a generator can only tell apart by its label: dark images (0) and bright ones (1)."""
    rng = np.random.default_rng(0)
    n = 256
    y = np.arange(n) % 2
    x = np.where(y[:, None, None, None] == 1, 200, 30) + rng.integers(0, 40, (n, *SHAPE))
    path = tmp_path_factory.mktemp("data") / "dark_bright.npz"
    np.savez(path, x=x.astype(np.uint8), y=y.astype(np.int64), class_names=np.asarray(["dark", "bright"]))
    return path


@pytest.fixture(scope="module")
def trained(dark_and_bright, tmp_path_factory):
    recipe = GanRecipe.model_validate({
        "name": "tiny", "seed": 0, "data": {"source": f"npz:{dark_and_bright}", "val_fraction": 0.0},
        "gan": {"noise": 8, "width": 8}, "optim": {"lr": 0.002}, "train": {"steps": 150, "batch_size": 32,
                                                                           "log_every": 50}})
    run = RunDir(tmp_path_factory.mktemp("runs") / "gan")
    last = train(recipe, load_splits(recipe.data, recipe.seed), run)
    return run.path, last


@pytest.mark.slow
def test_generator_and_discriminator_shapes():
    models = acgan.build((12, 16, 3), 5, noise=4, width=4, seed=0)
    labels = jnp.array([0, 4, 2])
    images = acgan.sample(models.g_def, models.g_state, labels, jax.random.key(0), noise=4)
    assert images.shape == (3, 12, 16, 3) and float(images.min()) >= 0 and float(images.max()) <= 1
    from flax import nnx

    real, classes = nnx.merge(models.d_def, models.d_state)(images)
    assert real.shape == (3,) and classes.shape == (3, 5)


def test_an_image_size_the_generator_cannot_reach_is_a_user_error():
    from cnncli.errors import UserError

    with pytest.raises(UserError, match="multiples of 4"):
        acgan.build((10, 10, 1), 2, noise=4, width=4, seed=0)


@pytest.mark.slow
def test_samples_follow_their_label(trained):
    path, last = trained
    gan = load_gan(path)
    labels = np.repeat(np.arange(2, dtype=np.int32), 64)
    images = gan.sample(labels, seed=1)
    assert images.shape == (128, *SHAPE) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, gan.sample(labels, seed=1))  # a seed gives the same images
    dark, bright = images[:64].mean() / 255, images[64:].mean() / 255
    assert bright - dark > 0.3, (dark, bright)  # the label, not the noise, decides the brightness
    assert last["fake_class_acc"] > 0.9  # and the discriminator's class head agrees
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [50, 100, 150]


@pytest.mark.slow
def test_sample_pool_is_balanced_and_checks_the_classes(trained):
    from cnncli.errors import UserError

    path, _ = trained
    x, y = sample_pool(path, 10, 0, ["dark", "bright"], SHAPE)
    assert x.shape == (10, *SHAPE) and np.bincount(y).tolist() == [5, 5]
    with pytest.raises(UserError, match="trained on 2 classes"):
        sample_pool(path, 10, 0, ["a", "b", "c"], SHAPE)


@pytest.mark.slow
def test_gan_sample_cli_writes_a_labelled_grid_and_an_npz(trained, tmp_path):
    path, _ = trained
    result = cli("gan", "sample", path, "--n", "4", "--out", tmp_path / "grid.png", "--npz", tmp_path / "s.npz")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "grid.png") as img:
        assert img.format == "PNG" and img.size[0] > img.size[1] / 2
    data = np.load(tmp_path / "s.npz")
    assert data["x"].shape == (8, *SHAPE) and data["y"].tolist() == [0] * 4 + [1] * 4


def test_gan_cli_user_errors(tmp_path):
    result = cli("gan", "train", "lenet5_fashion_mnist")
    assert result.exit_code == 2 and "not a GAN recipe" in result.stderr
    result = cli("train", "acgan_fashion_mnist_100")
    assert result.exit_code == 2 and "cnncli gan train" in result.stderr
    result = cli("gan", "sample", tmp_path)
    assert result.exit_code == 2 and "not a trained GAN" in result.stderr
    result = cli("gan", "train", "acgan_fashion_mnist_100", "--set", "gan.widht=8")
    assert result.exit_code == 2 and "did you mean" in result.stderr


# ----------------------------------------------------------------------- data.generated: GAN samples in the batches


class _Display:
    """A training display that keeps the loop's messages, and presses Ctrl-C at one (epoch, step)."""

    def __init__(self, at=None):
        self.at, self.messages = at, []

    def update(self, *, epoch, step, **kw):
        if (epoch, step) == self.at:
            signal.raise_signal(signal.SIGINT)

    def message(self, text):
        self.messages.append(text)

    def start(self, **kw): ...
    def epoch_done(self, row): ...
    def finish(self): ...


def _classifier(npz, gan=None, fraction=0.5, **data):
    """A linear classifier on the GAN's data section (so the GAN saw exactly its training images)."""
    from cnncli.recipe import Recipe

    raw = {"name": "clf", "seed": 0, "model": {"name": "linear"},
           "data": {"source": f"npz:{npz}", "val_fraction": 0.0, **data},
           "optim": {"name": "sgd", "lr": 0.05}, "train": {"epochs": 2, "batch_size": 16, "log_every": 1}}
    if gan is not None:
        raw["data"]["generated"] = {"gan": str(gan), "fraction": fraction, "pool": 64, "seed": 3}
    return Recipe.model_validate(raw)


def _train(recipe, path, display=None, resume=False):
    from cnncli.train.loop import start_run
    from cnncli.train.loop import train as train_classifier

    run = RunDir(path)
    if not resume:
        start_run(recipe, load_splits(recipe.data, recipe.seed), run)
    train_classifier(recipe, load_splits(recipe.data, recipe.seed), run, display=display, resume=resume)
    return metric_rows(run.path)


@pytest.mark.slow
def test_a_generated_fraction_of_zero_trains_the_plain_run_bit_for_bit(trained, dark_and_bright, tmp_path):
    gan, _ = trained
    plain = _train(_classifier(dark_and_bright), tmp_path / "plain")
    assert _train(_classifier(dark_and_bright, gan, fraction=0.0), tmp_path / "zero") == plain


@pytest.mark.slow
def test_generated_images_join_every_batch_and_a_resumed_run_draws_the_same(trained, dark_and_bright, tmp_path):
    from cnncli.train.loop import Interrupted

    gan, _ = trained
    recipe = _classifier(dark_and_bright, gan, fraction=0.5)
    display = _Display()
    rows = _train(recipe, tmp_path / "mixed", display)
    # 8 real + 8 generated per batch of 16: an epoch passes over the 256 real images in 32 steps, not 16
    assert [r["step"] for r in rows] == [32, 64]
    assert any("8 real images and 8 drawn from 64 generated" in m for m in display.messages)
    assert not any("warning" in m for m in display.messages)  # the GAN trained on this very split
    assert rows != _train(_classifier(dark_and_bright), tmp_path / "plain")
    with pytest.raises(Interrupted):
        _train(recipe, tmp_path / "resumed", _Display(at=(1, 5)))
    assert _train(recipe, tmp_path / "resumed", resume=True) == rows


@pytest.mark.slow
def test_a_gan_trained_on_another_split_is_a_warning(trained, dark_and_bright, tmp_path):
    gan, _ = trained
    display = _Display()
    _train(_classifier(dark_and_bright, gan, val_fraction=0.25), tmp_path / "other", display)
    assert any("trained with another data section or seed" in m for m in display.messages)


@pytest.mark.slow
def test_generated_user_errors(trained, tmp_path):
    gan, _ = trained
    result = cli("train", "lenet5_fashion_mnist", "--dry-run", "--set", f"data.generated.gan={tmp_path}")
    assert result.exit_code == 2 and "is not a trained GAN" in result.stderr
    result = cli("train", "lenet5_fashion_mnist", "--dry-run", "--set", f"data.generated.gan={gan}",
                 "--set", "data.generated.fraction=0.001")
    assert result.exit_code == 2 and "is 0 generated images" in result.stderr
    result = cli("train", "lenet5_fashion_mnist", "--set", f"data.generated.gan={gan}", "--set", "data.limit=500",
                 "--run-dir", tmp_path / "run")
    assert result.exit_code == 2 and "trained on 2 classes of 8x8x1 images" in result.stderr
    result = cli("gan", "train", "acgan_fashion_mnist_100", "--set", f"data.generated.gan={gan}")
    assert result.exit_code == 2 and "a GAN trains on real images only" in result.stderr
