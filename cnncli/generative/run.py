"""Train a GAN recipe into a run directory, and read a trained generator back as a sampler.

A GAN run directory holds `recipe.yaml` (resolved, with a `gan` section), `data.json` (class names,
image shape, the training images' count), `metrics.jsonl` (one row per `train.log_every` steps),
`generator/` (an Orbax checkpoint of the generator, written at the end or on Ctrl-C) and
`samples.png` (one row per class).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cnncli.data.pipeline import Splits
from cnncli.errors import UserError
from cnncli.generative import acgan
from cnncli.generative.recipe import GanRecipe
from cnncli.generative.recipe import load as load_recipe
from cnncli.recipe import DataConfig
from cnncli.run.rundir import RunDir

GENERATOR = "generator"
SAMPLES_PER_CLASS = 10  # columns of the samples.png grid written at the end of training
SHUFFLE_STREAM, STEP_STREAM = 1, 2


def train(recipe: GanRecipe, splits: Splits, run: RunDir, *, progress=None) -> dict[str, Any]:
    """Train the recipe's ACGAN on the training split; returns the last metrics row.

    `progress(step, steps, row)` is called every `train.log_every` steps. Ctrl-C stops after the current
    step, keeping (and saving) the generator trained so far.
    """
    cfg = recipe.train
    n = len(splits.train_x)
    if cfg.batch_size > n:
        raise UserError(f"train.batch_size={cfg.batch_size} is larger than the {n} training images")
    models = acgan.build(splits.image_shape, splits.num_classes, recipe.gan.noise, recipe.gan.width, recipe.seed)
    tx_g = optax.adam(recipe.optim.lr, recipe.optim.b1, recipe.optim.b2)
    tx_d = optax.adam(recipe.optim.lr, recipe.optim.b1, recipe.optim.b2)
    g_params = nnx.filter_state(models.g_state, nnx.Param)
    d_params = nnx.filter_state(models.d_state, nnx.Param)
    state = (models.g_state, models.d_state, tx_g.init(g_params), tx_d.init(d_params))
    step_fn = acgan.make_train_step(models, tx_g, tx_d, batch_size=cfg.batch_size,
                                    class_weight=recipe.gan.class_weight)
    xs, ys = jnp.asarray(splits.train_x), jnp.asarray(splits.train_y, jnp.int32)
    key = jax.random.key(recipe.seed)
    step_key = jax.random.fold_in(key, STEP_STREAM)
    per_epoch = n // cfg.batch_size
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_text(run.recipe, recipe.to_yaml())
    run.write_json(run.data, {"source": recipe.data.source, "class_names": splits.class_names,
                              "image_shape": list(splits.image_shape), "n_train": n, "kind": "gan"})
    stop = {"now": False}
    previous = signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    sums, row, t0, order = None, {}, time.perf_counter(), None
    try:
        for step in range(cfg.steps):
            i = step % per_epoch
            if i == 0:
                order = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, SHUFFLE_STREAM), step), n)
            idx = jax.lax.dynamic_slice_in_dim(order, i * cfg.batch_size, cfg.batch_size)
            state, metrics = step_fn(*state, xs[idx], ys[idx], jax.random.fold_in(step_key, step))
            sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps or stop["now"]:
                count = done % cfg.log_every or cfg.log_every
                row = {"step": done, **{k: round(float(v) / count, 4) for k, v in jax.device_get(sums).items()},
                       "seconds": round(time.perf_counter() - t0, 1)}
                run.append_metrics(row)
                sums = None
                if progress is not None:
                    progress(done, cfg.steps, row)
            if stop["now"]:
                break
    finally:
        signal.signal(signal.SIGINT, previous)
        save_generator(run, state[0])
    return {**row, "stopped": stop["now"]}


def save_generator(run: RunDir, g_state) -> Path:
    import orbax.checkpoint as ocp

    target = (run.path / GENERATOR).absolute()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, jax.device_get(nnx.to_pure_dict(g_state)), force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
    return target


@dataclass
class TrainedGan:
    """A trained generator and what it was trained on."""

    path: Path
    recipe: GanRecipe
    class_names: list[str]
    image_shape: tuple[int, int, int]
    g_def: Any
    g_state: Any

    def sample(self, labels: np.ndarray, seed: int = 0, batch: int = 500) -> np.ndarray:
        """uint8 images (N, H, W, C) of the given classes."""
        fn = jax.jit(lambda state, labels, key: acgan.sample(self.g_def, state, labels, key, self.recipe.gan.noise))
        out = []
        for start in range(0, len(labels), batch):
            part = jnp.asarray(labels[start:start + batch], jnp.int32)
            pixels = fn(self.g_state, part, jax.random.fold_in(jax.random.key(seed), start))
            out.append(np.asarray(jnp.round(pixels * 255.0)).astype(np.uint8))
        return np.concatenate(out) if out else np.zeros((0, *self.image_shape), np.uint8)


def check_gan_dir(path: str | Path) -> RunDir:
    """The run directory of a trained GAN.

    Raises:
        UserError: `path` holds no generator written by `cnncli gan train`.
    """
    run = RunDir(path)
    if not (run.path / GENERATOR).is_dir() or not run.recipe.is_file():
        raise UserError(f"{run.path} is not a trained GAN: expected recipe.yaml and generator/ written by "
                        f"`cnncli gan train`")
    return run


def trained_on(path: str | Path) -> tuple[DataConfig, int]:
    """The data section and seed a GAN was trained with (they decide its training split)."""
    recipe = load_recipe(check_gan_dir(path).recipe)
    return recipe.data, recipe.seed


def load_gan(path: str | Path) -> TrainedGan:
    """The trained GAN of a run directory written by `cnncli gan train`."""
    import orbax.checkpoint as ocp

    run = check_gan_dir(path)
    recipe = load_recipe(run.recipe)
    data = run.read_json(run.data)
    shape, names = tuple(data["image_shape"]), list(data["class_names"])
    models = acgan.build(shape, len(names), recipe.gan.noise, recipe.gan.width, recipe.seed)
    checkpointer = ocp.StandardCheckpointer()
    try:
        raw = checkpointer.restore((run.path / GENERATOR).absolute())
    finally:
        checkpointer.close()
    nnx.replace_by_pure_dict(models.g_state, raw)
    return TrainedGan(run.path, recipe, names, shape, models.g_def, models.g_state)


def sample_pool(path: str | Path, size: int, seed: int, class_names: list[str],
                image_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """`size` generated images with balanced labels (uint8 images, int32 labels) for a classifier's batches.

    Raises:
        UserError: the GAN was trained on other classes or another image shape than the classifier's data.
    """
    gan = load_gan(path)
    if gan.class_names != list(class_names) or gan.image_shape != tuple(image_shape):
        raise UserError(f"the GAN in {path} was trained on {len(gan.class_names)} classes of "
                        f"{'x'.join(map(str, gan.image_shape))} images ({', '.join(gan.class_names[:3])}, ...), the "
                        f"classifier's data has {len(class_names)} of {'x'.join(map(str, image_shape))}")
    labels = np.arange(size, dtype=np.int32) % len(class_names)
    return gan.sample(labels, seed), labels
