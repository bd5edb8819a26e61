"""Train-step throughput of a 28x28x1 recipe with and without its augmentation, interleaved in one process.

    PYTHONPATH=. python docs/augment_cost.py [RECIPE]     (default: lenet5_fashion_mnist_augment)

Both jitted steps run on the same synthetic uint8 batches, alternating blocks of BLOCK steps for
ROUNDS rounds, so a changing load on a shared machine hits both alike. Prints the median images/s of
each and the per-round ratio (docs/toolbox.md, measurement 1).
"""

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cnncli.data.augment import build_augment
from cnncli.recipe import load
from cnncli.train import optim
from cnncli.train.state import TrainState, build, init_totals
from cnncli.train.steps import StepOptions, data_mesh, make_train_step

CHUNKS, BLOCK, ROUNDS = 50, 50, 8  # batches in the synthetic epoch, steps per timed block, rounds
SHAPE, CLASSES = (28, 28, 1), 10


class Runner:
    """One train step and its state, advanced `n` steps at a time over the synthetic epoch."""

    def __init__(self, recipe, augment):
        net = build(recipe, SHAPE, CLASSES)
        tx = optim.build_optimizer(recipe.optim, optim.learning_rate(recipe.optim, recipe.schedule, epochs=1,
                                                                      steps_per_epoch=CHUNKS), net.params)
        self.step = make_train_step(net.train_def, tx, num_classes=CLASSES, batch_size=recipe.train.batch_size,
                                    mesh=data_mesh(), options=StepOptions(augment=augment))
        self.state = TrainState(net.params, net.rest, tx.init(net.params), jnp.zeros((), jnp.int32))
        self.totals, self.calls, self.start = init_totals(), 0, jnp.int32(0)

    def run(self, xs, ys, n: int) -> None:
        for _ in range(n):
            if self.calls % CHUNKS == 0:  # a new synthetic epoch: the batch index wraps to 0
                self.start = jnp.int32(self.calls)
            self.state, self.totals = self.step(self.state, self.totals, xs, ys, self.start, jax.random.key(0))
            self.calls += 1
        jax.block_until_ready(self.totals)


def main(recipe_name: str) -> None:
    recipe = load(recipe_name)
    batch = recipe.train.batch_size
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.integers(0, 256, (CHUNKS * batch, *SHAPE), dtype=np.uint8))
    ys = jnp.asarray(rng.integers(0, CLASSES, (CHUNKS * batch,), dtype=np.int32))
    runners = {"none": Runner(recipe, None), "augmented": Runner(recipe, build_augment(recipe.augment))}
    for runner in runners.values():
        runner.run(xs, ys, 3)  # compilation
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(ROUNDS):
        for name, runner in runners.items():
            t = time.perf_counter()
            runner.run(xs, ys, BLOCK)
            rates[name].append(BLOCK * batch / (time.perf_counter() - t))
    for name, values in rates.items():
        print(f"{name:10s} median {statistics.median(values):8.0f} img/s  "
              f"(rounds: {', '.join(f'{v:.0f}' for v in values)})")
    ratios = [a / b for a, b in zip(rates["augmented"], rates["none"])]
    print(f"augmented / none: median {statistics.median(ratios):.2f} "
          f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "lenet5_fashion_mnist_augment")
