#!/usr/bin/env python3
"""An attack's input-gradient step compiled on its own against the same step inside a compiled loop, with
cnncli's convolutions and with the plain `lax` convolution, on a trained run's first N test images.

Why it exists: the attacks run their iterations as one `lax` loop (cnncli/adversarial/attacks.py), and XLA's
CPU compiler rearranges the kernel of JAX's transposed convolution only in a program's top level, not in loop
bodies, where that convolution then takes a generic path several times slower. cnncli's convolution writes the
input gradient in the form XLA wants (cnncli/ops/conv.py `transposed_conv`); `plain` shows what it avoids.
Rerun this when JAX changes.

    python benchmarks/attack_loops.py runs/resnet20_fashion_mnist --n 500

Every line printed is one JSON object: the convolution, milliseconds per step alone and inside a loop.
"""

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a trained cnncli run")
    p.add_argument("--n", type=int, default=500, help="the first N test images, one batch")
    p.add_argument("--steps", type=int, default=4, help="iterations of the loop")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from cnncli.adversarial.robustness import logits_function
    from cnncli.ops.conv import plain_convolutions
    from cnncli.train.trained_run import eval_data, load_trained

    trained = load_trained(args.run)
    x, _, _ = eval_data(trained, "test")
    model = trained.model
    pixels = jnp.asarray(x[:args.n], jnp.float32) / 255.0

    def ascend(params, rest, v):
        """One signed-gradient step on the first logit: the work of an APGD or PGD iteration."""
        logits_fn = logits_function(model.eval_def, params, rest)
        return v + 1e-3 * jnp.sign(jax.grad(lambda u: logits_fn(u)[:, 0].sum())(v))

    def looped(params, rest, v):
        return jax.lax.fori_loop(0, args.steps, lambda i, u: ascend(params, rest, u), v)

    def ms(fn, calls):
        jax.block_until_ready(fn(model.params, model.rest, pixels))  # compile
        start = time.perf_counter()
        jax.block_until_ready(fn(model.params, model.rest, pixels))
        return round(1000 * (time.perf_counter() - start) / calls, 1)

    for conv, context in (("cnncli", contextlib.nullcontext), ("plain", plain_convolutions)):
        jax.clear_caches()  # the model's forward pass is jitted too: trace it again under this convolution
        with context():
            alone, loop = ms(jax.jit(ascend), 1), ms(jax.jit(looped), args.steps)
        print(json.dumps({"conv": conv, "n": args.n, "ms_per_step_alone": alone, "ms_per_step_in_loop": loop}),
              flush=True)


if __name__ == "__main__":
    main()
