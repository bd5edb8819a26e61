"""GFLOP/s of one 3x3 convolution layer's three passes, XLA's plain convolution against cnncli's.

    PYTHONPATH=. python docs/conv_layers.py                 # cnncli's fast path (CNNCLI_CONV=fast)
    CNNCLI_CONV=xla PYTHONPATH=. python docs/conv_layers.py # XLA's defaults (YNNPACK convolutions)

For each layer shape of a CIFAR ResNet-18 / VGG-16 at batch 128, prints the forward pass, the input
gradient and the weight gradient in GFLOP/s (2 x multiply-accumulates of the direct convolution per
second, whatever algorithm ran), the best of ROUNDS timings of REPEATS calls (docs/performance.md).
"""

import time

import jax

from cnncli.ops.conv import conv2d
from cnncli.runtime import keep_freed_memory

keep_freed_memory()  # as the CLI does: each call's large temporaries stay mapped for the next

BATCH, ROUNDS, REPEATS = 128, 3, 4
LAYERS = [(32, 64, 64), (16, 128, 128), (8, 256, 256), (4, 512, 512), (2, 512, 512)]  # map side, C in, C out
SAME = ((1, 1), (1, 1))


def best_ms(fn, *args) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(REPEATS):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / REPEATS * 1e3)
    return best


def main() -> None:
    key = jax.random.key(0)
    print("map      C in -> out   forward   input grad   weight grad   (GFLOP/s)")
    for side, cin, cout in LAYERS:
        x = jax.random.normal(key, (BATCH, side, side, cin))
        w = jax.random.normal(key, (3, 3, cin, cout)) * 0.01
        g = jax.random.normal(key, (BATCH, side, side, cout))
        gflop = 2 * BATCH * side * side * cin * cout * 9 / 1e9
        passes = [best_ms(lambda x, w: conv2d(x, w, padding=SAME), x, w),
                  best_ms(lambda x, w, g: jax.vjp(lambda x: conv2d(x, w, padding=SAME), x)[1](g)[0], x, w, g),
                  best_ms(lambda x, w, g: jax.vjp(lambda w: conv2d(x, w, padding=SAME), w)[1](g)[0], x, w, g)]
        rates = "   ".join(f"{gflop / ms * 1e3:9.0f}" for ms in passes)
        print(f"{side:2d}x{side:<2d}   {cin:4d} -> {cout:4d}   {rates}")


if __name__ == "__main__":
    main()
