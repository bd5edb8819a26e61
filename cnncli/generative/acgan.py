"""A class-conditional DCGAN trained as an ACGAN (Odena et al. 2017), small enough for a CPU.

Generator: [z, one-hot class] -> FC to (H/4 x W/4 x 4w) -> BN-ReLU -> 4x4 transposed conv /2 to
2w channels -> BN-ReLU -> 4x4 transposed conv /2 to the image's channels -> sigmoid, so samples are
pixels in [0, 1] like every image cnncli trains on. Discriminator: two 4x4 stride-2 convolutions
(w, 2w channels, leaky ReLU 0.2, as DCGAN) -> two heads on the flattened features: real/fake and
the class. Losses: the discriminator learns real vs fake and the class of real and generated
images; the generator makes its images look real (the non-saturating loss) and of the class it
was asked for. Both heads train the discriminator on the class of generated images too, as in the
paper, so a generator that ignores its label is penalized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cnncli.errors import UserError

LEAK = 0.2  # DCGAN's leaky ReLU slope in the discriminator
KERNEL = 4  # the transposed / strided convolutions' window: 4x4 with stride 2 tiles without checkerboards
INIT_STD = 0.02  # DCGAN's N(0, 0.02) weight initialization


def check_shape(image_shape: tuple[int, int, int]) -> None:
    h, w, _ = image_shape
    if h % 4 or w % 4:
        raise UserError(f"the GAN upsamples twice by 2: image height and width must be multiples of 4, got {h}x{w} "
                        f"(set data.image_size)")


class Generator(nnx.Module):
    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, noise: int, width: int, *,
                 rngs: nnx.Rngs):
        check_shape(image_shape)
        h, w, c = image_shape
        init = nnx.initializers.normal(INIT_STD)
        self.num_classes, self.noise, self.base = num_classes, noise, (h // 4, w // 4, 4 * width)
        self.fc = nnx.Linear(noise + num_classes, (h // 4) * (w // 4) * 4 * width, kernel_init=init, rngs=rngs)
        self.bn0 = nnx.BatchNorm(4 * width, momentum=0.9, rngs=rngs)
        self.up1 = nnx.ConvTranspose(4 * width, 2 * width, (KERNEL, KERNEL), strides=(2, 2), padding="SAME",
                                     kernel_init=init, rngs=rngs)
        self.bn1 = nnx.BatchNorm(2 * width, momentum=0.9, rngs=rngs)
        self.up2 = nnx.ConvTranspose(2 * width, c, (KERNEL, KERNEL), strides=(2, 2), padding="SAME",
                                     kernel_init=init, rngs=rngs)

    def __call__(self, z: jax.Array, labels: jax.Array) -> jax.Array:
        x = self.fc(jnp.concatenate([z, jax.nn.one_hot(labels, self.num_classes)], -1))
        x = jax.nn.relu(self.bn0(x.reshape(len(z), *self.base)))
        x = jax.nn.relu(self.bn1(self.up1(x)))
        return jax.nn.sigmoid(self.up2(x))


class Discriminator(nnx.Module):
    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, width: int, *, rngs: nnx.Rngs):
        h, w, c = image_shape
        init = nnx.initializers.normal(INIT_STD)
        self.conv1 = nnx.Conv(c, width, (KERNEL, KERNEL), strides=(2, 2), padding="SAME", kernel_init=init, rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (KERNEL, KERNEL), strides=(2, 2), padding="SAME", kernel_init=init,
                              rngs=rngs)
        features = (h // 4) * (w // 4) * 2 * width
        self.real = nnx.Linear(features, 1, kernel_init=init, rngs=rngs)
        self.classes = nnx.Linear(features, num_classes, kernel_init=init, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(real/fake logit (N,), class logits (N, K)) of pixels in [0, 1], centred to [-1, 1] first."""
        x = jax.nn.leaky_relu(self.conv1(2.0 * x - 1.0), LEAK)
        x = jax.nn.leaky_relu(self.conv2(x), LEAK).reshape(len(x), -1)
        return self.real(x)[:, 0], self.classes(x)


@dataclass
class GanModels:
    """The two networks as (graphdef, state) pairs; the state is what a checkpoint holds."""

    g_def: Any
    d_def: Any
    g_state: Any
    d_state: Any
    num_classes: int
    noise: int


def build(image_shape, num_classes: int, noise: int, width: int, seed: int) -> GanModels:
    rngs = nnx.Rngs(seed)
    g = Generator(tuple(image_shape), num_classes, noise, width, rngs=rngs)
    d = Discriminator(tuple(image_shape), num_classes, width, rngs=rngs)
    g_def, g_state = nnx.split(g)
    d_def, d_state = nnx.split(d)
    return GanModels(g_def, d_def, g_state, d_state, num_classes, noise)


def make_train_step(models: GanModels, tx_g: optax.GradientTransformation, tx_d: optax.GradientTransformation,
                    *, batch_size: int, class_weight: float):
    """A jitted step(g_state, d_state, opt_g, opt_d, real uint8 batch, labels, key) -> (states, metrics).

    One discriminator update on a real batch and a generated batch of the same (random) labels,
    then one generator update on a fresh generated batch (DCGAN's alternation).
    """
    g_def, d_def, k, noise = models.g_def, models.d_def, models.num_classes, models.noise

    def split(state):
        return nnx.split_state(state, nnx.Param, ...)

    def generate(g_params, g_rest, z, labels):
        g = nnx.merge(g_def, g_params, g_rest, copy=True)
        g.train()
        images = g(z, labels)
        return images, nnx.split(g, nnx.Param, ...)[2]

    def step(g_state, d_state, opt_g, opt_d, real, real_labels, key):
        g_params, g_rest = split(g_state)
        d_params, d_rest = split(d_state)
        kz1, kz2, kl1, kl2 = jax.random.split(key, 4)
        x_real = real.astype(jnp.float32) / 255.0
        fake_labels = jax.random.randint(kl1, (batch_size,), 0, k)
        fake, g_rest = generate(g_params, g_rest, jax.random.normal(kz1, (batch_size, noise)), fake_labels)
        fake = jax.lax.stop_gradient(fake)

        def d_loss(d_params):
            d = nnx.merge(d_def, d_params, d_rest)
            real_logit, real_cls = d(x_real)
            fake_logit, fake_cls = d(fake)
            adv = (optax.sigmoid_binary_cross_entropy(real_logit, jnp.ones_like(real_logit)).mean()
                   + optax.sigmoid_binary_cross_entropy(fake_logit, jnp.zeros_like(fake_logit)).mean())
            cls = (optax.softmax_cross_entropy_with_integer_labels(real_cls, real_labels).mean()
                   + optax.softmax_cross_entropy_with_integer_labels(fake_cls, fake_labels).mean())
            acc = jnp.mean(jnp.argmax(real_cls, -1) == real_labels)
            return adv + class_weight * cls, (adv, acc, jnp.mean(real_logit > 0), jnp.mean(fake_logit < 0))

        d_grads, (d_adv, real_acc, real_ok, fake_ok) = jax.grad(d_loss, has_aux=True)(d_params)
        updates, opt_d = tx_d.update(d_grads, opt_d, d_params)
        d_params = optax.apply_updates(d_params, updates)

        g_labels = jax.random.randint(kl2, (batch_size,), 0, k)
        z = jax.random.normal(kz2, (batch_size, noise))

        def g_loss(g_params):
            images, rest = generate(g_params, g_rest, z, g_labels)
            logit, cls = nnx.merge(d_def, d_params, d_rest)(images)
            adv = optax.sigmoid_binary_cross_entropy(logit, jnp.ones_like(logit)).mean()
            ce = optax.softmax_cross_entropy_with_integer_labels(cls, g_labels).mean()
            return adv + class_weight * ce, (adv, jnp.mean(jnp.argmax(cls, -1) == g_labels), rest)

        g_grads, (g_adv, fake_acc, g_rest) = jax.grad(g_loss, has_aux=True)(g_params)
        updates, opt_g = tx_g.update(g_grads, opt_g, g_params)
        g_params = optax.apply_updates(g_params, updates)
        metrics = {"d_loss": d_adv, "g_loss": g_adv, "d_real": real_ok, "d_fake": fake_ok,
                   "real_class_acc": real_acc, "fake_class_acc": fake_acc}
        return (nnx.merge_state(g_params, g_rest), nnx.merge_state(d_params, d_rest), opt_g, opt_d), metrics

    return jax.jit(step, donate_argnums=(0, 1, 2, 3))


def sample(g_def, g_state, labels: jax.Array, key: jax.Array, noise: int) -> jax.Array:
    """Generated images (N, H, W, C) in [0, 1] of the given classes, the generator in inference mode."""
    g = nnx.merge(g_def, g_state)
    g.eval()
    return g(jax.random.normal(key, (len(labels), noise)), labels)
